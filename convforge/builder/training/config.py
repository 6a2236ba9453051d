"""TrainConfig: every setting of a training run, with its unit and reason.

The CLI overrides fields; the run's ``config.json`` and every checkpoint
record the resolved values, so a run can be repeated or resumed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from convforge.builder.data.augment import AugmentConfig
from convforge.builder.registry import ModelConfig, get_entry
from convforge.errors import UserError, check_choice

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "onecycle")
AMP_MODES = ("off", "auto", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    # Data
    dataset: str = "digits"  # --dataset spec (see convforge.builder.data.sources)
    input_size: int = 32  # square side in px the model sees (digits' 8 px are upsampled)
    val_fraction: float = 0.1  # held out, stratified, when the data has no validation part
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Optimization
    epochs: int = 15  # full passes over the training split
    batch_size: int = 64  # images per step per process (global batch = this x processes)
    optimizer: str = "sgd"  # sgd (momentum) or adamw
    lr: float | None = None  # peak learning rate; None: 0.4 x batch/256 for sgd, 1e-3 for adamw
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum for SGD
    weight_decay: float | None = None  # L2 on conv/linear weights only; None: 5e-4 sgd, 0.05 adamw
    schedule: str = "cosine"  # per-step LR schedule: cosine, step or onecycle
    warmup_epochs: float = 1.0  # linear warmup from 0.1 x lr (cosine and step schedules)
    step_epochs: int = 30  # step schedule: multiply the LR by step_gamma every this many epochs
    step_gamma: float = 0.1
    label_smoothing: float = 0.1  # target = (1 - eps) one-hot + eps uniform
    clip_grad_norm: float = 0.0  # max global gradient L2 norm; 0 = no clipping
    # Numerics and speed
    amp: str = "off"  # mixed precision: off, bf16 (CPU or CUDA), fp16 (CUDA, with GradScaler), auto
    channels_last: bool = False  # NHWC memory format (faster convs on many CPUs/GPUs)
    ema_decay: float = 0.0  # exponential moving average of weights, evaluated apart; 0 = off
    device: str = "auto"  # auto (CUDA when present), cpu or cuda
    workers: int = 0  # DataLoader worker processes (0 = load in the training process)
    # Reproducibility and monitoring
    seed: int = 0  # seeds the split, init, shuffling and augmentation
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU)
    patience: int = 0  # stop after this many epochs without a better val accuracy; 0 = never
    overfit_window: int = 3  # warn after this many epochs of rising val loss and falling train loss
    out: str = "runs/train"  # run folder: best.pt, last.pt, metrics.csv, curves.png, config.json

    def resolved(self) -> TrainConfig:
        """Defaults filled in (lr, weight decay) and every field checked (UserError if bad)."""
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("amp mode", self.amp, AMP_MODES)
        check_choice("device", self.device, DEVICES)
        for name in ("epochs", "batch_size", "input_size", "step_epochs"):
            _positive_int(name, getattr(self, name))
        for name in ("workers", "patience", "overfit_window", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UserError(f"{name} must be a non-negative integer, got {value!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"EMA decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.clip_grad_norm < 0 or self.warmup_epochs < 0:
            raise UserError("clip_grad_norm and warmup_epochs must be >= 0")
        lr = self.lr if self.lr is not None else _default_lr(self.optimizer, self.batch_size)
        if lr <= 0:
            raise UserError(f"learning rate must be positive, got {lr}")
        wd = self.weight_decay
        if wd is None:
            wd = 5e-4 if self.optimizer == "sgd" else 0.05
        if wd < 0:
            raise UserError(f"weight decay must be >= 0, got {wd}")
        return TrainConfig(**{**self.__dict__, "lr": lr, "weight_decay": wd})


def _default_lr(optimizer: str, batch_size: int) -> float:
    # SGD: the linear scaling rule (Goyal et al.) anchored at 0.4 for a batch of 256,
    # i.e. 0.1 for the default batch of 64; AdamW is far less batch-sensitive.
    return 0.4 * batch_size / 256 if optimizer == "sgd" else 1e-3


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")


def recipe_model(
    arch: str = "resnet18", input_size: int = 32, stem: str = "auto", options=None, **fields
) -> ModelConfig:
    """The model ``convforge train`` builds for ``input_size`` px images.

    ``stem="auto"`` picks ``small`` up to 64 px and ``imagenet`` above. A
    small-stem ResNet defaults to ``base_width=16`` (stages 16/32/64/128, the
    CIFAR-ResNet widths): 16x cheaper than torchvision's 64, and as accurate
    on 8-64 px data. ``fields`` are other ModelConfig fields; num_classes and
    in_channels come from the dataset.
    """
    if stem == "auto":
        stem = "small" if input_size <= 64 else "imagenet"
    options = dict(options or {})
    if stem == "small" and "base_width" in get_entry(arch).options:
        options.setdefault("base_width", 16)
    return ModelConfig(arch, stem=stem, options=options, **fields)
