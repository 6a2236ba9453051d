"""The GPU check: one prepared run of at most 8 minutes, for a lent H100/H200.

    python benchmarks/gpu_check.py [--budget-seconds 480] [--out benchmarks/results/gpu_check.json]

Runs, in this order, each step only while the budget lasts (a step that does not
fit is listed under ``skipped`` with the reason, never silently dropped):

1. ``pytest -m gpu``: every GPU test, the conformance suite's GPU backends
   included; capped at a third of the budget.
2. ResNet-50 at 224 px (random weights with non-trivial BN statistics), exported
   once by convforge, through the ``torch`` backend at batch 1 and 256, end to end
   (host<->device copies included) and compute-only (the batch staged on the GPU):
   the goal configurations first (fp16 + channels_last + CUDA graphs; fp16/bf16 +
   channels_last + compile), then the rest of fp32/fp16/bf16 x channels_last x
   compile x CUDA graphs. fp16 programs are also timed end to end with fp16 host
   inputs (half the bytes to copy).
3. ``tensorrt``, ``ort-cuda`` and ``ort-trt`` on the fp16 and fp32 files, where
   they can run.

Goals on an H100/H200: batch 1 at <= 0.7 ms, batch 256 at >= 15,000 images/s
(compute-only; the best configuration of each is named). Writes one JSON: the
environment, the test summary, every record, what was skipped and the verdicts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from convforge import contract
from convforge.builder import create_model
from convforge.export import export_onnx
from convforge.export.onnx_export import serialize
from convforge.export.precision import to_fp16
from convforge.runtime import bench
from convforge.runtime.backends import backend_class

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 256)
GOAL_BATCH1_MS = 0.7
GOAL_BATCH256_IPS = 15_000.0


def _torch_configs() -> list[dict]:
    """Every torch-backend configuration, the ones the goals need first."""
    goals = [
        {"dtype": "fp16", "channels_last": True, "cuda_graphs": True},
        {"dtype": "fp16", "channels_last": True, "compile": True},
        {"dtype": "bf16", "channels_last": True, "compile": True},
        {"dtype": "fp16", "channels_last": True, "compile": True, "cuda_graphs": True},
    ]
    rest = [
        {"dtype": d, "channels_last": cl, "compile": c, "cuda_graphs": g}
        for d in ("fp32", "fp16", "bf16")
        for cl in (False, True)
        for c in (False, True)
        for g in (False, True)
    ]
    seen, ordered = set(), []
    for cfg in goals + rest:
        full = {"channels_last": False, "compile": False, "cuda_graphs": False, **cfg}
        key = tuple(sorted(full.items()))
        if key not in seen:
            seen.add(key)
            ordered.append({"device": "cuda", **full})
    return ordered


def _estimate_s(options: dict) -> float:
    """Rough seconds for one configuration at both batch sizes (compile dominates)."""
    return 90.0 if options.get("compile") else 15.0


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds
        self.skipped: list[dict] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def allows(self, what: str, estimate: float) -> bool:
        if self.left() >= estimate:
            return True
        self.skipped.append(
            {"what": what, "why": f"over the time budget ({self.left():.0f} s left)"}
        )
        return False


def run_gpu_tests(budget: Budget) -> dict:
    limit = max(30.0, min(budget.left() / 3, budget.left() - 60))
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, code = (e.stdout or b"").decode(errors="replace"), "timeout"
    lines = [line for line in out.splitlines() if line.strip()]
    return {
        "command": " ".join(command[2:]),
        "exit_code": code,
        "seconds": round(time.perf_counter() - start, 1),
        "summary": lines[-1] if lines else "",
        "tail": lines[-40:],
    }


def export_resnet50(folder: Path) -> tuple[Path, Path]:
    """ResNet-50 fp32 (+ .pt2) and its fp16 variant, with convforge's exporter."""
    torch.manual_seed(0)
    model = create_model("resnet50").eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_(0, 0.2)
    info = contract.metadata(
        arch="resnet50",
        classes=[str(i) for i in range(1000)],
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        input_size=224,
        resize_size=256,
        channels=3,
        source_sha256="",
    )
    fp32 = folder / "resnet50.onnx"
    export_onnx(model, fp32, input_size=(3, 224, 224), metadata=info)
    fp16 = folder / "resnet50.fp16.onnx"
    fp16.write_bytes(serialize(to_fp16(onnx.load(fp32))))
    return fp32, fp16


def bench_config(name: str, path: Path, options: dict, cfg: bench.BenchConfig) -> list[dict]:
    records = bench.bench_backend(name, str(path), cfg, **options)
    if name == "torch" and options.get("dtype") == "fp16":
        records += _half_host_inputs(path, options, cfg)
    return [{**r, "options": options, "file": path.name} for r in records]


def _half_host_inputs(path: Path, options: dict, cfg: bench.BenchConfig) -> list[dict]:
    """End to end with float16 host batches: what halving the host-to-device copy buys."""
    backend = backend_class("torch")(str(path), **options).load()
    records = []
    try:
        rng = np.random.default_rng(cfg.seed)
        for bs in cfg.batch_sizes:
            batch = rng.standard_normal((bs, 3, 224, 224)).astype(np.float16)
            backend.run(batch)
            samples = bench.timed(lambda b=batch: backend.run(b), cfg)
            records.append(
                {
                    **backend.describe(),
                    "batch_size": bs,
                    "timing": "end-to-end, fp16 host input",
                    **bench.latency_stats(samples, bs),
                }
            )
    finally:
        backend.close()
    return records


def verdicts(records: list[dict]) -> dict:
    def best(batch: int, key: str, pick):
        rows = [r for r in records if r["batch_size"] == batch and r["timing"] == "compute-only"]
        if not rows:
            return None
        r = pick(rows, key=lambda r: r[key])
        return {"value": round(r[key], 3), "backend": r["backend"], "options": r["options"],
                "file": r["file"]}  # fmt: skip

    b1 = best(1, "p50_ms", min)
    b256 = best(256, "throughput_ips", max)
    return {
        "batch1_p50_ms": b1,
        "batch1_goal_ms": GOAL_BATCH1_MS,
        "batch1_met": b1 is not None and b1["value"] <= GOAL_BATCH1_MS,
        "batch256_images_per_s": b256,
        "batch256_goal_ips": GOAL_BATCH256_IPS,
        "batch256_met": b256 is not None and b256["value"] >= GOAL_BATCH256_IPS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    parser.add_argument("--budget-seconds", type=float, default=480.0)
    parser.add_argument("--skip-tests", action="store_true", help="leave out pytest -m gpu")
    args = parser.parse_args()
    budget = Budget(args.budget_seconds)
    result: dict = {"environment": bench.environment(), "budget_seconds": args.budget_seconds}
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device (torch.cuda.is_available() is False)")
    result["tests"] = None if args.skip_tests else run_gpu_tests(budget)
    print(f"tests: {result['tests'] and result['tests']['summary']}", flush=True)

    cfg = bench.BenchConfig(
        batch_sizes=BATCHES, warmup_iters=10, warmup_seconds=0.5, iters=30, seconds=1.0
    )
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32, fp16 = export_resnet50(Path(tmp))
        steps = [("torch", fp32, o) for o in _torch_configs()[:4]]
        steps += [("tensorrt", fp16, {"max_batch": 256, "opt_batch": 256})]
        steps += [("torch", fp32, o) for o in _torch_configs()[4:]]
        steps += [
            ("tensorrt", fp32, {"max_batch": 256, "opt_batch": 256}),
            ("ort-cuda", fp16, {}),
            ("ort-cuda", fp16, {"cuda_graph": True}),
            ("ort-trt", fp16, {"max_batch": 256, "opt_batch": 256}),
            ("ort-cuda", fp32, {}),
        ]
        for name, path, options in steps:
            what = f"{name} {path.name} {options}"
            ok, why = backend_class(name).available()
            if not ok:
                budget.skipped.append({"what": what, "why": why})
                continue
            estimate = _estimate_s(options) if name == "torch" else 150.0
            if not budget.allows(what, estimate):
                continue
            try:
                rows = bench_config(name, path, options, cfg)
            except Exception as e:  # noqa: BLE001 (one failing configuration is a result)
                budget.skipped.append({"what": what, "why": f"failed: {str(e).splitlines()[0]}"})
                continue
            records += rows
            for r in rows:
                print(f"{what} batch {r['batch_size']} {r['timing']}: p50 {r['p50_ms']:.3f} ms, "
                      f"{r['throughput_ips']:.0f} images/s", flush=True)  # fmt: skip
    result.update(records=records, skipped=budget.skipped, verdicts=verdicts(records))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["verdicts"], indent=2))
    print(f"{result['environment'].get('gpu', 'no GPU')}; wrote {args.out}")


if __name__ == "__main__":
    main()
