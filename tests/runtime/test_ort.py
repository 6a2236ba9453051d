"""ONNX Runtime backends: ort-cpu here; ort-cuda / ort-trt where their providers exist."""

from __future__ import annotations

import numpy as np
import pytest

from convforge.errors import UserError
from convforge.runtime.backends.base import BackendUnavailable
from convforge.runtime.backends.ort import NO_CUDA, NO_TRT, OrtCpu, OrtCuda, OrtTensorRT
from tests.helpers import (
    SMALL_INPUT,
    export_small_model,
    random_batch,
    torch_logits,
)

SIZE = SMALL_INPUT


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path, model = export_small_model(tmp_path_factory.mktemp("ort"))
    return str(path), model


def _assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)


# -- ort-cpu ---------------------------------------------------------------------------------


def test_cpu_available():
    assert OrtCpu.available() == (True, "")


@pytest.mark.parametrize("n", [1, 7])
def test_cpu_matches_torch(exported, n):
    path, model = exported
    batch = random_batch(n, seed=n)
    with OrtCpu(path) as backend:
        _assert_close(backend.run(batch), torch_logits(model, batch))
        assert backend.spec.channels == 3 and backend.spec.height == 16
        assert backend.precision == "fp32"


@pytest.mark.parametrize(
    "batch, message",
    [
        (np.zeros((1, *SIZE), np.float64), "float32"),
        (np.zeros((1, 1, 16, 16), np.float32), "channels"),
        (np.zeros((1, 3, 8, 8), np.float32), "16x16"),
        (np.zeros((3, 16, 16), np.float32), "4-D"),
        (np.zeros((0, *SIZE), np.float32), "empty"),
        ([[0.0]], "numpy array"),
    ],
)
def test_cpu_bad_input_is_user_error(exported, batch, message):
    path, _ = exported
    with OrtCpu(path) as backend:
        with pytest.raises(UserError, match=message):
            backend.run(batch)


def test_cpu_run_before_load(exported):
    backend = OrtCpu(exported[0])
    with pytest.raises(RuntimeError, match="load"):
        backend.run(random_batch(1))


def test_cpu_context_manager_closes(exported):
    with OrtCpu(exported[0]) as backend:
        assert backend.session is not None
        backend.run(random_batch(2))
    assert backend.session is None
    with pytest.raises(RuntimeError, match="load"):
        backend.run(random_batch(1))


def test_cpu_describe(exported):
    with OrtCpu(exported[0], threads=1, graph_optimization="basic") as backend:
        d = backend.describe()
    assert d["backend"] == "ort-cpu" and d["precision"] == "fp32"
    assert d["provider"] == "CPUExecutionProvider"
    assert d["threads"] == 1 and d["threads_source"] == "option"
    assert d["graph_optimization"] == "basic" and d["execution_mode"] == "sequential"
    assert d["providers"] == ["CPUExecutionProvider"]


def test_cpu_threads_option_reaches_session(exported):
    import onnxruntime as ort

    with OrtCpu(exported[0], threads=2, graph_optimization="extended") as backend:
        so = backend.session.get_session_options()
        assert so.intra_op_num_threads == 2
        assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
        assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


def test_cpu_default_threads_are_physical_cores(exported):
    import os

    from convforge.runtime.backends.ort import physical_cores

    cores, how = physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0)) and how
    backend = OrtCpu(exported[0])
    assert backend.threads == cores
    assert backend.session_options().intra_op_num_threads == cores


@pytest.mark.parametrize(
    "options, message",
    [
        ({"threads": 0}, "threads"),
        ({"threads": "4"}, "threads"),
        ({"graph_optimization": "max"}, "graph optimization"),
        ({"thread": 2}, "unknown option"),
    ],
)
def test_cpu_bad_options(exported, options, message):
    with pytest.raises(UserError, match=message):
        OrtCpu(exported[0], **options)


def test_cpu_missing_or_foreign_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        OrtCpu(str(tmp_path / "nope.onnx")).load()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError):
        OrtCpu(str(bad)).load()


def test_runtime_module_imports_without_onnxruntime():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from convforge.runtime.backends.ort import OrtCpu, OrtCuda\n"
        "ok, why = OrtCpu.available(); assert not ok and 'onnxruntime' in why, why\n"
        "ok, why = OrtCuda.available(); assert not ok, why\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- GPU backends: unavailable here ------------------------------------------------------------

GPU_BACKENDS = [(OrtCuda, NO_CUDA), (OrtTensorRT, NO_TRT)]


def _has(provider: str) -> bool:
    import onnxruntime as ort

    return provider in ort.get_available_providers()


@pytest.mark.parametrize("cls, reason", GPU_BACKENDS)
def test_gpu_backend_unavailable_says_why(exported, cls, reason):
    if _has(cls.provider):
        pytest.skip(f"{cls.provider} is present here")
    assert cls.available() == (False, reason)
    with pytest.raises(BackendUnavailable, match="onnxruntime has no"):
        cls(exported[0]).load()


def test_gpu_options_validated_without_gpu(exported):
    with pytest.raises(UserError, match="cudnn_conv_algo_search"):
        OrtCuda(exported[0], cudnn_conv_algo_search="FAST")
    with pytest.raises(UserError, match="min_batch <= opt_batch <= max_batch"):
        OrtTensorRT(exported[0], min_batch=8, max_batch=4)
    with pytest.raises(UserError, match="unknown option"):
        OrtTensorRT(exported[0], fp16=True)


def test_trt_provider_options(exported, tmp_path):
    from convforge.runtime.backends.base import InputSpec

    backend = OrtTensorRT(exported[0], min_batch=1, opt_batch=4, max_batch=8, cache_dir=tmp_path)
    backend.spec = InputSpec(3, 16, 16)  # what load() reads from the file
    opts = backend.provider_options()
    assert opts["trt_profile_min_shapes"] == "input:1x3x16x16"
    assert opts["trt_profile_opt_shapes"] == "input:4x3x16x16"
    assert opts["trt_profile_max_shapes"] == "input:8x3x16x16"
    assert opts["trt_engine_cache_enable"] == "True"
    assert opts["trt_engine_cache_path"] == str(tmp_path)
    assert opts["trt_timing_cache_enable"] == "True"
    assert opts["trt_fp16_enable"] == "False"  # fp32 file
    backend.precision = "fp16"
    assert backend.provider_options()["trt_fp16_enable"] == "True"
    assert backend._providers()[1][0] == "CUDAExecutionProvider"


def test_cuda_provider_options(exported):
    backend = OrtCuda(exported[0], cuda_graph=True, cudnn_conv_algo_search="HEURISTIC")
    assert backend._providers() == [
        (
            "CUDAExecutionProvider",
            {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC", "enable_cuda_graph": "1"},
        )
    ]


# -- GPU backends: on a machine with the providers ---------------------------------------------


def _require(provider: str) -> None:
    if not _has(provider):
        pytest.skip(f"{provider} not in onnxruntime.get_available_providers() (CPU-only build)")


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [OrtCuda, OrtTensorRT])
@pytest.mark.parametrize("n", [1, 7])
def test_gpu_matches_torch(exported, cls, n, tmp_path):
    _require(cls.provider)
    path, model = exported
    batch = random_batch(n, seed=n)
    options = {"cache_dir": str(tmp_path)} if cls is OrtTensorRT else {}
    with cls(path, **options) as backend:
        assert backend.session.get_providers()[0] == cls.provider
        _assert_close(backend.run(batch), torch_logits(model, batch))


@pytest.mark.gpu
def test_cuda_io_binding_device_resident(exported):
    _require("CUDAExecutionProvider")
    path, model = exported
    batch = random_batch(4)
    with OrtCuda(path) as backend:
        backend.stage(batch)
        x, y = backend._buffers[4]
        assert x.device_name().lower() == "cuda" and y.device_name().lower() == "cuda"
        backend.run_device_resident()
        _assert_close(backend.fetch(), torch_logits(model, batch))


@pytest.mark.gpu
def test_cuda_graph_fixedrandom_batch(exported):
    _require("CUDAExecutionProvider")
    path, model = exported
    with OrtCuda(path, cuda_graph=True) as backend:
        for seed in range(3):  # capture, then replays on new data in the same buffers
            batch = random_batch(2, seed=seed)
            _assert_close(backend.run(batch), torch_logits(model, batch))
        with pytest.raises(UserError, match="fixed batch size"):
            backend.run(random_batch(3))
