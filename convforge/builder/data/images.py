"""ImageSet: labelled images as uint8 tensors, held in memory or read from files.

Item ``i`` of an ImageSet is ``(image, label)``: ``image`` a
``torchvision.tv_tensors.Image`` of dtype uint8 and shape ``[C, H, W]``
(before any transform), ``label`` an int in ``range(len(classes))``. A
``transform`` (see :mod:`.augment`) is applied to the image when set. Every
source (digits, CIFAR, MNIST, ImageFolder, synthetic) produces one of the two
kinds below, so the trainer never knows where images came from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from convforge.errors import UserError


class ImageSet(torch.utils.data.Dataset):
    """Base: ``classes``, ``targets`` (one int per item), ``channels`` (1 or 3), ``transform``."""

    classes: list[str]
    targets: list[int]
    channels: int
    transform: Callable | None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def load(self, index: int) -> tv_tensors.Image:
        """The raw uint8 ``[C, H, W]`` image, no transform."""
        raise NotImplementedError

    def subset(self, indices: Sequence[int]) -> ImageSet:
        """A new ImageSet of the items at ``indices`` (same classes, no transform)."""
        raise NotImplementedError

    def with_transform(self, transform: Callable | None) -> ImageSet:
        """A shallow copy whose items pass through ``transform``."""
        clone = self.subset(range(len(self)))
        clone.transform = transform
        return clone


class TensorImageSet(ImageSet):
    """Images held in memory: ``images`` uint8 ``[N, C, H, W]``."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], classes: list[str]):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {images.dtype} {images.shape}"
            )
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.channels = images.shape[1]
        self.transform = None

    def load(self, index: int) -> tv_tensors.Image:
        return tv_tensors.Image(self.images[index])

    def subset(self, indices: Sequence[int]) -> TensorImageSet:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return TensorImageSet(self.images[idx], [self.targets[i] for i in idx], self.classes)


class FileImageSet(ImageSet):
    """Images read from files with PIL on access, converted to ``channels`` (1: L, 3: RGB)."""

    def __init__(
        self, paths: Sequence[str], targets: Sequence[int], classes: list[str], channels: int
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.paths = [str(p) for p in paths]
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.channels = channels
        self.transform = None

    def load(self, index: int) -> tv_tensors.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                return tv_tensors.Image(TF.pil_to_tensor(im))
        except (OSError, UnidentifiedImageError, SyntaxError) as e:
            raise UserError(f"cannot read image {path}: {e}") from None

    def subset(self, indices: Sequence[int]) -> FileImageSet:
        indices = list(indices)
        return FileImageSet(
            [self.paths[i] for i in indices],
            [self.targets[i] for i in indices],
            self.classes,
            self.channels,
        )


def stratified_split(
    targets: Sequence[int], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)``: each class split ``1 - val_fraction : val_fraction``.

    Seeded, so the same targets and seed always give the same split. Every
    class with at least two items keeps at least one in each part; a class
    with a single item puts it in train.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    train, val = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0  # a lone item trains: a class seen only in validation cannot be learned
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)


@dataclasses.dataclass(frozen=True)
class ChannelStats:
    mean: list[float]  # per channel, images scaled to [0, 1]
    std: list[float]


def channel_stats(images: ImageSet, max_samples: int = 2000, seed: int = 0) -> ChannelStats:
    """Per-channel mean and std over (up to ``max_samples`` random) raw images, in [0, 1].

    Computed on the training split only, so validation data never leaks
    into preprocessing.
    """
    n = len(images)
    if n == 0:
        raise UserError("cannot compute statistics of an empty dataset")
    rng = np.random.default_rng(seed)
    picks = rng.choice(n, size=min(n, max_samples), replace=False)
    total = torch.zeros(images.channels, dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    count = 0
    for i in picks:
        x = images.load(int(i)).to(torch.float64) / 255.0
        total += x.sum(dim=(1, 2))
        total_sq += (x * x).sum(dim=(1, 2))
        count += x.shape[1] * x.shape[2]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return ChannelStats(mean.tolist(), std.tolist())
