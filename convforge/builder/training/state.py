"""What a run keeps between epochs and across a resume, and the files that hold it.

Every epoch the main process writes ``last.pt`` (and ``best.pt`` when the
validation accuracy improved), ``metrics.csv`` and ``curves.png`` into the
run's folder; ``config.json`` once at the start. Checkpoints are written
atomically (:func:`~convforge.builder.checkpoint.save_checkpoint`).

Exact resume: every source of randomness is re-seeded from ``(seed, epoch)``
at the start of each epoch (:func:`seed_everything`), and ``last.pt`` holds
weights, optimizer, scheduler, scaler and EMA state (:class:`Learner`), the
history and best epoch (:class:`RunState`) and every RNG's state. So a run
stopped after epoch k and resumed ends with the same weights as one that
never stopped (on CPU; GPU kernels may be nondeterministic unless
``deterministic`` is on).
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.optim.swa_utils import AveragedModel

from convforge import __version__
from convforge.builder.checkpoint import Checkpoint, save_checkpoint
from convforge.builder.data.augment import AugmentConfig
from convforge.builder.data.sources import DataBundle
from convforge.builder.registry import ModelConfig
from convforge.builder.training import monitor
from convforge.builder.training.config import TrainConfig
from convforge.builder.training.distill import Distillation
from convforge.builder.training.distributed import World
from convforge.builder.transfer import FinetuneSchedule
from convforge.errors import UserError
from convforge.files import write_text


@dataclass
class RunSpec:
    """What a run trains, on what, and where; fixed before its first step.

    A resumed run's spec comes from its ``last.pt``; the configurations are
    recorded in ``config.json`` and in every checkpoint.
    """

    out: Path  # the run's folder (a resumed run's: wherever its last.pt is now)
    model_cfg: ModelConfig  # resolved; num_classes and in_channels match the data
    cfg: TrainConfig  # resolved, with the augmentation as it runs
    bundle: DataBundle  # the train and validation splits
    data_cfg: dict  # what inference needs to preprocess like training (trainer.data_config)
    schedule: FinetuneSchedule  # which stages train when (FromScratch: all, always)
    extra: dict  # more entries stored in every checkpoint (fine-tuning's source)
    distill: Distillation | None = None  # a teacher whose outputs the loss also follows


@dataclass
class Learner:
    """The objects a training step changes; ``last.pt`` holds the state of each."""

    net: nn.Module  # the model itself (not its DDP wrapper)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per batch
    scaler: torch.amp.GradScaler | None  # fp16 autocast only
    ema: AveragedModel | None  # when ema_decay > 0

    def state_dicts(self) -> dict:
        """The checkpoint entries ``model_state`` ... ``ema_state`` (None where absent)."""
        return {
            "model_state": self.net.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "scaler_state": self.scaler.state_dict() if self.scaler is not None else None,
            "ema_state": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dicts(self, checkpoint: Checkpoint) -> None:
        """Load what :meth:`state_dicts` wrote; a scaler or EMA the file lacks starts afresh."""
        self.net.load_state_dict(checkpoint.model_state)
        states = checkpoint.extra  # the other entries state_dicts() wrote
        self.optimizer.load_state_dict(states["optimizer_state"])
        self.scheduler.load_state_dict(states["scheduler_state"])
        if self.scaler is not None and states.get("scaler_state"):
            self.scaler.load_state_dict(states["scaler_state"])
        if self.ema is not None and states.get("ema_state"):
            self.ema.load_state_dict(states["ema_state"])


@dataclass
class RunState:
    """Where a run stands: one history row per completed epoch and the best so far."""

    history: list[dict] = field(default_factory=list)  # rows as in metrics.csv
    best_acc: float = -1.0  # best validation top-1 in [0, 1]; -1 before the first epoch
    best_epoch: int = 0  # 1-based epoch of best_acc; 0 before the first epoch
    start_epoch: int = 0  # epochs completed before this invocation (a resume's last.pt)

    def record(self, row: dict) -> bool:
        """Append an epoch's row; True when its ``val_acc`` beats every earlier epoch's."""
        self.history.append(row)
        improved = row["val_acc"] > self.best_acc
        if improved:
            self.best_acc, self.best_epoch = row["val_acc"], row["epoch"]
        return improved


def configs_from(checkpoint: Checkpoint) -> tuple[ModelConfig, TrainConfig]:
    """The configurations a checkpoint was trained with; UserError if it has no
    ``train_config`` (it was not written by the trainer, so it cannot be resumed)."""
    if not checkpoint.train_config:
        raise UserError(
            f"{checkpoint.path} has no train_config: only a last.pt written by convforge train "
            f"can be resumed"
        )
    train = dict(checkpoint.train_config)
    train["augment"] = AugmentConfig(**train["augment"])
    return checkpoint.model_config, TrainConfig(**train)


def restore(checkpoint: Checkpoint, learner: Learner) -> RunState:
    """Continue from ``checkpoint`` (a ``last.pt``): the learner's states, every RNG's state,
    and the run's state to go on from."""
    learner.load_state_dicts(checkpoint)
    state = RunState(
        history=list(checkpoint.history),
        best_acc=checkpoint.metrics["best_val_acc"],
        best_epoch=checkpoint.metrics["best_epoch"],
        start_epoch=checkpoint.epoch,
    )
    _set_rng_state(checkpoint.extra["rng_state"])
    return state


def save(spec: RunSpec, learner: Learner, state: RunState, epoch: int, improved: bool) -> None:
    """Write the files of a completed ``epoch`` (1-based): ``last.pt``, ``best.pt`` when
    ``improved``, ``metrics.csv`` and ``curves.png``."""
    payload = _payload(spec, learner, state, epoch)
    save_checkpoint(spec.out / "last.pt", payload)
    if improved:
        save_checkpoint(spec.out / "best.pt", payload)
    monitor.write_metrics_csv(spec.out / "metrics.csv", state.history)
    monitor.plot_curves(
        spec.out / "curves.png", state.history, f"{spec.model_cfg.arch} on {spec.cfg.dataset}"
    )


def write_config(spec: RunSpec, world: World) -> None:
    """``config.json``: the run's configurations, versions and where it runs."""
    record = {
        "model": dataclasses.asdict(spec.model_cfg),
        "train": dataclasses.asdict(spec.cfg),
        "data": spec.data_cfg,
        "transfer": spec.schedule.as_dict(),
        "versions": _versions(),
        "world_size": world.size,
        "device": str(world.device),
    }
    write_text(spec.out / "config.json", json.dumps(record, indent=2) + "\n")


def _payload(spec: RunSpec, learner: Learner, state: RunState, epoch: int) -> dict:
    states = learner.state_dicts()
    last = state.history[-1]
    return {
        "model_state": states["model_state"],
        "model_config": dataclasses.asdict(spec.model_cfg),
        "data_config": spec.data_cfg,
        "train_config": dataclasses.asdict(spec.cfg),
        "optimizer_state": states["optimizer_state"],
        "scheduler_state": states["scheduler_state"],
        "scaler_state": states["scaler_state"],
        "ema_state": states["ema_state"],
        "epoch": epoch,
        "metrics": {**last, "best_val_acc": state.best_acc, "best_epoch": state.best_epoch},
        "history": state.history,
        "rng_state": _rng_state(),
        "transfer": spec.schedule.as_dict(),
        "versions": _versions(),
        **spec.extra,
    }


# -- randomness ----------------------------------------------------------------------------


def seed_everything(seed: int, epoch: int) -> None:
    """Seed Python's, numpy's and torch's RNGs from ``(seed, epoch)``."""
    s = seed * 1_000_003 + epoch
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _versions() -> dict:
    return {
        "convforge": __version__,
        "torch": str(torch.__version__),  # a TorchVersion object, which weights_only refuses
        "torchvision": str(torchvision.__version__),
        "python": sys.version.split()[0],
    }
