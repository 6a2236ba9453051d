"""Validation of an exported ONNX model against the original PyTorch model.

The ONNX runs in ONNX Runtime twice, with graph optimizations disabled (so
ORT's own fusions cannot hide a folding bug) and fully enabled (what users
get), at batch size 1 and 8, on real samples when the checkpoint's data is
at hand. The reference is the original, unfolded model in eval mode.

Pass criteria per precision:

* fp32: max |onnx - torch| <= 1e-4 x the logit scale (max |torch logit|)
  in every run;
* fp16: top-1 agreement with the fp32 model >= 99%;
* int8: top-1 accuracy on the labelled validation samples at most 1 point
  below the fp32 model's. Accuracy is read from the run with ORT's
  optimizations on, except for the TensorRT flavour: ORT's fused x86 int8
  kernels overflow on full-range int8 weights without VNNI, while running the
  Q/DQ graph as written (optimizations off) is the arithmetic TensorRT does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

FP32_REL_TOL = 1e-4
FP16_MIN_AGREEMENT = 0.99
INT8_MAX_DROP = 0.01
BATCH_SIZES = (1, 8)
BATCH1_SAMPLES = 16  # batch size 1 runs this many samples one by one


@dataclass
class Run:
    batch_size: int
    graph_optimization: str  # "disabled" or "all"
    max_abs_diff: float
    max_rel_diff: float  # max_abs_diff / logit scale
    top1_agreement: float  # fraction of samples whose argmax matches the reference


@dataclass
class ValidationReport:
    precision: str
    samples: int
    source: str  # "dataset" (real validation images) or "random"
    logit_scale: float  # max |reference logit|
    runs: list[Run]
    reference_accuracy: float | None  # top-1 on labels, when there are labels
    onnx_accuracy: float | None
    accuracy_run: str  # ORT graph optimizations of the run onnx_accuracy comes from
    passed: bool
    criterion: str  # what was required, in words

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format(self) -> str:
        lines = [
            f"{self.precision} validation on {self.samples} {self.source} samples "
            f"(logit scale {self.logit_scale:.3g}): {'PASS' if self.passed else 'FAIL'} "
            f"- {self.criterion}"
        ]
        for r in self.runs:
            lines.append(
                f"  batch {r.batch_size:>2}  ORT optimizations {r.graph_optimization:<8}  "
                f"max abs {r.max_abs_diff:.3g}  max rel {r.max_rel_diff:.3g}  "
                f"top-1 agreement {r.top1_agreement:.2%}"
            )
        if self.reference_accuracy is not None:
            lines.append(
                f"  top-1 accuracy: PyTorch {self.reference_accuracy:.2%}, "
                f"ONNX {self.onnx_accuracy:.2%} (ORT optimizations {self.accuracy_run})"
            )
        return "\n".join(lines)


def reference_logits(module: nn.Module, samples: np.ndarray) -> np.ndarray:
    """The original model's logits on ``samples`` (eval mode, fp32, CPU)."""
    module.eval()
    with torch.no_grad():
        x = torch.from_numpy(samples)
        return torch.cat([module(b) for b in x.split(64)]).numpy()


def ort_logits(model: onnx.ModelProto, samples: np.ndarray, batch: int, optimize: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    session = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    outs = [
        session.run(["logits"], {"input": samples[i : i + batch]})[0]
        for i in range(0, len(samples), batch)
    ]
    return np.concatenate(outs)


def validate(
    model: onnx.ModelProto,
    reference: np.ndarray,
    samples: np.ndarray,
    precision: str,
    labels: np.ndarray | None = None,
    source: str = "dataset",
    accuracy_optimized: bool = True,
) -> ValidationReport:
    """Compare ``model``'s logits on ``samples`` with ``reference`` (the PyTorch logits).

    ``accuracy_optimized``: take the accuracy from the batch-8 run with ORT
    optimizations on (True) or off (False).
    """
    scale = float(np.abs(reference).max())
    ref_top1 = reference.argmax(1)
    runs = []
    onnx_full = None
    for batch in BATCH_SIZES:
        n = min(len(samples), BATCH1_SAMPLES) if batch == 1 else len(samples)
        for optimize in (False, True):
            out = ort_logits(model, samples[:n], batch, optimize)
            if batch != 1 and optimize == accuracy_optimized:
                onnx_full = out
            diff = float(np.abs(out - reference[:n]).max())
            runs.append(
                Run(
                    batch,
                    "all" if optimize else "disabled",
                    diff,
                    diff / max(scale, 1e-12),
                    float((out.argmax(1) == ref_top1[:n]).mean()),
                )
            )
    ref_acc = onnx_acc = None
    if labels is not None:
        ref_acc = float((ref_top1 == labels).mean())
        onnx_acc = float((onnx_full.argmax(1) == labels).mean())
    passed, criterion = _judge(precision, runs, ref_acc, onnx_acc)
    return ValidationReport(
        precision,
        len(samples),
        source,
        scale,
        runs,
        ref_acc,
        onnx_acc,
        "all" if accuracy_optimized else "disabled",
        passed,
        criterion,
    )


def _judge(precision, runs, ref_acc, onnx_acc) -> tuple[bool, str]:
    if precision == "fp32":
        worst = max(r.max_rel_diff for r in runs)
        return worst <= FP32_REL_TOL, f"max rel diff {worst:.2g} <= {FP32_REL_TOL:g}"
    if precision == "fp16":
        worst = min(r.top1_agreement for r in runs)
        return worst >= FP16_MIN_AGREEMENT, (
            f"top-1 agreement {worst:.2%} >= {FP16_MIN_AGREEMENT:.0%}"
        )
    if ref_acc is None:
        return False, "int8 needs labelled validation samples to measure accuracy"
    drop = ref_acc - onnx_acc
    return drop <= INT8_MAX_DROP, f"top-1 accuracy drop {drop * 100:.2f} <= 1 point"
