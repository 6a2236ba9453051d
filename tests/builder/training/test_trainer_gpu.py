"""The trainer on a CUDA device: fp16 with GradScaler, bf16, channels_last, exact resume."""

import dataclasses
import os

import pytest
import torch

from convforge.builder import build_model
from convforge.builder.checkpoint import load_checkpoint
from convforge.builder.data.sources import load_dataset
from convforge.builder.training.config import TrainConfig, recipe_model
from convforge.builder.training.trainer import train

# cuBLAS reads this once, when CUDA starts: set it before any test touches the GPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _model():
    return dataclasses.replace(recipe_model("resnet18", 32), num_classes=10, in_channels=1)


def _cfg(tmp_path, name, **kwargs):
    return TrainConfig(out=str(tmp_path / name), device="cuda", **kwargs)


@pytest.mark.parametrize("amp", ["fp16", "bf16", "off"])
def test_cuda_training_learns_digits(tmp_path, amp):
    cfg = _cfg(tmp_path, amp, epochs=6, amp=amp, channels_last=amp != "off")
    result = train(_model(), cfg, progress=False)
    assert result.best_val_acc >= 0.97
    ck = load_checkpoint(result.out / "last.pt")
    assert (ck.extra["scaler_state"] is not None) == (amp == "fp16")
    assert ck.history[-1]["images_per_s"] > 0


def test_cuda_deterministic_resume_ends_with_the_same_weights(tmp_path):
    straight = train(
        _model(), _cfg(tmp_path, "straight", epochs=2, deterministic=True), progress=False
    )
    torch.manual_seed(0)
    model = build_model(_model())
    steps = len(load_dataset("digits").train) // 64
    calls = {"n": 0}

    def ctrl_c_in_epoch_two(module, args):
        if module.training:
            calls["n"] += 1
            if calls["n"] > steps:
                raise KeyboardInterrupt

    model.register_forward_pre_hook(ctrl_c_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(
            _model(),
            _cfg(tmp_path, "stopped", epochs=2, deterministic=True),
            model=model,
            progress=False,
        )
    resumed = train(None, None, resume=tmp_path / "stopped" / "last.pt", progress=False)
    assert resumed.epochs_run == 2
    a = load_checkpoint(straight.out / "last.pt").model_state
    b = load_checkpoint(resumed.out / "last.pt").model_state
    assert all(torch.equal(a[k], b[k]) for k in a)
