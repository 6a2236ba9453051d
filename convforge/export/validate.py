"""Validation of an exported ONNX file against the original PyTorch model.

What is checked is the file as written, through the code users run: its
metadata is read back with :func:`convforge.contract.read_info` and must
say what the export meant it to say, and its logits come from the runtime's
``ort-cpu`` backend, run twice, with graph optimizations disabled (so ORT's
own fusions cannot hide a folding bug) and fully enabled (what users get),
at batch size 1 and 8, on real samples when the checkpoint's data is at
hand. The reference is the original, unfolded model in eval mode.

Pass criteria per precision:

* fp32: max |onnx - torch| <= 1e-4 x the logit scale (max |torch logit|)
  in every run;
* fp16: top-1 agreement with the fp32 model >= 99%;
* int8: top-1 accuracy on the labelled validation samples at most
  ``int8_max_drop`` points below the fp32 model's (export's
  ``--int8-max-drop``, 0.5 by default). Accuracy is read from the run with ORT's
  optimizations on, except for the TensorRT flavour: ORT's fused x86 int8
  kernels overflow on full-range int8 weights without VNNI, while running the
  Q/DQ graph as written (optimizations off) is the arithmetic TensorRT does.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from convforge import contract
from convforge.runtime.backends.ort import OrtCpu

FP32_REL_TOL = 1e-4
FP16_MIN_AGREEMENT = 0.99
INT8_MAX_DROP = 0.5  # points of top-1
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


@dataclass(frozen=True)
class ValidationInputs:
    """What an exported file is checked on: every step of the check reads it from here.

    An export builds it once and hands the same frozen value to each file it
    checks (fp32, fp16, int8); a uint8-input twin gets its own, with the pixels
    behind ``samples`` and the original model's logits on those pixels.
    """

    samples: np.ndarray  # what the file takes: float32 [N, C, H, W], or uint8 [N, H, W, C]
    reference: np.ndarray  # the original PyTorch model's logits of samples, [N, K]
    labels: np.ndarray | None = None  # the true class of each sample; None: no accuracy
    source: str = "dataset"  # "dataset" (real validation images) or "random"
    int8_max_drop: float = INT8_MAX_DROP  # top-1 points an int8 file may lose

    @classmethod
    def of(cls, module: nn.Module, samples: np.ndarray, **fields) -> ValidationInputs:
        """Inputs whose reference is ``module``'s logits of ``samples``
        (:func:`reference_logits`); ``fields`` set the others."""
        return cls(samples, reference_logits(module, samples), **fields)


def reference_logits(module: nn.Module, samples: np.ndarray) -> np.ndarray:
    """The original model's logits on ``samples`` (eval mode, fp32, CPU)."""
    module.eval()
    with torch.no_grad():
        x = torch.from_numpy(samples)
        return torch.cat([module(b) for b in x.split(64)]).numpy()


def ort_logits(backend: OrtCpu, samples: np.ndarray, batch: int) -> np.ndarray:
    """Logits of ``samples`` from a loaded ``ort-cpu`` backend, ``batch`` at a time."""
    return np.concatenate(
        [backend.run(samples[i : i + batch]) for i in range(0, len(samples), batch)]
    )


def check_metadata(path: str | os.PathLike, expected: dict[str, str]) -> contract.ModelInfo:
    """Read ``path`` back through the contract; RuntimeError unless it holds ``expected``.

    ``expected`` is the encoded metadata the export wrote. A mismatch is a bug
    in the export (the file would be served with the wrong labels or
    preprocessing), never a user mistake.
    """
    info = contract.read_info(path)
    want = contract.decode(expected)
    got = {k: info.metadata.get(k) for k in want}
    if got != want:
        wrong = sorted(k for k in want if got[k] != want[k])
        raise RuntimeError(f"{path}: metadata read back differs from what was written: {wrong}")
    return info


def validate(
    path: str | os.PathLike,
    checks: ValidationInputs,
    precision: str,
    accuracy_optimized: bool = True,
) -> ValidationReport:
    """Compare the logits of the ONNX file at ``path`` on ``checks.samples`` with
    ``checks.reference``, and judge them by ``precision``'s criterion (module docstring).

    ``accuracy_optimized``: take the accuracy from the batch-8 run with ORT
    optimizations on (True) or off (False).
    """
    samples, reference, labels = checks.samples, checks.reference, checks.labels
    scale = float(np.abs(reference).max())
    ref_top1 = reference.argmax(1)
    runs = []
    onnx_full = None
    for optimize in (False, True):
        with OrtCpu(str(path), graph_optimization="all" if optimize else "disabled") as backend:
            for batch in BATCH_SIZES:
                n = min(len(samples), BATCH1_SAMPLES) if batch == 1 else len(samples)
                out = ort_logits(backend, samples[:n], batch)
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
    passed, criterion = _judge(precision, runs, ref_acc, onnx_acc, checks.int8_max_drop)
    return ValidationReport(
        precision,
        len(samples),
        checks.source,
        scale,
        runs,
        ref_acc,
        onnx_acc,
        "all" if accuracy_optimized else "disabled",
        passed,
        criterion,
    )


def _judge(precision, runs, ref_acc, onnx_acc, max_drop) -> tuple[bool, str]:
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
    drop = (ref_acc - onnx_acc) * 100
    # Accuracies are multiples of 1/samples: a tolerance keeps an exact tie a pass.
    return drop <= max_drop + 1e-7, f"top-1 accuracy drop {drop:.2f} <= {max_drop:g} points"
