"""Training augmentation, evaluation preprocessing and batch Mixup/CutMix (transforms v2).

Everything here is assembled from ``torchvision.transforms.v2``; nothing is
re-implemented. A transform takes one raw item of an :class:`~.images.ImageSet`
(a uint8 ``tv_tensors.Image [C, H, W]``, C = 1 or 3, at the dataset's native
size) and returns a plain float32 tensor ``[C, input_size, input_size]``
normalized with the dataset's mean and std. Geometric and colour ops run on
uint8 (as torchvision's classification references do), then ``ToDtype`` +
``Normalize``, then ``RandomErasing`` (so erased pixels are 0 = the mean).

Two geometry paths, chosen by :func:`is_large`:

* small (fixed-size datasets such as digits, MNIST, CIFAR, trained at <= 64 px):
  ``Resize((s, s))`` to the input size, then ``RandomCrop(s, padding)`` with
  zero padding (the CIFAR recipe). Evaluation: the plain resize.
* large (ImageFolder, or any input_size > 64): ``RandomResizedCrop(s,
  scale=(scale_min, 1))``. Evaluation: ``Resize(round(s / 0.875))`` of the
  shorter side + ``CenterCrop(s)`` (256 -> 224, torchvision's convention).

Presets (``None`` fields of :class:`AugmentConfig` take these values;
``scale_min`` only matters on the large path, ``crop_padding`` defaults to
``input_size // 8`` on the small path):

=========  ====  ====  =========  ========  ============  ==============  =======  =====  ======
preset     crop  flip  scale_min  rotation  color_jitter  auto            erasing  mixup  cutmix
=========  ====  ====  =========  ========  ============  ==============  =======  =====  ======
none       no    no    0.25       0         0             none            0        0      0
light      yes   yes   0.25       0         0             none            0        0      0
standard   yes   yes   0.25       10        0.2           none            0        0      0
strong     yes   yes   0.08       10        0.2           trivialaugment  0.25     0.2    1.0
=========  ====  ====  =========  ========  ============  ==============  =======  =====  ======

``strong`` follows torchvision's recent classification recipe (TrivialAugment,
Mixup alpha 0.2 / CutMix alpha 1.0, one of the two per batch) with timm's
random-erasing probability 0.25. Horizontal flips (p = 0.5) are left out by
every preset when the dataset is not flip-safe (digits: a mirrored 2 or 7 is
not a 2 or 7); an explicit ``flip=True`` is honoured anyway.

Grayscale works with every option: v2's saturation and the auto policies'
"Color" op leave 1-channel images unchanged, and colour jitter gets no
saturation term for them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms import v2

from convforge.errors import UserError, check_choice, check_int
from convforge.settings import setting

PRESETS = ("none", "light", "standard", "strong")
AUTO_POLICIES = ("none", "autoaugment", "randaugment", "trivialaugment")

# Inputs at most this size (px) with a known native size use the small-image path.
SMALL_MAX = 64
# Evaluation crops the central 87.5% of a resized image (224 of 256), torchvision's convention.
EVAL_CROP_FRACTION = 0.875

_PRESET_VALUES: dict[str, dict] = {
    "none": dict(
        flip=False,
        crop=False,
        scale_min=0.25,
        rotation=0.0,
        color_jitter=0.0,
        auto="none",
        erasing=0.0,
        mixup=0.0,
        cutmix=0.0,
    ),
    "light": dict(
        flip=True,
        crop=True,
        scale_min=0.25,
        rotation=0.0,
        color_jitter=0.0,
        auto="none",
        erasing=0.0,
        mixup=0.0,
        cutmix=0.0,
    ),
    "standard": dict(
        flip=True,
        crop=True,
        scale_min=0.25,
        rotation=10.0,
        color_jitter=0.2,
        auto="none",
        erasing=0.0,
        mixup=0.0,
        cutmix=0.0,
    ),
    "strong": dict(
        flip=True,
        crop=True,
        scale_min=0.08,
        rotation=10.0,
        color_jitter=0.2,
        auto="trivialaugment",
        erasing=0.25,
        mixup=0.2,
        cutmix=1.0,
    ),
}


def preset_values(preset: str) -> dict:
    """The values ``preset`` gives every field but ``crop_padding`` (see the module table)."""
    return dict(_PRESET_VALUES[check_choice("augmentation preset", preset, PRESETS)])


@dataclass
class AugmentConfig:
    """Every augmentation choice. ``None`` fields take the preset's value in :meth:`resolved`."""

    preset: str = setting(
        "standard",
        f"preset filling every unset option below: {', '.join(PRESETS)}",
        flag="--augment",
    )
    flip: bool | None = setting(
        None, "horizontal flip, p = 0.5 (presets skip it for digits/MNIST, which flips change)"
    )
    crop: bool | None = setting(
        None, "small images: zero-pad + RandomCrop; large: RandomResizedCrop"
    )
    crop_padding: int | None = setting(None, "px of padding for the small-image crop; default: 1/8")
    scale_min: float | None = setting(None, "RandomResizedCrop's lowest area fraction, in (0, 1]")
    rotation: float | None = setting(None, "max degrees of rotation either way, 0..180 (0 = off)")
    color_jitter: float | None = setting(
        None, "brightness/contrast(/saturation) strength, 0..1 (0 = off)"
    )
    auto: str | None = setting(None, f"policy: {', '.join(AUTO_POLICIES)}", flag="--auto-augment")
    erasing: float | None = setting(None, "random erasing (cutout) probability, 0..1 (0 = off)")
    mixup: float | None = setting(None, "Mixup's Beta(alpha, alpha) alpha, >= 0 (0 = off)")
    cutmix: float | None = setting(None, "CutMix's Beta(alpha, alpha) alpha, >= 0 (0 = off)")

    def resolved(self, flip_safe: bool = True) -> AugmentConfig:
        """A copy with the preset's value in every ``None`` field, every field checked.

        ``crop_padding`` stays ``None`` when unset: its default depends on the
        input size, which :func:`train_transform` knows. When ``flip_safe`` is
        False an unset ``flip`` becomes False; an explicit ``flip=True`` is
        kept (the user's choice). Raises UserError naming the field and the
        accepted values. Resolving a resolved config returns an equal one.
        """
        values = preset_values(self.preset)
        if not flip_safe:
            values["flip"] = False
        filled = {
            name: values[name] if getattr(self, name) is None else getattr(self, name)
            for name in values
        }
        cfg = dataclasses.replace(self, **filled)
        for name in ("flip", "crop"):
            if not isinstance(getattr(cfg, name), bool):
                raise UserError(
                    f"augmentation {name} must be true or false, got {getattr(cfg, name)!r}"
                )
        if cfg.crop_padding is not None:
            pad = cfg.crop_padding
            if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
                raise UserError(f"crop padding must be a whole number of pixels >= 0, got {pad!r}")
        check_choice("auto augmentation policy", cfg.auto, AUTO_POLICIES)
        return dataclasses.replace(
            cfg,
            scale_min=_number(
                "crop scale_min", cfg.scale_min, 0.0, 1.0, "in (0, 1]", low_open=True
            ),
            rotation=_number("rotation", cfg.rotation, 0.0, 180.0, "0..180 degrees (0 = off)"),
            color_jitter=_number("color jitter", cfg.color_jitter, 0.0, 1.0, "0..1 (0 = off)"),
            erasing=_number("erasing probability", cfg.erasing, 0.0, 1.0, "0..1 (0 = off)"),
            mixup=_number("mixup alpha", cfg.mixup, 0.0, math.inf, "0 (off) or positive"),
            cutmix=_number("cutmix alpha", cfg.cutmix, 0.0, math.inf, "0 (off) or positive"),
        )


def _number(name: str, value, lo: float, hi: float, accepted: str, low_open=False) -> float:
    """``value`` as a float if it is a finite number in [lo, hi] (or (lo, hi]), else UserError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (lo < value if low_open else lo <= value) and value <= hi
    if not ok:
        raise UserError(f"{name} must be {accepted}, got {value!r}")
    return value


def require_resolved(aug: AugmentConfig) -> AugmentConfig:
    """``aug`` checked; it must be resolved already, since flip-safety is the dataset's to say."""
    if aug.flip is None:
        raise ValueError("resolve the AugmentConfig first: aug.resolved(flip_safe=...)")
    return aug.resolved()


def is_large(input_size: int, native_size: int | None) -> bool:
    """True for the RandomResizedCrop / Resize + CenterCrop path, False for the small path.

    Large: images of varying size (``native_size`` None, i.e. ImageFolder) or
    inputs above 64 px. Small: fixed-size datasets trained at <= 64 px.
    """
    return native_size is None or input_size > SMALL_MAX


def eval_resize_size(input_size: int, native_size: int | None) -> int:
    """The evaluation resize: ``input_size`` (small path), else ``round(input_size / 0.875)``."""
    if is_large(input_size, native_size):
        return round(input_size / EVAL_CROP_FRACTION)
    return input_size


def _check_size(input_size: int, mean: list[float], std: list[float]) -> int:
    check_int("input size (px)", input_size)
    if len(mean) not in (1, 3) or len(std) != len(mean):
        raise ValueError(f"mean and std need 1 or 3 values each, got {len(mean)} and {len(std)}")
    return len(mean)


def _eval_geometry(input_size: int, native_size: int | None) -> list[v2.Transform]:
    resize = eval_resize_size(input_size, native_size)
    if is_large(input_size, native_size):
        # Shorter side to `resize`, keeping the aspect ratio; then the central square.
        return [v2.Resize(resize, antialias=True), v2.CenterCrop(input_size)]
    return [v2.Resize((resize, resize), antialias=True)]


def _finish(mean: list[float], std: list[float]) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def _auto_policy(name: str, large: bool) -> v2.Transform | None:
    # Bilinear as in torchvision's classification references (the default, nearest, is blocky).
    bilinear = v2.InterpolationMode.BILINEAR
    if name == "autoaugment":
        policy = v2.AutoAugmentPolicy.IMAGENET if large else v2.AutoAugmentPolicy.CIFAR10
        return v2.AutoAugment(policy, interpolation=bilinear)
    if name == "randaugment":
        return v2.RandAugment(interpolation=bilinear)
    if name == "trivialaugment":
        return v2.TrivialAugmentWide(interpolation=bilinear)
    return None


def train_transform(
    aug: AugmentConfig,
    input_size: int,
    mean: list[float],
    std: list[float],
    native_size: int | None,
) -> v2.Transform:
    """The training transform: uint8 image -> normalized float32 ``[C, input_size, input_size]``.

    ``aug`` must be resolved (:meth:`AugmentConfig.resolved`); ``mean`` and
    ``std`` are per channel in [0, 1] units (their length gives C).
    ``native_size`` is the dataset's fixed image side, or None when sizes vary.
    With every option off this equals :func:`eval_transform`.
    """
    aug = require_resolved(aug)
    channels = _check_size(input_size, mean, std)
    large = is_large(input_size, native_size)
    ops: list[v2.Transform] = []
    if large and aug.crop:
        ops.append(v2.RandomResizedCrop(input_size, scale=(aug.scale_min, 1.0), antialias=True))
    elif large:
        ops += _eval_geometry(input_size, native_size)
    else:
        # Resize first so that crop, rotation and the auto policy work at the trained resolution
        # (an 8 px digit rotated at 8 px would be mush).
        ops += _eval_geometry(input_size, native_size)
        if aug.crop:
            pad = input_size // 8 if aug.crop_padding is None else aug.crop_padding
            if pad >= input_size:
                raise UserError(
                    f"crop padding must be smaller than the input size {input_size}, got {pad}"
                )
            ops.append(v2.RandomCrop(input_size, padding=pad, fill=0))
    if aug.flip:
        ops.append(v2.RandomHorizontalFlip(p=0.5))
    if aug.rotation > 0:
        ops.append(
            v2.RandomRotation(aug.rotation, interpolation=v2.InterpolationMode.BILINEAR, fill=0)
        )
    if aug.color_jitter > 0:
        s = aug.color_jitter
        # Saturation is a no-op on one channel; leaving it out saves a random draw per image.
        ops.append(v2.ColorJitter(brightness=s, contrast=s, saturation=s if channels == 3 else 0))
    policy = _auto_policy(aug.auto, large)
    if policy is not None:
        ops.append(policy)
    ops += _finish(mean, std)
    if aug.erasing > 0:
        # After Normalize, so value 0 fills erased boxes with the dataset mean.
        ops.append(v2.RandomErasing(p=aug.erasing, value=0))
    ops.append(v2.ToPureTensor())
    return v2.Compose(ops)


def eval_transform(
    input_size: int, mean: list[float], std: list[float], native_size: int | None
) -> v2.Transform:
    """The evaluation transform: resize (+ center crop on the large path) and normalize.

    Deterministic: it holds no random transform, so the same image always
    gives the same tensor.
    """
    _check_size(input_size, mean, std)
    ops = _eval_geometry(input_size, native_size) + _finish(mean, std) + [v2.ToPureTensor()]
    return v2.Compose(ops)


def batch_mix(
    aug: AugmentConfig, num_classes: int
) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """Mixup and/or CutMix for a batch, or None when both alphas are 0.

    The callable takes float images ``[N, C, H, W]`` and int64 labels ``[N]``
    and returns the mixed images and soft labels ``[N, num_classes]`` (rows
    sum to 1). With both on, each batch gets one of the two, chosen at random.
    Each image is mixed with its neighbour in the batch (``roll(1)``), so
    shuffle the batches.
    """
    aug = aug.resolved()
    if aug.mixup == 0 and aug.cutmix == 0:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"Mixup/CutMix need at least 2 classes, got {num_classes!r}")
    mixes: list[v2.Transform] = []
    if aug.mixup > 0:
        mixes.append(v2.MixUp(alpha=aug.mixup, num_classes=num_classes))
    if aug.cutmix > 0:
        mixes.append(v2.CutMix(alpha=aug.cutmix, num_classes=num_classes))
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)
