"""Does a pruned model's int8 latency follow its MACs? Channel rounding, measured.

    python benchmarks/prune_widths.py [--arch resnet18] [--speedups 2.5,4]
        [--round-to none,8,16,32] [--rounds 10] [--out benchmarks/results/prune_widths.json]

A ResNet-18 (or ``--arch``) at 224 px (seeded random weights: latency does not depend on their
values) is pruned to each MAC speedup with ``compress``'s own pruner
(``builder.compress.pruning.prune_to``, l1 importance), once per ``--round-to``
(every pruned width a multiple of it; ``none``: any width). Each is exported with
torch.onnx, quantized by NNCF (static int8, 32 random calibration images) and
compiled by OpenVINO for the CPU with no config, the same path as the
"openvino int8 (nncf)" peer of ``benchmarks/compress.py``; the unpruned model is
the reference. Latency is interleaved in rounds at batch 1 and 32.

Why: a 2.5x MAC cut gave only 1.23x at batch 1 (compress-2.5x.md). oneDNN's int8
kernels block channels by 16 (AVX-512) or 64 (AMX); a width of 81 runs as 96.
Results: ``--out`` (.json and .md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import cpu_backends as cb  # noqa: E402  (the export, NNCF and OpenVINO paths, the timing loop)

from convforge.builder.compress.pruning import macs_and_params, prune_to  # noqa: E402
from convforge.builder.registry import build_model  # noqa: E402
from convforge.builder.training.config import recipe_model  # noqa: E402
from convforge.runtime.bench import latency_stats  # noqa: E402
from convforge.runtime.environment import environment  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def model_at(arch: str, speedup: float, round_to: int | None) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = build_model(recipe_model(arch, cb.SIZE, num_classes=10, in_channels=3)).eval()
    example = torch.zeros(1, 3, cb.SIZE, cb.SIZE)
    macs0, _ = macs_and_params(model, example)
    if speedup > 1:
        prune_to(model, example, int(macs0 / speedup), "l1", round_to=round_to)
    macs, params = macs_and_params(model, example)
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return model, {"macs": macs, "params": params, "mac_speedup": macs0 / macs,
                   "widths": sorted(set(convs))}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18", help="a recipe model name (resnet18, resnet50)")
    p.add_argument("--speedups", default="2.5,4")
    p.add_argument("--round-to", default="none,8,16,32")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", type=Path, default=RESULTS / "prune_widths.json")
    a = p.parse_args()
    speedups = [float(s) for s in a.speedups.split(",")]
    rounding = [None if r == "none" else int(r) for r in a.round_to.split(",")]
    calib = np.random.default_rng(0).standard_normal((32, 3, cb.SIZE, cb.SIZE)).astype(np.float32)
    points = [(1.0, None)] + [(s, r) for s in speedups for r in rounding]
    rows, paths = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for speedup, round_to in points:
            model, info = model_at(a.arch, speedup, round_to)
            onnx_path = Path(tmp) / f"m{len(rows)}.onnx"
            cb.peer_onnx(model, onnx_path)
            info.update(speedup_asked=speedup, round_to=round_to)
            rows.append(info)
            name = f"x{speedup:g} round_to={round_to}"
            paths.append(cb.ov_path(name, cb.nncf_int8(onnx_path, calib), "int8"))
            print(name, info, flush=True)
        for bs in (1, 32):
            x = calib[:1] if bs == 1 else np.concatenate([calib] * (bs // len(calib)))[:bs]
            samples = cb.latencies(paths, x, a.rounds)
            for row, s in zip(rows, samples, strict=True):
                row[f"bs{bs}"] = latency_stats(s, bs)
    ref1, ref32 = rows[0]["bs1"]["p50_ms"], rows[0]["bs32"]["p50_ms"]
    lines = [
        f"# prune widths: {a.arch} ({time.strftime('%Y-%m-%d')}, {environment()['cpu']}, "
        f"{os.cpu_count()} cores)",
        "",
        "| MAC speedup asked | round_to | MAC speedup | widths | bs1 p50 ms | vs unpruned "
        "| bs32 p50 ms | bs32 throughput vs unpruned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b1, b32 = r["bs1"]["p50_ms"], r["bs32"]["p50_ms"]
        r["bs1_ratio"], r["bs32_throughput_ratio"] = b1 / ref1, ref32 / b32
        lines.append(
            f"| {r['speedup_asked']:g} | {r['round_to']} | {r['mac_speedup']:.2f} "
            f"| {' '.join(map(str, r['widths']))} | {b1:.2f} | {b1 / ref1:.3f} "
            f"| {b32:.1f} | {ref32 / b32:.2f} |"
        )
    doc = {"date": time.strftime("%Y-%m-%d"), "arch": a.arch, "environment": environment(),
           "rows": rows}  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1))
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
