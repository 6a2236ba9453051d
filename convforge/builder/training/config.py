"""TrainConfig: every setting of a training run, with its unit and reason.

The CLI overrides fields; the run's ``config.json`` and every checkpoint
record the resolved values, so a run can be repeated or resumed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from convforge.builder.data.augment import AugmentConfig
from convforge.builder.registry import ModelConfig, get_entry
from convforge.errors import UserError
from convforge.settings import check_ranges, setting

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "onecycle")
AMP_MODES = ("off", "auto", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig:
    # Data
    dataset: str = setting(
        "digits",
        "digits, synthetic[:classes=N,size=PX,...], imagefolder:DIR, cifar10:DIR, "
        "cifar100:DIR, mnist:DIR or fashion-mnist:DIR (local files only)",
    )
    input_size: int = setting(
        32, "square side in px the model sees (digits' 8 px are upsampled)", minimum=1
    )
    val_fraction: float = setting(0.1, "held out, stratified, when the data has no validation part")
    augment: AugmentConfig = setting(factory=AugmentConfig, cli=False)  # its own options
    # Optimization
    epochs: int = setting(15, "full passes over the training split", minimum=1)
    batch_size: int = setting(
        64, "images per step per process (global batch: x processes)", minimum=1
    )
    optimizer: str = setting(
        "sgd", f"{' or '.join(OPTIMIZERS)} (SGD: momentum, Nesterov)", choices=OPTIMIZERS
    )
    lr: float | None = setting(
        None, "peak learning rate; default: 0.4 x batch/256 for sgd, 1e-3 for adamw"
    )
    momentum: float = setting(0.9, "SGD momentum")
    nesterov: bool = setting(True, "Nesterov momentum for SGD")
    weight_decay: float | None = setting(
        None, "L2 on conv/linear weights only; default: 5e-4 sgd, 0.05 adamw", minimum=0.0
    )
    schedule: str = setting(
        "cosine", f"per-step LR schedule: {', '.join(SCHEDULES)}", choices=SCHEDULES
    )
    warmup_epochs: float = setting(
        1.0, "linear warmup from 0.1 x lr (cosine and step schedules)", minimum=0.0
    )
    step_epochs: int = setting(
        30, "step schedule: multiply the LR by --step-gamma this often", minimum=1
    )
    step_gamma: float = setting(0.1, "step schedule: LR factor")
    label_smoothing: float = setting(0.1, "target = (1 - eps) one-hot + eps uniform")
    clip_grad_norm: float = setting(
        0.0, "max global gradient L2 norm; 0 = no clipping", minimum=0.0
    )
    # Numerics and speed
    amp: str = setting(
        "off", "mixed precision: off, bf16 (CPU or CUDA), fp16 (CUDA), auto", choices=AMP_MODES
    )
    channels_last: bool = setting(False, "NHWC memory format (faster convs on many CPUs/GPUs)")
    ema_decay: float = setting(0.0, "EMA of the weights, evaluated apart (e.g. 0.999; 0 = off)")
    device: str = setting("auto", "auto (CUDA when present), cpu or cuda", choices=DEVICES)
    workers: int = setting(
        0, "DataLoader worker processes (0 = load in the training process)", minimum=0
    )
    # Reproducibility and monitoring
    seed: int = setting(0, "seeds the split, init, shuffling and augmentation", minimum=0)
    deterministic: bool = setting(False, "deterministic kernels only (slower on GPU)")
    patience: int = setting(
        0, "stop after this many epochs without a better val accuracy; 0: never", minimum=0
    )
    overfit_window: int = setting(
        3, "warn after this many epochs of rising val loss and falling train loss", minimum=0
    )
    out: str = setting("runs/train", "run folder: best.pt, last.pt, metrics.csv, curves.png")

    def resolved(self) -> TrainConfig:
        """Defaults filled in (lr, weight decay) and every field checked (UserError if bad)."""
        check_ranges(self)  # choices and ranges declared on the fields; the rest below
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"EMA decay must be in [0, 1) (0 = off), got {self.ema_decay}")
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
