"""Optimizer parameter groups and per-step learning-rate schedules.

Weight decay applies to conv and linear weights only: decaying norm scales
and biases (1-D parameters) only fights the normalization and hurts
accuracy (the torchvision references and timm exclude them the same way).
Schedules advance every step, not every epoch, so warmup is smooth.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from convforge.builder.training.config import TrainConfig


def param_groups(
    model: nn.Module, weight_decay: float, lr_mult: Callable[[str], float] | None = None
) -> list[dict]:
    """Groups by (lr multiplier, decays?): ``[{"params", "weight_decay", "lr_mult"}, ...]``.

    Every parameter is in a group, frozen ones too, so unfreezing one later
    needs no new optimizer. ``lr_mult(name)`` scales the learning rate per
    parameter (fine-tuning: backbone x 0.1); default 1 for all.
    """
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        mult = lr_mult(name) if lr_mult else 1.0
        groups.setdefault((mult, p.ndim > 1), []).append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_mult": mult}
        for (mult, decay), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))
    ]


def make_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW over ``groups``, each at ``cfg.lr x lr_mult``."""
    for g in groups:
        g["lr"] = cfg.lr * g["lr_mult"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak LR at ``step`` for the cosine and step schedules.

    Linear warmup from 0.1 to 1 over ``warmup_epochs``; then cosine decay to 0
    over the remaining steps, or x ``step_gamma`` every ``step_epochs``.
    """
    total = cfg.epochs * steps_per_epoch
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.step_gamma ** ((step // steps_per_epoch) // cfg.step_epochs)


def make_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-step scheduler for ``cfg.schedule`` (call ``.step()`` after every batch)."""
    if cfg.schedule == "onecycle":
        # torch's one-cycle: warm up to the peak over 30% of steps (momentum cycled
        # down meanwhile), then anneal to peak/1e4.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=cfg.epochs * steps_per_epoch,
            cycle_momentum=cfg.optimizer == "sgd",
        )
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch)
    )
