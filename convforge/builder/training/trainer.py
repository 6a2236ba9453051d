"""The training loop: data in, ``best.pt`` / ``last.pt`` / ``metrics.csv`` / ``curves.png`` out.

One epoch = shuffle (seeded by seed and epoch), augment, forward, loss,
backward, optimizer and schedule step per batch; then evaluate on the
validation split (and the EMA weights when on), record, checkpoint.

A run resumed from its ``last.pt`` ends with the same weights as one that
never stopped (:mod:`.state` says how, and what the files hold). Ctrl-C
loses at most the epoch in progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from convforge.builder.checkpoint import Checkpoint, load_checkpoint
from convforge.builder.data import augment
from convforge.builder.data.images import channel_stats
from convforge.builder.data.sources import DataBundle, load_dataset
from convforge.builder.registry import ModelConfig, build_model
from convforge.builder.training import distributed, monitor
from convforge.builder.training.config import TrainConfig
from convforge.builder.training.distill import Distillation
from convforge.builder.training.distributed import World
from convforge.builder.training.optim import make_optimizer, make_scheduler, param_groups
from convforge.builder.training.state import (
    Learner,
    RunSpec,
    RunState,
    configs_from,
    restore,
    save,
    seed_everything,
    write_config,
)
from convforge.builder.transfer import FinetuneSchedule, FromScratch, schedule_from_record
from convforge.errors import UserError
from convforge.files import ensure_dir


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


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
    """What inference needs to preprocess like training did (docs/file-contract.md: data_config)."""
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
    schedule: FinetuneSchedule | None = None,
    model: nn.Module | None = None,
    bundle: DataBundle | None = None,
    extra: dict | None = None,
    data_cfg: dict | None = None,
    distill: Distillation | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model_cfg`` (or the given ``model``) as ``cfg`` says; return the summary.

    ``model_cfg.num_classes`` and ``in_channels`` are taken from the data
    unless ``model`` is given (fine-tuning builds its own). ``resume`` names a
    ``last.pt``: the run continues from it with the configuration stored
    there. ``schedule`` says which stages train when (default: all, always;
    a resumed run's: the one it was trained with). ``extra`` is stored in
    every checkpoint (fine-tuning's source). ``data_cfg``: the preprocessing to train
    with and record (default: the data's own statistics; a resumed run's: its own).
    ``distill``: a teacher the loss also follows (:mod:`.distill`; give it again when
    resuming). ``progress``: log each epoch and show a progress bar.
    """
    checkpoint = load_checkpoint(resume) if resume else None
    if checkpoint is not None:
        model_cfg, cfg = configs_from(checkpoint)
    world = distributed.setup(cfg.device)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        started = time.perf_counter()
        if checkpoint is not None:
            out = Path(resume).parent  # the run's folder, wherever it has moved
        else:
            cfg = cfg.resolved()
            out = Path(cfg.out)
        if world.is_main:
            ensure_dir(out)
        bundle = bundle or load_data(cfg, channels=None if model is None else model_cfg.in_channels)
        if checkpoint is not None:
            data_cfg = checkpoint.data_config
        elif data_cfg is None:
            data_cfg = data_config(cfg, bundle)
        if model is None:
            model_cfg = dataclasses.replace(
                model_cfg, num_classes=len(bundle.classes), in_channels=bundle.channels
            )
            torch.manual_seed(cfg.seed)
            model = build_model(model_cfg)
        if checkpoint is not None and schedule is None:
            schedule = schedule_from_record(model, checkpoint.transfer)
        model_cfg = model_cfg.resolved()
        if model_cfg.in_channels != bundle.channels:
            raise UserError(
                f"the model takes {model_cfg.in_channels}-channel images but the dataset has "
                f"{bundle.channels}"
            )
        aug = cfg.augment.resolved(flip_safe=bundle.flip_safe)
        cfg = dataclasses.replace(cfg, augment=aug)  # recorded as it ran
        spec = RunSpec(
            out, model_cfg, cfg, bundle, data_cfg, schedule or FromScratch(), extra or {}, distill
        )
        return _Run(world, spec, model, checkpoint, progress).fit(started)
    finally:
        torch.use_deterministic_algorithms(deterministic)  # leave the process as it was
        distributed.teardown()


class _Run:
    """The epoch loop of one :func:`train` call, over a run prepared as ``spec``.

    ``model`` is the network to train (moved to the device here);
    ``checkpoint`` a ``last.pt`` to continue from, or None.
    """

    def __init__(
        self,
        world: World,
        spec: RunSpec,
        model: nn.Module,
        checkpoint: Checkpoint | None,
        progress: bool,
    ):
        self.world, self.spec, self.progress = world, spec, progress
        net, ema, scaler = self._setup_model(model)
        self._setup_data()
        groups = param_groups(net, spec.cfg.weight_decay, spec.schedule.lr_mult)
        optimizer = make_optimizer(spec.cfg, groups)
        scheduler = make_scheduler(spec.cfg, optimizer, len(self.train_loader))
        self.learner = Learner(net, optimizer, scheduler, scaler, ema)
        self.state = RunState() if checkpoint is None else restore(checkpoint, self.learner)

    # -- setup -----------------------------------------------------------------------------

    def _setup_model(
        self, model: nn.Module
    ) -> tuple[nn.Module, AveragedModel | None, torch.amp.GradScaler | None]:
        """Device, memory format, numerics and losses; returns ``(net, ema, scaler)``."""
        cfg, dev = self.spec.cfg, self.world.device
        if cfg.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic (set before CUDA starts to be
            # sure); ops with no deterministic kernel warn rather than stop the run.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        net = model.to(dev, memory_format=self.memory_format)
        ema = None
        if cfg.ema_decay > 0:
            ema = AveragedModel(
                net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
            )
        self.amp_dtype = _amp_dtype(cfg.amp, dev)
        scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        if self.spec.distill is not None:
            self.spec.distill.to(dev, self.memory_format)
        self.eval_criterion = nn.CrossEntropyLoss(reduction="sum")
        self.ddp = None
        return net, ema, scaler

    def _setup_data(self) -> None:
        cfg, world, d, bundle = self.spec.cfg, self.world, self.spec.data_cfg, self.spec.bundle
        native = bundle.native_size
        train_tf = augment.train_transform(cfg.augment, cfg.input_size, d["mean"], d["std"], native)
        eval_tf = augment.eval_transform(cfg.input_size, d["mean"], d["std"], native)
        train_set = bundle.train.with_transform(train_tf)
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
        val = bundle.val.subset(range(world.rank, len(bundle.val), world.size))
        self.val_loader = DataLoader(
            val.with_transform(eval_tf),
            batch_size=2 * cfg.batch_size,
            num_workers=cfg.workers,
            pin_memory=pin,
        )
        self.mixer = augment.batch_mix(cfg.augment, len(bundle.classes))

    # -- the loop --------------------------------------------------------------------------

    def fit(self, started: float) -> TrainResult:
        """Train the epochs not done yet; ``started``: ``time.perf_counter()`` at the start
        of this :func:`train` call (for :attr:`TrainResult.seconds`)."""
        cfg, world, spec, state = self.spec.cfg, self.world, self.spec, self.state
        if world.is_main:
            write_config(spec, world)
            self._log(
                f"{spec.bundle.description}; training {spec.model_cfg.arch} on "
                f"{world.device}{f' x {world.size} processes' if world.size > 1 else ''}, "
                f"out {spec.out}"
            )
            if spec.bundle.skipped:
                self._log(
                    f"warning: skipped {len(spec.bundle.skipped)} unreadable image(s), "
                    f"e.g. {spec.bundle.skipped[0]}"
                )
        if state.start_epoch >= cfg.epochs:
            self._log(f"{spec.out}: all {cfg.epochs} epochs are already done")
        stopped_early = False
        epoch = state.start_epoch
        try:
            for epoch in range(state.start_epoch, cfg.epochs):
                self._epoch(epoch)
                if self._stop_early(epoch):
                    stopped_early = True
                    self._log(
                        f"early stop: no better val accuracy for {cfg.patience} epochs "
                        f"(best {state.best_acc:.2%} at epoch {state.best_epoch})"
                    )
                    break
        except KeyboardInterrupt:
            done = epoch  # epochs fully completed and saved
            self._log(
                f"\ninterrupted during epoch {epoch + 1}: {spec.out / 'last.pt'} holds "
                f"epoch {done}; continue with --resume {spec.out / 'last.pt'}"
            )
            raise
        return TrainResult(
            spec.out,
            max(state.best_acc, 0.0),
            state.best_epoch,
            len(state.history),
            stopped_early,
            time.perf_counter() - started,
            state.history,
        )

    def _epoch(self, epoch: int) -> None:
        """Train, evaluate, record and save the 0-based ``epoch``."""
        cfg, learner, schedule = self.spec.cfg, self.learner, self.spec.schedule
        seed_everything(cfg.seed, epoch)
        self.generator.manual_seed(cfg.seed * 1_000_003 + epoch)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        changed = schedule.apply(learner.net, epoch)
        if changed and epoch > 0:
            frozen = sorted(schedule.frozen_in(epoch))
            self._log(
                f"epoch {epoch + 1}: trainable stages change; frozen now: "
                f"{', '.join(frozen) or 'nothing'}"
            )
        if changed or self.ddp is None:
            self._wrap()
        lr = learner.optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        train_loss, train_acc, seen = self._train_epoch(epoch)
        train_seconds = time.perf_counter() - t0
        val_loss, val_acc = self._evaluate(learner.net)
        ema_loss = ema_acc = None
        if learner.ema is not None:
            ema_loss, ema_acc = self._evaluate(learner.ema.module)
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
        improved = self.state.record(row)
        if self.world.is_main:
            save(self.spec, learner, self.state, epoch + 1, improved)
            self._log(_summary(row, cfg.epochs, self.state.best_acc))
            if monitor.overfitting(self.state.history, cfg.overfit_window):
                self._log(
                    f"warning: possible overfitting: val loss rose and train loss fell for "
                    f"{cfg.overfit_window} epochs (consider stronger augmentation, more "
                    f"weight decay, or --patience)"
                )
        distributed.barrier(self.world)

    def _wrap(self) -> None:
        """(Re)wrap in DDP: it must be rebuilt whenever the set of trainable parameters changes."""
        if self.world.size == 1:
            self.ddp = self.learner.net
            return
        ids = [self.world.device.index] if self.world.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.learner.net, device_ids=ids)

    def _train_epoch(self, epoch: int) -> tuple[float, float, int]:
        cfg, dev, world, learner = self.spec.cfg, self.world.device, self.world, self.learner
        self.spec.schedule.train_mode(learner.net)
        loss_sum = correct = seen = 0.0
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            unit="batch",
            disable=not (self.progress and world.is_main) or None,
            file=sys.stderr,
        )
        trainable = [p for p in learner.net.parameters() if p.requires_grad]
        for step, (images, labels) in enumerate(bar):
            images = images.to(dev, non_blocking=True, memory_format=self.memory_format)
            labels = labels.to(dev, non_blocking=True)
            targets = labels
            if self.mixer is not None:
                images, targets = self.mixer(images, labels)
            with self._autocast():
                logits = self.ddp(images)
                loss = self.criterion(logits.float(), targets)
                if self.spec.distill is not None:
                    loss = self.spec.distill.loss(loss, logits, images)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                    f"(lr {learner.optimizer.param_groups[0]['lr']:.3g}); "
                    f"{self.spec.out / 'last.pt'} "
                    f"keeps the last good epoch ({epoch}). Lower --lr, or set --clip-grad-norm"
                )
            learner.optimizer.zero_grad(set_to_none=True)
            if learner.scaler is not None:
                learner.scaler.scale(loss).backward()
                learner.scaler.unscale_(learner.optimizer)
            else:
                loss.backward()
            if cfg.clip_grad_norm > 0:
                nn.utils.clip_grad_norm_(trainable, cfg.clip_grad_norm)
            if learner.scaler is not None:
                learner.scaler.step(learner.optimizer)
                learner.scaler.update()
            else:
                learner.optimizer.step()
            learner.scheduler.step()
            if learner.ema is not None:
                learner.ema.update_parameters(learner.net)
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
        patience = self.spec.cfg.patience
        return patience > 0 and (epoch + 1) - self.state.best_epoch >= patience

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


def _amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off":
        return None
    if mode == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if mode == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; on CPU use --amp bf16")
    return torch.float16 if mode == "fp16" else torch.bfloat16
