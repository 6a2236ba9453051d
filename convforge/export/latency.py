"""A model's batch-1 latency on a backend, as export would deliver it: `compress --latency-ms`.

The module is folded and exported to ONNX as :func:`.exporter.export_onnx` does (in a
temporary folder, without its validation: the exporter's report uses this probe, so this
module may not import it), then timed by the runtime's benchmark on the named backend:
the number `convforge bench` would print for the fp32 file, measured here and now.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from convforge.export.fold import fold_batchnorm
from convforge.export.onnx_export import DEFAULT_OPSET, serialize, to_onnx, trace
from convforge.runtime import backends
from convforge.runtime.bench import BenchConfig, bench_backend

# Short but not noisy: the probe runs once per compress round and once on the original.
PROBE = BenchConfig(batch_sizes=(1,), warmup_iters=10, warmup_seconds=0.5, iters=50, seconds=2.0)


def latency_probe(backend: str, input_size: tuple[int, int, int]) -> Callable[[nn.Module], float]:
    """A function: model -> its median batch-1 latency in ms on ``backend`` (``auto``: the
    backend auto loads for the first model, then that one for every model) for
    ``input_size`` (C, H, W) inputs. UserError when the backend cannot run it."""
    chosen = [None if backend == "auto" else backends.backend_class(backend).name]

    def measure(model: nn.Module) -> float:
        with tempfile.TemporaryDirectory(prefix="convforge-latency-") as folder:
            path = Path(folder) / "model.onnx"
            example = torch.randn(2, *input_size)
            folded, _ = fold_batchnorm(copy.deepcopy(model).eval(), example=example)
            path.write_bytes(serialize(to_onnx(trace(folded, input_size), DEFAULT_OPSET)))
            if chosen[0] is None:
                loaded, _ = backends.load_backend("auto", str(path))
                chosen[0] = loaded.name
                loaded.close()
            (record,) = [r for r in bench_backend(chosen[0], str(path), PROBE)
                         if r["timing"] == "end-to-end"]  # fmt: skip
            return round(record["p50_ms"], 4)

    return measure
