"""convforge's default resnet18/resnet50/vgg16_bn load torchvision weights and agree with it."""

import pytest
import torch
import torchvision
from torch import nn

from convforge.builder import create_model

TORCHVISION = {
    "resnet18": (torchvision.models.resnet18, 11_689_512),
    "resnet50": (torchvision.models.resnet50, 25_557_032),
    "vgg16_bn": (torchvision.models.vgg16_bn, 138_365_992),
}


def _with_real_statistics(model: nn.Module) -> nn.Module:
    """Give every BN non-trivial running stats and affine params, as trained weights have."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model.eval()


@pytest.mark.parametrize("arch", list(TORCHVISION))
def test_loads_torchvision_state_dict_strictly_and_matches_outputs(arch):
    make_tv, params = TORCHVISION[arch]
    reference = _with_real_statistics(make_tv())
    ours = create_model(arch)
    result = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ours.eval()
    assert sum(p.numel() for p in ours.parameters()) == params
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert expected.std() > 0  # a real signal, not a constant
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
