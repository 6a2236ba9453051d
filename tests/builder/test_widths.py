"""Per-layer widths: recorded off a model, rebuilt by build_model, refused when wrong."""

import dataclasses

import pytest
import torch
from torch import nn

from convforge.builder import transfer
from convforge.builder.registry import ModelConfig, build_model
from convforge.builder.widths import apply_widths, changed_widths, layer_widths
from convforge.errors import UserError

CFG = ModelConfig("resnet18", num_classes=10, in_channels=3, stem="small",
                  options={"base_width": 8})  # fmt: skip
# layer1.0's inner width 8 -> 5: its first conv's outputs, its norm, its second conv's inputs.
NARROW = {"layer1.0.conv1": [5, 8], "layer1.0.bn1": [5], "layer1.0.conv2": [8, 5]}


def test_a_config_with_widths_builds_the_narrow_model_and_records_exactly_them():
    model = build_model(dataclasses.replace(CFG, widths=NARROW))
    assert model.layer1[0].conv1.weight.shape == (5, 8, 3, 3)
    assert model.layer1[0].bn1.num_features == 5
    assert model.layer1[0].conv2.weight.shape == (8, 5, 3, 3)
    assert changed_widths(model, build_model(CFG)) == NARROW
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


def test_layer_widths_covers_convs_linears_and_norms():
    widths = layer_widths(build_model(dataclasses.replace(CFG, norm="group", num_groups=4)))
    assert widths["conv1"] == [8, 3] and widths["fc"] == [10, 64] and widths["bn1"] == [8]
    assert widths["layer2.0.downsample.1"] == [16]


@pytest.mark.parametrize(
    ("widths", "message"),
    [
        ({"layer1.0.act1": [4]}, "is not a conv, linear or norm layer"),
        ({"nothing.here": [4, 4]}, "is not a conv, linear or norm layer"),
        ({"layer1.0.conv1": [5]}, "needs 2 positive integer"),
        ({"layer1.0.bn1": [0]}, "needs 1 positive integer"),
        ({"layer1.0.conv1": [5, True]}, "needs 2 positive integer"),
        ({"layer1.0.conv1": "5,8"}, "needs 2 positive integer"),
    ],
)
def test_bad_widths_are_one_line_errors(widths, message):
    with pytest.raises(UserError, match=message):
        build_model(dataclasses.replace(CFG, widths=widths))


def test_a_group_norm_keeps_its_groups_and_refuses_widths_they_do_not_divide():
    cfg = dataclasses.replace(CFG, norm="group", num_groups=4)
    model = build_model(dataclasses.replace(cfg, widths={"layer1.0.bn1": [4]}))
    assert model.layer1[0].bn1.num_groups == 4
    with pytest.raises(UserError, match="group norm of 4 groups; 6 channels do not divide"):
        build_model(dataclasses.replace(cfg, widths={"layer1.0.bn1": [6]}))


def test_a_depthwise_conv_stays_depthwise():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8, padding=1))
    apply_widths(model, {"0": [4, 4]})
    assert model[0].groups == 4 and model[0].weight.shape == (4, 1, 3, 3)


def test_widths_must_be_a_mapping():
    with pytest.raises(UserError, match="widths must be a mapping"):
        dataclasses.replace(CFG, widths=[1, 2]).resolved()


def test_fine_tuning_a_pruned_model_for_new_classes_records_the_new_head():
    # The head's recorded [out, in] follows the new class count, so the fine-tuned model's
    # config rebuilds it (a stale out of 10 would not load the 4-class head). Shapes only:
    # these widths break layer4's residual sum, and nothing here runs forward.
    narrow = {**NARROW, "fc": [10, 40], "layer4.1.conv2": [40, 64], "layer4.1.bn2": [40]}
    cfg = dataclasses.replace(CFG, widths=narrow).resolved()
    model, new_cfg = transfer.adapt(build_model(cfg), cfg, num_classes=4, in_channels=1)
    assert new_cfg.widths["fc"] == [4, 40] and model.fc.out_features == 4
    assert cfg.widths["fc"] == [10, 40]  # the source config is not changed
    rebuilt = build_model(new_cfg)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
