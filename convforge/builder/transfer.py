"""Transfer learning: start from pretrained weights, replace the head, freeze stages.

* :func:`load_pretrained`: a convforge checkpoint or a torchvision
  ``state_dict`` file on disk, rebuilt as a convforge model (strict load: a
  file of another architecture is an error naming the mismatched keys).
* :func:`adapt`: a new head for the new class count (torchvision's own
  reference script fails here) and, if needed, a first conv adapted to the
  new channel count (RGB weights summed for grayscale).
* :class:`FinetuneSchedule`: what the trainer asks of a run's schedule of
  frozen stages and learning-rate multipliers; :class:`FromScratch` is the
  schedule of a run that starts from random weights.
* :class:`TransferSchedule`: which stages are frozen in which epoch and their
  learning-rate multiplier; frozen BatchNorm layers stay in eval mode so
  their running statistics are not touched.
* :func:`decide`: the lecture's rule of thumb (``--strategy auto``).

Stages are the architecture's natural blocks: ResNet ``stem, layer1..layer4,
head``; VGG ``stage1..stage5`` (split at the max-pools) and ``head``; the
plain net ``features, head``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from convforge.builder.checkpoint import Checkpoint, model_with_weights, read_weights_file
from convforge.builder.initialization import init_weights
from convforge.builder.plain import PlainNet
from convforge.builder.registry import ModelConfig
from convforge.builder.resnet import ResNet
from convforge.builder.vgg import VGG
from convforge.errors import UserError, check_choice

STRATEGIES = ("auto", "feature-extract", "finetune")
# --strategy auto: a dataset is "small" below this many training images per class.
SMALL_PER_CLASS = 500
# ... and "similar" when a linear probe on the pretrained features beats one on the same
# architecture's random features by at least this much accuracy.
SIMILARITY_MARGIN = 0.10


# -- stages -------------------------------------------------------------------------------


def stages(model: nn.Module) -> dict[str, list[str]]:
    """Ordered stage name -> parameter/module name prefixes (ending in '.')."""
    if isinstance(model, ResNet):
        named = {"stem": ["conv1.", "bn1."]}
        named.update({f"layer{i}": [f"layer{i}."] for i in range(1, 5)})
        return named | {"head": ["fc."]}
    if isinstance(model, VGG):
        named, current, n = {}, [], 1
        for i, m in enumerate(model.features):
            current.append(f"features.{i}.")
            if isinstance(m, nn.MaxPool2d):
                named[f"stage{n}"], current, n = current, [], n + 1
        return named | {"head": ["classifier."]}
    if isinstance(model, PlainNet):
        return {"features": ["features."], "head": ["fc."]}
    raise UserError(f"no stage layout for {type(model).__name__}; transfer needs a convforge model")


def _in(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(p) or f"{name}." in prefixes for p in prefixes)


class FinetuneSchedule(Protocol):
    """What fine-tuning changes in the trainer's loop: which stages train when, and how fast."""

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
class TransferSchedule:
    """Which stages train when, and how fast (a :class:`FinetuneSchedule`)."""

    strategy: str  # feature-extract or finetune
    stage_prefixes: dict[str, list[str]]  # from stages(model)
    frozen: list[str]  # stages frozen from the first epoch
    backbone_lr_mult: float = 0.1  # LR multiplier of every trainable stage but the head
    unfreeze_at: int = 0  # 1-based epoch from which the frozen stages train too; 0 = never
    reason: str = ""  # why this schedule (printed, stored in checkpoints)
    _current: frozenset = field(default=frozenset(), repr=False)

    def frozen_in(self, epoch: int) -> frozenset:
        """Stages frozen during 0-based ``epoch``."""
        if self.unfreeze_at and epoch + 1 >= self.unfreeze_at:
            return frozenset()
        return frozenset(self.frozen)

    def lr_mult(self, name: str) -> float:
        return 1.0 if _in(name, self.stage_prefixes["head"]) else self.backbone_lr_mult

    def apply(self, model: nn.Module, epoch: int) -> bool:
        frozen = self.frozen_in(epoch)
        prefixes = [p for s in frozen for p in self.stage_prefixes[s]]
        for name, p in model.named_parameters():
            p.requires_grad_(not _in(name, prefixes))
        changed = frozen != self._current
        self._current = frozen
        return changed

    def train_mode(self, model: nn.Module) -> None:
        model.train()
        prefixes = [p for s in self._current for p in self.stage_prefixes[s]]
        for name, m in model.named_modules():
            if isinstance(m, _BatchNorm) and _in(name, prefixes):
                m.eval()  # frozen: normalize with the pretrained running statistics, keep them

    def as_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "frozen": list(self.frozen),
            "backbone_lr_mult": self.backbone_lr_mult,
            "unfreeze_at": self.unfreeze_at,
            "reason": self.reason,
        }


def make_schedule(
    model: nn.Module,
    strategy: str,
    freeze_until: str | None = None,
    backbone_lr_mult: float = 0.1,
    unfreeze_at: int = 0,
    reason: str = "",
) -> TransferSchedule:
    """``feature-extract``: all but the head frozen. ``finetune``: stages up to and
    including ``freeze_until`` frozen (none if None), the rest at ``backbone_lr_mult``."""
    check_choice("strategy", strategy, STRATEGIES[1:])
    named = stages(model)
    order = list(named)
    if strategy == "feature-extract":
        frozen = order[:-1]
    elif freeze_until is None:
        frozen = []
    else:
        check_choice("stage for --freeze-until", freeze_until, order[:-1])
        frozen = order[: order.index(freeze_until) + 1]
    if backbone_lr_mult < 0 or unfreeze_at < 0:
        raise UserError("--backbone-lr-mult and --unfreeze-at must be >= 0")
    return TransferSchedule(strategy, named, frozen, backbone_lr_mult, unfreeze_at, reason)


def schedule_from_record(model: nn.Module, record: dict | None) -> TransferSchedule | None:
    """The schedule a checkpoint was trained with (its ``transfer`` entry); None if from
    scratch."""
    if not record or record.get("strategy") in (None, "scratch"):
        return None
    return TransferSchedule(
        record["strategy"],
        stages(model),
        list(record["frozen"]),
        record["backbone_lr_mult"],
        record["unfreeze_at"],
        record.get("reason", ""),
    )


# -- pretrained weights -------------------------------------------------------------------


def load_pretrained(path, arch: str | None = None) -> tuple[nn.Module, ModelConfig]:
    """The model in ``path`` with its weights: a convforge checkpoint, or a torchvision
    ``state_dict`` (then ``arch`` names the architecture, e.g. resnet18)."""
    data = read_weights_file(path)
    if isinstance(data, dict) and "model_state" in data and "model_config" in data:
        checkpoint = Checkpoint.from_payload(data, path)
        return checkpoint.build_model(), checkpoint.model_config.resolved()
    if not (
        isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values())
    ):
        raise UserError(f"{path} is neither a convforge checkpoint nor a state_dict of tensors")
    if arch is None:
        raise UserError(
            f"{path} is a bare state_dict, which does not name its architecture; "
            f"pass --model (e.g. resnet18)"
        )
    cfg = _config_from_state(arch, data)
    return model_with_weights(cfg, data, path), cfg.resolved()


def _config_from_state(arch: str, state: dict) -> ModelConfig:
    """A ModelConfig matching a torchvision-layout state_dict (classes, channels, stem, width)."""
    head = "fc.weight" if "fc.weight" in state else None
    if head is None:
        heads = sorted(k for k in state if k.startswith("classifier.") and k.endswith(".weight"))
        head = heads[-1] if heads else None
    first = "conv1.weight" if "conv1.weight" in state else "features.0.weight"
    if head is None or first not in state:
        raise UserError(f"the state_dict does not look like a {arch} (no {first} / head weights)")
    conv = state[first]
    stem = (
        "imagenet"
        if conv.shape[-1] == 7 or (arch.startswith("vgg") and head != "classifier.0.weight")
        else "small"
    )
    options = {"base_width": int(conv.shape[0])} if arch.startswith("resnet") else {}
    return ModelConfig(
        arch,
        num_classes=int(state[head].shape[0]),
        in_channels=int(conv.shape[1]),
        stem=stem,
        options=options,
    )


def adapt(model: nn.Module, cfg: ModelConfig, num_classes: int, in_channels: int):
    """Replace the head for ``num_classes`` and the first conv for ``in_channels``.

    Returns ``(model, config)``. The new head is initialized with the model's
    init rule; a first conv going from 3 to 1 channels sums the RGB weights
    (a gray image then gives the response its RGB copy gave), other changes
    repeat the weights and rescale (as timm's ``adapt_input_conv``).
    """
    old_head = _head(model)
    if old_head.out_features != num_classes:
        new_head = nn.Linear(old_head.in_features, num_classes)
        init_weights(new_head, cfg.init, cfg.activation, cfg.leaky_slope)
        _set_head(model, new_head)
    if in_channels != cfg.in_channels:
        conv = _first_conv(model)
        w = conv.weight.data
        if in_channels == 1:
            new_w = w.sum(dim=1, keepdim=True)
        else:
            reps = math.ceil(in_channels / w.shape[1])
            new_w = w.repeat(1, reps, 1, 1)[:, :in_channels] * (w.shape[1] / in_channels)
        conv.weight = nn.Parameter(new_w)
        conv.in_channels = in_channels
    # A pruned model records its head's and first conv's widths: they follow the new data.
    widths = {k: list(v) for k, v in cfg.widths.items()}
    names = {id(m): name for name, m in model.named_modules()}
    head, first = names[id(_head(model))], names[id(_first_conv(model))]
    if head in widths:
        widths[head][0] = num_classes
    if first in widths:
        widths[first][1] = in_channels
    return model, dataclasses.replace(
        cfg, num_classes=num_classes, in_channels=in_channels, widths=widths
    )


def _head(model: nn.Module) -> nn.Linear:
    return model.classifier[-1] if isinstance(model, VGG) else model.fc


def _set_head(model: nn.Module, head: nn.Linear) -> None:
    if isinstance(model, VGG):
        model.classifier[-1] = head
    else:
        model.fc = head


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


# -- --strategy auto ----------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    small: bool  # fewer than SMALL_PER_CLASS training images per class
    similar: bool  # pretrained features beat random ones by SIMILARITY_MARGIN on a linear probe
    strategy: str
    freeze_until: str | None
    backbone_lr_mult: float
    row: str  # the lecture table's cell
    reason: str


def decide(
    n_train: int,
    n_classes: int,
    probe_pretrained: float,
    probe_random: float,
    stage_names: list[str],
) -> Decision:
    """The lecture's table: (small | large data) x (similar | different domain)."""
    per_class = n_train / max(n_classes, 1)
    small = per_class < SMALL_PER_CLASS
    similar = probe_pretrained - probe_random >= SIMILARITY_MARGIN
    size = f"{per_class:.0f} images/class {'<' if small else '>='} {SMALL_PER_CLASS}"
    sim = (
        f"linear probe {probe_pretrained:.1%} on pretrained vs {probe_random:.1%} on random "
        f"features ({'>=' if similar else '<'} {SIMILARITY_MARGIN:.0%} gain)"
    )
    backbone = [s for s in stage_names if s != "head"]
    middle = backbone[(len(backbone) - 1) // 2] if len(backbone) > 1 else None
    if small and similar:
        strategy, freeze, mult = "feature-extract", None, 0.1
        row = "small data, similar domain: feature extraction (freeze all, new head)"
    elif small:
        strategy, freeze, mult = "finetune", middle, 0.1
        row = (
            f"small data, different domain: features from earlier layers (freeze the generic "
            f"stages through {middle}, retrain the later ones and the head)"
        )
    elif similar:
        strategy, freeze, mult = "finetune", None, 0.1
        row = "large data, similar domain: fine-tune all layers (backbone at 0.1x LR)"
    else:
        strategy, freeze, mult = "finetune", None, 1.0
        row = (
            "large data, different domain: fine-tune all layers at the full LR (the "
            "lecture's 'train from scratch, or fine-tune', from the pretrained weights)"
        )
    return Decision(small, similar, strategy, freeze, mult, row, f"{size}; {sim}")


def linear_probe(model: nn.Module, train, val, max_train: int = 1000, max_val: int = 500) -> float:
    """Accuracy of a logistic regression on ``model``'s pooled penultimate features.

    ``train`` / ``val`` are ImageSets with the evaluation transform set.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    body = copy.deepcopy(model).eval()
    _set_head(body, nn.Identity())
    if isinstance(body, VGG):
        body.avgpool, body.classifier = nn.AdaptiveAvgPool2d((1, 1)), nn.Identity()

    def features(images, limit):
        rng = np.random.default_rng(0)
        idx = rng.permutation(len(images))[:limit].tolist()
        x = torch.stack([images[i][0] for i in idx])
        y = np.array([images.targets[i] for i in idx])
        with torch.no_grad():
            f = torch.cat([body(b).flatten(1) for b in x.split(128)])
        return f.numpy(), y

    xt, yt = features(train, max_train)
    xv, yv = features(val, max_val)
    scaler = StandardScaler().fit(xt)
    clf = LogisticRegression(max_iter=500).fit(scaler.transform(xt), yt)
    return float(clf.score(scaler.transform(xv), yv))
