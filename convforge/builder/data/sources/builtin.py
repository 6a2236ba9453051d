"""The datasets that need no path: scikit-learn's bundled digits and the procedural images.

Neither has a test part, so both are split into train and val by a seeded
stratified split.
"""

from __future__ import annotations

import numpy as np
import torch

from convforge.builder.data import synthetic
from convforge.builder.data.sources.bundle import DataBundle, split_bundle, to_channels


def load_digits(val_fraction: float, seed: int, channels: int | None) -> DataBundle:
    """scikit-learn's 8x8 handwritten digits (``--dataset digits``), scaled to 0..255."""
    from sklearn import datasets  # the digits are bundled with scikit-learn, never downloaded

    digits = datasets.load_digits()
    # Values are 0..16; scale to 0..255 the same way for every pixel.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1)
    return split_bundle(
        "digits",
        "scikit-learn",
        to_channels(images, channels),
        digits.target.tolist(),
        [str(d) for d in range(10)],
        val_fraction,
        seed,
        flip_safe=False,  # a mirrored 2, 3 or 7 is not that digit
    )


def load_synthetic(
    options_text: str | None, val_fraction: float, seed: int, channels: int | None
) -> DataBundle:
    """Procedural images (``--dataset synthetic[:key=value,...]``, see :mod:`..synthetic`)."""
    options = synthetic.parse_options(options_text, channels=channels)
    pixels, labels, classes = synthetic.generate(options)
    return split_bundle(
        "synthetic",
        options.describe(),
        torch.from_numpy(pixels),
        labels.tolist(),
        classes,
        val_fraction,
        seed,
        flip_safe=synthetic.flip_safe(options.classes),
    )
