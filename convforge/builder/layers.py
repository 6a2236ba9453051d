"""Activation and normalization factories, and the conv helpers every model uses.

A model never names a concrete activation or norm class. It receives two
factories, the way torchvision passes ``norm_layer`` down its ResNet:

* ``act_layer()`` returns a fresh activation module;
* ``norm_layer(num_channels)`` returns a fresh normalization module for a
  ``[N, C, H, W]`` tensor with ``num_channels`` channels.

so one choice applies consistently through the whole network.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from convforge.errors import UserError, check_choice, check_int

ActLayer = Callable[[], nn.Module]
NormLayer = Callable[[int], nn.Module]

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu", "silu")
NORMS = ("batch", "group", "layer", "instance", "none")

# The module types an activation factory can return: the diagnostics hook these.
ACTIVATION_TYPES = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU)


def activation_layer(name: str, leaky_slope: float = 0.01) -> ActLayer:
    """Factory for the activation ``name`` (one of :data:`ACTIVATIONS`).

    ``leaky_slope`` is Leaky ReLU's slope for x < 0 (default 0.01, as in the
    lecture); ignored by the others. ReLU-family modules run in place to save
    memory: they never overwrite a tensor that something else still reads.
    """
    check_choice("activation", name, ACTIVATIONS)
    if not 0.0 <= leaky_slope < 1.0:
        raise UserError(f"leaky_slope must be in [0, 1), got {leaky_slope}")
    return {
        "relu": partial(nn.ReLU, inplace=True),
        "leaky_relu": partial(nn.LeakyReLU, negative_slope=leaky_slope, inplace=True),
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "gelu": nn.GELU,
        "silu": partial(nn.SiLU, inplace=True),
    }[name]


def norm_layer(name: str, num_groups: int = 32) -> NormLayer:
    """Factory for the normalization ``name`` (one of :data:`NORMS`).

    Statistics of an ``[N, C, H, W]`` tensor, as the lecture defines them:

    * ``batch``: per channel over N, H, W (running averages at test time, which
      is what makes it foldable into the preceding conv).
    * ``group``: per sample over groups of ``num_groups`` channel groups
      (``num_groups`` must divide every layer's width).
    * ``layer``: per sample over C, H, W. Implemented as GroupNorm with one
      group: the same statistics as LayerNorm over (C, H, W), with a learned
      scale and shift per channel instead of per element, so the layer does
      not depend on the input's spatial size.
    * ``instance``: per sample and per channel over H, W (affine, no running
      statistics: train and test behave the same).
    * ``none``: identity.
    """
    check_choice("norm", name, NORMS)
    check_int("num_groups", num_groups)
    if name == "batch":
        return nn.BatchNorm2d
    if name == "layer":
        return partial(nn.GroupNorm, 1)
    if name == "instance":
        return partial(nn.InstanceNorm2d, affine=True)
    if name == "none":
        return lambda num_channels: nn.Identity()

    def group_norm(num_channels: int) -> nn.Module:
        if num_channels % num_groups:
            raise UserError(
                f"norm 'group': num_groups={num_groups} does not divide a layer of "
                f"{num_channels} channels; choose a num_groups that divides every width "
                f"(1, 2, 4, 8, 16 or 32 for the 64..2048-channel models)"
            )
        return nn.GroupNorm(num_groups, num_channels)

    return group_norm


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with padding 1 (keeps H, W at stride 1)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """1x1 convolution (channel projection)."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias)


def needs_bias(norm: nn.Module) -> bool:
    """Whether a conv feeding ``norm`` needs its own bias.

    Batch and instance norm subtract a per-channel mean, which removes a
    per-channel bias exactly, and add their own learned shift; group and layer
    norm follow the same convention (torchvision, timm). Only a conv followed
    by no norm (``nn.Identity``) needs one.
    """
    return isinstance(norm, nn.Identity)
