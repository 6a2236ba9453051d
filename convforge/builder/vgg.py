"""VGG-11/13/16/19 (Simonyan & Zisserman 2014), with and without BatchNorm.

Only 3x3 convs, stacked: two see a 5x5 window, three a 7x7 one, with more
non-linearities and fewer weights than one big kernel. Stage widths are data
(:data:`CFGS`, 'M' is a 2x2 max-pool). The layout (``features``, ``avgpool``,
``classifier`` and their Sequential indices) matches torchvision's, so its
``vgg16`` / ``vgg16_bn`` state dicts load with ``strict=True``; as there,
every conv has a bias, with or without a norm after it.
"""

from __future__ import annotations

from torch import Tensor, nn

from convforge.builder.layers import ActLayer, NormLayer, conv3x3
from convforge.builder.registry import register_model

CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}  # fmt: skip


class VGG(nn.Module):
    """Conv stages (conv3x3-norm-act, then max-pool), pooling, classifier.

    ``stem='imagenet'``: the paper's head: 7x7 adaptive average pool, then
    FC-4096, FC-4096, FC-classes with dropout (224 px inputs).
    ``stem='small'``: max-pools round up (so an 8 px input still passes all
    five), global average pool and one linear layer (8-64 px inputs).
    """

    def __init__(
        self,
        cfg: list[int | str],
        num_classes: int,
        in_channels: int,
        stem: str,
        norm_layer: NormLayer,
        act_layer: ActLayer,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features = _make_features(cfg, in_channels, norm_layer, act_layer, stem == "small")
        width = next(v for v in reversed(cfg) if v != "M")
        if stem == "imagenet":
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(width * 7 * 7, 4096),
                act_layer(),
                nn.Dropout(dropout),
                nn.Linear(4096, 4096),
                act_layer(),
                nn.Dropout(dropout),
                nn.Linear(4096, num_classes),
            )
        else:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.classifier = nn.Sequential(nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def _make_features(cfg, in_channels, norm_layer, act_layer, ceil_pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=ceil_pool))
            continue
        norm = norm_layer(v)
        # torchvision's Sequential indices: conv, [norm,] act. Only an actual norm takes a slot.
        layers += [conv3x3(in_channels, v, bias=True)]
        layers += [] if isinstance(norm, nn.Identity) else [norm]
        layers += [act_layer()]
        in_channels = v
    return nn.Sequential(*layers)


@register_model(default_norm="none")
def vgg11(**kwargs) -> VGG:
    """VGG-11 (configuration A): 8 conv layers."""
    return VGG(CFGS["vgg11"], **kwargs)


@register_model(norms=("batch",))
def vgg11_bn(**kwargs) -> VGG:
    """VGG-11 with BatchNorm after every conv."""
    return VGG(CFGS["vgg11"], **kwargs)


@register_model(default_norm="none")
def vgg13(**kwargs) -> VGG:
    """VGG-13 (configuration B): 10 conv layers."""
    return VGG(CFGS["vgg13"], **kwargs)


@register_model(norms=("batch",))
def vgg13_bn(**kwargs) -> VGG:
    """VGG-13 with BatchNorm after every conv."""
    return VGG(CFGS["vgg13"], **kwargs)


@register_model(default_norm="none")
def vgg16(**kwargs) -> VGG:
    """VGG-16 (configuration D): 13 conv layers."""
    return VGG(CFGS["vgg16"], **kwargs)


@register_model(norms=("batch",))
def vgg16_bn(**kwargs) -> VGG:
    """VGG-16 with BatchNorm after every conv."""
    return VGG(CFGS["vgg16"], **kwargs)


@register_model(default_norm="none")
def vgg19(**kwargs) -> VGG:
    """VGG-19 (configuration E): 16 conv layers."""
    return VGG(CFGS["vgg19"], **kwargs)


@register_model(norms=("batch",))
def vgg19_bn(**kwargs) -> VGG:
    """VGG-19 with BatchNorm after every conv."""
    return VGG(CFGS["vgg19"], **kwargs)
