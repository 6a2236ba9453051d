"""Peak memory of int8 calibration: convforge's chunked calibration vs ONNX Runtime's one pass.

    .venv/bin/python benchmarks/calibration_memory.py [--images 512] [--peer-images 32,64]

The model is ResNet-50 (torchvision's layout, 3x224x224, random weights with
convforge's init; activation sizes, which decide the memory, do not depend on
the weights), exported by convforge. Calibration images are random normal.

* ``convforge``: :class:`convforge.export.int8.Int8Quantizer` with ``--images``
  images: the calibration model runs on chunks sized to
  ``CALIBRATION_MEMORY`` of activations, each merged into the ranges or
  histograms so far (ONNX Runtime's ``CalibStridedMinMax`` feed).
* ``onnxruntime one pass`` (the peer, what convforge did before): ONNX
  Runtime's ``quantize_static`` fed batches of 32 images in one reader, which
  keeps every activation of every image until it computes the ranges. Run
  with fewer images (``--peer-images``): at 256 images the entropy and
  percentile methods were killed for memory at 24 GB.

Each measurement runs in a fresh subprocess and reports its peak resident
memory (``ru_maxrss``) and wall time; the goal is <= 4 GiB for convforge at 512
images with every method. Writes benchmarks/results/calibration_memory.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).parent / ".cache" / "calibration_memory"
METHODS = ("minmax", "entropy", "percentile")
GOAL_GIB = 4.0


def model_path() -> Path:
    """ResNet-50 exported by convforge (cached)."""
    import torch

    from convforge.builder import create_model
    from convforge.export import export_onnx

    path = CACHE / "resnet50.onnx"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        export_onnx(create_model("resnet50").eval(), path, (3, 224, 224))
    return path


def images(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 224, 224), dtype=np.float32)


def child(path: str, who: str, method: str, n: int) -> dict:
    """One calibration in this process; its peak RSS and time."""
    import onnx

    model = onnx.load(path)
    calibration = images(n)
    start = time.perf_counter()
    if who == "convforge":
        from convforge.export.int8 import Int8Quantizer

        with Int8Quantizer(model, calibration, "cpu", method) as quantizer:
            quantizer.quantize()
            chunk = quantizer.chunk
    else:
        import tempfile

        chunk = 32
        with tempfile.TemporaryDirectory() as tmp:
            one_pass(Path(path), Path(tmp) / "int8.onnx", calibration, method)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "who": who,
        "method": method,
        "images": n,
        "chunk": chunk,
        "input_bytes_gib": round(calibration.nbytes / 2**30, 3),
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "seconds": round(seconds, 1),
    }


def one_pass(source: Path, out: Path, calibration: np.ndarray, method: str = "minmax") -> None:
    """ONNX Runtime's quantize_static as its documentation shows it: one reader, one pass
    (batches of 32), QDQ, per-channel int8 weights in 7 bits, uint8 activations.

    Also the ``onnxruntime int8`` peer of ``benchmarks/cpu_backends.py``.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader:
        def __init__(self):
            self.batches = iter(calibration[i : i + 32] for i in range(0, len(calibration), 32))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    prepared = out.with_suffix(".pre.onnx")
    with contextlib.redirect_stdout(io.StringIO()):  # the calibrators' progress output
        quant_pre_process(str(source), str(prepared))
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[method],
        )


def measure(path: Path, who: str, method: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", who, method, str(n), str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        # A peer killed for memory is a result, not a crash of the benchmark.
        why = "killed (out of memory)" if done.returncode in (-9, 137) else done.stderr[-300:]
        return {"who": who, "method": method, "images": n, "failed": why}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--peer-images", default="32,64")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default=str(RESULTS / "calibration_memory.json"))
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        who, method, n, path = args.child
        print(json.dumps(child(path, who, method, int(n))))
        return 0
    from convforge.runtime.environment import environment

    path = model_path()
    methods = args.methods.split(",")
    records = []
    for method in methods:
        records.append(measure(path, "convforge", method, args.images))
        print(records[-1], flush=True)
        for n in (int(v) for v in args.peer_images.split(",") if v):  # "" = no peer run
            records.append(measure(path, "onnxruntime one pass", method, n))
            print(records[-1], flush=True)
    goal = all(
        r.get("peak_rss_gib", float("inf")) <= GOAL_GIB for r in records if r["who"] == "convforge"
    )
    result = {
        "benchmark": "calibration_memory",
        "environment": environment(),
        "model": "resnet50 3x224x224 (convforge export)",
        "goal": f"convforge peak RSS <= {GOAL_GIB} GiB at {args.images} images, every method",
        "goal_met": goal,
        "records": records,
    }
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"goal met: {goal}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
