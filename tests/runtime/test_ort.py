"""ONNX Runtime backends: ort-cpu here; ort-cuda / ort-trt where their providers exist."""

from __future__ import annotations

import numpy as np
import pytest

from convforge.errors import UserError
from convforge.runtime.backends.base import BackendUnavailable
from convforge.runtime.backends.ort import OrtCpu
from convforge.runtime.backends.ort_cuda import OrtCuda
from convforge.runtime.backends.ort_trt import OrtTensorRT, engine_cache_dir
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


def test_cpu_spinning_option_reaches_session(exported):
    spinning = "session.intra_op.allow_spinning"
    with OrtCpu(exported[0], spinning=False) as backend:
        entries = backend.session.get_session_options().get_session_config_entry
        assert entries(spinning) == "0" and backend.describe()["spinning"] is False
        assert np.isfinite(backend.run(random_batch(1))).all()
    # On (ONNX Runtime's default): the entry is left unset.
    with pytest.raises(RuntimeError, match="does not have configuration"):
        OrtCpu(exported[0]).session_options().get_session_config_entry(spinning)


def test_cpu_default_threads_are_physical_cores(exported):
    import os

    from convforge.runtime.backends.ort import physical_cores

    cores, how = physical_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0)) and how
    backend = OrtCpu(exported[0])
    assert backend.threads == cores
    assert backend.session_options().intra_op_num_threads == cores


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
        "from convforge.runtime.backends.ort import OrtCpu\n"
        "from convforge.runtime.backends.ort_cuda import OrtCuda\n"
        "ok, why = OrtCpu.available(); assert not ok and 'onnxruntime' in why, why\n"
        "ok, why = OrtCuda.available(); assert not ok, why\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- GPU backends: the decisions around the provider, tested at ONNX Runtime's boundary ------


def _has(provider: str) -> bool:
    import onnxruntime as ort

    return provider in ort.get_available_providers()


def test_trt_provider_options(exported, tmp_path):
    backend = OrtTensorRT(exported[0], min_batch=1, opt_batch=4, max_batch=8, cache_dir=tmp_path)
    backend.info = backend._read_info()  # what load() does before the session
    backend._check_file(backend.info)
    opts = backend.provider_options()
    assert opts["trt_profile_min_shapes"] == "input:1x3x16x16"
    assert opts["trt_profile_opt_shapes"] == "input:4x3x16x16"
    assert opts["trt_profile_max_shapes"] == "input:8x3x16x16"
    assert opts["trt_engine_cache_enable"] == "True"
    assert opts["trt_engine_cache_path"] == engine_cache_dir(str(tmp_path), exported[0])
    assert opts["trt_timing_cache_enable"] == "True"
    assert opts["trt_timing_cache_path"] == str(tmp_path)  # per GPU + version: shared
    assert opts["trt_fp16_enable"] == "False"  # fp32 file
    backend.precision = "fp16"
    assert backend.provider_options()["trt_fp16_enable"] == "True"
    assert backend._providers()[1][0] == "CUDAExecutionProvider"


def _reweighted(path, folder):
    """A copy of the ONNX file at ``path`` with the same graph and names, other weights:
    what retraining and re-exporting to the same file name gives."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) * 1.5, first.name))
    out = folder / "m.onnx"
    onnx.save(model, out)
    return str(out)


def test_trt_engine_cache_is_keyed_by_file_content(exported, tmp_path):
    """ONNX Runtime names cached engines from node and tensor names, never weights: two
    exports of one architecture must not share an engine folder."""
    retrained = _reweighted(exported[0], tmp_path)
    folders = []
    for path in (exported[0], retrained):
        backend = OrtTensorRT(path, cache_dir=str(tmp_path / "cache"))
        backend.info = backend._read_info()  # what load() does before the session
        backend._check_file(backend.info)
        folders.append(backend.provider_options()["trt_engine_cache_path"])
    assert folders[0] != folders[1]
    assert all(f.startswith(str(tmp_path / "cache")) for f in folders)


def _pretend_gpu_build(monkeypatch, session_factory=None):
    """onnxruntime as an onnxruntime-gpu wheel reports itself: CUDA and TensorRT providers
    listed whether or not their libraries load. ``session_factory`` stands in for
    InferenceSession."""
    import onnxruntime as ort

    listed = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    if session_factory is not None:
        monkeypatch.setattr(ort, "InferenceSession", session_factory)


def _falls_back_to_cpu(path, sess_options=None, providers=None, **kwargs):
    """What InferenceSession does when a listed provider's libraries are missing: it prints
    "EP Error" and retries on the CPU, returning a session without the provider."""
    import onnxruntime as ort

    real = ort.capi.onnxruntime_inference_collection.InferenceSession
    return real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])


def _raises_missing_libraries(path, sess_options=None, providers=None, **kwargs):
    raise RuntimeError(
        "Failed to load library libonnxruntime_providers_tensorrt.so with error: "
        "libnvinfer.so.10: cannot open shared object file: No such file or directory"
    )


@pytest.mark.parametrize("factory", [_falls_back_to_cpu, _raises_missing_libraries])
@pytest.mark.parametrize("cls", [OrtTensorRT, OrtCuda])
def test_a_listed_provider_that_does_not_load_is_unavailable(exported, tmp_path, monkeypatch,
                                                             cls, factory):  # fmt: skip
    _pretend_gpu_build(monkeypatch, factory)
    assert cls.available() == (True, "")
    options = {"cache_dir": str(tmp_path)} if cls is OrtTensorRT else {}
    with pytest.raises(BackendUnavailable, match=cls.provider if factory is _falls_back_to_cpu
                       else "libnvinfer.so.10: cannot open shared object file"):  # fmt: skip
        cls(exported[0], **options).load()


def test_cuda_provider_options(exported):
    backend = OrtCuda(exported[0], cuda_graph=True, cudnn_conv_algo_search="HEURISTIC")
    assert backend._providers() == [
        (
            "CUDAExecutionProvider",
            {
                "device_id": "0",
                "cudnn_conv_algo_search": "HEURISTIC",
                "enable_cuda_graph": "1",
                "use_tf32": "0",
            },
        )
    ]


# -- GPU backends: on a machine with the providers ---------------------------------------------


def _require(provider: str) -> None:
    if not _has(provider):
        pytest.skip(f"{provider} not in onnxruntime.get_available_providers() (CPU-only build)")


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


def test_cuda_graph_instances_run_one_batch_size(exported):
    assert OrtCuda(exported[0], cuda_graph=True).single_batch_size
    assert not OrtCuda(exported[0]).single_batch_size


@pytest.mark.gpu
def test_cuda_graph_fixed_batch(exported):
    _require("CUDAExecutionProvider")
    path, model = exported
    with OrtCuda(path, cuda_graph=True) as backend:
        for seed in range(3):  # capture, then replays on new data in the same buffers
            batch = random_batch(2, seed=seed)
            _assert_close(backend.run(batch), torch_logits(model, batch))
        with pytest.raises(UserError, match="fixed batch size"):
            backend.run(random_batch(3))
