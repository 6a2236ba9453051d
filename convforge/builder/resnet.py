"""ResNet-18/34/50/101/152 (He et al. 2015), laid out like torchvision's.

Module names (``conv1``/``bn1``, ``layer1``..``layer4``, ``downsample``,
``fc``) and shapes match ``torchvision.models.resnet`` so a torchvision
``state_dict()`` loads with ``strict=True``. The ``bn*`` modules hold whatever
norm was chosen (the names stay for that compatibility). Bottleneck blocks
stride in the 3x3 conv ("ResNet v1.5"), as torchvision does.
"""

from __future__ import annotations

from torch import Tensor, nn

from convforge.builder.layers import ActLayer, NormLayer, conv1x1, conv3x3, needs_bias
from convforge.builder.registry import register_model
from convforge.errors import UserError


def _zero_scale(norm: nn.Module) -> None:
    if getattr(norm, "weight", None) is not None:
        nn.init.zeros_(norm.weight)


class BasicBlock(nn.Module):
    """conv3x3-norm-act-conv3x3-norm, add the shortcut, act: y = act(F(x) + x)."""

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int,
        downsample: nn.Module | None,
        norm_layer: NormLayer,
        act_layer: ActLayer,
    ) -> None:
        super().__init__()
        bn1, bn2 = norm_layer(channels), norm_layer(channels)
        self.conv1 = conv3x3(in_channels, channels, stride, bias=needs_bias(bn1))
        self.bn1 = bn1
        self.act1 = act_layer()
        self.conv2 = conv3x3(channels, channels, bias=needs_bias(bn2))
        self.bn2 = bn2
        self.downsample = downsample
        self.act2 = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + identity)

    def zero_init_last(self) -> None:
        _zero_scale(self.bn2)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each followed by norm; add; act."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stride: int,
        downsample: nn.Module | None,
        norm_layer: NormLayer,
        act_layer: ActLayer,
    ) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        bn1, bn2, bn3 = norm_layer(channels), norm_layer(channels), norm_layer(out_channels)
        self.conv1 = conv1x1(in_channels, channels, bias=needs_bias(bn1))
        self.bn1 = bn1
        self.act1 = act_layer()
        self.conv2 = conv3x3(channels, channels, stride, bias=needs_bias(bn2))
        self.bn2 = bn2
        self.act2 = act_layer()
        self.conv3 = conv1x1(channels, out_channels, bias=needs_bias(bn3))
        self.bn3 = bn3
        self.downsample = downsample
        self.act3 = act_layer()

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + identity)

    def zero_init_last(self) -> None:
        _zero_scale(self.bn3)


class ResNet(nn.Module):
    """Stem, four stages of residual blocks, global pool, linear.

    Stage widths are ``base_width`` x (1, 2, 4, 8): 64 gives the paper's (and
    torchvision's) 64, 128, 256, 512; 16 gives a net 16x cheaper, the usual
    choice for small inputs such as CIFAR or digits.

    ``stem='imagenet'``: 7x7/2 conv + 3x3/2 max-pool (224 px inputs, /32 overall).
    ``stem='small'``: 3x3/1 conv, no max-pool (8-64 px inputs, /8 overall).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int,
        in_channels: int,
        stem: str,
        norm_layer: NormLayer,
        act_layer: ActLayer,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        if base_width < 1:
            raise UserError(f"base_width must be a positive integer, got {base_width}")
        w = base_width
        self._norm_layer = norm_layer
        self._act_layer = act_layer
        self.inplanes = w
        bn1 = norm_layer(w)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, w, 7, stride=2, padding=3, bias=needs_bias(bn1))
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, w, bias=needs_bias(bn1))
            self.maxpool = nn.Identity()
        self.bn1 = bn1
        self.act = act_layer()
        self.layer1 = self._make_layer(block, w, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 2 * w, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * w, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * w, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * w * block.expansion, num_classes)

    def _make_layer(self, block, channels: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        out_channels = channels * block.expansion
        if stride != 1 or self.inplanes != out_channels:
            # Projection shortcut: a strided 1x1 conv matches the residual's shape.
            norm = self._norm_layer(out_channels)
            downsample = nn.Sequential(
                conv1x1(self.inplanes, out_channels, stride, bias=needs_bias(norm)), norm
            )
        args = (self._norm_layer, self._act_layer)
        layers = [block(self.inplanes, channels, stride, downsample, *args)]
        self.inplanes = out_channels
        layers += [block(self.inplanes, channels, 1, None, *args) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def resnet18(base_width: int = 64, **kwargs) -> ResNet:
    """ResNet-18: BasicBlock x [2, 2, 2, 2]."""
    return ResNet(BasicBlock, [2, 2, 2, 2], base_width=base_width, **kwargs)


@register_model
def resnet34(base_width: int = 64, **kwargs) -> ResNet:
    """ResNet-34: BasicBlock x [3, 4, 6, 3]."""
    return ResNet(BasicBlock, [3, 4, 6, 3], base_width=base_width, **kwargs)


@register_model
def resnet50(base_width: int = 64, **kwargs) -> ResNet:
    """ResNet-50: Bottleneck x [3, 4, 6, 3]."""
    return ResNet(Bottleneck, [3, 4, 6, 3], base_width=base_width, **kwargs)


@register_model
def resnet101(base_width: int = 64, **kwargs) -> ResNet:
    """ResNet-101: Bottleneck x [3, 4, 23, 3]."""
    return ResNet(Bottleneck, [3, 4, 23, 3], base_width=base_width, **kwargs)


@register_model
def resnet152(base_width: int = 64, **kwargs) -> ResNet:
    """ResNet-152: Bottleneck x [3, 8, 36, 3]."""
    return ResNet(Bottleneck, [3, 8, 36, 3], base_width=base_width, **kwargs)
