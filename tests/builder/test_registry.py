import dataclasses

import pytest
from torch import nn

from convforge.builder import ModelConfig, create_model, get_entry, list_models, register_model
from convforge.errors import UserError

EXPECTED = {
    "plain", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
}  # fmt: skip


def test_every_model_is_registered_in_natural_order():
    assert set(list_models()) == EXPECTED
    assert list_models()[:6] == [
        "plain",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
    ]


def test_duplicate_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):

        @register_model
        def resnet18(**kwargs):
            return nn.Identity()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"activation": "swish"}, "unknown --activation 'swish'; choose one of: relu, leaky_relu"),
        ({"norm": "weight"}, "unknown --norm 'weight'; choose one of: batch, group, layer"),
        ({"init": "orthogonal"}, "unknown --init 'orthogonal'; choose one of: kaiming, xavier"),
        ({"stem": "cifar"}, "unknown --stem 'cifar'; choose one of: imagenet, small"),
        ({"num_classes": 0}, "--num-classes must be a positive integer"),
        ({"in_channels": 2.5}, "--in-channels must be a positive integer"),
        ({"depth": 5}, "model 'resnet18' has no option depth; it takes: base_width"),
    ],
)
def test_bad_options_name_the_valid_choices(kwargs, message):
    with pytest.raises(UserError) as e:
        create_model("resnet18", **kwargs)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_model_lists_the_models():
    with pytest.raises(
        UserError, match=r"unknown model 'resnet19'; choose one of: plain, resnet18, resnet34"
    ):
        create_model("resnet19")


def test_group_norm_must_divide_every_width():
    with pytest.raises(UserError, match="num_groups=48 does not divide a layer of 64 channels"):
        create_model("resnet18", norm="group", num_groups=48)


def test_bn_variant_refuses_other_norms():
    with pytest.raises(UserError, match="'vgg16_bn' takes norm batch only.*use 'vgg16'"):
        create_model("vgg16_bn", norm="group")


def test_zero_init_residual_needs_blocks_and_a_norm():
    with pytest.raises(UserError, match="no blocks"):
        create_model("vgg11_bn", zero_init_residual=True)
    with pytest.raises(UserError, match="norm 'none'"):
        create_model("resnet18", norm="none", zero_init_residual=True)


def test_resolved_config_fills_defaults_from_the_architecture_and_activation():
    assert ModelConfig("vgg16").resolved().norm == "none"
    assert ModelConfig("vgg16_bn").resolved().norm == "batch"
    assert ModelConfig("resnet18").resolved().norm == "batch"
    assert ModelConfig("resnet18", activation="tanh").resolved().init == "xavier"
    assert ModelConfig("resnet18", activation="leaky_relu").resolved().init == "kaiming"
    assert ModelConfig("plain").resolved().options == {"depth": 10, "width": 64}


def test_config_round_trips_through_a_dict():
    cfg = ModelConfig("plain", activation="gelu", options={"depth": 4}).resolved()
    again = ModelConfig(**dataclasses.asdict(cfg)).resolved()
    assert again == cfg


def test_entry_describes_the_model():
    entry = get_entry("resnet50")
    assert entry.summary.startswith("ResNet-50")
    assert get_entry("plain").options == {"depth": 10, "width": 64}
