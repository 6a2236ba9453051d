"""convforge's CPU inference paths side by side with the peers a skilled user reaches for.

    .venv/bin/python benchmarks/cpu_backends.py [--models resnet18,resnet50] [--batches 1,32]
        [--epochs 3] [--rounds 10]

Needs the dev extras plus NNCF (``pip install nncf``) for the OpenVINO INT8 peer.

**Model.** Each architecture (torchvision's layout, 3x224x224 input) is
trained by convforge's own trainer on scikit-learn's digits, upsampled to
224 px and repeated to RGB, with 30% of the images held out (539 validation
images; one image is 0.19 points): 3 epochs of SGD with batch 32, lr 0.05,
cosine schedule, no augmentation (ResNet-50: see ``RECIPES``). The trained
checkpoint and the exports are cached under ``benchmarks/.cache/`` (not
committed), so a rerun only measures.

**Peers** (what a skilled user does without convforge; all from the unfolded
trained module):

* ``torch eager``: the ``nn.Module`` in eval mode under ``torch.inference_mode``.
* ``onnxruntime fp32``: ``torch.onnx.export(..., dynamo=True)`` with its
  defaults, run by an ``InferenceSession`` with default options.
* ``onnxruntime int8``: ONNX Runtime's own tool: ``quant_pre_process`` then
  ``quantize_static`` in QDQ format, per-channel int8 weights, uint8
  activations, ``reduce_range`` (the configuration ORT's documentation gives
  for AVX2 CPUs without VNNI; its S8S8 default is several times slower on them).
* ``openvino fp32``: ``ov.Core().compile_model(onnx, "CPU")`` with no config.
* ``openvino int8 (nncf)``: NNCF post-training quantization of the OpenVINO
  model (``nncf.quantize``, default preset, fast bias correction), compiled
  with no config: the strongest CPU peer.
* ``openvino int8 (nncf) static`` ("tuned peer", reported apart from the goal):
  the same model reshaped to a static batch size before compiling, as
  OpenVINO's performance guide advises; kept to show whether static shapes
  pay (convforge's openvino backend keeps the exported dynamic batch because
  this measured no gain).

Both int8 peers calibrate on 256 training images, like convforge's export.

**convforge** paths: ``convforge export --int8`` (``--int8-target cpu``,
minmax calibration, ``--int8-max-drop 0.5``: layers stay in float until the
int8 file is within 0.5 points of fp32) writes ``model.onnx``, ``model.pt2``
and ``model.int8.onnx`` (unless no mix fits); each runs through convforge's
runtime backends (``ort-cpu``, ``openvino``, ``torch``) with their default
options. The "best path" is the fastest convforge path whose top-1 is within
0.5 points of the trained fp32 module (torch eager); "int8 speedups" compare
each backend's int8 file with its fp32 file (goal: >= 1.5x on ResNet-50).

**convforge tune** (one path per batch size): ``convforge tune`` over
``model.onnx`` and ``model.int8.onnx`` with nothing named (every available
backend, its settings, both files; accuracy on the validation images, 0.5
points allowed; ``--tune-budget`` seconds), then the plan's choice for that
batch size. Goal: <= 1.0x the fastest peer at equal accuracy, i.e. among the
peers whose top-1 is within the same 0.5 points (the ratio to the fastest peer
of any accuracy is reported too). The plan is cached as ``plan.json`` beside
the exports.

**Timing.** Per batch size, every path is loaded, warmed up, then measured
in ``--rounds`` rounds; within a round each path runs a few times in turn,
so all paths share the machine's noise. Each turn opens with one untimed
call: the engine before may leave its threads spinning, which made first
calls ~2x slower (``ort_int8_batch1.py``). Inputs are preprocessed validation
images (preprocessing is outside the timing for everyone). Latency is the
median per call; ratios are convforge's best path over the fastest peer
(goal: <= 0.9). Writes ``benchmarks/results/cpu_backends.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov
import torch

from convforge.builder.checkpoint import Checkpoint, load_checkpoint
from convforge.builder.data import augment
from convforge.builder.data.augment import AugmentConfig
from convforge.builder.data.sources import load_dataset
from convforge.builder.training import trainer
from convforge.builder.training.config import TrainConfig, recipe_model
from convforge.errors import UserError
from convforge.export import ExportOptions, export_checkpoint
from convforge.runtime import backends
from convforge.runtime.bench import latency_stats
from convforge.runtime.environment import environment
from convforge.runtime.model import load_plan

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).parent / ".cache" / "cpu_backends"
SIZE = 224
VAL_FRACTION = 0.3
SEED = 0
CALIB_SAMPLES = 256
ACCURACY_GOAL_PT = 0.5  # convforge's path may lose at most this much top-1 against fp32
LATENCY_GOAL = 0.9  # convforge's best / fastest peer
INT8_SPEEDUP_GOAL = 1.5  # convforge int8 over its own fp32, same backend
TUNE_GOAL = 1.0  # convforge tune's choice / fastest peer, nothing named by the user


@dataclass
class Runner:
    """One way of running the model: a name, who provides it, and how to call it."""

    name: str
    owner: str  # "peer" (the goal compares against these), "tuned peer" or "convforge"
    precision: str
    run: Callable[[np.ndarray], np.ndarray]
    close: Callable[[], None] = lambda: None
    batch_size: int | None = None  # a path planned for one batch size only


# ---- the trained model ------------------------------------------------------------------


# ResNet-50 with the defaults (plain init, lr 0.05) blew up in its first epoch here (train
# top-1 13%, val loss 1e6): it starts with its residual blocks as identity and a lower lr,
# and learns more slowly (75% after 3 epochs), so it gets 6.
DEFAULT_EPOCHS = 3
RECIPES = {"resnet50": {"lr": 0.02, "zero_init_residual": True, "epochs": 6}}


def train_config(arch: str, epochs: int, lr: float | None) -> TrainConfig:
    return TrainConfig(
        lr=lr,
        dataset="digits",
        input_size=SIZE,
        val_fraction=VAL_FRACTION,
        augment=AugmentConfig(preset="none"),  # a few epochs: augmentation would only slow them
        epochs=epochs,
        batch_size=32,
        channels_last=True,
        seed=SEED,
        out=str(CACHE / arch),
    )


def trained(arch: str, epochs: int | None) -> Path:
    """best.pt of ``arch`` trained for ``epochs``: from the cache, resumed, or trained now.

    ``epochs`` None: the recipe's. Training anew clears the cached exports.
    """
    recipe = RECIPES.get(arch, {})
    epochs = epochs or recipe.get("epochs", DEFAULT_EPOCHS)
    cfg = train_config(arch, epochs, recipe.get("lr"))
    out = Path(cfg.out)
    stamp = out / "bench.json"
    want = {**recipe, "arch": arch, "epochs": epochs, "size": SIZE, "val_fraction": VAL_FRACTION}
    cached = json.loads(stamp.read_text()) if stamp.exists() else None
    if cached == {**want, "done": True}:
        return out / "best.pt"
    resume = out / "last.pt" if cached == want and (out / "last.pt").exists() else None
    shutil.rmtree(out / "onnx", ignore_errors=True)  # exports of an older model
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(want))
    bundle = trainer.load_data(cfg, channels=3)
    model_cfg = recipe_model(arch, SIZE, zero_init_residual=recipe.get("zero_init_residual", False))
    trainer.train(model_cfg, cfg, bundle=bundle, resume=resume)
    stamp.write_text(json.dumps({**want, "done": True}))
    return out / "best.pt"


def images(ck: Checkpoint) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(validation images, their labels, calibration images), preprocessed for the model."""
    data = ck.data_config
    bundle = load_dataset("digits", val_fraction=VAL_FRACTION, seed=SEED, channels=3)
    tf = augment.eval_transform(SIZE, data["mean"], data["std"], bundle.native_size)

    def stack(split, idx):
        view = split.with_transform(tf)
        return torch.stack([view[i][0] for i in idx]).numpy().astype(np.float32)

    val = stack(bundle.val, range(len(bundle.val)))
    calib_idx = np.random.default_rng(1).permutation(len(bundle.train))[:CALIB_SAMPLES]
    return val, np.asarray(bundle.val.targets), stack(bundle.train, calib_idx.tolist())


def module(ck: Checkpoint) -> torch.nn.Module:
    return ck.build_model().eval()


# ---- peers ------------------------------------------------------------------------------


def peer_onnx(model: torch.nn.Module, path: Path) -> None:
    """The plain export a user writes: torch.onnx with its defaults and a dynamic batch."""
    x = torch.zeros(1, 3, SIZE, SIZE)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(
            model, (x,), dynamo=True, input_names=["input"], dynamic_shapes=({0: batch},)
        )
    program.save(str(path))


def ort_int8(source: Path, out: Path, calib: np.ndarray) -> None:
    from calibration_memory import one_pass  # ORT's quantize_static, as its docs show it

    one_pass(source, out, calib)


def nncf_int8(source: Path, calib: np.ndarray):
    import nncf

    data = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))])
    return nncf.quantize(ov.convert_model(str(source)), data, subset_size=len(calib))


def ort_path(name: str, path: Path, precision: str) -> Runner:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    return Runner(name, "peer", precision, lambda x: session.run(None, {feed: x})[0])


def ov_path(name: str, model, precision: str, owner: str = "peer", static: bool = False):
    """OpenVINO with no config; ``static``: the model reshaped to each batch size it meets."""
    core = ov.Core()
    requests = {}

    def run(x):
        key = len(x) if static else None
        if key not in requests:
            m = core.read_model(model) if isinstance(model, str) else model.clone()
            if static:
                m.reshape({0: [len(x), 3, SIZE, SIZE]})
            requests[key] = core.compile_model(m, "CPU").create_infer_request()
        requests[key].infer({0: x})
        return requests[key].get_output_tensor(0).data.copy()

    return Runner(name, owner, precision, run, requests.clear)


def torch_path(model: torch.nn.Module) -> Runner:
    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return Runner("torch eager", "peer", "fp32", run)


def peers(ck: Checkpoint, work: Path, calib: np.ndarray) -> list[Runner]:
    model = module(ck)
    fp32 = work / "peer.onnx"
    int8 = work / "peer.int8.onnx"
    if not fp32.exists():
        peer_onnx(model, fp32)
    if not int8.exists():
        ort_int8(fp32, int8, calib)
    nncf_model = nncf_int8(fp32, calib)
    return [
        torch_path(model),
        ort_path("onnxruntime fp32", fp32, "fp32"),
        ort_path("onnxruntime int8", int8, "int8"),
        ov_path("openvino fp32", str(fp32), "fp32"),
        ov_path("openvino int8 (nncf)", nncf_model, "int8"),
        # Beyond the defaults: OpenVINO's advice to compile for static shapes.
        ov_path("openvino int8 (nncf) static", nncf_model, "int8", "tuned peer", static=True),
    ]


# ---- convforge --------------------------------------------------------------------------


def exported(checkpoint: Path, work: Path) -> tuple[Path, str]:
    """convforge export --int8 of ``checkpoint`` into ``work`` (cached), and its int8 story.

    The int8 file keeps top-1 within ``ACCURACY_GOAL_PT`` of fp32
    (``--int8-max-drop``): layers stay in float until it fits. Returns the
    fp32 path and what became of int8: the layers kept in float, or why it
    was refused (the fp32 export then stands alone).
    """
    out = work / "model.onnx"
    refused = work / "int8_refused.txt"
    report = out.with_suffix(".export.json")
    if out.with_suffix(".int8.onnx").exists() and report.exists():
        return out, int8_story(report)
    if refused.exists() and out.exists():
        print(f"[{checkpoint.parent.name}] {refused.read_text()}", flush=True)
        return out, f"refused: {refused.read_text()}"
    opts = ExportOptions(
        int8=True, int8_target="cpu", calib_samples=CALIB_SAMPLES, int8_max_drop=ACCURACY_GOAL_PT
    )
    try:
        export_checkpoint(checkpoint, out, opts)
        return out, int8_story(report)
    except UserError as e:  # the accuracy search found no mix, or validation failed
        refused.write_text(str(e))
        print(f"[{checkpoint.parent.name}] {e}", flush=True)
    export_checkpoint(checkpoint, out, ExportOptions())
    return out, f"refused: {refused.read_text()}"


def int8_story(report: Path) -> str:
    """What the export's accuracy search did, in one line, from its report."""
    search = json.loads(report.read_text())["variants"]["int8"].get("int8_search")
    if not search or not search["float_layers"]:
        return "minmax, every layer int8"
    kept = search["float_layers"]
    return f"minmax, {len(kept)} of {search['layers']} layers kept in float: {', '.join(kept)}"


def convforge_paths(onnx_path: Path, with_int8: bool) -> list[Runner]:
    int8 = onnx_path.with_suffix(".int8.onnx")
    program = onnx_path.with_suffix(".pt2")
    made = []
    for backend, path, precision in (
        ("ort-cpu", onnx_path, "fp32"),
        ("ort-cpu", int8, "int8"),
        ("openvino", onnx_path, "fp32"),
        ("openvino", int8, "int8"),
        ("torch", program, "fp32"),
    ):
        if precision == "int8" and not with_int8:
            continue
        b = backends.create(backend, str(path))
        b.load()
        made.append(Runner(f"convforge {backend}", "convforge", precision, b.run, b.close))
    return made


def tuned_paths(work: Path, files: list[Path], batches: list[int], budget: float) -> list[Runner]:
    """``convforge tune`` over ``files`` (no backend or precision named), then its plan's
    choice per batch size as one path each. The plan is cached beside the exports."""
    from convforge.runtime.plan import Plan
    from convforge.runtime.tune import TuneConfig, tune

    plan_path = work / "plan.json"
    if plan_path.exists():
        plan = Plan.read(plan_path)
        if sorted(e.batch_size for e in plan.entries) != sorted(batches):
            plan = None
    else:
        plan = None
    if plan is None:
        bundle = load_dataset("digits", val_fraction=VAL_FRACTION, seed=SEED, channels=3)
        raw = [bundle.val.load(i).numpy().transpose(1, 2, 0) for i in range(len(bundle.val))]
        cfg = TuneConfig(batch_sizes=tuple(batches), budget_seconds=budget, max_images=len(raw))
        plan = tune([str(f) for f in files], raw, list(bundle.val.targets), cfg, dataset="digits")
        plan.write(plan_path)
    made = []
    for bs in batches:
        entry = plan.entry(bs)
        model = load_plan(plan, bs, check=False)
        settings = " ".join(f"{k}={v}" for k, v in entry.options.items())
        print(f"[tune] batch {bs}: {entry.backend} {Path(entry.file).name} {settings}", flush=True)
        made.append(
            Runner(
                f"convforge tune (bs {bs}: {entry.backend} {settings})".replace(" )", ")"),
                "convforge tune",
                entry.precision,
                model.backend.run,
                model.close,
                batch_size=bs,
            )
        )
    return made


# ---- measuring --------------------------------------------------------------------------


def top1(runner: Runner, x: np.ndarray, y: np.ndarray) -> float:
    hits = 0
    for i in range(0, len(x), 32):
        hits += int((runner.run(x[i : i + 32]).argmax(1) == y[i : i + 32]).sum())
    return 100.0 * hits / len(y)


def latencies(paths: list[Runner], x: np.ndarray, rounds: int) -> list[list[float]]:
    """Per path, ms per call; the paths take turns within each round (shared noise)."""
    calls = 5 if len(x) == 1 else 1
    for p in paths:
        for _ in range(3 if len(x) == 1 else 1):
            p.run(x)
    samples: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for p, s in zip(paths, samples, strict=True):
            p.run(x)  # untimed: the path before may leave threads spinning (ort_int8_batch1)
            for _ in range(calls):
                t = time.perf_counter()
                p.run(x)
                s.append((time.perf_counter() - t) * 1e3)
    return samples


def measure(arch: str, epochs: int, batches: list[int], rounds: int, tune_budget: float) -> dict:
    checkpoint = trained(arch, epochs)
    work = CACHE / arch / "onnx"
    work.mkdir(parents=True, exist_ok=True)
    ck = load_checkpoint(checkpoint)
    val, labels, calib = images(ck)
    t = time.perf_counter()
    onnx_path, int8 = exported(checkpoint, work)
    with_int8 = not int8.startswith("refused")
    print(f"[{arch}] export ready in {time.perf_counter() - t:.0f} s", flush=True)
    paths = peers(ck, work, calib) + convforge_paths(onnx_path, with_int8)
    files = [onnx_path, onnx_path.with_suffix(".int8.onnx")] if with_int8 else [onnx_path]
    paths += tuned_paths(work, files, batches, tune_budget)
    records = []
    accuracy = {}
    for p in paths:
        accuracy[p.name, p.precision] = top1(p, val, labels)
        print(
            f"[{arch}] {p.name} {p.precision}: top-1 {accuracy[p.name, p.precision]:.2f}%",
            flush=True,
        )
    reference = accuracy["torch eager", "fp32"]  # the trained module itself
    for bs in batches:
        x = np.ascontiguousarray(val[:bs])
        here = [p for p in paths if p.batch_size in (None, bs)]
        for p, s in zip(here, latencies(here, x, rounds), strict=True):
            acc = accuracy[p.name, p.precision]
            records.append(
                {
                    "model": arch,
                    "path": p.name,
                    "owner": p.owner,
                    "precision": p.precision,
                    "batch_size": bs,
                    "top1": round(acc, 2),
                    "top1_delta_pt": round(acc - reference, 2),
                    **{
                        k: round(v, 4) if isinstance(v, float) else v
                        for k, v in latency_stats(s, bs).items()
                    },
                }
            )
            print(
                f"[{arch}] bs {bs} {p.name} {p.precision}: p50 {records[-1]['p50_ms']:.2f} ms",
                flush=True,
            )
    for p in paths:
        p.close()
    trained_as = json.loads((checkpoint.parent / "bench.json").read_text())
    trained_as.pop("done", None)
    return {
        "model": arch,
        "trained": trained_as,
        "val_images": len(labels),
        "convforge_int8": int8,
        "records": records,
    }


def verdicts(records: list[dict]) -> list[dict]:
    """Per model and batch: convforge's best accurate path against the fastest peer."""
    out = []
    keys = sorted({(r["model"], r["batch_size"]) for r in records})
    for model, bs in keys:
        rows = [r for r in records if r["model"] == model and r["batch_size"] == bs]
        peer = min((r for r in rows if r["owner"] == "peer"), key=lambda r: r["p50_ms"])
        # The "equal accuracy": a peer within the same budget convforge's paths keep.
        accurate_peers = [
            r for r in rows if r["owner"] == "peer" and r["top1_delta_pt"] >= -ACCURACY_GOAL_PT
        ]
        fair = min(accurate_peers, key=lambda r: r["p50_ms"])
        ours = min(
            (
                r
                for r in rows
                if r["owner"] == "convforge" and r["top1_delta_pt"] >= -ACCURACY_GOAL_PT
            ),
            key=lambda r: r["p50_ms"],
        )
        ratio = ours["p50_ms"] / peer["p50_ms"]
        tuned = [r for r in rows if r["owner"] == "tuned peer"]
        tuned_p50 = min(r["p50_ms"] for r in tuned) if tuned else None
        planned = next((r for r in rows if r["owner"] == "convforge tune"), None)
        tune_ratio = planned["p50_ms"] / fair["p50_ms"] if planned else None
        out.append(
            {
                "model": model,
                "batch_size": bs,
                "fastest_peer": f"{peer['path']} {peer['precision']}",
                "fastest_peer_p50_ms": peer["p50_ms"],
                "fastest_peer_top1_delta_pt": peer["top1_delta_pt"],
                "fastest_peer_within_budget": f"{fair['path']} {fair['precision']}",
                "fastest_peer_within_budget_p50_ms": fair["p50_ms"],
                "convforge_best": f"{ours['path']} {ours['precision']}",
                "convforge_best_p50_ms": ours["p50_ms"],
                "ratio": round(ratio, 3),
                "latency_goal_met": ratio <= LATENCY_GOAL,
                "convforge_top1_delta_pt": ours["top1_delta_pt"],
                "tuned_peer_p50_ms": tuned_p50,
                "ratio_to_tuned_peer": round(ours["p50_ms"] / tuned_p50, 3) if tuned else None,
                "tune_choice": planned and f"{planned['path']} {planned['precision']}",
                "tune_p50_ms": planned and planned["p50_ms"],
                "tune_ratio": tune_ratio and round(tune_ratio, 3),  # to the peer within budget
                "tune_ratio_to_fastest_peer": planned
                and round(planned["p50_ms"] / peer["p50_ms"], 3),
                "tune_top1_delta_pt": planned and planned["top1_delta_pt"],
                "tune_goal_met": planned is not None
                and tune_ratio <= TUNE_GOAL
                and planned["top1_delta_pt"] >= -ACCURACY_GOAL_PT,
            }
        )
    return out


def int8_speedups(records: list[dict]) -> list[dict]:
    """convforge's int8 file against its fp32 file, per backend, model and batch size."""
    out = []
    for r in records:
        if r["owner"] != "convforge" or r["precision"] != "int8":
            continue
        fp32 = next(
            f
            for f in records
            if (f["model"], f["path"], f["batch_size"]) == (r["model"], r["path"], r["batch_size"])
            and f["precision"] == "fp32"
        )
        speedup = fp32["p50_ms"] / r["p50_ms"]
        out.append(
            {
                "model": r["model"],
                "backend": r["path"].removeprefix("convforge "),
                "batch_size": r["batch_size"],
                "fp32_p50_ms": fp32["p50_ms"],
                "int8_p50_ms": r["p50_ms"],
                "speedup": round(speedup, 3),
                "goal_met": speedup >= INT8_SPEEDUP_GOAL,
                "int8_top1_delta_pt": round(r["top1"] - fp32["top1"], 2),
            }
        )
    return out


def table(records: list[dict]) -> str:
    lines = [
        f"{'model':9} {'bs':>3} {'path':30} {'prec':5} {'p50 ms':>9} {'img/s':>8} "
        f"{'top-1':>7} {'delta':>6}"
    ]
    for r in records:
        lines.append(
            f"{r['model']:9} {r['batch_size']:>3} {r['path']:30} {r['precision']:5} "
            f"{r['p50_ms']:9.2f} {r['throughput_ips']:8.1f} {r['top1']:7.2f} "
            f"{r['top1_delta_pt']:+6.2f}"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--epochs", type=int, help="training epochs for every model (default: recipe)")
    p.add_argument("--rounds", type=int, default=10, help="measurement rounds per batch size")
    p.add_argument("--tune-budget", type=float, default=300, help="convforge tune's budget (s)")
    p.add_argument("--out", default=str(RESULTS / "cpu_backends.json"))
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("nncf").setLevel(logging.ERROR)
    started = time.time()
    runs = []
    for arch in a.models.split(","):
        batches = [int(b) for b in a.batches.split(",")]
        runs.append(measure(arch, a.epochs, batches, a.rounds, a.tune_budget))
        gc.collect()
    records = [r for run in runs for r in run["records"]]
    result = {
        "benchmark": "cpu_backends",
        "environment": {
            **environment(),
            "nncf": _version("nncf"),
            "openvino": ov.__version__.split("-")[0],
        },
        "settings": {
            "input": f"3x{SIZE}x{SIZE}",
            "dataset": "digits (upsampled, RGB)",
            "val_images": runs[0]["val_images"],
            "rounds": a.rounds,
            "calibration_images": CALIB_SAMPLES,
            "metric": "median latency per call (p50_ms)",
        },
        "models": [{k: v for k, v in run.items() if k != "records"} for run in runs],
        "verdicts": verdicts(records),
        "int8_speedups": int8_speedups(records),
        "records": records,
        "seconds": round(time.time() - started, 1),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(a.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, a.out)
    print(table(records))
    for v in result["verdicts"]:
        print(
            f"{v['model']} bs {v['batch_size']}: {v['convforge_best']} "
            f"{v['convforge_best_p50_ms']:.2f} ms vs {v['fastest_peer']} "
            f"{v['fastest_peer_p50_ms']:.2f} ms: ratio {v['ratio']:.3f} "
            f"(goal <= {LATENCY_GOAL}), top-1 delta {v['convforge_top1_delta_pt']:+.2f} pt"
        )
        if v["tune_choice"]:
            print(
                f"  tune: {v['tune_choice']} {v['tune_p50_ms']:.2f} ms: ratio "
                f"{v['tune_ratio']:.3f} to {v['fastest_peer_within_budget']} (goal <= "
                f"{TUNE_GOAL}; {v['tune_ratio_to_fastest_peer']:.3f} to the fastest peer), "
                f"top-1 delta {v['tune_top1_delta_pt']:+.2f} pt"
            )
    for v in result["int8_speedups"]:
        print(
            f"{v['model']} bs {v['batch_size']} {v['backend']}: int8 {v['int8_p50_ms']:.2f} ms vs "
            f"fp32 {v['fp32_p50_ms']:.2f} ms: x{v['speedup']:.2f} (goal >= {INT8_SPEEDUP_GOAL}), "
            f"top-1 {v['int8_top1_delta_pt']:+.2f} pt"
        )
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
