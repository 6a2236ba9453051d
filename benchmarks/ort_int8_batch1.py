"""Why ONNX Runtime's int8 ResNet-18 at batch 1 looked barely faster than fp32 (19 vs 21 ms).

    .venv/bin/python benchmarks/ort_int8_batch1.py [--runs 200]

``benchmarks/cpu_backends.py`` measured convforge's ``ort-cpu`` int8 ResNet-18
(trained) at a p50 of 19.05 ms against 20.47 ms in fp32, with a minimum of
11.3 ms and a coefficient of variation of 0.22 (fp32: 0.07): a bimodal
distribution. A random-weight model had measured 11 ms. Candidate causes, each
measured here on the same files, batch 1, in one run:

1. **Weights** (trained vs random): the same architecture exported and
   quantized the same way, timed alone.
2. **Neighbours**: cpu_backends keeps every path loaded and runs them in
   turns. ONNX Runtime's intra-op threads spin after a run ends (``allow_spinning``,
   on by default), so a session that ran just before can hold a core while
   the next one starts. Timed: int8 alone; int8 in turns with the fp32
   session (as cpu_backends does, 5 calls per turn); the same with spinning
   off in both sessions (``session.intra_op.allow_spinning = 0``).
3. **The graph**: ONNX Runtime's optimized int8 graph (``optimized_model_filepath``):
   Q/DQ pairs left unfused and float ops between int8 ones; and its profiler's
   time per op type.
4. **Denormals**: ``session.set_denormal_as_zero = 1``.

Files: the convforge exports of the trained ResNet-18 in
``benchmarks/.cache/cpu_backends/resnet18/onnx`` (run cpu_backends.py first), and a
random-weight ResNet-18 exported and quantized by the same code. Writes
``benchmarks/results/ort_int8_batch1.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

RESULTS = Path(__file__).parent / "results"
TRAINED = Path(__file__).parent / ".cache" / "cpu_backends" / "resnet18" / "onnx"
RANDOM = Path(__file__).parent / ".cache" / "ort_int8_batch1"


def random_weight_exports() -> Path:
    """model.onnx + model.int8.onnx of a random-weight ResNet-18, as convforge exports them."""
    import torch

    from convforge.builder import create_model
    from convforge.export import export_onnx
    from convforge.export.int8 import to_int8
    from convforge.export.onnx_export import serialize

    out = RANDOM / "model.onnx"
    if not out.with_suffix(".int8.onnx").exists():
        RANDOM.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        report = export_onnx(create_model("resnet18").eval(), out, (3, 224, 224))
        calib = np.random.default_rng(0).standard_normal((256, 3, 224, 224), dtype=np.float32)
        out.with_suffix(".int8.onnx").write_bytes(serialize(to_int8(report.model, calib)))
    return out


def session(path: Path, spinning: bool = True, denormal_as_zero: bool = False, **extra):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if denormal_as_zero:
        so.add_session_config_entry("session.set_denormal_as_zero", "1")
    for key, value in extra.items():
        setattr(so, key, value)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {
        "p50_ms": round(float(np.median(a)), 3),
        "min_ms": round(float(a.min()), 3),
        "p90_ms": round(float(np.percentile(a, 90)), 3),
        "cv": round(float(a.std() / a.mean()), 3),
        "runs": len(a),
    }


def call(s, x) -> float:
    t = time.perf_counter()
    s.run(None, {"input": x})
    return (time.perf_counter() - t) * 1e3


def alone(sessions: dict, x, runs: int) -> dict:
    """Each session timed on its own, one after the other (no neighbour runs in between)."""
    out = {}
    for name, s in sessions.items():
        for _ in range(10):
            call(s, x)
        out[name] = stats([call(s, x) for _ in range(runs)])
    return out


def in_turns(sessions: dict, x, runs: int, per_turn: int = 5) -> dict:
    """The sessions take turns, ``per_turn`` calls each, as cpu_backends.py runs its paths."""
    times = defaultdict(list)
    for s in sessions.values():
        call(s, x)
    for _ in range(max(1, runs // per_turn)):
        for name, s in sessions.items():
            for i in range(per_turn):
                ms = call(s, x)
                times[name].append(ms)
                times[f"{name}, {'first call' if i == 0 else 'later calls'} of a turn"].append(ms)
    return {k: stats(v) for k, v in sorted(times.items())}


def graph(path: Path) -> dict:
    """Op histogram of ONNX Runtime's optimized graph and its profiler's time per op type."""
    with tempfile.TemporaryDirectory() as tmp:
        optimized = f"{tmp}/optimized.onnx"
        s = session(
            path,
            optimized_model_filepath=optimized,
            enable_profiling=True,
            profile_file_prefix=f"{tmp}/profile",
        )
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
        for _ in range(30):
            s.run(None, {"input": x})
        trace = json.loads(Path(s.end_profiling()).read_text())
        ops = Counter(n.op_type for n in onnx.load(optimized).graph.node)
    per_op = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1e3 / 30  # ms per inference
    return {
        "optimized_ops": dict(ops.most_common()),
        "ms_per_inference_by_op": {
            k: round(v, 3) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--out", default=str(RESULTS / "ort_int8_batch1.json"))
    a = p.parse_args()
    from convforge.runtime.environment import environment

    files = {"random": random_weight_exports()}
    if (TRAINED / "model.int8.onnx").exists():
        files["trained"] = TRAINED / "model.onnx"
    else:
        print(f"no trained export in {TRAINED}: run benchmarks/cpu_backends.py first", flush=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224), dtype=np.float32)
    result = {"benchmark": "ort_int8_batch1", "environment": environment(), "models": {}}
    for weights, fp32 in files.items():
        int8 = fp32.with_suffix(".int8.onnx")
        r = {}
        r["alone"] = alone({"fp32": session(fp32), "int8": session(int8)}, x, a.runs)
        r["alone, denormals as zero"] = alone(
            {
                "fp32": session(fp32, denormal_as_zero=True),
                "int8": session(int8, denormal_as_zero=True),
            },
            x,
            a.runs,
        )
        r["in turns, spinning on (default)"] = in_turns(
            {"fp32": session(fp32), "int8": session(int8)}, x, a.runs
        )
        r["in turns, spinning off"] = in_turns(
            {"fp32": session(fp32, spinning=False), "int8": session(int8, spinning=False)},
            x,
            a.runs,
        )
        r["int8 graph"] = graph(int8)
        r["fp32 graph"] = graph(fp32)
        result["models"][weights] = r
        for how, rows in r.items():
            if "graph" in how:
                continue
            for name, s in rows.items():
                print(
                    f"{weights:8} {how:32} {name:34} p50 {s['p50_ms']:7.2f}  "
                    f"min {s['min_ms']:7.2f}  cv {s['cv']:.2f}",
                    flush=True,
                )
        print(f"{weights} int8 optimized ops: {r['int8 graph']['optimized_ops']}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
