"""Synthetic images: seeded, any size, classes told apart by structure and not by colour."""

import time

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier

from convforge.builder.data.synthetic import (
    SHAPES,
    SyntheticOptions,
    class_names,
    flip_safe,
    generate,
    parse_options,
)
from convforge.errors import UserError


def test_parse_options():
    assert parse_options(None) == SyntheticOptions()
    assert parse_options("") == SyntheticOptions(10, 32, 100, 3, 0)
    assert parse_options(" classes=4 , size=16,data_seed=7,") == SyntheticOptions(
        classes=4, size=16, data_seed=7
    )
    assert parse_options("channels=1").channels == 1
    assert parse_options(None, channels=1).channels == 1
    assert SyntheticOptions().describe() == (
        "classes=10, size=32, per_class=100, channels=3, data_seed=0"
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("colours=3", "bad synthetic option 'colours=3'; use key=value with keys: classes, size"),
        ("classes", "bad synthetic option 'classes'"),
        ("size=big", "synthetic option size must be an integer, got 'big'"),
        ("size=7", "synthetic option size must be >= 8, got 7"),
        ("classes=1", "synthetic option classes must be >= 2, got 1"),
        ("per_class=1", "synthetic option per_class must be >= 2, got 1"),
        ("data_seed=-1", "synthetic option data_seed must be >= 0"),
        ("channels=2", "synthetic option channels must be 1 or 3, got 2"),
        ("size=8,size=9", "synthetic option size is given twice"),
        ("classes=1000,per_class=1000,size=64", "would take 11.4 GiB"),
    ],
)
def test_parse_options_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_options(text)


def test_channels_argument_must_agree():
    with pytest.raises(UserError, match="channels=3 contradicts channels 1"):
        parse_options("channels=3", channels=1)


def test_deterministic_for_a_data_seed():
    a = generate(parse_options("classes=4,size=16,per_class=5,data_seed=3"))
    b = generate(parse_options("classes=4,size=16,per_class=5,data_seed=3"))
    c = generate(parse_options("classes=4,size=16,per_class=5,data_seed=4"))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    assert np.array_equal(a[1], c[1])  # same labels, different images


@pytest.mark.parametrize(
    "classes, size, channels", [(2, 8, 3), (3, 9, 1), (7, 17, 3), (30, 33, 1), (101, 12, 3)]
)
def test_any_size_and_class_count(classes, size, channels):
    options = SyntheticOptions(classes=classes, size=size, per_class=3, channels=channels)
    images, labels, names = generate(options)
    assert images.shape == (3 * classes, channels, size, size) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [3] * classes
    assert len(names) == classes and len(set(names)) == classes
    assert images.std() > 20  # not blank


def test_rendering_in_chunks_matches_one_go(monkeypatch):
    from convforge.builder.data import synthetic

    options = SyntheticOptions(classes=3, size=16, per_class=10)
    whole = generate(options)[0]
    monkeypatch.setattr(synthetic, "_CHUNK_PIXELS", 16 * 16 * 30)
    assert np.array_equal(generate(options)[0], whole)


def test_class_names():
    assert class_names(3) == ["disc", "square", "triangle"]
    assert class_names(10)[:7] == [
        "disc-0deg", "square-0deg", "triangle-0deg", "ring-0deg", "plus-0deg", "frame-0deg",
        "disc-90deg",
    ]  # fmt: skip
    many = class_names(100)
    assert many[0] == "disc-0deg-f1" and many[-1] == "ring-0deg-f5"
    assert all(name.split("-")[0] in SHAPES for name in many)


def test_flip_safe_only_with_0_and_90_degree_stripes():
    assert flip_safe(2) and flip_safe(10) and flip_safe(12)
    assert not flip_safe(13) and not flip_safe(100)


def test_fast():
    options = SyntheticOptions(classes=10, size=32, per_class=100)
    generate(SyntheticOptions(classes=2, size=8, per_class=2))  # warm up numpy
    start = time.perf_counter()
    images, _, _ = generate(options)
    elapsed = time.perf_counter() - start
    assert len(images) == 1000
    assert elapsed < 3.0, f"1000 images of 32 px took {elapsed:.2f} s"


# ---- learnable from structure, not from colour ----------------------------------------------


def _orientation_features(images: np.ndarray, cells: int = 4, bins: int = 9) -> np.ndarray:
    """A small HOG: magnitude-weighted histograms of gradient orientation on a cells x cells grid.

    Colour-blind by construction (per pixel, the channel with the strongest
    gradient is used), so it sees only edges and stripes.
    """
    x = images.astype(np.float32)
    gx, gy = np.zeros_like(x), np.zeros_like(x)
    gx[..., 1:-1] = x[..., 2:] - x[..., :-2]
    gy[..., 1:-1, :] = x[..., 2:, :] - x[..., :-2, :]
    magnitude = np.hypot(gx, gy)
    strongest = magnitude.argmax(axis=1)[:, None]
    gx, gy, magnitude = (np.take_along_axis(a, strongest, 1)[:, 0] for a in (gx, gy, magnitude))
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    b = np.minimum((angle / np.pi * bins).astype(int), bins - 1)
    n, h, w = magnitude.shape
    cell = (np.arange(h) * cells // h)[:, None] * cells + (np.arange(w) * cells // w)[None, :]
    index = (cell[None] * bins + b).reshape(n, -1) + np.arange(n)[:, None] * cells * cells * bins
    features = np.bincount(
        index.ravel(), weights=magnitude.ravel(), minlength=n * cells * cells * bins
    ).reshape(n, -1)
    features /= features.sum(axis=1, keepdims=True) + 1e-6
    return np.sqrt(features)


def _holdout_accuracy(model, features, labels) -> float:
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=0.3, random_state=0, stratify=labels
    )
    return model.fit(x_train, y_train).score(x_test, y_test)


@pytest.fixture(scope="module")
def default_images():
    images, labels, _ = generate(SyntheticOptions(classes=10, size=32, per_class=60))
    return images, labels


def test_not_separable_by_mean_colour(default_images):
    images, labels = default_images
    mean_colour = images.mean(axis=(2, 3)) / 255.0
    chance = 1 / 10
    for model in (LogisticRegression(max_iter=1000), KNeighborsClassifier(15)):
        accuracy = _holdout_accuracy(model, mean_colour, labels)
        assert accuracy < chance + 0.07, f"{type(model).__name__} on mean colour: {accuracy:.2f}"


def test_learnable_from_structure(default_images):
    # A linear classifier (closed-form ridge: fast) on colour-blind orientation features.
    images, labels = default_images
    features = _orientation_features(images)
    accuracy = _holdout_accuracy(RidgeClassifier(), features, labels)
    assert accuracy > 0.5, f"orientation features: {accuracy:.2f} (chance 0.10)"
    # Control: the same check on labels that carry no structure stays near chance.
    shuffled = np.random.default_rng(0).permutation(labels)
    control = _holdout_accuracy(RidgeClassifier(), features, shuffled)
    assert control < 0.2, f"shuffled labels scored {control:.2f}"


def test_learnable_in_gray_and_small():
    images, labels, _ = generate(SyntheticOptions(classes=4, size=16, per_class=100, channels=1))
    accuracy = _holdout_accuracy(RidgeClassifier(), _orientation_features(images), labels)
    assert accuracy > 0.4, f"{accuracy:.2f} (chance 0.25)"  # shapes only: stripes are random here
    mean = images.mean(axis=(1, 2, 3))[:, None] / 255.0
    assert _holdout_accuracy(LogisticRegression(), mean, labels) < 0.25 + 0.12
