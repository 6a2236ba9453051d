"""A plain deep CNN: the lecture's "deep network" for the initialization experiment.

``depth`` layers of conv3x3-norm-act at one width, no pooling and no
residuals, then a global average pool and a linear layer. With nothing but
the weights to keep the signal's scale, it shows what each init rule does to
activations layer by layer (``convforge diagnose init``).
"""

from __future__ import annotations

from torch import Tensor, nn

from convforge.builder.layers import ActLayer, NormLayer, conv3x3, needs_bias
from convforge.builder.registry import register_model
from convforge.errors import UserError


class PlainNet(nn.Module):
    """``depth`` x (conv3x3 -> norm -> act) at ``width`` channels, pool, linear.

    ``stem='imagenet'`` makes the first conv 7x7/2 followed by a 3x3/2
    max-pool (like ResNet's) so 224 px inputs stay affordable.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        stem: str,
        norm_layer: NormLayer,
        act_layer: ActLayer,
        depth: int = 10,
        width: int = 64,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise UserError(f"plain net needs depth >= 1 and width >= 1, got {depth}, {width}")
        layers: list[nn.Module] = []
        for i in range(depth):
            norm = norm_layer(width)
            c_in = in_channels if i == 0 else width
            if i == 0 and stem == "imagenet":
                conv = nn.Conv2d(c_in, width, 7, stride=2, padding=3, bias=needs_bias(norm))
            else:
                conv = conv3x3(c_in, width, bias=needs_bias(norm))
            layers += [conv, norm, act_layer()]
            if i == 0 and stem == "imagenet":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(self.features(x)).flatten(1))


@register_model
def plain(depth: int = 10, width: int = 64, **kwargs) -> PlainNet:
    """Plain CNN: `depth` 3x3 conv layers at one width, no residuals."""
    return PlainNet(depth=depth, width=width, **kwargs)
