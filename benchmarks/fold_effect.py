"""What BatchNorm folding buys: ONNX node count and ONNX Runtime latency, unfolded vs folded.

    .venv/bin/python benchmarks/fold_effect.py [--runs 30] [--models resnet18,resnet50,vgg16_bn]

For each model (224 px, random weights with non-trivial BN statistics):

* unfolded: the original module through torch.onnx's dynamo exporter with its
  graph optimizer off, so every BatchNormalization stays a node (what a plain
  export gives a runtime with no fusion of its own);
* folded: convforge's pipeline (fold_batchnorm, torch.export, ONNX, validation).

Each runs in ONNX Runtime (CPU, batch 1) with graph optimizations disabled
(a runtime without its own fusions) and enabled; median latency over --runs
after 5 warm-ups, both variants alternating. Also the wall time of
``export_onnx`` (fold + trace + ONNX + validation) for each model; the goal for
ResNet-50 is under 30 s. Writes benchmarks/results/fold_effect.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from convforge.builder import create_model
from convforge.export import export_onnx
from convforge.export.onnx_export import trace

RESULTS = Path(__file__).parent / "results"


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model.eval()


def _unfolded_onnx(model: torch.nn.Module, path: Path) -> None:
    program = trace(model, (3, 224, 224))
    onnx_program = torch.onnx.export(
        program,
        input_names=["input"],
        output_names=["logits"],
        opset_version=18,
        dynamo=True,
        external_data=False,
        optimize=False,
    )
    onnx_program.save(str(path))


def _session(path: Path, optimize: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _latencies(sessions: dict, x: np.ndarray, runs: int) -> dict[str, float]:
    """Median ms per session; sessions alternate within each round to share the noise."""
    for s in sessions.values():
        for _ in range(5):
            s.run(None, {"input": x})
    times = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"input": x})
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def _nodes(path: Path) -> tuple[int, int]:
    import onnx

    graph = onnx.load(str(path)).graph
    return len(graph.node), sum(n.op_type == "BatchNormalization" for n in graph.node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--models", default="resnet18,resnet50,vgg16_bn")
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = _model(name)
            unfolded, folded = Path(tmp) / f"{name}.raw.onnx", Path(tmp) / f"{name}.onnx"
            _unfolded_onnx(model, unfolded)
            t = time.perf_counter()
            report = export_onnx(model, folded, input_size=(3, 224, 224))
            export_s = time.perf_counter() - t
            sessions = {
                (variant, opt): _session(path, opt)
                for variant, path in (("unfolded", unfolded), ("folded", folded))
                for opt in (False, True)
            }
            ms = _latencies(sessions, x, args.runs)
            for variant, path in (("unfolded", unfolded), ("folded", folded)):
                nodes, bn = _nodes(path)
                for opt in (False, True):
                    records.append(
                        {
                            "model": name,
                            "variant": variant,
                            "nodes": nodes,
                            "bn_nodes": bn,
                            "ort_graph_optimization": "all" if opt else "disabled",
                            "p50_ms": ms[(variant, opt)],
                            "batch_size": 1,
                        }
                    )
            records.append(
                {
                    "model": name,
                    "export_seconds": round(export_s, 2),
                    "export_stages": report.seconds,
                    "max_rel_diff": max(r.max_rel_diff for r in report.validation.runs),
                }
            )
            print(
                f"{name}: exported in {export_s:.1f} s; "
                + ", ".join(
                    f"{v} ORT-opt {'on' if o else 'off'} {ms[(v, o)]:.2f} ms"
                    for v in ("unfolded", "folded")
                    for o in (False, True)
                )
            )
    result = {
        "benchmark": "fold_effect",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu": _cpu(),
            "cores": os.cpu_count(),
            "onnxruntime": ort.__version__,
            "torch": str(torch.__version__),
            "python": platform.python_version(),
        },
        "records": records,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fold_effect.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / 'fold_effect.json'}")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
