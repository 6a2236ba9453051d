"""Small helpers shared by the tests."""

import numpy as np
import torch

from convforge.builder.data.synthetic import photo


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
    """A photo-like JPEG at ``path`` (returned as str), quality 90: see
    :func:`convforge.builder.data.synthetic.photo`."""
    photo(width, height, seed).save(path, quality=90)
    return str(path)


def skip_unless_available(name: str) -> None:
    """Skip the calling test, with the backend's own reason, when ``name`` cannot run here."""
    import pytest

    from convforge.runtime.backends import backend_class

    ok, why = backend_class(name).available()
    if not ok:
        pytest.skip(f"{name} cannot run here: {why}")
