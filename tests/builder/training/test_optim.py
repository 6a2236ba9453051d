import math

import pytest
import torch
from torch import nn

from convforge.builder import create_model
from convforge.builder.training.config import TrainConfig
from convforge.builder.training.optim import lr_factor, make_optimizer, make_scheduler, param_groups


def test_no_weight_decay_on_norm_parameters_and_biases():
    model = create_model("resnet18", num_classes=3, stem="small", base_width=8)
    groups = param_groups(model, weight_decay=5e-4)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        is_weight_matrix = p.ndim > 1
        assert (id(p) in decayed) == is_weight_matrix, name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_lr_multiplier_per_parameter():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    groups = param_groups(model, 0.0, lr_mult=lambda name: 1.0 if name.startswith("1.") else 0.1)
    cfg = TrainConfig(lr=0.2).resolved()
    opt = make_optimizer(cfg, groups)
    lrs = {g["lr_mult"]: g["lr"] for g in opt.param_groups}
    assert lrs == pytest.approx({1.0: 0.2, 0.1: 0.02})


def test_cosine_with_warmup():
    cfg = TrainConfig(epochs=10, warmup_epochs=1, schedule="cosine").resolved()
    assert lr_factor(cfg, 0, 10) == pytest.approx(0.1)
    assert lr_factor(cfg, 5, 10) == pytest.approx(0.55)
    assert lr_factor(cfg, 10, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 55, 10) == pytest.approx(0.5)
    assert lr_factor(cfg, 100, 10) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule():
    cfg = TrainConfig(epochs=10, warmup_epochs=0, schedule="step", step_epochs=3).resolved()
    assert [lr_factor(cfg, e * 5, 5) for e in (0, 2, 3, 6, 9)] == pytest.approx(
        [1, 1, 0.1, 0.01, 0.001]
    )


@pytest.mark.parametrize("schedule", ["cosine", "step", "onecycle"])
def test_scheduler_steps_per_batch_and_peaks_at_lr(schedule):
    cfg = TrainConfig(epochs=4, lr=0.3, schedule=schedule, warmup_epochs=1, step_epochs=2)
    cfg = cfg.resolved()
    model = nn.Linear(3, 2)
    opt = make_optimizer(cfg, param_groups(model, 0.0))
    sched = make_scheduler(cfg, opt, steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(0.3, rel=0.05)
    assert lrs[0] < 0.3 and lrs[-1] < 0.3
    assert all(math.isfinite(x) for x in lrs)


def test_scheduler_state_survives_weights_only_round_trip(tmp_path):
    cfg = TrainConfig(epochs=2, schedule="onecycle").resolved()
    opt = make_optimizer(cfg, param_groups(nn.Linear(2, 2), 0.0))
    sched = make_scheduler(cfg, opt, 3)
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["total_steps"] == 6
