"""The BatchNorm folding formula against the layer followed by its BatchNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from convforge.export.fold_math import fold_weights
from tests.export.conftest import assert_close_to, randomize_bn

# (layer, BN class, input shape). ConvTranspose cases use out != in, groups 1, 2 and 4.
PAIRS = {
    "conv1d": (lambda b: nn.Conv1d(4, 6, 3, bias=b), nn.BatchNorm1d, (2, 4, 16)),
    "conv2d": (lambda b: nn.Conv2d(3, 6, 3, padding=1, bias=b), nn.BatchNorm2d, (2, 3, 12, 12)),
    "conv3d": (lambda b: nn.Conv3d(2, 5, 3, bias=b), nn.BatchNorm3d, (2, 2, 6, 6, 6)),
    "conv2d_groups2": (
        lambda b: nn.Conv2d(4, 6, 3, groups=2, bias=b),
        nn.BatchNorm2d,
        (2, 4, 9, 9),
    ),
    "conv2d_depthwise": (
        lambda b: nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=b),
        nn.BatchNorm2d,
        (2, 8, 10, 10),
    ),
    "convT1d": (lambda b: nn.ConvTranspose1d(4, 6, 3, bias=b), nn.BatchNorm1d, (2, 4, 10)),
    "convT1d_groups2": (
        lambda b: nn.ConvTranspose1d(4, 6, 3, groups=2, bias=b),
        nn.BatchNorm1d,
        (2, 4, 10),
    ),
    "convT2d": (
        lambda b: nn.ConvTranspose2d(3, 5, 3, stride=2, output_padding=1, bias=b),
        nn.BatchNorm2d,
        (2, 3, 7, 7),
    ),
    "convT2d_groups2": (
        lambda b: nn.ConvTranspose2d(4, 6, 3, groups=2, bias=b),
        nn.BatchNorm2d,
        (2, 4, 8, 8),
    ),
    "convT2d_groups4": (
        lambda b: nn.ConvTranspose2d(8, 12, (3, 2), stride=2, groups=4, bias=b),
        nn.BatchNorm2d,
        (2, 8, 6, 6),
    ),
    "convT2d_depthwise": (
        lambda b: nn.ConvTranspose2d(6, 6, 3, groups=6, bias=b),
        nn.BatchNorm2d,
        (2, 6, 7, 7),
    ),
    "convT3d_groups2": (
        lambda b: nn.ConvTranspose3d(4, 6, 2, groups=2, bias=b),
        nn.BatchNorm3d,
        (2, 4, 4, 4, 4),
    ),
    "linear": (lambda b: nn.Linear(10, 7, bias=b), nn.BatchNorm1d, (4, 10)),
}


def _fold_layer(layer: nn.Module, bn: _BatchNorm) -> nn.Module:
    """A copy of ``layer`` with fold_weights' W', b' in it."""
    w, b = fold_weights(
        layer.weight,
        layer.bias,
        bn.running_mean,
        bn.running_var,
        bn.eps,
        bn.weight,
        bn.bias,
        transposed=isinstance(layer, nn.modules.conv._ConvTransposeNd),
        groups=getattr(layer, "groups", 1),
    )
    folded = type(layer)(**_ctor_args(layer), bias=True)
    folded.weight.data.copy_(w)
    folded.bias.data.copy_(b)
    return folded.eval()


def _ctor_args(layer: nn.Module) -> dict:
    if isinstance(layer, nn.Linear):
        return {"in_features": layer.in_features, "out_features": layer.out_features}
    args = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
    kwargs = {a: getattr(layer, a) for a in args} | {"groups": layer.groups}
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        kwargs["output_padding"] = layer.output_padding
    return kwargs


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain_bn"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_fold_weights_matches_layer_then_bn(pair, bias, affine):
    make, bn_cls, shape = PAIRS[pair]
    layer = make(bias).eval()
    out_channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    bn = randomize_bn(bn_cls(out_channels, affine=affine), strong=True).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = bn(layer(x))
        out = _fold_layer(layer, bn)(x)
    assert out.shape == ref.shape
    assert_close_to(out, ref, rel=1e-5)


def test_fold_weights_computes_in_float64_and_keeps_dtype():
    weight = torch.randn(4, 3, 3, 3)
    mean, var = torch.randn(4), torch.rand(4) * 1e-6  # tiny variances: large scales
    gamma, beta = torch.randn(4), torch.randn(4)
    w, b = fold_weights(weight, None, mean, var, 1e-9, gamma, beta)
    scale = gamma.double() / torch.sqrt(var.double() + 1e-9)
    assert w.dtype == b.dtype == torch.float32
    assert torch.equal(w, (weight.double() * scale.view(4, 1, 1, 1)).float())
    assert torch.equal(b, (-mean.double() * scale + beta.double()).float())
    w16, b16 = fold_weights(weight.half(), None, mean, var, 1e-5, None, None)
    assert w16.dtype == b16.dtype == torch.float16


def test_fold_weights_does_not_modify_inputs():
    tensors = [torch.randn(6, 4, 3), torch.randn(6), torch.randn(6), torch.rand(6) + 0.1]
    gamma, beta = torch.randn(6), torch.randn(6)
    before = [t.clone() for t in (*tensors, gamma, beta)]
    fold_weights(*tensors, 1e-5, gamma, beta)
    assert all(torch.equal(a, b) for a, b in zip(before, (*tensors, gamma, beta), strict=True))


def test_fold_weights_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="running_mean has shape"):
        fold_weights(torch.randn(6, 4, 3), None, torch.zeros(5), torch.ones(6), 1e-5, None, None)
    # ConvTranspose, groups=2: weight [in=4, out/groups=3, k] has 6 output channels, not 3.
    w = torch.randn(4, 3, 3)
    grouped = {"transposed": True, "groups": 2}
    with pytest.raises(ValueError, match=r"expected \(6,\)"):
        fold_weights(w, None, torch.zeros(3), torch.ones(3), 1e-5, None, None, **grouped)
    fold_weights(w, None, torch.zeros(6), torch.ones(6), 1e-5, None, None, **grouped)
