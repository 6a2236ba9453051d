"""The backend registry and `auto`: it loads candidates in turn and says what it skipped.

GPU providers are made to look installed by patching ONNX Runtime at its boundary
(``get_available_providers``, ``InferenceSession``); nothing reports having run on a
provider that did not run."""

from __future__ import annotations

import dataclasses
from importlib import metadata

import onnx
import pytest

from convforge import contract, extras
from convforge.errors import UserError
from convforge.export.int8 import to_int8
from convforge.runtime import load
from convforge.runtime.backends import (
    AUTO_ORDER,
    BACKENDS,
    GPU_BACKENDS,
    BackendUnavailable,
    DeviceResident,
    backend_class,
    load_backend,
)
from convforge.runtime.backends.base import refuse_asymmetric_int8
from convforge.runtime.backends.options import parse_options
from tests.helpers import export_small_model, random_batch
from tests.runtime.test_ort import _falls_back_to_cpu, _pretend_gpu_build, _raises_missing_libraries


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """fp32, int8 for the cpu target, int8 for the tensorrt target."""
    folder = tmp_path_factory.mktemp("auto")
    path, _ = export_small_model(folder)
    out = {"fp32": str(path)}
    for target in ("cpu", "tensorrt"):
        int8 = to_int8(onnx.load(path), random_batch(16, seed=3), target)
        out[target] = str(folder / f"m.int8-{target}.onnx")
        onnx.save(int8, out[target])
    return out


def test_the_registry_is_the_auto_order_and_the_gpu_backends_come_from_the_classes():
    assert AUTO_ORDER == tuple(BACKENDS)
    assert AUTO_ORDER == ("tensorrt", "ort-trt", "ort-cuda", "openvino", "ort-cpu", "torch")
    assert GPU_BACKENDS == ("tensorrt", "ort-trt", "ort-cuda")


@pytest.mark.parametrize("name", list(BACKENDS))
def test_each_backend_declares_its_facts(name):
    """What the rest of the package reads from a backend class: all declared, all valid."""
    cls = backend_class(name)
    assert cls.name == name
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    assert cls.library in extras.ENGINES  # a module that runs models, as require_engine knows
    declared = metadata.metadata("convforge").get_all("Provides-Extra")  # pyproject's extras
    assert cls.extra and set(cls.extra.split(",")) <= set(declared)
    assert isinstance(cls.gpu, bool)
    assert isinstance(cls.numeric_options, tuple) and set(cls.numeric_options) <= fields
    for fp32 in (True, False):
        variants = cls.tune_variants(8, (1, 8, 32), fp32)
        assert variants and all(isinstance(v, dict) and set(v) <= fields for v in variants)
        for options in variants:
            parse_options(cls.Options, options, name)  # values the backend takes


def _first_cpu_backend() -> str:
    return next(n for n in AUTO_ORDER[3:] if backend_class(n).available()[0])


@pytest.mark.parametrize("factory", [_falls_back_to_cpu, _raises_missing_libraries])
def test_auto_moves_past_gpu_providers_that_do_not_load(files, monkeypatch, factory, tmp_path):
    """onnxruntime-gpu lists TensorRT even without its libraries: auto must not stop there."""
    monkeypatch.setenv("HOME", str(tmp_path))  # ort-trt's default engine cache
    _pretend_gpu_build(monkeypatch, factory)
    backend, skipped = load_backend("auto", files["fp32"])
    try:
        assert backend.name == _first_cpu_backend()
        assert backend.run(random_batch(2)).shape == (2, 5)
    finally:
        backend.close()
    why = {s["backend"]: s["why"] for s in skipped}
    assert list(why)[:3] == ["tensorrt", "ort-trt", "ort-cuda"]
    for name in ("ort-trt", "ort-cuda"):
        assert "could not create a session" in why[name] or "did not load" in why[name]


def test_a_named_backend_never_falls_back(files, monkeypatch, tmp_path):
    _pretend_gpu_build(monkeypatch, _falls_back_to_cpu)
    with pytest.raises(BackendUnavailable, match="TensorrtExecutionProvider did not load"):
        load_backend("ort-trt", files["fp32"], cache_dir=str(tmp_path))


def test_the_model_api_reports_what_auto_skipped(files):
    with load(files["fp32"], backend="auto") as model:
        assert model.backend.name == _first_cpu_backend()
        skipped = [s["backend"] for s in model.skipped]
    assert skipped == [n for n in AUTO_ORDER[: AUTO_ORDER.index(model.backend.name)]]
    with pytest.raises(UserError, match="need a named backend, not auto"):
        load(files["fp32"], backend="auto", threads=2)


def test_a_broken_file_is_an_error_not_a_skip(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserError, match="is not a readable ONNX model") as e:
        load_backend("auto", str(junk))
    assert not isinstance(e.value, BackendUnavailable)


def test_the_tensorrt_backends_refuse_a_cpu_target_int8_file(files):
    info = contract.read_info(files["cpu"])
    assert info.precision == "int8" and info.int8_symmetric is False
    for name in ("ort-trt", "tensorrt"):
        with pytest.raises(BackendUnavailable, match="re-export with --int8-target tensorrt"):
            refuse_asymmetric_int8(name, info)
    symmetric = contract.read_info(files["tensorrt"])
    assert symmetric.int8_symmetric is True
    refuse_asymmetric_int8("tensorrt", symmetric)  # runs


def test_auto_skips_tensorrt_for_a_cpu_target_int8_file_and_says_why(files, monkeypatch, tmp_path):
    _pretend_gpu_build(monkeypatch, _falls_back_to_cpu)
    with pytest.raises(BackendUnavailable, match="an int8 export for the cpu target"):
        load_backend("ort-trt", files["cpu"], cache_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # refused before any engine was built
    monkeypatch.setenv("HOME", str(tmp_path))
    backend, skipped = load_backend("auto", files["cpu"])
    backend.close()
    why = {s["backend"]: s["why"] for s in skipped}
    assert "re-export with --int8-target tensorrt" in why["ort-trt"]


def test_auto_on_a_torch_program_skips_the_onnx_backends(files):
    pt2 = files["fp32"].replace(".onnx", ".pt2")
    backend, skipped = load_backend("auto", pt2)
    backend.close()
    assert backend.name == "torch"
    assert {s["backend"]: s["why"] for s in skipped}["ort-cpu"] == "runs .onnx files"
    with pytest.raises(UserError, match="ort-cpu runs .onnx files, got .*m.pt2"):
        load_backend("ort-cpu", pt2)


@pytest.mark.parametrize("name", ["tensorrt", "ort-trt", "ort-cuda", "ort-cpu", "openvino"])
def test_a_backend_that_mixes_in_device_resident_is_device_resident(name):
    # The class attribute Backend.device_resident = False once shadowed the mixin's True
    # (Backend comes first in their bases), so bench never timed the GPU backends
    # compute-only. No load needed: what the class is says it.
    cls = backend_class(name)
    assert object.__new__(cls).device_resident is issubclass(cls, DeviceResident)
    assert issubclass(cls, DeviceResident) is (name in ("tensorrt", "ort-trt", "ort-cuda"))
