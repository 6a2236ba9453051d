"""TensorRT backend: its decisions, tested at TensorRT's and cuda-python's boundary (calls
that return False, a corrupt timing cache, a misaligned tensor), and GPU tests that skip
elsewhere."""

import enum
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest

from convforge.errors import UserError
from convforge.runtime.backends import tensorrt as trt_backend
from convforge.runtime.backends.cuda_runtime import check_device_tensor
from convforge.runtime.backends.tensorrt import (
    TensorRT,
    bind,
    engine_cache_key,
    set_shape,
    timing_cache,
)

OK, WHY = TensorRT.available()
needs_trt = pytest.mark.skipif(not OK, reason=f"TensorRT backend unavailable: {WHY}")


def test_cache_key_changes_with_each_input_and_is_stable_otherwise():
    base = (b"onnx-bytes", "NVIDIA H100", "10.7.0", (1, 8, 32))
    key = engine_cache_key(*base)
    assert key == engine_cache_key(*base)
    assert len(key) == 64 and int(key, 16) >= 0
    variants = [
        (b"onnx-bytez", *base[1:]),
        (base[0], "NVIDIA H200", *base[2:]),
        (*base[:2], "11.0.0", base[3]),
        (*base[:3], (1, 8, 64)),
        (*base[:3], (1, 4, 32)),
        (*base[:3], (2, 8, 32)),
    ]
    keys = {engine_cache_key(*v) for v in variants}
    assert key not in keys and len(keys) == len(variants)


class _Config:
    """The IBuilderConfig calls timing_cache() makes, with TensorRT's return conventions."""

    def __init__(self, loads=True, accepts=(True, True)):
        self.loads, self.accepts, self.set = loads, list(accepts), []

    def create_timing_cache(self, blob):
        if blob and self.loads is not True:
            if self.loads == "raises":
                raise RuntimeError("Serialization assertion magicTagRead == kMAGIC_TAG failed")
            return None
        return types.SimpleNamespace(blob=blob)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.set.append(cache.blob)
        return self.accepts.pop(0)


@pytest.mark.parametrize("config", [_Config(loads="raises"), _Config(loads=None),
                                    _Config(accepts=(False, True))])  # fmt: skip
def test_an_unreadable_timing_cache_is_discarded_with_a_warning(config, tmp_path):
    path = tmp_path / "timing.cache"
    path.write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="discarding the unreadable TensorRT timing cache"):
        cache = timing_cache(config, path)
    assert cache.blob == b"" and config.set[-1] == b""  # a fresh one, set on the config


def test_a_readable_timing_cache_is_used_and_a_refused_fresh_one_is_an_error(tmp_path):
    path = tmp_path / "timing.cache"
    path.write_bytes(b"tactics")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert timing_cache(_Config(), path).blob == b"tactics"
    with pytest.raises(RuntimeError, match="refused a new, empty timing cache"):
        timing_cache(_Config(accepts=(False,)), tmp_path / "none.cache")


class _Context:
    """IExecutionContext's setters, returning what TensorRT returns: a bool."""

    def __init__(self, ok: bool):
        self.ok, self.calls = ok, []

    def set_tensor_address(self, name, address):
        self.calls.append((name, address))
        return self.ok

    def set_input_shape(self, name, shape):
        self.calls.append((name, shape))
        return self.ok


def test_binding_results_are_checked():
    with pytest.raises(RuntimeError, match="TensorRT refused the address of tensor 'logits'"):
        bind(_Context(False), "logits", 0x7F0000000000)
    with pytest.raises(UserError, match=r"TensorRT rejected input shape \[4, 3, 16, 16\]"):
        set_shape(_Context(False), "input", (4, 3, 16, 16))
    context = _Context(True)
    bind(context, "input.1", 0x7F0000000100)
    set_shape(context, "input.1", (4, 3, 16, 16))  # the graph's own input name
    assert context.calls == [("input.1", 0x7F0000000100), ("input.1", (4, 3, 16, 16))]


def test_addresses_are_checked_for_256_byte_alignment_before_binding():
    context = _Context(True)
    with pytest.raises(UserError, match="not 256-byte aligned"):
        bind(context, "input", 0x7F0000000040)
    assert context.calls == []  # TensorRT never saw it


def _tensor(**over):
    """What check_device_tensor reads of a torch tensor, for a CUDA tensor this machine
    cannot make."""
    import torch

    fields = dict(is_cuda=True, device=types.SimpleNamespace(index=0), dtype=torch.float32,
                  is_contiguous=lambda: True, data_ptr=lambda: 0x7F0000000000)  # fmt: skip
    return types.SimpleNamespace(**{**fields, **over})


@pytest.mark.parametrize(
    "over, message",
    [
        ({"is_cuda": False}, "takes a torch CUDA tensor"),
        ({"device": types.SimpleNamespace(index=1)}, "is on cuda:1, the engine on 0"),
        ({"is_contiguous": lambda: False}, "must be contiguous"),
        ({"data_ptr": lambda: 0x7F0000000010}, "not 256-byte aligned"),
    ],
)
def test_a_callers_device_tensor_is_checked_before_binding(over, message):
    check_device_tensor(_tensor(), 0, np.dtype(np.float32))
    with pytest.raises(UserError, match=message):
        check_device_tensor(_tensor(**over), 0, np.dtype(np.float32))
    with pytest.raises(UserError, match="takes float16 input"):
        check_device_tensor(_tensor(), 0, np.dtype(np.float16))


def test_one_logger_per_process(monkeypatch):
    made = []

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            made.append(severity)

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(Logger=Logger))
    trt_backend.logger.cache_clear()
    try:
        assert trt_backend.logger() is trt_backend.logger()
    finally:
        trt_backend.logger.cache_clear()
    assert made == [Logger.WARNING]


def _cudart(error: str, count=None):
    """cuda-python's runtime module as far as available() uses it."""
    errors = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorNoDevice": 100})
    return types.SimpleNamespace(
        cudaError_t=errors,
        cudaGetDeviceCount=lambda: (errors[error], count),
        cudaGetErrorName=lambda err: (errors.cudaSuccess, err.name.encode()),
    )


def test_availability_needs_tensorrt_cuda_python_and_a_device_not_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    monkeypatch.setitem(sys.modules, "torch", None)  # not needed any more
    monkeypatch.setattr(trt_backend, "cudart", lambda: (_ for _ in ()).throw(ImportError()))
    assert TensorRT.available() == (
        False,
        "cuda-python is not installed: pip install 'convforge[tensorrt]'",
    )
    monkeypatch.setattr(trt_backend, "cudart", lambda: _cudart("cudaErrorNoDevice"))
    assert TensorRT.available() == (
        False,
        "no CUDA device: CUDA cudaGetDeviceCount failed: cudaErrorNoDevice",
    )
    monkeypatch.setattr(trt_backend, "cudart", lambda: _cudart("cudaSuccess", 0))
    assert TensorRT.available() == (False, "no CUDA device: cudaGetDeviceCount() is 0")
    monkeypatch.setattr(trt_backend, "cudart", lambda: _cudart("cudaSuccess", 1))
    assert TensorRT.available() == (True, "")


def test_importing_the_backend_does_not_import_tensorrt_or_torch():
    code = (
        "import sys, convforge.runtime.backends.tensorrt as t; "
        "t.TensorRT('m.onnx').describe(); "
        "print('tensorrt' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# -- GPU (need TensorRT and a CUDA device) -------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import torch

    from convforge.builder import create_model
    from convforge.export import export_onnx

    torch.manual_seed(0)
    model = create_model("plain", depth=1, width=4, num_classes=3, stem="small").eval()
    path = tmp_path_factory.mktemp("trt") / "m.onnx"
    export_onnx(model, path, input_size=(3, 32, 32))
    return model, path


def _reference(model, x):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.gpu
@needs_trt
def test_build_matches_pytorch_and_second_load_hits_cache(exported, tmp_path):
    model, path = exported
    rng = np.random.default_rng(0)
    with TensorRT(str(path), cache_dir=str(tmp_path)) as b:
        assert b.cache_hit is False and b.build_seconds > 0
        assert b.precision == "fp32"
        for n in (1, 8):
            x = rng.standard_normal((n, 3, 32, 32)).astype(np.float32)
            y = b.run(x)
            assert y.dtype == np.float32 and y.shape == (n, 3)
            np.testing.assert_allclose(y, _reference(model, x), rtol=1e-2, atol=1e-2)
        import torch

        gx = torch.from_numpy(x).cuda()
        np.testing.assert_allclose(b.run_device(gx).cpu().numpy(), y, rtol=1e-5, atol=1e-5)
        b.stage(x)  # the bench's compute-only path, on the backend's own buffers
        b.run_device_resident()
        np.testing.assert_allclose(b.fetch(), y, rtol=1e-5, atol=1e-5)
    assert len(list(tmp_path.glob("*.engine"))) == 1
    with TensorRT(str(path), cache_dir=str(tmp_path)) as b2:
        assert b2.cache_hit is True
        d = b2.describe()
        assert d["backend"] == "tensorrt" and d["engine_cache_hit"] is True
        assert d["tensorrt_version"] and d["gpu"]
        assert d["profile"] == {"min_batch": 1, "opt_batch": 8, "max_batch": 32}
        np.testing.assert_allclose(b2.run(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@needs_trt
def test_batch_above_max_batch_is_a_user_error(exported, tmp_path):
    _, path = exported
    with TensorRT(str(path), cache_dir=str(tmp_path), opt_batch=2, max_batch=4) as b:
        with pytest.raises(UserError, match=r"outside the TensorRT profile \[1, 4\]"):
            b.run(np.zeros((5, 3, 32, 32), np.float32))
