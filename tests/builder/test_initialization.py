import math

import pytest
import torch
from torch import nn

from convforge.builder import create_model
from convforge.builder.initialization import init_weights, kaiming_gain


def _wide_conv():
    """A conv with many weights, so sample std is within ~1% of the rule's std."""
    return nn.Sequential(nn.Conv2d(64, 128, 3, bias=True), nn.BatchNorm2d(128))


def _std(layer):
    return layer.weight.std().item()


def test_small_is_point_zero_one_times_randn():
    net = _wide_conv()
    init_weights(net, "small")
    assert _std(net[0]) == pytest.approx(0.01, rel=0.02)


@pytest.mark.parametrize("activation, slope", [("relu", 0.0), ("leaky_relu", 0.2)])
def test_kaiming_is_gain_over_sqrt_fan_in(activation, slope):
    net = _wide_conv()
    init_weights(net, "kaiming", activation, leaky_slope=slope)
    fan_in = 64 * 3 * 3
    expected = math.sqrt(2.0 / (1 + slope**2)) / math.sqrt(fan_in)
    assert _std(net[0]) == pytest.approx(expected, rel=0.02)


def test_xavier_is_sqrt_two_over_fan_in_plus_fan_out():
    net = _wide_conv()
    init_weights(net, "xavier", "tanh")
    assert _std(net[0]) == pytest.approx(math.sqrt(2.0 / (64 * 9 + 128 * 9)), rel=0.02)


def test_biases_and_norms_start_neutral():
    net = _wide_conv()
    nn.init.normal_(net[0].bias)
    nn.init.normal_(net[1].weight)
    init_weights(net, "kaiming")
    assert torch.all(net[0].bias == 0)
    assert torch.all(net[1].weight == 1) and torch.all(net[1].bias == 0)


def test_kaiming_gain_values():
    assert kaiming_gain("relu") == pytest.approx(math.sqrt(2))
    assert kaiming_gain("gelu") == pytest.approx(math.sqrt(2))
    assert kaiming_gain("leaky_relu", 0.01) == pytest.approx(math.sqrt(2 / 1.0001))


@pytest.mark.parametrize("arch, last", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_zeroes_only_each_blocks_last_norm(arch, last):
    model = create_model(arch, stem="small", num_classes=3, zero_init_residual=True)
    block = model.layer1[0]
    assert torch.all(getattr(block, last).weight == 0)
    assert torch.all(block.bn1.weight == 1)
    assert torch.all(model.bn1.weight == 1)


def test_zero_init_residual_blocks_start_as_identity():
    model = create_model("resnet18", stem="small", num_classes=3, zero_init_residual=True).eval()
    block = model.layer1[1]
    x = torch.relu(torch.randn(2, 64, 8, 8))
    assert torch.allclose(block(x), x)
