"""Structured pruning (builder/compress/pruning.py): every model kind of the zoo down to a MAC
budget, its widths rebuilt by build_model, and the pruned checkpoint exported."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from convforge.builder.checkpoint import save_checkpoint
from convforge.builder.compress.pruning import IMPORTANCES, macs_and_params, prune_to
from convforge.builder.registry import ModelConfig, build_model
from convforge.builder.widths import changed_widths, layer_widths
from convforge.errors import UserError
from tests.helpers import with_bn_statistics

RESNET = {"stem": "small", "options": {"base_width": 8}}
# (config keywords, input px, importance, max_steps): one of each norm kind, block kind and stem.
# 100 steps (VGG's 512-wide layers: 50) instead of 400 keep the file fast and still land near
# the target; resnet18 runs the default.
CASES = {
    "vgg11": (dict(arch="vgg11", stem="small"), 16, "l1", 50),
    "vgg11_bn": (dict(arch="vgg11_bn", stem="small"), 16, "bn", 50),
    "resnet18": (dict(arch="resnet18", **RESNET), 16, "l1", 400),
    "resnet18_imagenet": (dict(arch="resnet18", stem="imagenet", options={"base_width": 8}),
                          32, "l2", 100),
    "resnet50": (dict(arch="resnet50", **RESNET), 16, "l2", 100),
    "resnet18_group": (dict(arch="resnet18", norm="group", num_groups=4, **RESNET), 16, "l1", 100),
    "resnet18_layer": (dict(arch="resnet18", norm="layer", **RESNET), 16, "l2", 100),
    "resnet18_instance": (dict(arch="resnet18", norm="instance", **RESNET), 16, "l1", 100),
    "plain": (dict(arch="plain", stem="small", in_channels=1, options={"depth": 3, "width": 16}),
              16, "l1", 100),
}  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Pruning runs many small tensor ops; on a shared 2-core machine two threads each make
    them ~50x slower (contention), so this file runs on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(**fields) -> tuple[ModelConfig, nn.Module]:
    cfg = ModelConfig(num_classes=5, **fields).resolved()
    return cfg, with_bn_statistics(build_model(cfg))


def _example(cfg: ModelConfig, px: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, cfg.in_channels, px, px)


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("case", CASES)
def test_prunes_to_half_the_macs_and_the_widths_rebuild_it(case):
    fields, px, importance, steps = CASES[case]
    cfg, model = _build(**fields)
    x = _example(cfg, px)
    before, params_before = macs_and_params(model, x)
    reached = prune_to(model, x, before // 2, importance, max_steps=steps)

    macs, params = macs_and_params(model, x)
    assert reached == macs and 0.3 * before <= macs <= before // 2 and params < params_before
    assert not model.training  # left in the eval mode with_bn_statistics set
    assert _first_conv(model).in_channels == cfg.in_channels
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features == 5
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0
    # The widths a checkpoint records rebuild the pruned shape: its weights load strictly.
    widths = changed_widths(model, build_model(cfg))
    assert widths  # something was pruned
    rebuilt = build_model(dataclasses.replace(cfg, widths=widths))
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert layer_widths(rebuilt) == layer_widths(model)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x), atol=1e-5, rtol=1e-5)
        assert model(x).shape == (2, 5)


@pytest.mark.slow
def test_vgg_imagenet_head_prunes_its_hidden_linears_but_not_the_classes():
    cfg, model = _build(arch="vgg11", stem="imagenet")
    x = _example(cfg, 32)
    before, _ = macs_and_params(model, x)
    assert prune_to(model, x, before // 2, "l1", max_steps=4) <= before // 2
    hidden, _, last = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert hidden.out_features < 4096 and last.in_features < 4096 and last.out_features == 5


def test_same_model_and_arguments_prune_the_same_channels():
    cfg, model = _build(arch="resnet18", **RESNET)
    twin = copy.deepcopy(model)
    x = _example(cfg, 16)
    target = macs_and_params(model, x)[0] // 2
    assert prune_to(model, x, target, "l2", max_steps=100) == prune_to(
        twin, x, target, "l2", max_steps=100
    )
    mine, theirs = model.state_dict(), twin.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_taylor_takes_gradients_without_changing_the_model_otherwise():
    cfg, model = _build(arch="resnet18", **RESNET)
    model.train()
    model.conv1.weight.requires_grad_(False)  # a frozen stem stays frozen
    x = _example(cfg, 16, n=8)
    batches = [(x, torch.arange(8) % 5)]
    magnitude = copy.deepcopy(model)
    target = macs_and_params(model, x)[0] // 2

    assert prune_to(model, x, target, "taylor", loss_batches=batches, max_steps=100) <= target
    assert model.training and all(m.training for m in model.modules())
    assert not model.conv1.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    # Gradients were taken in eval mode: no BatchNorm statistics moved.
    assert all(m.num_batches_tracked == 0 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    prune_to(magnitude, x, target, "l1", max_steps=100)
    assert model.state_dict().keys() == magnitude.state_dict().keys()
    assert any(  # loss gradients rank the channels differently from weight norms
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), magnitude.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match="loss_batches"):
        prune_to(magnitude, x, target, "taylor")


@pytest.mark.parametrize(
    ("fields", "has"),
    [(dict(arch="vgg11", stem="small"), "no norm layers"),
     (dict(arch="resnet18", norm="group", num_groups=4, **RESNET), "GroupNorm")],
)  # fmt: skip
def test_bn_importance_needs_batchnorm(fields, has):
    cfg, model = _build(**fields)
    with pytest.raises(UserError, match=f"--importance bn needs BatchNorm layers; .*{has}"):
        prune_to(model, _example(cfg, 16), 1, "bn")


def test_unknown_importance_names_the_choices():
    cfg, model = _build(arch="plain", stem="small", options={"depth": 2, "width": 4})
    with pytest.raises(UserError, match="unknown importance 'l3'; choose one of: l1, l2, bn"):
        prune_to(model, _example(cfg, 8), 1, "l3")
    assert IMPORTANCES == ("l1", "l2", "bn", "taylor")


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_an_unreachable_target_stops_with_every_layer_still_there(norm):
    cfg, model = _build(arch="plain", stem="small", norm=norm, num_groups=2,
                        options={"depth": 3, "width": 8})  # fmt: skip
    x = _example(cfg, 8)
    reached = prune_to(model, x, 1, "l1", max_steps=20)
    assert reached == macs_and_params(model, x)[0] > 1
    minimum = 2 if norm == "group" else 1  # one channel per group
    assert all(w[0] >= minimum for w in layer_widths(model).values())
    assert model(x).shape == (2, 5)


def test_round_to_and_ignored_layers():
    cfg, model = _build(arch="resnet18", stem="small", options={"base_width": 16})
    x = _example(cfg, 16)
    prune_to(model, x, macs_and_params(model, x)[0] // 2, "l1", round_to=8, max_steps=100,
             ignored=[model.layer4])  # fmt: skip
    widths = layer_widths(model)
    assert all(w[0] % 8 == 0 for name, w in widths.items() if name != "fc")
    assert widths["layer4.0.conv1"][0] == 128 and widths["layer4.1.conv2"][0] == 128
    grouped = _build(arch="resnet18", norm="group", num_groups=4, **RESNET)[1]
    with pytest.raises(UserError, match="--round-to cannot be combined with group norm"):
        prune_to(grouped, x, 1, "l1", round_to=8)


def test_round_to_takes_the_nearest_multiple_not_the_floor():
    # torch-pruning floors: a 32-wide stem would drop to 16 at the first step with round_to
    # 16 and a 20% MAC cut would become about 50%. The nearest multiple keeps it at 32 until
    # its schedule says 24, and the cut stays near the target.
    cfg, model = _build(arch="resnet18", stem="small", options={"base_width": 32})
    x = _example(cfg, 16)
    macs = macs_and_params(model, x)[0]
    reached = prune_to(model, x, int(macs * 0.8), "l1", round_to=16, max_steps=100)
    widths = layer_widths(model)
    assert all(w[0] % 16 == 0 for name, w in widths.items() if name != "fc")
    assert widths["conv1"][0] == 32 and widths["layer1.0.conv1"][0] == 32
    assert 0.6 * macs < reached <= 0.8 * macs


@pytest.mark.parametrize(
    ("fields", "folded"),
    [(dict(arch="resnet18", **RESNET), 20),
     (dict(arch="vgg11_bn", stem="small"), 8),
     (dict(arch="vgg11", stem="small"), 0),
     (dict(arch="resnet18", norm="group", num_groups=4, **RESNET), 0),
     (dict(arch="resnet18", norm="layer", **RESNET), 0),
     (dict(arch="resnet18", norm="instance", **RESNET), 0)],
    ids=["batch-resnet18", "batch-vgg11_bn", "none-vgg11", "group", "layer", "instance"],
)  # fmt: skip
def test_a_pruned_checkpoint_exports_folded_and_validated(tmp_path, fields, folded):
    from convforge.export import ExportOptions, export_checkpoint

    cfg, model = _build(**fields)
    x = _example(cfg, 16)
    prune_to(model, x, macs_and_params(model, x)[0] // 2, "l1", max_steps=50)
    pruned_cfg = dataclasses.replace(cfg, widths=changed_widths(model, build_model(cfg)))
    save_checkpoint(tmp_path / "pruned.pt", {
        "model_state": model.state_dict(),
        "model_config": dataclasses.asdict(pruned_cfg),
        # A dataset not at hand: the export validates on random inputs against torch.
        "data_config": {"dataset": f"imagefolder:{tmp_path / 'gone'}", "classes": list("abcde"),
                        "mean": [0.5] * 3, "std": [0.25] * 3, "input_size": 16,
                        "resize_size": 16, "channels": 3},
        "epoch": 1,
    })  # fmt: skip
    report = export_checkpoint(tmp_path / "pruned.pt", tmp_path / "m.onnx", ExportOptions())
    assert report.validation.passed
    assert report.fold.folded == folded and report.batchnorm_nodes == 0
