"""The PyTorch backend: the exported .pt2 program against the model it came from."""

import shutil

import numpy as np
import pytest
import torch

from convforge.builder import create_model
from convforge.errors import UserError
from convforge.export import export_onnx
from convforge.runtime.backends.base import BackendUnavailable
from convforge.runtime.backends.torch_program import TorchProgram
from tests.helpers import (
    SMALL_CLASSES,
    export_small_model,
    random_batch,
    torch_logits,
)

CLASSES = SMALL_CLASSES
NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False here)"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path, model = export_small_model(tmp_path_factory.mktemp("torch"))
    return path, model


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_fp32_matches_pytorch(exported, n, suffix):
    path, model = exported
    x = random_batch(n)
    want = torch_logits(model, x)
    with TorchProgram(path.with_suffix(suffix)) as backend:
        assert backend.spec.channels == 3 and (backend.spec.height, backend.spec.width) == (16, 16)
        got = backend.run(x)
        info = backend.describe()
    assert got.dtype == np.float32 and got.shape == (n, len(CLASSES))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert info["backend"] == "torch" and info["precision"] == "fp32"
    assert info["device"] == "cpu" and info["program"] == str(path.with_suffix(".pt2"))


def test_channels_last_matches_pytorch(exported):
    path, model = exported
    x = random_batch(5, seed=2)
    want = torch_logits(model, x)
    with TorchProgram(path, channels_last=True) as backend:
        got = backend.run(x)
        assert backend.describe()["channels_last"] is True
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("n", [1, 5])
def test_bf16_agrees_on_top1_and_returns_float32(exported, n):
    path, model = exported
    x = random_batch(n, seed=3)
    want = torch_logits(model, x)
    with TorchProgram(path, dtype="bf16") as backend:
        got = backend.run(x)
        assert backend.precision == "bf16" and backend.describe()["dtype"] == "bf16"
    assert got.dtype == np.float32
    assert (got.argmax(1) == want.argmax(1)).all()
    assert np.abs(got - want).max() <= 5e-2 * np.abs(want).max()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compile_matches_pytorch(exported):
    path, model = exported
    x = random_batch(2, seed=4)
    want = torch_logits(model, x)
    with TorchProgram(path, compile=True) as backend:
        got = backend.run(x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_missing_program_is_a_user_error(exported, tmp_path):
    alone = tmp_path / "alone.onnx"
    shutil.copy(exported[0], alone)
    with pytest.raises(UserError, match=r"alone\.pt2 does not exist.*convforge export"):
        TorchProgram(alone).load()


def test_foreign_program_is_a_user_error(tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a torch.export program"):
        TorchProgram(junk).load()


def test_cuda_graphs_need_the_cuda_device(exported):
    with pytest.raises(UserError, match="cuda_graphs needs device='cuda'"):
        TorchProgram(exported[0], cuda_graphs="yes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu_is_unavailable(exported):
    ok, why = TorchProgram.available("cuda")
    assert not ok and "cuda" in why
    with pytest.raises(BackendUnavailable, match="cuda"):
        TorchProgram(exported[0], device="cuda").load()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("fp16", 2e-2), ("bf16", 5e-2)])
def test_cuda_matches_pytorch(exported, dtype, tol):
    path, model = exported
    x = random_batch(5, seed=5)
    want = torch_logits(model, x)
    with TorchProgram(path, device="cuda", dtype=dtype, channels_last=True) as backend:
        got = backend.run(x)
        assert backend.describe()["device"] == "cuda" and backend.precision == dtype
    assert got.dtype == np.float32
    assert (got.argmax(1) == want.argmax(1)).all()
    assert np.abs(got - want).max() <= tol * np.abs(want).max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_graphs_replay_per_batch_shape(exported):
    path, model = exported
    with TorchProgram(path, device="cuda", cuda_graphs=True) as backend:
        for n, seed in [(1, 6), (5, 7), (1, 8)]:  # the third run replays the first graph
            x = random_batch(n, seed=seed)
            want = torch_logits(model, x)
            got = backend.run(x)
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
        assert len(backend._graphs) == 2


def test_spec_comes_from_the_onnx_when_the_program_has_no_metadata(tmp_path):
    """An export without convforge metadata still serves: the ONNX declares the input shape."""
    model = create_model("plain", depth=1, width=4, num_classes=2, stem="small").eval()
    export_onnx(model, tmp_path / "bare.onnx", input_size=(3, 8, 8))
    x = np.random.default_rng(9).standard_normal((3, 3, 8, 8)).astype(np.float32)
    with TorchProgram(tmp_path / "bare.onnx") as backend:
        assert (backend.spec.channels, backend.spec.height) == (3, 8)
        got = backend.run(x)
    assert np.abs(got - torch_logits(model, x)).max() <= 1e-5 * np.abs(torch_logits(model, x)).max()
    with pytest.raises(UserError, match="no convforge metadata"):
        TorchProgram(tmp_path / "bare.pt2").load()


def test_an_fp16_program_also_takes_float16_host_batches(exported):
    assert TorchProgram(exported[0], dtype="fp16").input_dtypes == (np.float32, np.float16)
    with TorchProgram(exported[0]) as backend:  # fp32: float32 only
        with pytest.raises(UserError, match="input must be float32, got float16"):
            backend.run(random_batch(2).astype(np.float16))


def test_staged_runs_match_run_and_are_device_resident_on_cuda_only(exported):
    assert TorchProgram(exported[0], device="cuda").device_resident
    x = random_batch(3, seed=11)
    with TorchProgram(exported[0]) as backend:
        assert not backend.device_resident  # the bench times no compute-only row on the CPU
        backend.stage(x)
        backend.run_device_resident()
        np.testing.assert_array_equal(backend.fetch(), backend.run(x))
