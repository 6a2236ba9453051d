import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convforge.builder.layers import activation_layer, needs_bias, norm_layer
from convforge.errors import UserError


def _plain_norm(name, channels=8, **kwargs):
    """The norm with its affine scale 1 and shift 0 (the fresh state), in train mode."""
    return norm_layer(name, **kwargs)(channels).train()


def test_batch_norm_normalizes_each_channel_over_batch_and_space():
    x = torch.randn(4, 8, 5, 5) * 3 + 2
    y = _plain_norm("batch")(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(8), atol=1e-5)
    assert torch.allclose(y.var(dim=(0, 2, 3), unbiased=False), torch.ones(8), atol=1e-3)


def test_layer_norm_normalizes_each_sample_over_channels_and_space():
    x = torch.randn(4, 8, 5, 5) * 3 + 2
    expected = F.layer_norm(x, x.shape[1:], eps=1e-5)
    assert torch.allclose(_plain_norm("layer")(x), expected, atol=1e-5)


def test_instance_norm_normalizes_each_sample_and_channel_over_space():
    x = torch.randn(4, 8, 5, 5) * 3 + 2
    y = _plain_norm("instance")(x)
    assert torch.allclose(y.mean(dim=(2, 3)), torch.zeros(4, 8), atol=1e-5)
    assert torch.allclose(y.var(dim=(2, 3), unbiased=False), torch.ones(4, 8), atol=1e-3)


def test_group_norm_normalizes_each_sample_over_channel_groups():
    x = torch.randn(4, 8, 5, 5) * 3 + 2
    y = _plain_norm("group", num_groups=2)(x).reshape(4, 2, -1)
    assert torch.allclose(y.mean(-1), torch.zeros(4, 2), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(4, 2), atol=1e-3)


def test_no_norm_is_identity_and_asks_for_a_conv_bias():
    norm = norm_layer("none")(8)
    x = torch.randn(2, 8, 3, 3)
    assert torch.equal(norm(x), x)
    assert needs_bias(norm)
    assert not needs_bias(norm_layer("batch")(8))


def test_group_count_that_does_not_divide_is_a_clear_error():
    with pytest.raises(UserError, match="num_groups=3 does not divide a layer of 8 channels"):
        norm_layer("group", num_groups=3)(8)


@pytest.mark.parametrize(
    "name, fn",
    [
        ("relu", torch.relu),
        ("tanh", torch.tanh),
        ("sigmoid", torch.sigmoid),
        ("gelu", F.gelu),
        ("silu", F.silu),
        ("leaky_relu", lambda x: F.leaky_relu(x, 0.01)),
    ],
)
def test_activation_computes_its_formula(name, fn):
    x = torch.linspace(-3, 3, 61)
    assert torch.allclose(activation_layer(name)()(x.clone()), fn(x))


def test_leaky_slope_is_configurable():
    act = activation_layer("leaky_relu", leaky_slope=0.2)()
    assert torch.allclose(act(torch.tensor([-1.0, 2.0])), torch.tensor([-0.2, 2.0]))


def test_each_call_returns_a_fresh_module():
    make = activation_layer("relu")
    assert make() is not make()
    assert isinstance(make(), nn.ReLU)


@pytest.mark.parametrize("slope", [-0.1, 1.0])
def test_leaky_slope_out_of_range_is_refused(slope):
    with pytest.raises(UserError, match=r"leaky_slope must be in \[0, 1\)"):
        activation_layer("leaky_relu", leaky_slope=slope)
