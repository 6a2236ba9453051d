"""``mnist:PATH``, ``fashion-mnist:PATH``: the four IDX files, optionally gzipped.

They are looked for in PATH, PATH/raw and torchvision's own download layout
under PATH. The t10k files are the validation split.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from convforge.builder.data.images import TensorImageSet
from convforge.builder.data.sources.bundle import (
    DataBundle,
    missing_folder,
    tensor_bundle,
    to_channels,
)
from convforge.errors import UserError

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


_IDX_IMAGES, _IDX_LABELS = 0x00000803, 0x00000801
_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MNIST_SUBFOLDERS = {
    # PATH/raw, and torchvision's own download layout under PATH.
    "mnist": ("raw", "MNIST/raw"),
    "fashion-mnist": ("raw", "FashionMNIST/raw"),
}


def _find_idx(folder: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array in IDX file ``path`` (gzipped if it ends in .gz), shaped by its header.

    UserError naming the file for a wrong ``magic``, a short header, or data
    that does not match the dimensions.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    what = "images" if magic == _IDX_IMAGES else "labels"
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        shown = "none (file too short)" if found is None else f"0x{found:08x}"
        raise UserError(
            f"{path} is not an IDX {what} file: magic number {shown}, expected 0x{magic:08x}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path} is truncated: its header needs {header} bytes, has {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)
    if len(raw) - header != expected:
        state = "truncated" if len(raw) - header < expected else "malformed"
        raise UserError(
            f"{path} is {state}: {len(raw) - header} data bytes for dimensions"
            f" {'x'.join(map(str, dims))} ({expected} bytes)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _mnist_part(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path, _IDX_IMAGES), read_idx(labels_path, _IDX_LABELS)
    if len(images) != len(labels):
        raise UserError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() >= 10:
        raise UserError(f"{labels_path}: label {labels.max()} is out of range 0..9")
    return images, labels


def load(kind: str, path: Path, channels: int | None) -> DataBundle:
    """The (Fashion-)MNIST IDX files in ``path`` or a known subfolder; t10k = val split."""
    subfolders = _MNIST_SUBFOLDERS[kind]
    expected = (
        f"{', '.join(_MNIST_FILES)} (each optionally .gz) in PATH or"
        f" {' or '.join('PATH/' + s for s in subfolders)}"
    )
    if not path.is_dir():
        raise missing_folder(kind, path, expected)
    found, lacking = None, None
    for folder in (path, *(path / s for s in subfolders)):
        files = [_find_idx(folder, base) for base in _MNIST_FILES]
        if all(files):
            found = files
            break
        if any(files) and lacking is None:  # a partial set: name what it lacks
            missing = [base for base, f in zip(_MNIST_FILES, files, strict=True) if f is None]
            lacking = f"{folder} lacks {', '.join(missing)}"
    if found is None:
        raise UserError(f"{kind}: {lacking or 'no IDX files in ' + str(path)}; expected {expected}")
    train_images, train_labels = _mnist_part(found[0], found[1])
    val_images, val_labels = _mnist_part(found[2], found[3])
    if train_images.shape[1:] != val_images.shape[1:]:
        raise UserError(
            f"{found[0]} has {train_images.shape[1:]} images but {found[2]} has"
            f" {val_images.shape[1:]}"
        )
    classes = FASHION_MNIST_CLASSES if kind == "fashion-mnist" else [str(d) for d in range(10)]

    def tensor_set(images: np.ndarray, labels: np.ndarray) -> TensorImageSet:
        tensor = to_channels(torch.from_numpy(images).unsqueeze(1), channels)
        return TensorImageSet(tensor, labels.tolist(), list(classes))

    return tensor_bundle(
        kind,
        str(found[0].parent),
        tensor_set(train_images, train_labels),
        tensor_set(val_images, val_labels),
        flip_safe=kind == "fashion-mnist",  # a mirrored shoe is a shoe; a mirrored 3 is not a 3
    )
