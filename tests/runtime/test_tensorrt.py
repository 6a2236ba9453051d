"""TensorRT backend: its decisions, tested at TensorRT's and cuda-python's boundary (calls
that return False, a corrupt timing cache, a misaligned tensor), and GPU tests that skip
elsewhere."""

import ctypes
import enum
import importlib.util
import re
import subprocess
import sys
import threading
import types
import warnings

import numpy as np
import pytest

from convforge.errors import UserError
from convforge.runtime.backends import BackendUnavailable, tensorrt_engine
from convforge.runtime.backends import tensorrt as trt_backend
from convforge.runtime.backends.cuda_runtime import check_device_tensor
from convforge.runtime.backends.tensorrt import TensorRT, bind, set_shape
from convforge.runtime.backends.tensorrt_engine import engine_cache_key, timing_cache

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
    tensorrt_engine.logger.cache_clear()
    try:
        assert tensorrt_engine.logger() is tensorrt_engine.logger()
    finally:
        tensorrt_engine.logger.cache_clear()
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
        f"cuda-bindings (cuda-python) is not installed: {trt_backend.WHERE}",
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


# -- the load and run paths, at TensorRT's and cuda-python's boundary -----------------------
# A fake ``tensorrt`` module (builder, network, parser, profile, runtime, engine, context as
# small classes recording their calls, with TensorRT 10.x's Python signatures and return
# conventions) and a fake cuda-python runtime whose "device" memory is host memory, so that
# the fake engine computes real numbers: logits = 2 * the first K values of each image.

K = 3  # classes of the test file


class _Calls(list):
    def of(self, name):
        return [c[1:] for c in self if c[0] == name]


def _fake_trt(
    calls, *, parse=True, profile_index=0, build=True, deserialize=True, extra_outputs=()
):
    """A ``tensorrt`` module as the backend uses it; ``calls`` records what it is asked."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.9.0.34"

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    trt.Logger = Logger
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("Flag", {"STRONGLY_TYPED": 1})
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {"TF32": 6})
    trt.TensorIOMode = enum.Enum("TensorIOMode", {"INPUT": 1, "OUTPUT": 2})
    trt.float32 = "float32"
    trt.nptype = lambda t: {"float32": np.float32}[t]

    class Profile:
        def set_shape(self, name, lo, opt, hi):
            calls.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

    class Config:
        def clear_flag(self, flag):
            calls.append(("clear_flag", flag))

        def add_optimization_profile(self, profile):
            calls.append(("add_optimization_profile",))
            return profile_index

        def create_timing_cache(self, blob):
            return types.SimpleNamespace(serialize=lambda: b"timing")

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

    class Network:
        num_inputs = 1

        def get_input(self, i):
            return types.SimpleNamespace(name="input")

    class Builder:
        def __init__(self, logger):
            calls.append(("Builder",))

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build_serialized_network",))
            return b"plan" if build else None

    class Error:
        def desc(self):
            return "Unsupported ONNX op\n'Foo'"

    class OnnxParser:
        num_errors = 0 if parse else 1

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return parse

        def get_error(self, i):
            return Error()

    outputs = ["logits", *extra_outputs]

    class Context:
        def __init__(self):
            self.shape, self.addresses = None, {}

        def set_input_shape(self, name, shape):
            self.shape = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            n = self.shape[0]
            return self.shape if name == "input" else (n, K if name == "logits" else 5)

        def set_tensor_address(self, name, address):
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream_handle):
            calls.append(("execute_async_v3", self, stream_handle))
            assert set(self.addresses) == {"input", *outputs}  # TensorRT needs every one
            x = _memory(self.addresses["input"], self.shape)
            y = _memory(self.addresses["logits"], (self.shape[0], K))
            y[:] = 2 * x.reshape(self.shape[0], -1)[:, :K]
            return True

    class Engine:
        num_io_tensors = 1 + len(outputs)

        def get_tensor_name(self, i):
            return ["input", *outputs][i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name == "input" else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return trt.float32

        def create_execution_context(self):
            context = Context()
            calls.append(("create_execution_context", context))
            return context

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            calls.append(("deserialize_cuda_engine", bytes(plan)))
            return Engine() if deserialize else None

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


def _memory(address, shape, dtype=np.float32):
    count = int(np.prod(shape))
    raw = (ctypes.c_ubyte * (count * np.dtype(dtype).itemsize)).from_address(address)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class _FakeCudart:
    """cuda-python's runtime module as the backend uses it: (error, value...) tuples;
    memory is host memory (256-byte aligned), copies are memmoves."""

    cudaError_t = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorInvalidValue": 1})
    cudaMemcpyKind = enum.IntEnum(
        "cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2}
    )
    cudaStreamNonBlocking = 1

    def __init__(self, calls):
        self.calls, self.blocks, self.pinned, self.streams = calls, {}, set(), 0
        self.current = {}  # thread -> its current device
        self.ok = self.cudaError_t.cudaSuccess

    def cudaGetErrorName(self, err):
        return self.ok, err.name.encode()

    def cudaGetDeviceCount(self):
        return self.ok, 1

    def cudaSetDevice(self, device):
        self.calls.append(("cudaSetDevice", threading.get_ident(), device))
        self.current[threading.get_ident()] = device
        return (self.ok,)

    def cudaGetDevice(self):
        return self.ok, self.current.get(threading.get_ident(), 0)

    def cudaGetDeviceProperties(self, device):
        return self.ok, types.SimpleNamespace(name=b"Fake GPU\0\0")

    def cudaStreamCreateWithFlags(self, flags):
        self.streams += 1
        self.calls.append(("cudaStreamCreateWithFlags", flags))
        return self.ok, 1000 + self.streams

    def cudaStreamCreate(self):
        return self.cudaStreamCreateWithFlags(0)

    def cudaStreamDestroy(self, stream):
        self.calls.append(("cudaStreamDestroy", stream))
        return (self.ok,)

    def cudaStreamSynchronize(self, stream):
        self.calls.append(("cudaStreamSynchronize", stream))
        return (self.ok,)

    def _alloc(self, nbytes):
        block = ctypes.create_string_buffer(nbytes + 256)
        address = ctypes.addressof(block) + (-ctypes.addressof(block)) % 256
        self.blocks[address] = block
        return address

    def cudaMalloc(self, nbytes):
        self.calls.append(("cudaMalloc", nbytes))
        return self.ok, self._alloc(nbytes)

    def cudaMallocHost(self, nbytes):
        self.calls.append(("cudaMallocHost", nbytes))
        address = self._alloc(nbytes)
        self.pinned.add(address)
        return self.ok, address

    def cudaFree(self, address):
        assert address in self.blocks and address not in self.pinned
        del self.blocks[address]
        return (self.ok,)

    def cudaFreeHost(self, address):
        assert address in self.pinned
        self.pinned.discard(address)
        del self.blocks[address]
        return (self.ok,)

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        self.calls.append(("cudaMemcpyAsync", kind, dst, src, count, stream))
        ctypes.memmove(dst, src, count)
        return (self.ok,)


def _classifier(path, batch=None, extra_output=False):
    """A small ONNX classifier (input [batch, 3, 4, 4] -> logits [batch, 3]) with convforge
    metadata; ``batch`` None: a dynamic batch dimension."""
    import onnx
    from onnx import TensorProto, helper

    from convforge import contract

    n = batch if batch is not None else "batch"
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["logits"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, K])]
    if extra_output:
        nodes.append(helper.make_node("Identity", ["pooled"], ["features"]))
        outputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, [n, K, 1, 1]))
    image = helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, K, 4, 4])
    graph = helper.make_graph(nodes, "g", [image], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    meta = contract.metadata(
        arch="tiny",
        classes=["a", "b", "c"],
        mean=[0.0] * K,
        std=[1.0] * K,
        input_size=4,
        resize_size=4,
        channels=K,
        source_sha256="0" * 64,
    )
    contract.write_props(model, meta)
    onnx.save(model, path)
    return str(path)


@pytest.fixture
def fake(monkeypatch):
    """Install a fake tensorrt and cudart; returns (calls, rt, install(**trt_options))."""
    calls = _Calls()
    rt = _FakeCudart(calls)
    monkeypatch.setattr(trt_backend, "cudart", lambda: rt)
    tensorrt_engine.logger.cache_clear()

    def install(**options):
        module = _fake_trt(calls, **options)
        monkeypatch.setitem(sys.modules, "tensorrt", module)
        tensorrt_engine.logger.cache_clear()
        return module

    install()
    yield calls, rt, install
    tensorrt_engine.logger.cache_clear()


def _batch(n):
    return np.arange(n * K * 16, dtype=np.float32).reshape(n, K, 4, 4)


def _expected(x):
    return 2 * x.reshape(x.shape[0], -1)[:, :K]


def test_a_fixed_batch_file_is_built_for_exactly_that_batch(fake, tmp_path):
    calls, _, _ = fake
    path = _classifier(tmp_path / "fixed.onnx", batch=2)
    with TensorRT(path, cache_dir=str(tmp_path / "c")) as b:
        assert calls.of("set_shape") == [("input", (2, K, 4, 4), (2, K, 4, 4), (2, K, 4, 4))]
        assert b.describe()["profile"] == {"min_batch": 2, "opt_batch": 2, "max_batch": 2}
        np.testing.assert_array_equal(b.run(_batch(2)), _expected(_batch(2)))
    with TensorRT(path, cache_dir=str(tmp_path / "c"), max_batch=2, opt_batch=2) as b:
        assert b.profile == (2, 2, 2)  # options that agree with the file are fine
    dynamic = _classifier(tmp_path / "dynamic.onnx")
    with TensorRT(dynamic, cache_dir=str(tmp_path / "c"), max_batch=4) as b:
        assert b.profile == (1, 4, 4)


@pytest.mark.parametrize(
    "options, named",
    [
        ({"max_batch": 32}, "max_batch=32"),
        ({"min_batch": 1, "opt_batch": 4}, "min_batch=1, opt_batch=4"),
    ],
)
def test_batch_options_that_contradict_a_fixed_batch_are_a_user_error(
    fake, tmp_path, options, named
):
    calls, _, _ = fake
    path = _classifier(tmp_path / "fixed.onnx", batch=2)
    with pytest.raises(UserError) as e:
        TensorRT(path, cache_dir=str(tmp_path), **options).load()
    assert type(e.value) is UserError  # the user's to fix, not a backend that cannot run
    assert str(e.value) == (
        f"fixed.onnx has a fixed batch of 2, so tensorrt builds for exactly 2; drop {named} "
        f"or set {'them' if ',' in named else 'it'} to 2"
    )
    assert calls.of("Builder") == []  # nothing built


@pytest.mark.parametrize(
    "failure, message",
    [
        ({"parse": False}, "TensorRT cannot parse .* Unsupported ONNX op 'Foo'$"),
        (
            {"profile_index": -1},
            r"TensorRT rejected the optimization profile "
            r"\[1, 3, 4, 4\]\.\.\[32, 3, 4, 4\] \(opt 8\)",
        ),
        ({"build": False}, "TensorRT failed to build an engine for"),
        ({"deserialize": False}, "TensorRT could not deserialize the engine it built"),
    ],
)
def test_parse_build_and_deserialize_failures_are_backend_unavailable(
    fake, tmp_path, failure, message, monkeypatch
):
    calls, rt, install = fake
    install(**failure)
    path = _classifier(tmp_path / "m.onnx")
    cache = tmp_path / "cache"
    with pytest.raises(BackendUnavailable, match=message) as e:
        TensorRT(path, cache_dir=str(cache)).load()
    assert "\n" not in str(e.value)
    assert list(cache.glob("*.engine")) == []  # no engine that does not load is cached
    assert rt.blocks == {}  # a failed load releases what it acquired

    from convforge.runtime.backends import load_backend

    monkeypatch.setenv("HOME", str(tmp_path))  # auto takes no options: the default cache dir
    backend, skipped = load_backend("auto", path)  # moves on, saying why
    try:
        assert backend.name != "tensorrt"
        assert skipped[0]["backend"] == "tensorrt"
        assert re.search(message, skipped[0]["why"])
    finally:
        backend.close()
    with pytest.raises(BackendUnavailable, match=message):
        load_backend("tensorrt", path, cache_dir=str(cache))  # by name: that line


def test_a_cached_engine_that_does_not_deserialize_is_rebuilt(fake, tmp_path):
    calls, _, _ = fake
    path = _classifier(tmp_path / "m.onnx")
    with TensorRT(path, cache_dir=str(tmp_path)) as b:
        assert b.cache_hit is False
    (engine,) = tmp_path.glob("*.engine")
    engine.write_bytes(b"damaged")
    runtime = sys.modules["tensorrt"].Runtime
    original = runtime.deserialize_cuda_engine
    runtime.deserialize_cuda_engine = lambda self, plan: (
        None if bytes(plan) == b"damaged" else original(self, plan)
    )
    with pytest.warns(RuntimeWarning, match="could not deserialize the cached engine"):
        with TensorRT(path, cache_dir=str(tmp_path)) as b:
            assert b.cache_hit is False
            np.testing.assert_array_equal(b.run(_batch(2)), _expected(_batch(2)))
    assert engine.read_bytes() == b"plan"  # replaced by the rebuilt one


def test_run_stages_through_pinned_host_buffers_on_the_instances_stream(fake, tmp_path):
    calls, rt, _ = fake
    path = _classifier(tmp_path / "m.onnx")
    b = TensorRT(path, cache_dir=str(tmp_path)).load()
    assert calls.of("cudaStreamCreateWithFlags") == [(rt.cudaStreamNonBlocking,)]
    stream = b._stream
    for n in (3, 2, 4, 1):  # 3 reserves rows for 4: the others reuse the same buffers
        x = _batch(n)
        y = b.run(x)
        np.testing.assert_array_equal(y, _expected(x))
        assert y.dtype == np.float32 and y.flags.owndata  # not a view of the staging buffer
    pinned = calls.of("cudaMallocHost")
    assert len(pinned) == 2 and len(calls.of("cudaMalloc")) == 2  # input and logits, once each
    copies = calls.of("cudaMemcpyAsync")
    assert len(copies) == 8
    for kind, dst, src, _, on in copies:
        host = src if kind == rt.cudaMemcpyKind.cudaMemcpyHostToDevice else dst
        assert host in rt.pinned and on == stream  # page-locked, on this instance's stream
    assert len(calls.of("cudaStreamSynchronize")) == 4  # one per run
    b.stage(_batch(2))  # the compute-only path uses the same buffers
    b.run_device_resident()
    np.testing.assert_array_equal(b.fetch(), _expected(_batch(2)))
    assert len(calls.of("cudaMallocHost")) == 2
    b.close()
    assert rt.blocks == {} and rt.pinned == set()  # cudaFree and cudaFreeHost on close
    assert calls.of("cudaStreamDestroy") == [(stream,)]


def test_siblings_share_one_engine_with_a_context_stream_and_buffers_each(fake, tmp_path):
    calls, rt, _ = fake
    path = _classifier(tmp_path / "m.onnx")
    first = TensorRT(path, cache_dir=str(tmp_path), device_id=1).load()
    made = {}

    def runner():
        made["sibling"] = first.sibling()  # in the thread that will run it
        made["thread"] = threading.get_ident()
        made["out"] = made["sibling"].run(_batch(4))

    thread = threading.Thread(target=runner)
    thread.start()
    thread.join()
    second = made["sibling"]
    np.testing.assert_array_equal(made["out"], _expected(_batch(4)))
    assert len(calls.of("deserialize_cuda_engine")) == 1  # one engine
    contexts = [c[0] for c in calls.of("create_execution_context")]
    assert len(contexts) == 2 and contexts[0] is not contexts[1]
    assert second._context is contexts[1] and second._stream != first._stream
    assert ("cudaSetDevice", made["thread"], 1) in calls  # the device, in the new thread
    assert second.describe() == first.describe()
    shared = first._shared
    assert second._shared is shared and shared.users == 2

    first.close()  # the engine stays for the sibling
    assert shared.engine is not None and shared.users == 1
    np.testing.assert_array_equal(second.run(_batch(2)), _expected(_batch(2)))
    before = len(calls)

    def closer():  # a thread working on device 0 that never ran the sibling
        rt.cudaSetDevice(0)
        second.close()  # the last one out releases the engine, on device 1

    thread = threading.Thread(target=closer)
    thread.start()
    thread.join()
    assert shared.engine is None and shared.runtime is None
    assert rt.blocks == {}
    devices = [c[2] for c in calls[before:] if c[0] == "cudaSetDevice"]
    assert devices == [0, 1, 0]  # and that thread's device is put back


def test_each_thread_that_runs_an_instance_sets_its_device_first(fake, tmp_path):
    calls, _, _ = fake
    path = _classifier(tmp_path / "m.onnx")
    with TensorRT(path, cache_dir=str(tmp_path), device_id=1) as b:
        idents = []

        def run():
            idents.append(threading.get_ident())
            b.run(_batch(1))
            b.run(_batch(1))

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        sets = [c for c in calls.of("cudaSetDevice") if c[0] == idents[0]]
        assert sets == [(idents[0], 1)]  # once in that thread, before its first run


def test_outputs_beyond_the_class_scores_are_bound_to_scratch(fake, tmp_path):
    _, _, install = fake
    install(extra_outputs=("features",))
    path = _classifier(tmp_path / "two.onnx", extra_output=True)
    with TensorRT(path, cache_dir=str(tmp_path)) as b:
        np.testing.assert_array_equal(b.run(_batch(2)), _expected(_batch(2)))


def test_availability_tells_missing_tensorrt_from_libraries_that_do_not_load(monkeypatch, tmp_path):
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setattr(trt_backend, "cudart", lambda: _cudart("cudaSuccess", 1))
    ok, why = TensorRT.available()
    if importlib.util.find_spec("tensorrt") is None:
        assert not ok and why.startswith("tensorrt is not installed: pip install")
        assert "https://pypi.nvidia.com" in why and "JetPack" in why
    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise ImportError('libnvinfer.so.10: cannot open shared object file: "
        "No such file or directory')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ok, why = TensorRT.available()
    assert not ok and "\n" not in why
    assert why.startswith(
        "tensorrt's Python bindings are installed but do not load (libnvinfer.so.10: cannot "
        "open shared object file: No such file or directory): pip install"
    )
    assert "https://pypi.nvidia.com" in why and "JetPack" in why and "NGC" in why
