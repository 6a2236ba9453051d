"""One short GPU check: the runtime's GPU paths on ResNet-50, one table, one JSON.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json]

Needs only PyTorch (CUDA) and ONNX Runtime; runs in a few minutes. Exports a
ResNet-50 (random weights, non-trivial BN statistics, 224 px) with convforge's
exporter, then benchmarks with convforge's bench at batch 1 and 256:

* the torch backend (the .pt2 program) in fp32 and fp16, each with and
  without CUDA graphs, end to end (host<->device copies included);
* ort-cuda / ort-trt / tensorrt where those packages and providers exist
  (compute-only timings too); the others are listed as skipped with why.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from convforge import contract
from convforge.builder import create_model
from convforge.export import export_onnx
from convforge.runtime import bench
from convforge.runtime.backends import backend_class

CONFIGS = [
    ("torch", {"device": "cuda", "dtype": "fp32"}),
    ("torch", {"device": "cuda", "dtype": "fp16"}),
    ("torch", {"device": "cuda", "dtype": "fp32", "cuda_graphs": True}),
    ("torch", {"device": "cuda", "dtype": "fp16", "cuda_graphs": True}),
    ("ort-cuda", {}),
    ("ort-trt", {"max_batch": 256, "opt_batch": 256}),
    ("tensorrt", {"max_batch": 256, "opt_batch": 256}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_check.json"))
    parser.add_argument("--batch-sizes", default="1,256")
    args = parser.parse_args()
    cfg = bench.BenchConfig(
        batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
        warmup_iters=10,
        warmup_seconds=1.0,
        iters=30,
        seconds=2.0,
    )
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
    records, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet50.onnx"
        export_onnx(model, path, input_size=(3, 224, 224), metadata=info)
        for name, options in CONFIGS:
            ok, why = backend_class(name).available()
            if not ok:
                skipped.append({"backend": name, "options": options, "why": why})
                continue
            for r in bench.bench_backend(name, str(path), cfg, **options):
                records.append({**r, "options": options})
    from convforge.console import format_table

    rows = [
        [
            r["backend"],
            r["precision"],
            "graphs" if r["options"].get("cuda_graphs") else "",
            r["timing"],
            r["batch_size"],
            round(r["p50_ms"], 3),
            round(r["p99_ms"], 3),
            round(r["throughput_ips"], 1),
        ]
        for r in records
    ]
    print(
        format_table(
            [
                "backend",
                "precision",
                "cuda graphs",
                "timing",
                "batch",
                "p50 ms",
                "p99 ms",
                "images/s",
            ],
            rows,
        )
    )
    for s in skipped:
        print(f"skipped {s['backend']} {s['options']}: {s['why']}")
    env = bench.environment()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"environment": env, "records": records, "skipped": skipped}, indent=2) + "\n"
    )
    print(f"{env.get('gpu', 'no GPU')}; wrote {args.out}")


if __name__ == "__main__":
    main()
