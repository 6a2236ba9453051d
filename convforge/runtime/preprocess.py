"""Images in, the model's input batch out: the evaluation preprocessing, from metadata.

Mirrors the export's evaluation transform with PIL and numpy (no torch):
convert to the model's channels (L or RGB); if ``resize_size`` equals the
input size, resize to input_size x input_size (the small-image path),
otherwise resize the shorter side to ``resize_size`` and center-crop
input_size (256 -> 224); scale to [0, 1]; normalize with the model's mean
and std; lay out as float32 [N, C, H, W]. Bilinear resampling with PIL's
antialiasing, as torchvision's ``Resize(antialias=True)`` does; results can
differ from torchvision's by one grey level in a few pixels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from convforge.contract import ModelInfo
from convforge.errors import UserError


def to_pil(image, channels: int) -> Image.Image:
    """A file path, a PIL image or a uint8 array (H, W) / (H, W, C) as a PIL image."""
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"image {path} does not exist")
        try:
            with Image.open(path) as im:
                im.load()
                pil = im
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"cannot read image {path}: {e}") from None
    elif isinstance(image, Image.Image):
        pil = image
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise UserError(
                f"image arrays must be uint8 (H, W) or (H, W, C), got {image.dtype} "
                f"{list(image.shape)}; preprocessed float batches go to Backend.run"
            )
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim == 3 and image.shape[2] not in (3, 4):
            raise UserError(f"image arrays need 1, 3 or 4 channels last, got {image.shape[2]}")
        pil = Image.fromarray(image)
    else:
        raise UserError(
            f"images must be file paths, PIL images or uint8 arrays, got {type(image).__name__}"
        )
    return pil.convert("L" if channels == 1 else "RGB")


def preprocess(images, info: ModelInfo) -> np.ndarray:
    """float32 [N, C, H, W] for ``images`` (a list of anything :func:`to_pil` takes)."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise UserError("no images given")
    c, size = info.spec.channels, info.spec.height
    mean = np.asarray(info.mean, dtype=np.float32).reshape(c, 1, 1)
    std = np.asarray(info.std, dtype=np.float32).reshape(c, 1, 1)
    out = np.empty((len(images), c, size, info.spec.width), dtype=np.float32)
    for i, image in enumerate(images):
        pil = _geometry(to_pil(image, c), size, info.resize_size)
        x = np.asarray(pil, dtype=np.float32) / 255.0
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        out[i] = (x - mean) / std
    return out


def _geometry(pil: Image.Image, size: int, resize_size: int) -> Image.Image:
    if resize_size == size:
        return pil.resize((size, size), Image.BILINEAR)
    w, h = pil.size
    scale = resize_size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    pil = pil.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return pil.crop((left, top, left + size, top + size))
