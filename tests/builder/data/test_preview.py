import io

import numpy as np
import pytest
import torch
from PIL import Image

from convforge.builder.data.augment import AugmentConfig
from convforge.builder.data.images import TensorImageSet
from convforge.builder.data.preview import preview_grid
from convforge.errors import UserError


def image_set(channels: int, size: int, n: int = 12, classes: int = 3) -> TensorImageSet:
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)
    return TensorImageSet(
        images, [i % classes for i in range(n)], [f"c{k}" for k in range(classes)]
    )


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def render(tmp_path, name, images, aug, seed=0, **kw):
    path = tmp_path / name
    channels = images.channels
    preview_grid(
        images,
        aug,
        input_size=kw.pop("input_size", 16),
        mean=[0.5] * channels,
        std=[0.25] * channels,
        native_size=kw.pop("native_size", 8),
        path=path,
        samples=kw.pop("samples", 3),
        variants=kw.pop("variants", 3),
        seed=seed,
        **kw,
    )
    return pixels(path)


@pytest.mark.parametrize("channels", [1, 3])
def test_preview_is_a_png_and_reproducible_for_a_seed(tmp_path, channels):
    images = image_set(channels, 8)
    aug = AugmentConfig("strong").resolved()
    a = render(tmp_path, "a.png", images, aug, seed=5)
    b = render(tmp_path, "b.png", images, aug, seed=5)
    c = render(tmp_path, "c.png", images, aug, seed=6)
    assert a.shape[0] > 100 and a.shape[1] > 100
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png"]


def test_mix_row_added_only_when_mixup_or_cutmix_on(tmp_path):
    images = image_set(3, 8)
    plain = render(tmp_path, "plain.png", images, AugmentConfig("light").resolved())
    mixed = render(tmp_path, "mixed.png", images, AugmentConfig("light", cutmix=1.0).resolved())
    assert mixed.shape[0] > plain.shape[0]  # one more row
    assert mixed.shape[1] == plain.shape[1]


def test_preview_large_path_and_callers_rng_untouched(tmp_path):
    images = image_set(3, 40)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    render(tmp_path, "big.png", images, AugmentConfig("standard").resolved(), native_size=None)
    assert torch.equal(torch.rand(3), expected)


def test_preview_rejects_bad_arguments(tmp_path):
    images = image_set(1, 8)
    with pytest.raises(ValueError, match="resolve"):
        render(tmp_path, "x.png", images, AugmentConfig("light"))
    with pytest.raises(UserError):
        render(tmp_path, "x.png", images, AugmentConfig("light").resolved(), samples=0)
    with pytest.raises(UserError, match="does not exist"):
        render(tmp_path / "missing", "x.png", images, AugmentConfig("light").resolved())
    assert not list(tmp_path.iterdir())


def test_preview_png_bytes_decode(tmp_path):
    images = image_set(1, 8, n=2, classes=2)
    render(tmp_path, "one.png", images, AugmentConfig("strong").resolved(), samples=5, variants=0)
    data = (tmp_path / "one.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    Image.open(io.BytesIO(data)).verify()
