"""JPEG file -> top-5, end to end: convforge's ``Model.predict`` against the peer pipeline.

    .venv/bin/pip install nncf                       # the peer's int8 quantizer
    .venv/bin/python benchmarks/e2e_latency.py [--plan plan.json] [--rounds 10] [--iters 20]
        [--checkpoint best.pt]

**Model.** ResNet-18 at 224 px: the checkpoint ``benchmarks/cpu_backends.py``
trains (``trained("resnet18", None)``, cached under ``benchmarks/.cache/``),
or ``--checkpoint``. convforge exports it with ``--int8 --input-format uint8``
(``model.int8.uint8.onnx``: int8, uint8 NHWC pixels in, the /255, mean and std
in the graph); the export is cached per checkpoint under
``benchmarks/.cache/e2e_latency/``.

**Inputs.** Photo-like JPEGs generated here (smooth gradients, shapes, noise;
quality 90; no downloads): 8 at 500x375 and 8 at 4000x3000.

**Peer**, as a skilled user writes it: PIL ``Image.open(...).convert("RGB")``,
torchvision transforms v2 (``ToImage``, ``Resize(256, antialias=True)``,
``CenterCrop(224)``, ``ToDtype(float32, scale=True)``, ``Normalize``), the
model exported by ``torch.onnx.export`` and quantized by NNCF
(``nncf.quantize``, 256 calibration images), compiled by OpenVINO with no
config; softmax and top-5 in numpy. A batch is decoded and transformed image by
image, then stacked.

**convforge**: ``convforge tune`` over the export's uint8-input files
(``model.uint8.onnx`` and ``model.int8.uint8.onnx``) at batch 1 and 32, with no
backend or precision named (the plan is cached beside the export; ``--plan``
gives another one, which must be tuned over this export's files), then
``convforge.runtime.load(..., plan=...)`` and ``Model.predict(paths, topk=5)``:
its own decode (JPEG draft mode, crop-box resize, a thread pool for batches)
straight to uint8 pixels, run by the plan's configuration for the batch size.

**Timing.** Both pipelines are loaded and warmed up, then measured in
``--rounds`` rounds; within a round, per image size, the two take turns (the
order alternates by round): at batch 1, ``--iters`` calls each, one image per
call, cycling through the files; at batch 32, ``max(1, iters // 8)`` calls of 32
files each. Every call is timed from file path to top-5 (files are in the page
cache after the warm-up, as on a server that just received them). Reported:
p50 ms per image at batch 1, images/s at batch 32 (32 / median call time), and
the ratios convforge / peer (goal: p50 <= 0.75x on both sizes). Writes
``benchmarks/results/e2e_latency.json`` with the machine
(``convforge.runtime.environment.environment``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov
import torch
from PIL import Image
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parents[1]

from cpu_backends import (  # noqa: E402 (benchmarks/ is the script's own folder)
    CALIB_SAMPLES,
    images,
    module,
    nncf_int8,
    peer_onnx,
    trained,
)

from convforge.builder.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from convforge.builder.data.synthetic import photo  # noqa: E402
from convforge.contract import sha256_of  # noqa: E402
from convforge.export import ExportOptions, export_checkpoint  # noqa: E402
from convforge.files import write_text  # noqa: E402
from convforge.runtime import load  # noqa: E402
from convforge.runtime.environment import environment  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "e2e_latency.json"
CACHE = ROOT / "benchmarks" / ".cache" / "e2e_latency"
SIZES = ((500, 375), (4000, 3000))
FILES_PER_SIZE = 8
BATCHES = (1, 32)
GOAL = 0.75  # convforge p50 / peer p50 at batch 1, on both sizes


def jpegs() -> dict[str, list[str]]:
    """``"500x375"`` -> the generated JPEG paths of that size (made once, then cached)."""
    out = {}
    for w, h in SIZES:
        folder = CACHE / "images"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(FILES_PER_SIZE):
            path = folder / f"photo-{w}x{h}-{i}.jpg"
            if not path.exists():
                photo(w, h, seed=i).save(path, quality=90)
            paths.append(str(path))
        out[f"{w}x{h}"] = paths
    return out


def exported(checkpoint: Path) -> Path:
    """convforge's export of ``checkpoint`` (int8 + uint8 input), cached by its sha256."""
    work = CACHE / sha256_of(checkpoint)[:16]
    out = work / "model.onnx"
    if not out.with_suffix(".int8.uint8.onnx").exists():
        work.mkdir(parents=True, exist_ok=True)
        opts = ExportOptions(int8=True, calib_samples=CALIB_SAMPLES, input_format="uint8")
        print(export_checkpoint(checkpoint, out, opts).format(), flush=True)
    return out


class Peer:
    """PIL decode + torchvision transforms v2 + the NNCF int8 model on OpenVINO (no config)."""

    name = "peer: PIL + torchvision v2 + OpenVINO NNCF int8"

    def __init__(self, ck: Checkpoint, work: Path) -> None:
        data = ck.data_config
        self.transform = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(256, antialias=True),
                v2.CenterCrop(224),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(data["mean"], data["std"]),
            ]
        )
        source = work / "peer.onnx"
        if not source.exists():
            peer_onnx(module(ck), source)
        calib = images(ck)[2]
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars
            quantized = nncf_int8(source, calib)
        self.request = ov.Core().compile_model(quantized, "CPU").create_infer_request()

    def top5(self, paths: list[str]) -> np.ndarray:
        batch = torch.stack([self.transform(Image.open(p).convert("RGB")) for p in paths])
        self.request.infer({0: batch.numpy()})
        logits = self.request.get_output_tensor(0).data
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        return np.argsort(-probs, axis=1, kind="stable")[:, :5]


def tuned(onnx: Path, budget: float) -> Path:
    """``convforge tune`` over the uint8-input files (fp32 and int8) at batch 1 and 32, with
    nothing named: every available backend, its settings, accuracy on the validation split
    the files' metadata names. Cached beside the export."""
    from convforge.cli import main as convforge

    plan = onnx.parent / "plan.json"
    if not plan.exists():
        files = [str(onnx.with_suffix(".uint8.onnx")), str(onnx.with_suffix(".int8.uint8.onnx"))]
        argv = ["tune", *files, "--batch-sizes", ",".join(map(str, BATCHES))]
        if convforge([*argv, "--budget-seconds", str(budget), "-o", str(plan)]) != 0:
            raise SystemExit("convforge tune failed")
    return plan


class Convforge:
    """``load(...)`` + ``Model.predict(paths, topk=5)`` running the plan's configuration for
    each batch size."""

    def __init__(self, plan: Path) -> None:
        from convforge.runtime.plan import Plan

        tuned = Plan.read(plan)
        self.models = {n: load(tuned.model, batch_size=n, plan=tuned) for n in BATCHES}
        self.name = f"convforge: predict with the plan {plan}"
        self.described = {
            n: {**m.backend.describe(), "file": Path(m.backend.path).name}
            for n, m in self.models.items()
        }

    def top5(self, paths: list[str]) -> np.ndarray:
        model = self.models.get(len(paths), self.models[32])
        return np.array([[p.index for p in top] for top in model.predict(paths, topk=5)])


def timed(pipeline, paths: list[str]) -> float:
    start = time.perf_counter()
    pipeline.top5(paths)
    return (time.perf_counter() - start) * 1000


def measure(peer: Peer, ours: Convforge, files: dict, rounds: int, iters: int) -> dict:
    """{(size, batch, "peer"|"convforge"): [ms per call]} over interleaved rounds."""
    times: dict = {}
    for paths in files.values():  # warm-up: page cache, OpenVINO's first inferences
        for pipeline in (peer, ours):
            for n in BATCHES:
                timed(pipeline, (paths * 32)[:n])
    calls = {1: iters, 32: max(1, iters // 8)}
    for r in range(rounds):
        for size, paths in files.items():
            for n in BATCHES:
                order = (("peer", peer), ("convforge", ours))
                for who, pipeline in order if r % 2 == 0 else order[::-1]:
                    for i in range(calls[n]):
                        chosen = [paths[(i * n + j) % len(paths)] for j in range(n)]
                        times.setdefault((size, n, who), []).append(timed(pipeline, chosen))
        print(f"round {r + 1}/{rounds} done", flush=True)
    return times


def agreement(peer: Peer, ours: Convforge, files: dict) -> dict:
    """Top-1 and top-5 set agreement of the two pipelines on every file (a sanity check)."""
    out = {}
    for size, paths in files.items():
        a, b = peer.top5(paths), ours.top5(paths)
        out[size] = {
            "top1": float((a[:, 0] == b[:, 0]).mean()),
            "top5_sets": float(np.mean([set(x) == set(y) for x, y in zip(a, b, strict=True)])),
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", help="a convforge tune plan over this benchmark's export "
                   "(default: tune one, cached)")  # fmt: skip
    p.add_argument("--tune-budget", type=float, default=300, help="convforge tune's budget (s)")
    p.add_argument("--checkpoint", help="default: cpu_backends' trained ResNet-18")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--iters", type=int, default=20, help="batch-1 calls per pipeline per round")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args()

    checkpoint = Path(args.checkpoint) if args.checkpoint else trained("resnet18", None)
    ck = load_checkpoint(checkpoint)
    onnx = exported(checkpoint)
    files = jpegs()
    plan = Path(args.plan) if args.plan else tuned(onnx, args.tune_budget)
    peer, ours = Peer(ck, onnx.parent), Convforge(plan)
    print(f"{peer.name}\n{ours.name}", flush=True)
    times = measure(peer, ours, files, args.rounds, args.iters)

    records, verdicts = [], []
    for size in files:
        row = {"size": size}
        for n in BATCHES:
            for who in ("peer", "convforge"):
                t = np.asarray(times[(size, n, who)])
                key = f"{who}_bs{n}"
                row[f"{key}_p50_ms_per_image"] = round(float(np.median(t)) / n, 3)
                row[f"{key}_p90_ms_per_image"] = round(float(np.percentile(t, 90)) / n, 3)
                row[f"{key}_images_per_s"] = round(n * 1000 / float(np.median(t)), 2)
                row[f"{key}_calls"] = len(t)
            row[f"ratio_bs{n}_p50"] = round(
                row[f"convforge_bs{n}_p50_ms_per_image"] / row[f"peer_bs{n}_p50_ms_per_image"], 3
            )
        verdicts.append({"size": size, "ratio": row["ratio_bs1_p50"], "goal": GOAL,
                         "met": row["ratio_bs1_p50"] <= GOAL})  # fmt: skip
        records.append(row)
    result = {
        "benchmark": "e2e_latency",
        "measured": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "environment": environment(),
        "config": {"rounds": args.rounds, "iters": args.iters, "files_per_size": FILES_PER_SIZE,
                   "checkpoint": str(checkpoint), "plan": str(plan)},  # fmt: skip
        "pipelines": {"peer": peer.name, "convforge": ours.name,
                      "convforge_settings": {str(k): v for k, v in ours.described.items()}},
        "agreement": agreement(peer, ours, files),
        "records": records,
        "verdicts": verdicts,
    }  # fmt: skip
    write_text(Path(args.out), json.dumps(result, indent=2) + "\n")
    print(f"{'size':<10} {'bs1 p50 peer':>13} {'convforge':>10} {'ratio':>6}   "
          f"{'bs32 img/s peer':>15} {'convforge':>10}")  # fmt: skip
    for row in records:
        print(
            f"{row['size']:<10} {row['peer_bs1_p50_ms_per_image']:>10.2f} ms "
            f"{row['convforge_bs1_p50_ms_per_image']:>7.2f} ms {row['ratio_bs1_p50']:>6.2f}   "
            f"{row['peer_bs32_images_per_s']:>15.1f} {row['convforge_bs32_images_per_s']:>10.1f}"
        )
    for v in verdicts:
        print(f"{v['size']}: convforge / peer p50 = {v['ratio']:.2f} "
              f"(goal <= {GOAL}): {'met' if v['met'] else 'NOT met'}")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
