"""Small helpers shared by the tests."""

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter


def with_bn_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with non-trivial BatchNorm statistics and affine parameters,
    as trained weights have (fresh ones are mean 0, var 1, scale 1, shift 0: folding
    them would test nothing)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    return model.eval()


SMALL_CLASSES = ["a", "b", "c", "d", "e"]
SMALL_INPUT = (3, 16, 16)


def export_small_model(folder):
    """(path to .onnx, eval PyTorch model): a ResNet-18 of width 8 for 16 px RGB, real BN
    statistics, exported by convforge (.onnx and .pt2) with full metadata."""
    from convforge import contract
    from convforge.builder import create_model
    from convforge.export import export_onnx

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=len(SMALL_CLASSES), stem="small", base_width=8)
    model = with_bn_statistics(model)
    info = contract.metadata(
        arch="resnet18", classes=SMALL_CLASSES, mean=[0.5] * 3, std=[0.25] * 3,
        input_size=16, resize_size=16, channels=3, source_sha256="0" * 64,
    )  # fmt: skip
    path = folder / "m.onnx"
    export_onnx(model, path, input_size=SMALL_INPUT, metadata=info)
    return path, model


def random_batch(n: int, seed: int = 1) -> np.ndarray:
    """float32 [n, 3, 16, 16] standard-normal inputs for the small model."""
    return np.random.default_rng(seed).standard_normal((n, *SMALL_INPUT)).astype(np.float32)


def torch_logits(model, x: np.ndarray) -> np.ndarray:
    """The PyTorch reference logits for ``x``."""
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def photo_jpeg(path, width, height, seed=0):
    """A photo-like JPEG at ``path`` (returned as str): smooth colour gradients, filled shapes,
    a little blur and sensor-like noise, saved by PIL at quality 90. Also used by
    benchmarks/e2e_latency.py."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = [128 + 100 * np.sin(x / width * 3 + c) * np.cos(y / height * 2 + c) for c in range(3)]
    image = Image.fromarray(np.stack(base, -1).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        cx, cy = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(min(width, height) // 30, min(width, height) // 6))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([cx - r, cy - r // 2, cx + r, cy + r], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(max(1, min(width, height) // 400)))
    noisy = np.asarray(image, np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return str(path)


def skip_unless_available(name: str) -> None:
    """Skip the calling test, with the backend's own reason, when ``name`` cannot run here."""
    import pytest

    from convforge.runtime.backends import backend_class

    ok, why = backend_class(name).available()
    if not ok:
        pytest.skip(f"{name} cannot run here: {why}")
