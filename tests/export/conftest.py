"""Helpers shared by the folding tests (test_fold_math.py, test_fold.py)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def randomize_bn(model: nn.Module, strong: bool = False) -> nn.Module:
    """Non-trivial running stats, gamma and beta on every BN (default init folds to ~identity).

    ``strong`` spreads them far (for single layers); the default keeps deep nets' activations
    in range so that their outputs stay finite and meaningful.
    """
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, _BatchNorm):
                continue
            if m.running_mean is not None:
                m.running_mean.normal_(0, 1.0 if strong else 0.1)
                m.running_var.uniform_(0.05 if strong else 0.5, 3.0 if strong else 1.5)
            if m.affine:
                m.weight.uniform_(-2, 2) if strong else m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 1.0 if strong else 0.1)
    return model


def assert_close_to(out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    scale = ref.abs().max().item()
    diff = (out - ref).abs().max().item()
    assert diff <= rel * scale, f"max abs diff {diff:.3g} > {rel:g} x max |ref| {scale:.3g}"
