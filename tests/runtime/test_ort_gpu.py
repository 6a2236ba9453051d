"""ort-cuda and ort-trt: their decisions around ONNX Runtime's GPU providers, tested at
onnxruntime's boundary. ``InferenceSession``, ``OrtValue``, ``get_available_providers`` and
``preload_dlls`` are small recording fakes that behave as onnxruntime-gpu documents; the
``tensorrt`` import and libnvinfer are faked the same way. No GPU needed."""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.util
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from convforge import contract
from convforge.errors import UserError
from convforge.runtime.backends import BackendUnavailable, load_backend, ort_gpu
from convforge.runtime.backends.ort_cuda import OrtCuda
from convforge.runtime.backends.ort_trt import OrtTensorRT, engine_cache_dir

CLASSES = ["a", "b", "c", "d", "e"]
TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
EP_ERROR = (
    "*************** EP Error ***************\n"
    "EP Error [ONNXRuntimeError] : 1 : FAIL : TensorRT EP failed to create engine from network"
    " for fused node: TRTKernel_graph_main_0 when using [('TensorrtExecutionProvider', {})]\n"
    "Falling back to ['CUDAExecutionProvider', 'CPUExecutionProvider'] and retrying.\n"
    "****************************************\n"
)


def _model(folder, batch: int | None = None, precision: str = "fp32", name: str = "m.onnx"):
    """A tiny classifier file with convforge metadata: input [N, 3, 16, 16] (N fixed at
    ``batch`` if given), output logits [N, 5]."""
    n = batch if batch is not None else "batch"
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, len(CLASSES)])],
        [helper.make_tensor("w", TensorProto.FLOAT, [3, 5], np.linspace(-1, 1, 15).tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    meta = contract.metadata(
        arch="tiny", classes=CLASSES, mean=[0.5] * 3, std=[0.25] * 3, input_size=16,
        resize_size=16, channels=3, source_sha256="0" * 64, precision=precision,
    )  # fmt: skip
    contract.write_props(model, meta)
    path = folder / name
    onnx.save(model, path)
    return str(path)


class FakeOrt:
    """onnxruntime-gpu as far as these backends use it, recording every call in ``calls``.

    ``drop``: providers whose libraries "do not load": InferenceSession prints ``printed``
    (its EP Error banner) and returns a session without them, as onnxruntime's fallback
    does. ``output_type`` / ``output_shape``: what the session says of its output.
    """

    def __init__(self) -> None:
        self.calls: list = []
        self.drop: set[str] = set()
        self.printed = ""
        self.output_type = "tensor(float)"
        self.output_shape = ["batch", len(CLASSES)]
        self.options: dict = {}  # provider -> its options, from the last session

    def install(self, monkeypatch) -> FakeOrt:
        import onnxruntime as ort

        monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
        monkeypatch.setattr(ort, "InferenceSession", self.session)
        monkeypatch.setattr(ort, "OrtValue", self.ortvalue_class())
        monkeypatch.setattr(ort, "preload_dlls", self.preload_dlls, raising=False)
        monkeypatch.setattr(ort_gpu, "_preloaded", set())  # a fresh process
        monkeypatch.setitem(sys.modules, "tensorrt", None)  # not importable unless a test says
        return self

    def preload_dlls(self, cuda=True, cudnn=True, msvc=True, directory=None):
        self.calls.append(("preload_dlls", cuda, cudnn, msvc, directory))
        print("Failed to load libcudnn.so.9: cannot open shared object file")  # as it reports

    def session(self, path, sess_options=None, providers=None, **kwargs):
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        self.options = {p[0]: p[1] for p in providers if isinstance(p, tuple)}
        self.calls.append(("session", names))
        print(self.printed, end="")
        return FakeSession(self, [p for p in names if p not in self.drop] + [CPU])

    def ortvalue_class(self):
        calls = self.calls

        class FakeOrtValue:
            def __init__(self, shape, dtype) -> None:
                self.shape, self.dtype = tuple(shape), np.dtype(dtype)

            @classmethod
            def ortvalue_from_numpy(cls, array, device_type="cpu", device_id=0):
                calls.append(("copy", "ortvalue_from_numpy", device_type, device_id))
                return cls(array.shape, array.dtype)

            @classmethod
            def ortvalue_from_shape_and_type(cls, shape, element_type, device_type="cpu",
                                             device_id=0):  # fmt: skip
                calls.append(("alloc", tuple(shape), np.dtype(element_type).name, device_type))
                return cls(shape, element_type)

            def update_inplace(self, array) -> None:
                calls.append(("copy", "update_inplace"))

        return FakeOrtValue


class FakeSession:
    def __init__(self, ort: FakeOrt, providers: list[str]) -> None:
        self.ort, self.providers = ort, providers

    def get_providers(self):
        return list(self.providers)

    def get_inputs(self):
        return [types.SimpleNamespace(name="input", shape=["batch", 3, 16, 16],
                                      type="tensor(float)")]  # fmt: skip

    def get_outputs(self):
        out = self.ort
        return [types.SimpleNamespace(name="logits", shape=out.output_shape, type=out.output_type)]

    def io_binding(self):
        return FakeBinding(self.ort)

    def run_with_iobinding(self, binding, run_options=None):
        self.ort.calls.append("run")


class FakeBinding:
    """IOBinding: records each call; copy_outputs_to_cpu gives the bound output's type."""

    def __init__(self, ort: FakeOrt) -> None:
        self.ort, self.output, self.rows = ort, None, 0

    def _record(self, what, *args):
        self.ort.calls.append((what, *args) if args else what)

    def clear_binding_inputs(self):
        self._record("clear_binding_inputs")

    def clear_binding_outputs(self):
        self._record("clear_binding_outputs")

    def bind_ortvalue_input(self, name, value):
        self.rows = value.shape[0]
        self._record("bind_ortvalue_input", name)

    def bind_ortvalue_output(self, name, value):
        self.output = value.dtype
        self._record("bind_ortvalue_output", name, value.dtype.name)

    def bind_output(self, name, device_type="cpu", device_id=0, *args):
        self.output = np.dtype(np.float16)  # what ORT would allocate: the graph's type
        self._record("bind_output", name, device_type, device_id)

    def synchronize_inputs(self):
        self._record("synchronize_inputs")

    def synchronize_outputs(self):
        self._record("synchronize_outputs")

    def copy_outputs_to_cpu(self):
        return [np.ones((self.rows, len(CLASSES)), self.output)]


@pytest.fixture
def fake(monkeypatch) -> FakeOrt:
    return FakeOrt().install(monkeypatch)


def _batch(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 3, 16, 16)).astype(np.float32)


def _fake_tensorrt(monkeypatch, calls: list, error: Exception | None = None) -> None:
    """``import tensorrt`` finds a module (version 10.9.0.34), recorded in ``calls``, or
    raises ``error`` as the wheel does when libnvinfer does not load."""

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name != "tensorrt":
                return None
            calls.append("import tensorrt")
            return importlib.util.spec_from_loader(name, self)

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            if error is not None:
                raise error
            module.__version__ = "10.9.0.34"

    monkeypatch.delitem(sys.modules, "tensorrt")  # the fixture's None: absent, then restored
    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])


# -- item 1: fixed batch, provider failures -------------------------------------------------


def test_a_fixed_batch_file_gets_the_profile_of_its_batch(fake, tmp_path):
    path = _model(tmp_path, batch=4)
    for options in ({}, {"min_batch": 4, "opt_batch": 4, "max_batch": 4}):
        with OrtTensorRT(path, cache_dir=str(tmp_path / "cache"), **options) as backend:
            trt = fake.options[TRT]
            for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes",
                        "trt_profile_max_shapes"):  # fmt: skip
                assert trt[key] == "input:4x3x16x16"
            d = backend.describe()
            assert (d["min_batch"], d["opt_batch"], d["max_batch"]) == (4, 4, 4)
            assert trt["trt_engine_cache_prefix"].startswith("b4-4-4_")
            assert backend.run(_batch(4)).shape == (4, 5)


@pytest.mark.parametrize(
    "options, named",
    [
        ({"max_batch": 2}, "max_batch=2"),
        ({"min_batch": 8, "max_batch": 32}, "min_batch=8"),
        ({"opt_batch": 2}, "opt_batch=2"),
        ({"min_batch": 1, "max_batch": 8}, "max_batch=8"),
    ],
)
def test_a_profile_option_a_fixed_batch_cannot_take_is_one_user_error(fake, tmp_path, options,
                                                                      named):  # fmt: skip
    path = _model(tmp_path, batch=4)
    with pytest.raises(UserError) as e:
        OrtTensorRT(path, cache_dir=str(tmp_path / "cache"), **options).load()
    message = str(e.value)
    assert not isinstance(e.value, BackendUnavailable)  # the user's mistake, not the machine
    assert "\n" not in message and "fixed batch of 4" in message and named in message
    assert not [c for c in fake.calls if c[0] == "session"]  # refused before any build


@pytest.mark.parametrize("cls", [OrtTensorRT, OrtCuda])
def test_a_provider_that_fails_in_the_session_is_unavailable_with_onnxruntimes_reason(
    fake, tmp_path, capsys, cls
):
    fake.drop, fake.printed = {cls.provider}, EP_ERROR.replace(TRT, cls.provider)
    path = _model(tmp_path)
    with pytest.raises(BackendUnavailable) as e:
        cls(path, **({"cache_dir": str(tmp_path)} if cls is OrtTensorRT else {})).load()
    message = str(e.value)
    assert "\n" not in message and cls.provider in message
    assert "TensorRT EP failed to create engine from network" in message
    out, err = capsys.readouterr()
    assert "EP Error" not in out and "EP Error" in err  # stdout is a command's, not ORT's


def test_auto_moves_past_an_ort_trt_that_fails_and_records_why(fake, tmp_path):
    fake.drop, fake.printed = {TRT}, EP_ERROR
    backend, skipped = load_backend("auto", _model(tmp_path))
    try:
        assert backend.name == "ort-cuda"
        why = {s["backend"]: s["why"] for s in skipped}["ort-trt"]
        assert "TensorRT EP failed to create engine from network" in why
    finally:
        backend.close()


def test_ort_trt_without_its_cuda_provider_is_unavailable(fake, tmp_path):
    """TensorRT loaded but the CUDA provider did not: the nodes TensorRT leaves would run
    on the CPU, with copies in between."""
    fake.drop = {CUDA}
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider did not load"):
        OrtTensorRT(_model(tmp_path), cache_dir=str(tmp_path)).load()


# -- item 2: the pip-installed libraries, found without torch --------------------------------


def test_gpu_libraries_are_preloaded_once_before_the_first_session(
    fake, tmp_path, monkeypatch, capsys
):
    _fake_tensorrt(monkeypatch, fake.calls)
    path = _model(tmp_path)
    for cls in (OrtTensorRT, OrtTensorRT, OrtCuda):
        cls(path, **({"cache_dir": str(tmp_path)} if cls is OrtTensorRT else {})).load().close()
    assert fake.calls[:3] == [
        ("preload_dlls", True, True, True, None),  # onnxruntime's documented defaults
        "import tensorrt",  # puts libnvinfer in the process for the TensorRT provider
        ("session", [TRT, CUDA]),
    ]
    assert fake.calls.count("import tensorrt") == 1
    assert [c for c in fake.calls if c[0] == "preload_dlls"] == [fake.calls[0]]
    out, err = capsys.readouterr()
    assert "libcudnn" not in out and "libcudnn" in err  # its print()s go to stderr

    # ort-cuda alone does not need TensorRT; onnxruntime < 1.21 has no preload_dlls, and a
    # tensorrt whose libraries do not load is left for the provider to report.
    import onnxruntime as ort

    calls: list = []
    monkeypatch.setattr(ort_gpu, "_preloaded", set())
    monkeypatch.delattr(ort, "preload_dlls")
    monkeypatch.setattr(sys, "meta_path", sys.meta_path[1:])
    _fake_tensorrt(monkeypatch, calls, OSError("libnvinfer.so.10: cannot open shared object"))
    OrtCuda(path).load().close()
    assert calls == []
    OrtTensorRT(path, cache_dir=str(tmp_path)).load().close()
    assert calls == ["import tensorrt"]


# -- item 5: the output buffer's element type -------------------------------------------------


def test_the_output_buffer_takes_the_sessions_output_type(fake, tmp_path):
    path = _model(tmp_path)
    for onnx_type, numpy_type in (("tensor(float16)", "float16"), ("tensor(float)", "float32")):
        fake.output_type = onnx_type
        with OrtCuda(path) as backend:
            logits = backend.run(_batch(2))
        assert ("alloc", (2, 5), numpy_type, "cuda") in fake.calls
        assert ("bind_ortvalue_output", "logits", numpy_type) in fake.calls
        assert logits.dtype == np.float32 and logits.shape == (2, 5)  # Backend.run's contract
        fake.calls.clear()
    fake.output_type = "tensor(bfloat16)"  # no numpy type: onnxruntime allocates it
    with OrtCuda(path) as backend:
        assert backend.run(_batch(2)).dtype == np.float32
    assert ("bind_output", "logits", "cuda", 0) in fake.calls
    assert not [c for c in fake.calls if c[0] == "alloc"]


def test_cuda_graphs_need_an_output_buffer_allocated_up_front(fake, tmp_path):
    """A CUDA graph replays into the output address it captured (ONNX Runtime's CUDA EP
    docs), so an output onnxruntime allocates per run cannot be used."""
    fake.output_shape = ["batch", "classes"]
    path = _model(tmp_path)
    with pytest.raises(UserError, match="cuda_graph=True needs an output it can allocate"):
        OrtCuda(path, cuda_graph=True).load()
    with OrtCuda(path) as backend:  # without a graph, onnxruntime allocating it is fine
        backend.run(_batch(1))
    assert ("bind_output", "logits", "cuda", 0) in fake.calls


# -- item 6: ort-trt's fp32 is TF32 -----------------------------------------------------------


def test_ort_trt_labels_an_fp32_file_tf32(fake, tmp_path):
    with OrtTensorRT(_model(tmp_path), cache_dir=str(tmp_path)) as backend:
        d = backend.describe()
        assert backend.precision == "tf32" and d["precision"] == "tf32" and d["tf32"] is True
        assert fake.options[TRT]["trt_fp16_enable"] == "False"
    fp16 = _model(tmp_path, precision="fp16", name="m.fp16.onnx")
    with OrtTensorRT(fp16, cache_dir=str(tmp_path)) as backend:
        assert backend.precision == "fp16" and backend.describe()["tf32"] is False
        assert fake.options[TRT]["trt_fp16_enable"] == "True"
    with OrtCuda(_model(tmp_path)) as backend:  # use_tf32 off: fp32 is fp32
        assert backend.precision == "fp32"


# -- item 8: the engine cache key -------------------------------------------------------------


def test_the_engine_cache_is_keyed_by_profile_and_versions(fake, tmp_path, monkeypatch):
    import onnxruntime as ort

    path = _model(tmp_path)
    monkeypatch.setattr(ort, "__version__", "1.22.0")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.9.0.34"))

    def key(**options):
        OrtTensorRT(path, cache_dir=str(tmp_path), **options).load().close()
        trt = fake.options[TRT]
        return trt["trt_engine_cache_path"], trt["trt_engine_cache_prefix"]

    folder, default = key()
    assert folder == engine_cache_dir(str(tmp_path), path)  # one folder per file content
    assert default == "b1-8-32_ort1.22.0_trt10.9.0.34"
    assert key(max_batch=256) == (folder, "b1-8-256_ort1.22.0_trt10.9.0.34")
    assert key(opt_batch=1)[1] == "b1-1-32_ort1.22.0_trt10.9.0.34"
    monkeypatch.setattr(ort, "__version__", "1.23.2")
    assert key()[1] == "b1-8-32_ort1.23.2_trt10.9.0.34"
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.12.0"))
    assert key()[1] == "b1-8-32_ort1.23.2_trt10.12.0"

    # No tensorrt module (JetPack's TensorRT without the Python bindings): libnvinfer's
    # getInferLibVersion(), else "unknown".
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    opened = []

    def cdll(name):
        opened.append(name)
        if name != "libnvinfer.so.10":
            raise OSError(f"{name}: cannot open shared object file")
        return types.SimpleNamespace(getInferLibVersion=lambda: 100900)

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    assert key()[1] == "b1-8-32_ort1.23.2_trt100900"
    monkeypatch.setattr(ctypes, "CDLL", lambda name: cdll("none"))
    assert key()[1] == "b1-8-32_ort1.23.2_trtunknown"


# -- item 9: the host-to-device copy is ordered before the run --------------------------------


def test_each_host_copy_is_synchronized_before_the_run(fake, tmp_path):
    with OrtCuda(_model(tmp_path)) as backend:
        for _ in range(3):  # a new buffer, then update_inplace into the same address
            backend.run(_batch(2))
        backend.stage(_batch(2))
        backend.run_device_resident()
    runs = [i for i, c in enumerate(fake.calls) if c == "run"]
    copies = [i for i, c in enumerate(fake.calls) if c[0] == "copy"]
    assert len(runs) == len(copies) == 4
    assert [fake.calls[i][1] for i in copies] == ["ortvalue_from_numpy"] + ["update_inplace"] * 3
    for copy, run in zip(copies, runs, strict=True):
        assert copy < run and "synchronize_inputs" in fake.calls[copy:run]
