"""What every source returns (:class:`DataBundle`) and the helpers the sources share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from convforge.builder.data.images import ImageSet, TensorImageSet, stratified_split
from convforge.errors import UserError


@dataclass
class DataBundle:
    """A dataset ready for training: the two splits and what the trainer needs to know."""

    name: str  # the spec's kind, e.g. "digits", "imagefolder"
    train: ImageSet
    val: ImageSet
    classes: list[str]
    channels: int  # 1 or 3
    native_size: int | None  # side in px when every image is square and the same size, else None
    flip_safe: bool  # do horizontal flips keep the label's meaning? (not for digits or MNIST)
    description: str  # one line for logs: source, split sizes, classes, image shape
    skipped: list[str] = field(default_factory=list)  # unreadable files skipped (ImageFolder)


def to_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` with ``channels`` channels (None: unchanged).

    Gray to RGB repeats the plane; RGB to gray uses PIL's integer luma
    formula, so a converted tensor equals ``Image.convert("L")`` exactly.
    """
    have = images.shape[1]
    if channels is None or channels == have:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    rgb = images.to(torch.int32)
    luma = (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16
    return luma.to(torch.uint8).unsqueeze(1)


def shape_text(channels: int, native_size: int | None) -> str:
    """``"3x32x32"``, or ``"3 channels, mixed sizes"`` when there is no one native size."""
    if native_size is None:
        return f"{channels} channels, mixed sizes"
    return f"{channels}x{native_size}x{native_size}"


def describe(kind: str, source: str, train: ImageSet, val: ImageSet, shape: str) -> str:
    """The bundle's one-line description: source, split sizes, classes, image shape."""
    return (
        f"{kind} ({source}): {len(train)} train / {len(val)} val images, "
        f"{len(train.classes)} classes, {shape}"
    )


def tensor_bundle(
    kind: str,
    source: str,
    train: TensorImageSet,
    val: TensorImageSet,
    flip_safe: bool,
) -> DataBundle:
    """A bundle of two in-memory sets (square images of one size)."""
    _, channels, height, width = train.images.shape
    native = height if height == width else None
    shape = f"{channels}x{height}x{width}"
    return DataBundle(
        name=kind,
        train=train,
        val=val,
        classes=train.classes,
        channels=channels,
        native_size=native,
        flip_safe=flip_safe,
        description=describe(kind, source, train, val, shape),
    )


def split_bundle(
    kind: str,
    source: str,
    images: torch.Tensor,
    labels: Sequence[int],
    classes: list[str],
    val_fraction: float,
    seed: int,
    flip_safe: bool,
) -> DataBundle:
    """Split one labelled tensor into train and val by a seeded stratified split."""
    everything = TensorImageSet(images, labels, classes)
    train_idx, val_idx = stratified_split(everything.targets, val_fraction, seed)
    return tensor_bundle(
        kind, source, everything.subset(train_idx), everything.subset(val_idx), flip_safe
    )


def missing_folder(kind: str, path: Path, expected: str) -> UserError:
    """The error for a PATH that is not a folder, naming what belongs there."""
    if path.is_file():
        hint = " (extract the archive first)" if path.name.endswith((".tar.gz", ".tgz")) else ""
        return UserError(f"{kind}: {path} is a file, not a folder{hint}; expected {expected}")
    return UserError(f"{kind}: folder {path} does not exist; expected {expected}")
