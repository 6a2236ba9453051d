"""Weight initialization: the lecture's three rules, applied in one loop.

Each rule is a fixed formula for the weights of every Conv2d and Linear layer
(biases start at zero, norm layers at scale 1 and shift 0):

* ``kaiming`` (He et al. 2015): ``W ~ N(0, gain^2 / fan_in)`` with the ReLU
  gain ``sqrt(2)``, or ``sqrt(2 / (1 + slope^2))`` for Leaky ReLU. The 2
  compensates for ReLU zeroing half its inputs. Fan mode is ``fan_in``
  (``in_channels * kh * kw``), which keeps the *forward* activation variance
  constant, the property the lecture's experiment and ``diagnose init``
  measure. (torchvision uses ``fan_out``, which keeps the backward gradient
  variance constant; for 3x3 stacks of equal width the two are the same.)
  GELU and SiLU get the ReLU gain: they behave like ReLU for large |x|.
* ``xavier`` (Glorot & Bengio 2010): ``W ~ N(0, 2 / (fan_in + fan_out))``,
  gain 1. Meant for tanh/sigmoid, whose slope at 0 is at most 1; it is the
  lecture's ``sqrt(1/Din)`` when fan_in equals fan_out.
* ``small``: ``W = 0.01 * randn``: the lecture's counter-example, kept so
  ``diagnose init`` can show activations collapsing with depth.

The default rule follows the activation: ``xavier`` for tanh and sigmoid,
``kaiming`` for the ReLU family.
"""

from __future__ import annotations

import math

from torch import nn

from convforge.errors import check_choice

INITS = ("kaiming", "xavier", "small")


def default_init(activation: str) -> str:
    """The lecture's pairing: Xavier for saturating activations, Kaiming for the ReLU family."""
    return "xavier" if activation in ("tanh", "sigmoid") else "kaiming"


def kaiming_gain(activation: str, leaky_slope: float = 0.01) -> float:
    """He gain for ``activation``: sqrt(2 / (1 + a^2)), where a = 0 except for Leaky ReLU."""
    slope = leaky_slope if activation == "leaky_relu" else 0.0
    return math.sqrt(2.0 / (1.0 + slope**2))


def init_weights(
    model: nn.Module,
    init: str,
    activation: str = "relu",
    leaky_slope: float = 0.01,
    zero_init_residual: bool = False,
) -> None:
    """Initialize ``model`` in place with rule ``init`` (one of :data:`INITS`).

    With ``zero_init_residual`` every residual block's last norm scale starts
    at 0 (Goyal et al. 2017), so each block begins as the identity; blocks opt
    in by defining ``zero_init_last()``.
    """
    check_choice("init", init, INITS)
    gain = kaiming_gain(activation, leaky_slope)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if init == "kaiming":
                fan_in = nn.init._calculate_correct_fan(m.weight, "fan_in")
                nn.init.normal_(m.weight, 0.0, gain / math.sqrt(fan_in))
            elif init == "xavier":
                nn.init.xavier_normal_(m.weight, gain=1.0)
            else:
                nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if hasattr(m, "zero_init_last"):
                m.zero_init_last()
