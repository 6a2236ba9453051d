import pytest
import torch
from torch import nn

from convforge.builder import ACTIVATIONS, NORMS, create_model, list_models
from convforge.builder.resnet import BasicBlock, Bottleneck


@pytest.mark.parametrize("arch", list_models())
@pytest.mark.parametrize("stem, size", [("small", 8), ("small", 32), ("imagenet", 64)])
def test_forward_shape_for_every_model_and_stem(arch, stem, size):
    model = create_model(arch, num_classes=7, in_channels=1, stem=stem).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("in_channels", [1, 3, 4])
def test_any_number_of_input_channels(in_channels):
    model = create_model("resnet18", in_channels=in_channels, num_classes=2, stem="small")
    assert model.conv1.in_channels == in_channels
    assert model(torch.randn(2, in_channels, 16, 16)).shape == (2, 2)


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_norm_and_activation_builds_and_backpropagates(arch, norm, activation):
    model = create_model(
        arch,
        num_classes=4,
        in_channels=3,
        stem="small",
        norm=norm,
        activation=activation,
        num_groups=8,
    ).train()
    # 32 px: VGG's last stage still has 2x2 positions, which instance norm needs.
    x = torch.randn(4, 3, 32, 32)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0


def _types(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize(
    "norm, kind",
    [
        ("batch", nn.BatchNorm2d),
        ("group", nn.GroupNorm),
        ("layer", nn.GroupNorm),
        ("instance", nn.InstanceNorm2d),
    ],
)
def test_the_chosen_norm_follows_every_conv(norm, kind):
    model = create_model("resnet34", norm=norm, num_groups=16)
    assert len(_types(model, kind)) == len(_types(model, nn.Conv2d))
    assert not _types(model, nn.BatchNorm2d) or kind is nn.BatchNorm2d


def test_convs_carry_a_bias_only_without_a_norm():
    assert all(c.bias is None for c in _types(create_model("resnet18"), nn.Conv2d))
    assert all(c.bias is not None for c in _types(create_model("resnet18", norm="none"), nn.Conv2d))


def test_the_chosen_activation_is_used_everywhere():
    model = create_model("resnet50", activation="leaky_relu", leaky_slope=0.1)
    acts = _types(model, nn.LeakyReLU)
    assert acts and all(a.negative_slope == 0.1 for a in acts)
    assert not _types(model, nn.ReLU)


def test_block_types_and_projection_shortcuts():
    r18, r50 = create_model("resnet18"), create_model("resnet50")
    assert isinstance(r18.layer1[0], BasicBlock) and isinstance(r50.layer1[0], Bottleneck)
    # ResNet-18 stage 1 keeps 64 channels at stride 1: identity shortcut.
    assert r18.layer1[0].downsample is None
    # Every later stage halves H, W and widens: a strided 1x1 projection.
    proj = r18.layer2[0].downsample[0]
    assert proj.kernel_size == (1, 1) and proj.stride == (2, 2)
    # Bottleneck stage 1 widens 64 -> 256 at stride 1: projection without striding.
    assert r50.layer1[0].downsample[0].stride == (1, 1)
    assert r50.fc.in_features == 2048


@pytest.mark.parametrize(
    "arch, blocks",
    [
        ("resnet18", [2, 2, 2, 2]),
        ("resnet34", [3, 4, 6, 3]),
        ("resnet101", [3, 4, 23, 3]),
        ("resnet152", [3, 8, 36, 3]),
    ],
)
def test_resnet_stage_depths(arch, blocks):
    model = create_model(arch)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == blocks


@pytest.mark.parametrize("arch, convs", [("vgg11", 8), ("vgg13", 10), ("vgg16", 13), ("vgg19", 16)])
def test_vgg_has_only_3x3_convs_and_three_fc_layers(arch, convs):
    model = create_model(arch)
    conv_layers = _types(model, nn.Conv2d)
    assert len(conv_layers) == convs
    assert all(c.kernel_size == (3, 3) for c in conv_layers)
    assert len(_types(model, nn.Linear)) == 3


def test_stems_differ_as_documented():
    big, small = create_model("resnet18"), create_model("resnet18", stem="small")
    assert big.conv1.kernel_size == (7, 7) and big.conv1.stride == (2, 2)
    assert isinstance(big.maxpool, nn.MaxPool2d)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    vgg_small = create_model("vgg16", stem="small", num_classes=10)
    assert len(_types(vgg_small, nn.Linear)) == 1


def test_plain_net_depth_and_width():
    model = create_model("plain", depth=6, width=32, stem="small", norm="none")
    convs = _types(model, nn.Conv2d)
    assert len(convs) == 6 and all(c.out_channels == 32 for c in convs)


def test_resnet_base_width_scales_every_stage():
    model = create_model("resnet18", base_width=16, stem="small", num_classes=10)
    widths = [getattr(model, f"layer{i}")[0].conv1.out_channels for i in range(1, 5)]
    assert widths == [16, 32, 64, 128] and model.fc.in_features == 128
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
