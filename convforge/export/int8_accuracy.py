"""INT8 that keeps accuracy: keep the most sensitive layers in float until the drop fits.

What NNCF's ``quantize_with_accuracy_control`` does for OpenVINO, on ONNX
Runtime's QDQ quantizer (:class:`~convforge.export.int8.Int8Quantizer`):

1. Quantize every layer; measure top-1 on the labelled validation images. If it
   is at most ``int8_max_drop`` points below the fp32 reference, that is the answer.
2. Otherwise rank the quantizable nodes (Conv, Gemm, MatMul, residual Add,
   pooling, ...: :data:`~convforge.export.int8.QUANTIZED_OPS`) by sensitivity:
   for each, quantize *only that* layer and measure how far the logits move
   from the fp32 model's on ``rank_samples`` calibration images (mean squared
   logit error). Calibration images carry no labels and are not the
   validation images, so the ranking does not fit the validation set. The
   layer that moves the logits most ranks first. (The reverse, keeping only
   that layer in float among int8 ones, ranked ResNet-50 by noise: with 71
   layers each float one changes the sum of the other 70 errors too little,
   and the search kept 70 in float and still lost as much as all-int8.)
3. Keep the top-k ranked layers in float, growing k by doubling until the
   validation drop fits, then bisect down to the smallest k that fits.
4. Refuse (UserError) when no mix fits: a mix keeps at least one layer int8,
   so the last try keeps every layer but the least sensitive in float. A
   layer is int8 only if a quantized tensor reaches or leaves it; a "mix"
   without any QuantizeLinear (a lone MaxPool gets none) is not one.

Accuracy is measured the way the export's validation measures it
(:mod:`convforge.export.validate`): ONNX Runtime on the CPU, batch 8, with
graph optimizations on for the ``cpu`` target and off for ``tensorrt``. The
report states the layers kept in float and what they cost: batch-1 latency of
fp32, all-int8 and the mix on ONNX Runtime, timed interleaved.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from convforge.errors import UserError
from convforge.export.int8 import Int8Quantizer
from convforge.export.onnx_export import serialize
from convforge.export.validate import ValidationInputs, ort_logits
from convforge.runtime.backends.ort import OrtCpu

RANK_SAMPLES = 32  # calibration images each layer's sensitivity is measured on
EVAL_BATCH = 8  # the batch the export's validation takes its accuracy from
TIMING_ROUNDS = 7  # interleaved rounds of the batch-1 latency comparison
SHOWN_RANKING = 10  # layers listed in the report's ranking


@dataclass
class Int8Search:
    """What the accuracy-aware int8 search did and what it cost (accuracies are fractions)."""

    max_drop: float  # the budget, in points of top-1
    reference_accuracy: float  # the fp32 model's top-1 on the validation images
    plain_accuracy: float  # every layer int8
    accuracy: float  # the chosen mix
    layers: int  # quantizable layers in the graph
    float_layers: list[str]  # kept in float, most sensitive first
    ranking: list[dict]  # the most sensitive layers: name, logit error with it alone int8
    evaluations: int  # quantized models built and measured
    latency_ms: dict[str, float]  # batch-1 p50 on ONNX Runtime (CPU): fp32, int8, mixed
    seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        drop = (self.reference_accuracy - self.accuracy) * 100
        plain = (self.reference_accuracy - self.plain_accuracy) * 100
        if not self.float_layers:
            return (
                f"int8 accuracy search: every layer int8 loses {plain:.2f} points "
                f"(budget {self.max_drop:g})"
            )
        lat = self.latency_ms
        lines = [
            f"int8 accuracy search: every layer int8 loses {plain:.2f} points, over the budget of "
            f"{self.max_drop:g}; {len(self.float_layers)} of {self.layers} layers kept in float "
            f"{f'lose {drop:.2f}' if drop > 0 else f'gain {-drop:.2f}'} "
            f"({self.evaluations} models measured, {self.seconds:.0f} s)",
            "  kept in float: " + ", ".join(self.float_layers),
        ]
        if lat:
            lines.append(
                f"  cost, batch 1 on ONNX Runtime CPU: {lat['mixed']:.2f} ms against "
                f"{lat['int8']:.2f} ms with every layer int8 ({lat['fp32']:.2f} ms in fp32)"
            )
        return "\n".join(lines)


def int8_within_budget(
    model: onnx.ModelProto,
    calibration: np.ndarray,
    checks: ValidationInputs,
    *,
    target: str = "cpu",
    method: str = "minmax",
    rank_samples: int = RANK_SAMPLES,
) -> tuple[onnx.ModelProto, Int8Search]:
    """The int8 model with the fewest float layers whose top-1 drop is <= the budget.

    ``model`` is the fp32 graph and ``calibration`` float32 [N, C, H, W] training
    images. ``checks`` holds the validation images (``samples``), their
    ``labels`` (required) and the fp32 (PyTorch) logits of them (``reference``),
    which define the reference accuracy, and the budget ``int8_max_drop`` in
    points (0.5 = half a point of top-1).
    Raises UserError when no mix of int8 and float layers fits the budget, and
    whatever :class:`Int8Quantizer` raises for bad calibration data.
    """
    samples, labels, reference = checks.samples, checks.labels, checks.reference
    max_drop = checks.int8_max_drop
    if labels is None:
        raise ValueError("int8_within_budget needs labelled validation samples")
    if not max_drop >= 0:
        raise UserError(f"--int8-max-drop must be >= 0 points, got {max_drop}")
    start = time.perf_counter()
    reference_acc = float((reference.argmax(1) == labels).mean())
    budget = max_drop / 100 + 1e-9  # accuracies are multiples of 1/len(labels)
    optimized = target != "tensorrt"  # see convforge.export.validate
    with Int8Quantizer(model, calibration, target, method) as quantizer, _Scratch() as scratch:

        def accuracy(keep: list[str]) -> tuple[onnx.ModelProto, float]:
            candidate = quantizer.quantize(keep)
            logits = scratch.logits(candidate, samples, optimized)
            return candidate, float((logits.argmax(1) == labels).mean())

        plain, plain_acc = accuracy([])
        search = Int8Search(
            max_drop, reference_acc, plain_acc, plain_acc, len(quantizer.layers), [], [], 1, {}, 0.0
        )
        if reference_acc - plain_acc <= budget:
            search.seconds = round(time.perf_counter() - start, 1)
            return plain, search
        most = len(quantizer.layers) - 1  # a mix keeps at least one layer in int8
        if most < 1:
            raise UserError(_refusal(max_drop, reference_acc - plain_acc, quantizer.layers))
        images = calibration[:rank_samples]
        ranked = _rank(quantizer, scratch, scratch.logits(model, images, True), images, search)
        tried: dict[int, tuple[onnx.ModelProto, float]] = {}

        def fits(k: int) -> bool:
            if k not in tried:
                tried[k] = accuracy(ranked[:k])
                search.evaluations += 1
            return reference_acc - tried[k][1] <= budget and _quantized(tried[k][0])

        # Double k until it fits, then bisect between the last k that did not and the first
        # that did: accuracy mostly grows with k, and each try costs a full validation.
        low, k = 0, 1
        while not fits(k):
            if k == most:
                lost = reference_acc - tried[k][1]
                nothing_int8 = lost <= budget  # it fit, but no tensor of it was quantized
                raise UserError(
                    _refusal(max_drop, reference_acc - plain_acc, ranked, lost, nothing_int8)
                )
            low, k = k, min(2 * k, most)
        while k - low > 1:
            mid = (low + k) // 2
            low, k = (low, mid) if fits(mid) else (mid, k)
        chosen, search.accuracy = tried[k]
        search.float_layers = ranked[:k]
        search.latency_ms = scratch.latencies(
            {"fp32": model, "int8": plain, "mixed": chosen}, samples[:1]
        )
    search.seconds = round(time.perf_counter() - start, 1)
    return chosen, search


def _quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def _refusal(
    max_drop: float, plain_drop: float, layers: list[str], mixed_drop=None, nothing_int8=False
) -> str:
    said = (
        f"int8 cannot keep top-1 within {max_drop:g} points: with every layer int8 it loses "
        f"{plain_drop * 100:.2f}"
    )
    if not layers:
        return f"{said}, and it has no quantizable layer to keep in float"
    if mixed_drop is None:
        return f"{said}, and its only quantizable layer is {layers[0]}"
    if nothing_int8:
        return (
            f"{said}, and the mixes that fit leave no layer int8; export without --int8, "
            "or raise --int8-max-drop"
        )
    return (
        f"{said}, and with all but one of its {len(layers)} quantizable layers in float "
        f"{mixed_drop * 100:.2f}; export without --int8, or raise --int8-max-drop"
    )


def _rank(quantizer, scratch, fp32: np.ndarray, images, search: Int8Search) -> list[str]:
    """Quantizable layers, the one that alone in int8 moves the logits most first.

    ``fp32`` holds the fp32 model's logits of ``images``.
    """
    from tqdm import tqdm

    optimized = quantizer.target != "tensorrt"
    errors = {}
    bar = tqdm(quantizer.layers, desc="int8 layer sensitivity", leave=False, file=sys.stderr)
    for layer in bar:
        alone = quantizer.quantize([other for other in quantizer.layers if other != layer])
        logits = scratch.logits(alone, images, optimized)
        errors[layer] = float(((logits - fp32) ** 2).sum(1).mean())
        search.evaluations += 1
    ranked = sorted(quantizer.layers, key=lambda name: -errors[name])
    search.ranking = [
        {"layer": name, "logit_mse": round(errors[name], 6)} for name in ranked[:SHOWN_RANKING]
    ]
    return ranked


class _Scratch:
    """A private folder where candidate models are written and run by the ort-cpu backend."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="convforge-int8-search-")

    def _write(self, model: onnx.ModelProto, name: str = "candidate.onnx") -> str:
        path = Path(self._tmp.name) / name
        path.write_bytes(serialize(model))
        return str(path)

    def logits(self, model: onnx.ModelProto, images: np.ndarray, optimized: bool) -> np.ndarray:
        level = "all" if optimized else "disabled"
        with OrtCpu(self._write(model), graph_optimization=level) as backend:
            return ort_logits(backend, images, EVAL_BATCH)

    def latencies(self, models: dict[str, onnx.ModelProto], x: np.ndarray) -> dict[str, float]:
        """Batch-1 p50 (ms) of each model on ONNX Runtime, timed in interleaved rounds."""
        runners = {n: OrtCpu(self._write(m, f"{n}.onnx")).load() for n, m in models.items()}
        try:
            times: dict[str, list[float]] = {n: [] for n in runners}
            for backend in runners.values():
                backend.run(x)  # first runs pay lazy initialization
            for _ in range(TIMING_ROUNDS):
                for name, backend in runners.items():
                    for _ in range(3):
                        t = time.perf_counter()
                        backend.run(x)
                        times[name].append((time.perf_counter() - t) * 1e3)
            return {n: round(float(np.median(t)), 3) for n, t in times.items()}
        finally:
            for backend in runners.values():
                backend.close()

    def __enter__(self) -> _Scratch:
        return self

    def __exit__(self, *exc) -> None:
        self._tmp.cleanup()
