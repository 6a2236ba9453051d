"""The training loop: data in, ``best.pt`` / ``last.pt`` / ``metrics.csv`` / ``curves.png`` out.

One epoch = shuffle (seeded by seed and epoch), augment, forward, loss,
backward, optimizer and schedule step per batch; then evaluate on the
validation split (and the EMA weights when on), record, checkpoint.

Exact resume: every source of randomness is re-seeded from ``(seed, epoch)``
at the start of each epoch, and ``last.pt`` (written at the end of every
epoch) holds weights, optimizer, scheduler, scaler and EMA state. So a run
stopped after epoch k and resumed ends with the same weights as one that
never stopped (on CPU; GPU kernels may be nondeterministic unless
``deterministic`` is on). Ctrl-C loses at most the epoch in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from convforge import __version__
from convforge.builder.checkpoint import load_checkpoint, save_checkpoint
from convforge.builder.data import augment
from convforge.builder.data.augment import AugmentConfig
from convforge.builder.data.images import channel_stats
from convforge.builder.data.sources import DataBundle, load_dataset
from convforge.builder.registry import ModelConfig, build_model
from convforge.builder.training import distributed, monitor
from convforge.builder.training.config import TrainConfig
from convforge.builder.training.optim import make_optimizer, make_scheduler, param_groups
from convforge.builder.transfer import plan_from_record
from convforge.errors import UserError
from convforge.files import ensure_dir, write_text


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Plan(Protocol):
    """What fine-tuning changes in the loop (see convforge.builder.transfer)."""

    def lr_mult(self, name: str) -> float: ...
    def frozen_in(self, epoch: int) -> frozenset: ...  # names of the stages frozen in epoch
    def apply(self, model: nn.Module, epoch: int) -> bool: ...  # freeze for epoch; True if changed
    def train_mode(self, model: nn.Module) -> None: ...
    def as_dict(self) -> dict: ...


class FromScratch:
    """Every parameter trains from the first epoch at the base learning rate."""

    def lr_mult(self, name: str) -> float:
        return 1.0

    def frozen_in(self, epoch: int) -> frozenset:
        return frozenset()

    def apply(self, model: nn.Module, epoch: int) -> bool:
        return False

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def as_dict(self) -> dict:
        return {"strategy": "scratch"}


@dataclass
class TrainResult:
    out: Path  # run folder
    best_val_acc: float  # best validation top-1 accuracy, in [0, 1]
    best_epoch: int
    epochs_run: int  # epochs completed, counting those before a resume
    stopped_early: bool
    seconds: float  # wall time of this invocation
    history: list[dict]


def load_data(cfg: TrainConfig, channels: int | None = None) -> DataBundle:
    """The run's dataset, split with the run's seed."""
    return load_dataset(
        cfg.dataset, val_fraction=cfg.val_fraction, seed=cfg.seed, channels=channels
    )


def data_config(cfg: TrainConfig, bundle: DataBundle) -> dict:
    """What inference needs to preprocess like training did (DESIGN.md: data_config)."""
    stats = channel_stats(bundle.train, seed=cfg.seed)
    return {
        "dataset": cfg.dataset,
        "classes": list(bundle.classes),
        "mean": stats.mean,
        "std": stats.std,
        "input_size": cfg.input_size,
        "resize_size": augment.eval_resize_size(cfg.input_size, bundle.native_size),
        "channels": bundle.channels,
        "native_size": bundle.native_size,
    }


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    *,
    resume: str | Path | None = None,
    plan: Plan | None = None,
    model: nn.Module | None = None,
    bundle: DataBundle | None = None,
    extra: dict | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model_cfg`` (or the given ``model``) as ``cfg`` says; return the summary.

    ``model_cfg.num_classes`` and ``in_channels`` are taken from the data
    unless ``model`` is given (fine-tuning builds its own). ``resume`` names a
    ``last.pt``: the run continues from it with the configuration stored
    there. ``extra`` is stored in every checkpoint (fine-tuning's source).
    """
    state = load_checkpoint(resume) if resume else None
    if state is not None:
        model_cfg, cfg = _configs_from(state)
    world = distributed.setup(cfg.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        run = _Run(world, model_cfg, cfg, resume, state, plan, model, bundle, extra, progress)
        return run.fit()
    finally:
        torch.use_deterministic_algorithms(deterministic)  # leave the process as it was
        distributed.teardown()


class _Run:
    def __init__(self, world, model_cfg, cfg, resume, state, plan, model, bundle, extra, progress):
        self.world = world
        self.progress = progress
        self.started = time.perf_counter()
        self.state = state
        if state is not None:
            self.out = Path(resume).parent  # the run's folder, wherever it has moved
        else:
            cfg = cfg.resolved()
            self.out = Path(cfg.out)
        self.cfg = cfg
        self.plan = plan or FromScratch()
        self.extra = extra or {}
        if world.is_main:
            ensure_dir(self.out)

        self.bundle = bundle or load_data(
            cfg, channels=None if model is None else model_cfg.in_channels
        )
        if self.state is not None:
            self.data_cfg = self.state["data_config"]
        else:
            self.data_cfg = data_config(cfg, self.bundle)
        if model is None:
            model_cfg = dataclasses.replace(
                model_cfg, num_classes=len(self.bundle.classes), in_channels=self.bundle.channels
            )
            torch.manual_seed(cfg.seed)
            model = build_model(model_cfg)
        if self.state is not None and plan is None:
            self.plan = plan_from_record(model, self.state.get("transfer")) or FromScratch()
        self.model_cfg = model_cfg.resolved()
        if self.model_cfg.in_channels != self.bundle.channels:
            raise UserError(
                f"the model takes {self.model_cfg.in_channels}-channel images but the dataset has "
                f"{self.bundle.channels}"
            )
        self.aug = cfg.augment.resolved(flip_safe=self.bundle.flip_safe)
        self.cfg = dataclasses.replace(cfg, augment=self.aug)  # recorded as it ran
        self._setup_model(model)
        self._setup_data()
        self._setup_optimization()
        self.history: list[dict] = []
        self.best_acc, self.best_epoch, self.start_epoch = -1.0, 0, 0
        if self.state is not None:
            self._restore(self.state)

    # -- setup -----------------------------------------------------------------------------

    def _setup_model(self, model: nn.Module) -> None:
        cfg, dev = self.cfg, self.world.device
        if cfg.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic (set before CUDA starts to be
            # sure); ops with no deterministic kernel warn rather than stop the run.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.net = model.to(dev, memory_format=self.memory_format)
        self.ema = None
        if cfg.ema_decay > 0:
            self.ema = AveragedModel(
                self.net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
            )
        self.amp_dtype = _amp_dtype(cfg.amp, dev)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.eval_criterion = nn.CrossEntropyLoss(reduction="sum")
        self.ddp = None

    def _setup_data(self) -> None:
        cfg, world, d = self.cfg, self.world, self.data_cfg
        native = self.bundle.native_size
        train_tf = augment.train_transform(self.aug, cfg.input_size, d["mean"], d["std"], native)
        eval_tf = augment.eval_transform(cfg.input_size, d["mean"], d["std"], native)
        train_set = self.bundle.train.with_transform(train_tf)
        if len(train_set) < cfg.batch_size * world.size:
            raise UserError(
                f"the training split has {len(train_set)} images, fewer than one batch "
                f"({cfg.batch_size} x {world.size} processes); lower --batch-size"
            )
        self.generator = torch.Generator()
        if world.size > 1:
            self.sampler = DistributedSampler(
                train_set, num_replicas=world.size, rank=world.rank, shuffle=True, seed=cfg.seed
            )
        else:
            self.sampler = RandomSampler(train_set, generator=self.generator)
        pin = world.device.type == "cuda"
        # drop_last: a last batch of one image would break BatchNorm's batch statistics.
        self.train_loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=cfg.workers,
            pin_memory=pin,
            generator=self.generator,
        )
        # Validation: each process takes every size-th image (no padding), sums are reduced.
        val = self.bundle.val.subset(range(world.rank, len(self.bundle.val), world.size))
        self.val_loader = DataLoader(
            val.with_transform(eval_tf),
            batch_size=2 * cfg.batch_size,
            num_workers=cfg.workers,
            pin_memory=pin,
        )
        self.mixer = augment.batch_mix(self.aug, len(self.bundle.classes))

    def _setup_optimization(self) -> None:
        groups = param_groups(self.net, self.cfg.weight_decay, self.plan.lr_mult)
        self.optimizer = make_optimizer(self.cfg, groups)
        self.steps_per_epoch = len(self.train_loader)
        self.scheduler = make_scheduler(self.cfg, self.optimizer, self.steps_per_epoch)

    def _restore(self, state: dict) -> None:
        self.net.load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scheduler.load_state_dict(state["scheduler_state"])
        if self.scaler is not None and state.get("scaler_state"):
            self.scaler.load_state_dict(state["scaler_state"])
        if self.ema is not None and state.get("ema_state"):
            self.ema.load_state_dict(state["ema_state"])
        self.history = list(state.get("history", []))
        self.best_acc = state["metrics"]["best_val_acc"]
        self.best_epoch = state["metrics"]["best_epoch"]
        self.start_epoch = state["epoch"]
        _set_rng_state(state["rng_state"])

    # -- the loop --------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg, world = self.cfg, self.world
        if world.is_main:
            self._write_config()
            self._log(
                f"{self.bundle.description}; training {self.model_cfg.arch} on "
                f"{world.device}{f' x {world.size} processes' if world.size > 1 else ''}, "
                f"out {self.out}"
            )
            if self.bundle.skipped:
                self._log(
                    f"warning: skipped {len(self.bundle.skipped)} unreadable image(s), "
                    f"e.g. {self.bundle.skipped[0]}"
                )
        if self.start_epoch >= cfg.epochs:
            self._log(f"{self.out}: all {cfg.epochs} epochs are already done")
        stopped_early = False
        epoch = self.start_epoch
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                self._epoch(epoch)
                if self._stop_early(epoch):
                    stopped_early = True
                    self._log(
                        f"early stop: no better val accuracy for {cfg.patience} epochs "
                        f"(best {self.best_acc:.2%} at epoch {self.best_epoch})"
                    )
                    break
        except KeyboardInterrupt:
            done = epoch  # epochs fully completed and saved
            self._log(
                f"\ninterrupted during epoch {epoch + 1}: {self.out / 'last.pt'} holds "
                f"epoch {done}; continue with --resume {self.out / 'last.pt'}"
            )
            raise
        return TrainResult(
            self.out,
            max(self.best_acc, 0.0),
            self.best_epoch,
            len(self.history),
            stopped_early,
            time.perf_counter() - self.started,
            self.history,
        )

    def _epoch(self, epoch: int) -> None:
        cfg = self.cfg
        _seed_everything(cfg.seed, epoch)
        self.generator.manual_seed(cfg.seed * 1_000_003 + epoch)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        changed = self.plan.apply(self.net, epoch)
        if changed and epoch > 0:
            frozen = sorted(self.plan.frozen_in(epoch))
            self._log(
                f"epoch {epoch + 1}: trainable stages change; frozen now: "
                f"{', '.join(frozen) or 'nothing'}"
            )
        if changed or self.ddp is None:
            self._wrap()
        lr = self.optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        train_loss, train_acc, seen = self._train_epoch(epoch)
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc = self._evaluate(self.net)
        ema_loss = ema_acc = None
        if self.ema is not None:
            ema_loss, ema_acc = self._evaluate(self.ema.module)
        row = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "ema_val_loss": ema_loss,
            "ema_val_acc": ema_acc,
            "seconds": round(time.perf_counter() - t0, 3),
            "images_per_s": round(seen / train_seconds, 1),
        }
        self.history.append(row)
        improved = val_acc > self.best_acc
        if improved:
            self.best_acc, self.best_epoch = val_acc, epoch + 1
        if self.world.is_main:
            self._save(epoch + 1, improved)
            self._log(_summary(row, cfg.epochs, self.best_acc))
            if monitor.overfitting(self.history, cfg.overfit_window):
                self._log(
                    f"warning: possible overfitting: val loss rose and train loss fell for "
                    f"{cfg.overfit_window} epochs (consider stronger augmentation, more "
                    f"weight decay, or --patience)"
                )
        distributed.barrier(self.world)

    def _wrap(self) -> None:
        """(Re)wrap in DDP: it must be rebuilt whenever the set of trainable parameters changes."""
        if self.world.size == 1:
            self.ddp = self.net
            return
        ids = [self.world.device.index] if self.world.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.net, device_ids=ids)

    def _train_epoch(self, epoch: int) -> tuple[float, float, int]:
        cfg, dev, world = self.cfg, self.world.device, self.world
        self.plan.train_mode(self.net)
        loss_sum = correct = seen = 0.0
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            unit="batch",
            disable=not (self.progress and world.is_main) or None,
            file=sys.stderr,
        )
        trainable = [p for p in self.net.parameters() if p.requires_grad]
        for step, (images, labels) in enumerate(bar):
            images = images.to(dev, non_blocking=True, memory_format=self.memory_format)
            labels = labels.to(dev, non_blocking=True)
            targets = labels
            if self.mixer is not None:
                images, targets = self.mixer(images, labels)
            with self._autocast():
                logits = self.ddp(images)
                loss = self.criterion(logits.float(), targets)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                    f"(lr {self.optimizer.param_groups[0]['lr']:.3g}); {self.out / 'last.pt'} "
                    f"keeps the last good epoch ({epoch}). Lower --lr, or set --clip-grad-norm"
                )
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if cfg.clip_grad_norm > 0:
                nn.utils.clip_grad_norm_(trainable, cfg.clip_grad_norm)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.net)
            n = labels.shape[0]
            hard = targets.argmax(1) if targets.ndim == 2 else targets
            loss_sum += loss.item() * n
            correct += (logits.argmax(1) == hard).sum().item()
            seen += n
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.1%}")
        loss_sum, correct, total = distributed.all_sum(world, loss_sum, correct, seen)
        return loss_sum / total, correct / total, int(seen)

    @torch.no_grad()
    def _evaluate(self, model: nn.Module) -> tuple[float, float]:
        model.eval()
        loss_sum = correct = count = 0.0
        for images, labels in self.val_loader:
            images = images.to(self.world.device, memory_format=self.memory_format)
            labels = labels.to(self.world.device)
            with self._autocast():
                logits = model(images).float()
            loss_sum += self.eval_criterion(logits, labels).item()
            correct += (logits.argmax(1) == labels).sum().item()
            count += labels.shape[0]
        loss_sum, correct, count = distributed.all_sum(self.world, loss_sum, correct, count)
        if count == 0:
            raise UserError("the validation split is empty; raise --val-fraction")
        return loss_sum / count, correct / count

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.world.device.type, dtype=self.amp_dtype)

    def _stop_early(self, epoch: int) -> bool:
        return self.cfg.patience > 0 and (epoch + 1) - self.best_epoch >= self.cfg.patience

    # -- files -----------------------------------------------------------------------------

    def _payload(self, epoch: int) -> dict:
        last = self.history[-1]
        return {
            "model_state": self.net.state_dict(),
            "model_config": dataclasses.asdict(self.model_cfg),
            "data_config": self.data_cfg,
            "train_config": dataclasses.asdict(self.cfg),
            "optimizer_state": self.optimizer.state_dict(),
            "scheduler_state": self.scheduler.state_dict(),
            "scaler_state": self.scaler.state_dict() if self.scaler is not None else None,
            "ema_state": self.ema.state_dict() if self.ema is not None else None,
            "epoch": epoch,
            "metrics": {**last, "best_val_acc": self.best_acc, "best_epoch": self.best_epoch},
            "history": self.history,
            "rng_state": _rng_state(),
            "transfer": self.plan.as_dict(),
            "versions": _versions(),
            **self.extra,
        }

    def _save(self, epoch: int, improved: bool) -> None:
        payload = self._payload(epoch)
        save_checkpoint(self.out / "last.pt", payload)
        if improved:
            save_checkpoint(self.out / "best.pt", payload)
        monitor.write_metrics_csv(self.out / "metrics.csv", self.history)
        monitor.plot_curves(
            self.out / "curves.png", self.history, f"{self.model_cfg.arch} on {self.cfg.dataset}"
        )

    def _write_config(self) -> None:
        record = {
            "model": dataclasses.asdict(self.model_cfg),
            "train": dataclasses.asdict(self.cfg),
            "data": self.data_cfg,
            "transfer": self.plan.as_dict(),
            "versions": _versions(),
            "world_size": self.world.size,
            "device": str(self.world.device),
        }
        write_text(self.out / "config.json", json.dumps(record, indent=2) + "\n")

    def _log(self, message: str) -> None:
        if self.world.is_main and self.progress:
            tqdm.write(message, file=sys.stdout)


def _summary(row: dict, epochs: int, best: float) -> str:
    ema = f"  ema acc {row['ema_val_acc']:.2%}" if row["ema_val_acc"] is not None else ""
    return (
        f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4f}  "
        f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.2%}  "
        f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.2%}{ema}  "
        f"best {best:.2%}  {row['seconds']:.1f} s  {row['images_per_s']:.0f} img/s"
    )


def _configs_from(state: dict) -> tuple[ModelConfig, TrainConfig]:
    """The configurations a checkpoint was trained with."""
    train = dict(state["train_config"])
    train["augment"] = AugmentConfig(**train["augment"])
    return ModelConfig(**state["model_config"]), TrainConfig(**train)


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off":
        return None
    if mode == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if mode == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; on CPU use --amp bf16")
    return torch.float16 if mode == "fp16" else torch.bfloat16


def _seed_everything(seed: int, epoch: int) -> None:
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
