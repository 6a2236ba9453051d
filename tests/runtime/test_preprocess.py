"""Runtime preprocessing (PIL + numpy) against the builder's evaluation transform (torchvision)."""

import numpy as np
import pytest
import torch
from PIL import Image

from convforge.builder.data import augment
from convforge.contract import InputSpec, ModelInfo
from convforge.errors import UserError
from convforge.runtime.preprocess import preprocess


def _info(channels, size, resize, mean, std):
    return ModelInfo(
        "m.onnx", InputSpec(channels, size, size), ["a", "b"], mean, std, resize, "fp32", "x", {}
    )


def _torchvision(image: np.ndarray, size, mean, std, native):
    tf = augment.eval_transform(size, mean, std, native)
    t = torch.from_numpy(image if image.ndim == 3 else image[:, :, None]).permute(2, 0, 1)
    from torchvision import tv_tensors

    return tf(tv_tensors.Image(t.contiguous())).numpy()


def test_small_path_matches_the_training_evaluation_transform():
    rng = np.random.default_rng(0)
    digit = (rng.random((8, 8)) * 255).astype(np.uint8)
    mean, std = [0.3], [0.4]
    ours = preprocess([digit], _info(1, 32, 32, mean, std))[0]
    theirs = _torchvision(digit, 32, mean, std, native=8)
    assert ours.shape == theirs.shape == (1, 32, 32)
    assert np.abs(ours - theirs).max() <= 3 / 255 / 0.4  # a few grey levels at most


def test_large_path_resizes_the_short_side_then_crops_the_center():
    rng = np.random.default_rng(1)
    photo = (rng.random((300, 400, 3)) * 255).astype(np.uint8)
    photo[100:200, 150:250] = 255  # structure, so a misplaced crop would show
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    ours = preprocess([Image.fromarray(photo)], _info(3, 224, 256, mean, std))[0]
    theirs = _torchvision(photo, 224, mean, std, native=None)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert np.abs(ours - theirs).mean() < 0.02 and np.abs(ours - theirs).max() < 0.5


def test_paths_and_channel_conversion(tmp_path):
    Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(tmp_path / "a.png")
    x = preprocess([str(tmp_path / "a.png")], _info(1, 8, 8, [0.0], [1.0]))
    assert x.shape == (1, 1, 8, 8) and x.dtype == np.float32
    assert np.allclose(x, 200 / 255, atol=1e-6)


@pytest.mark.parametrize(
    "image, message",
    [
        ("missing.png", "does not exist"),
        (np.zeros((4, 4), np.float32), "must be uint8"),
        (np.zeros((4, 4, 2), np.uint8), "need 1, 3 or 4 channels"),
        (42, "must be file paths, PIL images or uint8 arrays"),
    ],
)
def test_bad_images_are_user_errors(image, message, tmp_path):
    with pytest.raises(UserError, match=message):
        preprocess([image], _info(3, 8, 8, [0.0] * 3, [1.0] * 3))


def test_unreadable_image_file(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot read image"):
        preprocess([tmp_path / "bad.jpg"], _info(3, 8, 8, [0.0] * 3, [1.0] * 3))
