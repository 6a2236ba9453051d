import pytest
import torch
import torchvision

from convforge.builder import ModelConfig, create_model
from convforge.builder.transfer import (
    adapt,
    decide,
    load_pretrained,
    make_schedule,
    schedule_from_record,
    stages,
)
from convforge.errors import UserError


def _tv_file(tmp_path, make=torchvision.models.resnet18, name="r.pth"):
    torch.save(make().state_dict(), tmp_path / name)
    return tmp_path / name


def test_stage_layouts():
    assert list(stages(create_model("resnet18"))) == [
        "stem", "layer1", "layer2", "layer3", "layer4", "head"
    ]  # fmt: skip
    vgg = stages(create_model("vgg11_bn", stem="small", num_classes=3))
    assert list(vgg) == ["stage1", "stage2", "stage3", "stage4", "stage5", "head"]
    assert vgg["stage1"] == ["features.0.", "features.1.", "features.2.", "features.3."]


def test_torchvision_file_loads_and_adapts_to_new_classes_and_gray(tmp_path):
    model, cfg = load_pretrained(_tv_file(tmp_path), "resnet18")
    assert cfg.num_classes == 1000 and cfg.in_channels == 3 and cfg.stem == "imagenet"
    rgb = model.conv1.weight.detach().clone()
    model, new = adapt(model, cfg, num_classes=10, in_channels=1)
    assert new.num_classes == 10 and new.in_channels == 1
    assert model.fc.out_features == 10
    torch.testing.assert_close(model.conv1.weight, rgb.sum(dim=1, keepdim=True))
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_another_architecture_names_the_mismatched_keys(tmp_path):
    path = _tv_file(tmp_path, torchvision.models.resnet34)
    with pytest.raises(UserError, match=r"does not match resnet18: unexpected: layer1.2"):
        load_pretrained(path, "resnet18")


def test_bare_state_dict_needs_the_architecture(tmp_path):
    with pytest.raises(UserError, match="pass --model"):
        load_pretrained(_tv_file(tmp_path))


def _step(model, schedule, epoch=0):
    schedule.apply(model, epoch)
    schedule.train_mode(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.randn(8, 3, 32, 32)).square().mean()
    loss.backward()
    opt.step()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before, model, prefix):
    after = model.state_dict()
    return any(
        not torch.equal(before[k], after[k])
        for k in before
        if k.startswith(prefix) and after[k].is_floating_point()
    )


def test_feature_extraction_freezes_weights_and_bn_statistics():
    model = create_model("resnet18", num_classes=4, stem="small", base_width=8)
    schedule = make_schedule(model, "feature-extract")
    before = _snapshot(model)
    _step(model, schedule)
    for prefix in ("conv1.", "bn1.", "layer1.", "layer4."):
        assert not _changed(before, model, prefix), prefix  # incl. BN running_mean/var
    assert _changed(before, model, "fc.")


def test_finetune_freezes_up_to_a_stage_and_unfreezes_later():
    model = create_model("resnet18", num_classes=4, stem="small", base_width=8)
    schedule = make_schedule(model, "finetune", freeze_until="layer2", unfreeze_at=3)
    assert schedule.frozen == ["stem", "layer1", "layer2"]
    assert schedule.lr_mult("fc.weight") == 1.0 and schedule.lr_mult("layer3.0.conv1.weight") == 0.1
    before = _snapshot(model)
    _step(model, schedule, epoch=0)
    assert not _changed(before, model, "layer2.") and _changed(before, model, "layer3.")
    before = _snapshot(model)
    _step(model, schedule, epoch=2)  # the 3rd epoch: everything trains
    assert _changed(before, model, "layer1.") and _changed(before, model, "conv1.")


def test_schedule_round_trips_through_its_record():
    model = create_model("resnet18", num_classes=4, stem="small", base_width=8)
    schedule = make_schedule(model, "finetune", freeze_until="layer1", backbone_lr_mult=0.2)
    again = schedule_from_record(model, schedule.as_dict())
    assert again.frozen == schedule.frozen and again.backbone_lr_mult == 0.2
    assert schedule_from_record(model, {"strategy": "scratch"}) is None


def test_bad_stage_and_strategy():
    model = create_model("resnet18", num_classes=4, stem="small", base_width=8)
    with pytest.raises(UserError, match="unknown stage for --freeze-until 'layer9'"):
        make_schedule(model, "finetune", freeze_until="layer9")
    with pytest.raises(UserError, match="unknown strategy 'freeze'"):
        make_schedule(model, "freeze")


STAGES = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


@pytest.mark.parametrize(
    "n_train, pre, rand, strategy, freeze, row",
    [
        (1000, 0.90, 0.50, "feature-extract", None, "small data, similar domain"),
        (1000, 0.55, 0.50, "finetune", "layer2", "small data, different domain"),
        (50000, 0.90, 0.50, "finetune", None, "large data, similar domain"),
        (50000, 0.55, 0.50, "finetune", None, "large data, different domain"),
    ],
)
def test_auto_picks_each_row_of_the_lecture_table(n_train, pre, rand, strategy, freeze, row):
    d = decide(n_train, 10, pre, rand, STAGES)
    assert d.strategy == strategy and d.freeze_until == freeze and d.row.startswith(row)
    assert "images/class" in d.reason and "linear probe" in d.reason


def test_large_different_trains_the_backbone_at_full_rate():
    assert decide(50000, 10, 0.5, 0.5, STAGES).backbone_lr_mult == 1.0
    assert decide(50000, 10, 0.9, 0.5, STAGES).backbone_lr_mult == 0.1


def test_adapt_keeps_the_head_when_the_classes_match():
    model = create_model("resnet18", num_classes=10, stem="small", base_width=8)
    head = model.fc
    cfg = ModelConfig("resnet18", num_classes=10, stem="small", options={"base_width": 8})
    model, _ = adapt(model, cfg.resolved(), 10, 3)
    assert model.fc is head
