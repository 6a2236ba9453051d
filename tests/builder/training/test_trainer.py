"""The training loop on real data (scikit-learn's digits), small enough for CI."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convforge.builder import build_model
from convforge.builder.checkpoint import load_checkpoint
from convforge.builder.data.augment import AugmentConfig
from convforge.builder.data.sources import load_dataset
from convforge.builder.training.config import TrainConfig, recipe_model
from convforge.builder.training.trainer import TrainingDiverged, train


def _cfg(tmp_path, name="run", **kwargs) -> TrainConfig:
    base = dict(dataset="digits", input_size=16, epochs=2, out=str(tmp_path / name))
    return TrainConfig(**{**base, **kwargs})


def _model():
    """An 8-wide ResNet-18 for 16 px digits (10 classes, 1 channel), as train() builds it."""
    cfg = recipe_model("resnet18", 16, options={"base_width": 8})
    return dataclasses.replace(cfg, num_classes=10, in_channels=1)


def _built(seed=0):
    """The exact initial model train() builds for _model() with this seed."""
    torch.manual_seed(seed)
    return build_model(_model())


def _steps_per_epoch(batch_size=64):
    return len(load_dataset("digits", val_fraction=0.1, seed=0).train) // batch_size


def test_digits_default_recipe_learns(tmp_path):
    result = train(_model(), _cfg(tmp_path, epochs=5), progress=False)
    assert result.best_val_acc >= 0.95  # 179 held-out digits after 5 epochs
    out = result.out
    names = {p.name for p in out.iterdir()}
    assert {"best.pt", "last.pt", "metrics.csv", "curves.png", "config.json"} <= names
    assert len((out / "metrics.csv").read_text().splitlines()) == 1 + 5
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["in_channels"] == 1 and config["model"]["num_classes"] == 10
    assert config["train"]["augment"]["flip"] is False  # digits are not flip-safe


def test_checkpoint_follows_the_design_format(tmp_path):
    result = train(_model(), _cfg(tmp_path, epochs=1), progress=False)
    ck = load_checkpoint(result.out / "last.pt")
    assert ck.model_config == _model().resolved() and ck.epoch == 1
    assert ck.train_config["dataset"] == "digits" and len(ck.history) == 1
    for key in ("optimizer_state", "scheduler_state", "rng_state", "versions"):
        assert key in ck.extra
    data = ck.data_config
    assert data["classes"] == [str(i) for i in range(10)] and data["channels"] == 1
    assert data["input_size"] == 16 and len(data["mean"]) == len(data["std"]) == 1
    assert 0.0 < data["mean"][0] < 1.0
    assert ck.metrics["best_val_acc"] == ck.metrics["val_acc"]
    ck.build_model()  # rebuilt from the stored config alone


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, capsys):
    # The exactness promise is for the CPU (GPU kernels may be nondeterministic).
    straight = train(_model(), _cfg(tmp_path, "straight", device="cpu"), progress=False)

    model, calls = _built(), {"n": 0}

    def ctrl_c_in_epoch_two(module, args):
        if module.training:
            calls["n"] += 1
            if calls["n"] > _steps_per_epoch():
                raise KeyboardInterrupt

    model.register_forward_pre_hook(ctrl_c_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(_model(), _cfg(tmp_path, "stopped", device="cpu"), model=model)
    assert "continue with --resume" in capsys.readouterr().out
    stopped = tmp_path / "stopped" / "last.pt"
    assert load_checkpoint(stopped).epoch == 1

    resumed = train(None, None, resume=stopped, progress=False)
    assert resumed.epochs_run == 2 and len(resumed.history) == 2
    a = load_checkpoint(straight.out / "last.pt").model_state
    b = load_checkpoint(stopped).model_state
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model, calls = _built(), {"n": 0}

    def poison_epoch_two(module, args, output):
        if module.training:
            calls["n"] += 1
            if calls["n"] > _steps_per_epoch():
                return output * float("nan")
        return None

    model.register_forward_hook(poison_epoch_two)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2, step 1"):
        train(_model(), _cfg(tmp_path), model=model, progress=False)
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck.epoch == 1
    assert all(torch.isfinite(v).all() for v in ck.model_state.values() if v.is_floating_point())


def test_ema_is_evaluated_separately_and_saved(tmp_path):
    result = train(_model(), _cfg(tmp_path, epochs=1, ema_decay=0.9), progress=False)
    row = result.history[0]
    assert row["ema_val_acc"] is not None and 0.0 <= row["ema_val_acc"] <= 1.0
    assert load_checkpoint(result.out / "last.pt").extra["ema_state"] is not None


def test_early_stopping_with_patience(tmp_path):
    # No norm layers and a learning rate this small: the weights (so the accuracy) never
    # change, no epoch beats the first, and the run stops `patience` epochs later.
    model = recipe_model("plain", 8, norm="none", options={"depth": 2, "width": 8})
    cfg = _cfg(tmp_path, input_size=8, epochs=6, lr=1e-12, warmup_epochs=0, patience=2)
    result = train(model, cfg, progress=False)
    assert result.stopped_early and result.best_epoch == 1 and result.epochs_run == 3


def test_mixup_cutmix_channels_last_bf16_and_adamw_run(tmp_path):
    aug = AugmentConfig(preset="strong")
    cfg = _cfg(tmp_path, epochs=1, augment=aug, amp="bf16", channels_last=True,
               optimizer="adamw", schedule="onecycle", clip_grad_norm=1.0)  # fmt: skip
    result = train(_model(), cfg, progress=False)
    assert math.isfinite(result.history[0]["train_loss"])


def test_fp16_amp_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is allowed here")
    with pytest.raises(Exception, match="--amp fp16 needs a CUDA device"):
        train(_model(), _cfg(tmp_path, amp="fp16"), progress=False)


def test_batch_larger_than_the_data_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="fewer than one batch"):
        train(_model(), _cfg(tmp_path, batch_size=5000), progress=False)


@pytest.mark.slow
def test_distributed_training_with_two_cpu_processes(tmp_path):
    """torchrun, 2 processes, gloo: rank 0 writes the run; every val image counted once."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "convforge", "train", "--model", "plain", "--depth", "3", "--width", "8",
        "--input-size", "8", "--epochs", "2", "--batch-size", "32", "--out", str(out), "--json",
        "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    ck = load_checkpoint(out / "last.pt")
    assert ck.epoch == 2
    # Validation accuracy is a multiple of 1/n: each held-out image counted exactly once.
    n = len(load_dataset("digits", val_fraction=0.1, seed=0).val)
    val_acc = ck.metrics["val_acc"]
    assert abs(val_acc * n - round(val_acc * n)) < 1e-6
    assert Path(out / "metrics.csv").read_text().count("\n") == 3
