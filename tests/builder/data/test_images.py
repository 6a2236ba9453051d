"""ImageSet kinds, the stratified split and channel statistics."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from convforge.builder.data.images import (
    ChannelStats,
    FileImageSet,
    TensorImageSet,
    channel_stats,
    stratified_split,
)
from convforge.errors import UserError

# ---- stratified_split ----------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9])
def test_stratified_split_partitions_by_class(fraction):
    targets = np.repeat(np.arange(4), [40, 20, 7, 2])
    np.random.default_rng(0).shuffle(targets)
    train, val = stratified_split(targets.tolist(), fraction, seed=5)
    assert train == sorted(train) and val == sorted(val)
    assert not set(train) & set(val) and sorted(train + val) == list(range(len(targets)))
    for c, n in enumerate([40, 20, 7, 2]):
        n_val = int(np.sum(targets[val] == c))
        assert 1 <= n_val <= n - 1  # every class in both parts
        assert abs(n_val - n * fraction) <= 1  # proportions kept per class


def test_stratified_split_is_seeded():
    targets = [i % 3 for i in range(90)]
    assert stratified_split(targets, 0.2, 1) == stratified_split(targets, 0.2, 1)
    assert stratified_split(targets, 0.2, 1) != stratified_split(targets, 0.2, 2)


def test_stratified_split_single_item_class_trains():
    # A class seen only in validation could never be learned, whatever the fraction.
    for fraction in (0.1, 0.5, 0.6, 0.9):
        train, val = stratified_split([0, 0, 0, 0, 1], fraction, seed=0)
        assert 4 in train and 4 not in val


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_stratified_split_rejects_bad_fraction(fraction):
    with pytest.raises(UserError, match="val fraction must be between 0 and 1"):
        stratified_split([0, 1], fraction, seed=0)


# ---- TensorImageSet ------------------------------------------------------------------------


def _tensor_set(n=6, channels=3, size=4) -> TensorImageSet:
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8)
    return TensorImageSet(images, [i % 2 for i in range(n)], ["even", "odd"])


def test_tensor_image_set_items():
    data = _tensor_set()
    assert len(data) == 6 and data.channels == 3 and data.classes == ["even", "odd"]
    image, label = data[3]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert image.shape == (3, 4, 4) and torch.equal(image, data.images[3])
    assert label == 1 and isinstance(label, int)


@pytest.mark.parametrize(
    "images, targets, message",
    [
        (torch.zeros(2, 1, 4, 4), [0, 1], "uint8"),
        (torch.zeros(2, 4, 4, dtype=torch.uint8), [0, 1], "uint8 \\[N, C, H, W\\]"),
        (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), [0], "2 images but 1 targets"),
    ],
)
def test_tensor_image_set_checks(images, targets, message):
    with pytest.raises(ValueError, match=message):
        TensorImageSet(images, targets, ["a", "b"])


def test_tensor_subset_and_with_transform():
    data = _tensor_set()
    part = data.subset([4, 1])
    assert isinstance(part, TensorImageSet) and part.targets == [0, 1]
    assert part.classes == data.classes and part.transform is None
    assert torch.equal(part.images, data.images[[4, 1]])
    assert len(data.subset([])) == 0

    flipped = data.with_transform(lambda x: x.flip(-1))
    assert data.transform is None  # the original is untouched
    image, label = flipped[2]
    assert torch.equal(image, data.images[2].flip(-1)) and label == 0
    assert torch.equal(flipped.load(2), data.images[2])  # load() is always raw
    assert flipped.subset([0]).transform is None


# ---- FileImageSet --------------------------------------------------------------------------


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (3, 4), dtype=np.uint8)
    paths = [tmp_path / "rgb.png", tmp_path / "gray.png"]
    Image.fromarray(rgb).save(paths[0])
    Image.fromarray(gray).save(paths[1])
    return paths, rgb, gray


def test_file_image_set_reads_and_converts(image_files):
    paths, rgb, gray = image_files
    data = FileImageSet(paths, [1, 0], ["a", "b"], channels=3)
    assert len(data) == 2 and data.channels == 3
    image, label = data[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert np.array_equal(image.permute(1, 2, 0).numpy(), rgb) and label == 1
    gray_as_rgb, _ = data[1]
    assert gray_as_rgb.shape == (3, 3, 4) and np.array_equal(gray_as_rgb[1].numpy(), gray)

    as_gray = FileImageSet(paths, [1, 0], ["a", "b"], channels=1)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(as_gray.load(0)[0].numpy(), expected)
    assert as_gray.load(1).shape == (1, 3, 4)


def test_file_image_set_subset_and_transform(image_files):
    paths, rgb, _ = image_files
    data = FileImageSet(paths, [1, 0], ["a", "b"], channels=3)
    part = data.subset([1])
    assert isinstance(part, FileImageSet) and part.paths == [str(paths[1])]
    assert part.targets == [0] and part.channels == 3
    scaled = data.with_transform(lambda x: x // 2)
    assert np.array_equal(scaled[0][0].permute(1, 2, 0).numpy(), rgb // 2)
    assert data.transform is None


def test_file_image_set_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    data = FileImageSet([bad, tmp_path / "missing.png"], [0, 0], ["a"], channels=3)
    with pytest.raises(UserError, match=f"cannot read image {bad}"):
        data.load(0)
    with pytest.raises(UserError, match="cannot read image .*missing.png"):
        data[1]
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        FileImageSet([bad], [0], ["a"], channels=2)


# ---- channel_stats -------------------------------------------------------------------------


def test_channel_stats_matches_numpy():
    data = _tensor_set(n=20, channels=3, size=5)
    stats = channel_stats(data)
    pixels = data.images.numpy().astype(np.float64) / 255.0
    assert isinstance(stats, ChannelStats)
    np.testing.assert_allclose(stats.mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(stats.std, pixels.std(axis=(0, 2, 3)), rtol=1e-9)


def test_channel_stats_known_values_and_mixed_sizes(tmp_path):
    # Two gray images of different sizes: every pixel counts once, not every image.
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(paths[0])  # 4 pixels of 0
    Image.fromarray(np.full((2, 6), 255, np.uint8)).save(paths[1])  # 12 pixels of 1
    stats = channel_stats(FileImageSet(paths, [0, 0], ["x"], channels=1))
    assert stats.mean == pytest.approx([0.75])
    assert stats.std == pytest.approx([np.sqrt(0.75 * 0.25)])


def test_channel_stats_constant_and_sampled():
    flat = TensorImageSet(torch.full((3, 1, 2, 2), 51, dtype=torch.uint8), [0, 0, 0], ["x"])
    stats = channel_stats(flat)
    assert stats.mean == pytest.approx([0.2]) and stats.std[0] == pytest.approx(0.0, abs=1e-5)
    data = _tensor_set(n=50)
    sampled = channel_stats(data, max_samples=10, seed=1)
    assert sampled == channel_stats(data, max_samples=10, seed=1)  # seeded
    assert sampled != channel_stats(data)  # a subset, not everything
    assert all(abs(m - 0.5) < 0.1 for m in sampled.mean)


def test_channel_stats_empty():
    empty = TensorImageSet(torch.zeros(0, 3, 2, 2, dtype=torch.uint8), [], ["x"])
    with pytest.raises(UserError, match="empty dataset"):
        channel_stats(empty)
