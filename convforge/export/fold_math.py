"""The BatchNorm folding arithmetic: a pure function of tensors (no modules, no graph).

:func:`fold_weights` gives the weight and bias of one conv/linear layer that computes
what that layer followed by an eval-mode BatchNorm computes (the formula is in its
docstring). Finding the pairs in a model, deciding which are safe and writing the
result into it is the walker's job: :func:`convforge.export.fold.fold_batchnorm`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fold_weights"]


def fold_weights(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    gamma: Tensor | None,
    beta: Tensor | None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Return ``(W', b')``: a conv/linear layer followed by eval-mode BatchNorm, as one layer.

    With ``s = gamma / sqrt(running_var + eps)`` (one factor per output channel)::

        W'[o] = W[o] * s[o]                      (every weight feeding output channel o)
        b'[o] = (b[o] - running_mean[o]) * s[o] + beta[o]

    ``bias=None`` (a layer without bias) means b = 0; ``gamma=None`` / ``beta=None``
    (a BN with ``affine=False``) mean gamma = 1 / beta = 0.

    The output-channel axis depends on the layer:

    * ``Conv1d/2d/3d`` (``[out, in/groups, k...]``) and ``Linear`` (``[out, in]``):
      axis 0, whatever ``groups`` is.
    * ``ConvTranspose1d/2d/3d`` (``transposed=True``): the weight is
      ``[in, out/groups, k...]`` and output channel ``o = g * (out/groups) + j``
      for group ``g``; the weight is viewed as ``[groups, in/groups, out/groups, k...]``
      and scaled along ``j`` with group ``g``'s factors.

    Computed in float64 (``s`` can be large when ``running_var`` is tiny), then
    cast to ``weight``'s dtype; both results are on ``weight``'s device. The
    inputs are not modified. Shapes that do not match raise ``ValueError`` (a
    caller's bug: :func:`~convforge.export.fold.fold_batchnorm` checks channel
    counts before calling).
    """
    if weight.dim() < 2:
        raise ValueError(f"weight must have at least 2 dims, got shape {tuple(weight.shape)}")
    if groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups}")
    if transposed:
        if weight.shape[0] % groups:
            raise ValueError(
                f"ConvTranspose weight {tuple(weight.shape)}: in_channels not divisible by "
                f"groups={groups}"
            )
        out_channels = weight.shape[1] * groups
    else:
        out_channels = weight.shape[0]
    named = {"running_mean": running_mean, "running_var": running_var}
    named |= {"bias": bias, "gamma": gamma, "beta": beta}
    for name, t in named.items():
        if t is not None and t.shape != (out_channels,):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected ({out_channels},) "
                f"for weight {tuple(weight.shape)} (transposed={transposed}, groups={groups})"
            )

    def f64(t: Tensor | None, default: float) -> Tensor:
        if t is None:
            return torch.full((out_channels,), default, dtype=torch.float64, device=weight.device)
        return t.detach().to(device=weight.device, dtype=torch.float64)

    scale = f64(gamma, 1.0) / torch.sqrt(f64(running_var, 0.0) + eps)
    new_bias = (f64(bias, 0.0) - f64(running_mean, 0.0)) * scale + f64(beta, 0.0)
    w = weight.detach().to(torch.float64)
    kernel = w.shape[2:]
    ones = (1,) * len(kernel)
    if transposed:
        per_group = out_channels // groups
        w = w.reshape(groups, w.shape[0] // groups, per_group, *kernel)
        w = w * scale.reshape(groups, 1, per_group, *ones)
        w = w.reshape(weight.shape)
    else:
        w = w * scale.reshape(out_channels, 1, *ones)
    return w.to(weight.dtype), new_bias.to(weight.dtype)
