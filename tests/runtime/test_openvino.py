"""The OpenVINO CPU backend against the PyTorch model it was exported from."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from convforge.errors import UserError
from convforge.runtime.backends.openvino import OpenVino, native_bf16
from tests.helpers import (
    SMALL_CLASSES,
    export_small_model,
    random_batch,
    torch_logits,
)

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino)")

CLASSES = SMALL_CLASSES


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path, model = export_small_model(tmp_path_factory.mktemp("ov"))
    return path, model


@pytest.fixture
def compiled_with(monkeypatch):
    """The config dict of every ov.Core.compile_model call (the real compile still runs)."""
    configs = []
    compile_model = ov.Core.compile_model

    def capture(self, model, device=None, config=None):
        configs.append(dict(config or {}))
        return compile_model(self, model, device, config or {})

    monkeypatch.setattr(ov.Core, "compile_model", capture)
    return configs


@pytest.fixture
def cpu_reports(monkeypatch):
    """``cpu_reports("bf16")``: the compiled model says it computes in bf16, as it does on a
    CPU with native bf16 (a CPU without it cannot show that any other way)."""

    def report(type_name: str) -> None:
        get_property = ov.CompiledModel.get_property

        def patched(self, key):
            if key == "INFERENCE_PRECISION_HINT":
                return getattr(ov.Type, type_name)
            return get_property(self, key)

        monkeypatch.setattr(ov.CompiledModel, "get_property", patched)

    return report


@pytest.mark.parametrize("n", [1, 5])
def test_f32_matches_pytorch(exported, n):
    path, model = exported
    x = random_batch(n)
    want = torch_logits(model, x)
    with OpenVino(path, precision="f32") as backend:
        assert backend.spec.channels == 3 and (backend.spec.height, backend.spec.width) == (16, 16)
        got = backend.run(x)
        info = backend.describe()
    assert got.dtype == np.float32 and got.shape == (n, len(CLASSES))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert info["backend"] == "openvino" and info["precision"] == "fp32"
    assert info["inference_precision"] == "f32" and info["hint"] == "LATENCY"
    assert info["threads"] is None or info["threads"] >= 1
    assert info["streams"] is None or info["streams"] >= 1


def _tolerance(precision):
    return 1e-4 if precision == "fp32" else 5e-2


def test_an_fp32_file_runs_in_f32_unless_bf16_is_asked(exported, compiled_with, cpu_reports):
    """Left to itself OpenVINO computes fp32 files in bf16 on CPUs with AVX512-BF16/AMX:
    the backend always asks for f32, and for bf16 only when told."""
    path, model = exported
    x = random_batch(5, seed=2)
    want = torch_logits(model, x)
    with OpenVino(path) as backend:
        got = backend.run(x)
        info = backend.describe()
    assert compiled_with[-1]["INFERENCE_PRECISION_HINT"] == "f32"
    assert info["requested_precision"] == "f32" and info["inference_precision"] == "f32"
    assert info["precision"] == "fp32"
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # bf16 when asked: where the CPU has it, that is what runs, and the backend says so.
    cpu_reports("bf16")
    with OpenVino(path, precision="bf16") as backend:
        assert compiled_with[-1]["INFERENCE_PRECISION_HINT"] == "bf16"
        assert backend.precision == "bf16" and backend.describe()["inference_precision"] == "bf16"
    # And on a CPU without it OpenVINO runs f32: the report is what ran, not the request.
    cpu_reports("f32")
    with OpenVino(path, precision="bf16") as backend:
        assert backend.precision == "fp32" and backend.describe()["requested_precision"] == "bf16"


def test_an_fp16_file_computes_in_f32_and_says_fp16(exported, compiled_with):
    """CPUs have no fp16 compute to speak of: an fp16 file computes in f32 (never bf16,
    which holds fewer digits than the file), labelled with the file's precision."""
    from convforge.export.precision import to_fp16

    path, model = exported
    half = Path(path).with_name("m_fp16.onnx")
    onnx.save(to_fp16(onnx.load(path)), half)
    x = random_batch(5, seed=6)
    want = torch_logits(model, x)
    with OpenVino(half) as backend:
        got = backend.run(x)
        info = backend.describe()
    assert compiled_with[-1]["INFERENCE_PRECISION_HINT"] == "f32"
    assert info["precision"] == "fp16" and info["inference_precision"] == "f32"
    assert np.abs(got - want).max() <= 5e-3 * np.abs(want).max()  # fp16 weights, f32 compute


def test_bf16_request_reports_the_precision_that_ran(exported):
    """A bf16 request runs bf16 where the CPU has it; elsewhere OpenVINO runs f32 and says so."""
    path, model = exported
    x = random_batch(5, seed=3)
    want = torch_logits(model, x)
    with OpenVino(path, precision="bf16", hint="THROUGHPUT") as backend:
        got = backend.run(x)
        info = backend.describe()
    assert info["requested_precision"] == "bf16" and info["hint"] == "THROUGHPUT"
    assert info["precision"] in ("fp32", "bf16")
    assert (got.argmax(1) == want.argmax(1)).all()
    assert np.abs(got - want).max() <= _tolerance(info["precision"]) * np.abs(want).max()


def test_int8_model_reports_int8(exported, tmp_path, compiled_with, cpu_reports):
    """The float parts of an int8 file compute in f32 too; bf16 there is named."""
    from convforge.export.int8 import to_int8

    path, model = exported
    quantized = to_int8(onnx.load(path), random_batch(32, seed=4))
    q_path = tmp_path / "m_int8.onnx"
    onnx.save(quantized, q_path)
    x = random_batch(5, seed=5)
    want = torch_logits(model, x)
    with OpenVino(q_path) as backend:
        got = backend.run(x)
        assert backend.precision == "int8" and backend.describe()["precision"] == "int8"
        assert backend.describe()["inference_precision"] == "f32"
    assert compiled_with[-1]["INFERENCE_PRECISION_HINT"] == "f32"
    assert np.abs(got - want).max() <= 0.2 * np.abs(want).max()
    cpu_reports("bf16")
    with OpenVino(q_path, precision="bf16") as backend:
        assert backend.precision == "int8+bf16"


def test_native_bf16_is_what_the_cpu_has():
    """OpenVINO's BF16 capability, checked against the CPU's own flags (Linux x86)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file() or "avx" not in cpuinfo.read_text():
        pytest.skip("needs Linux on x86 to read the CPU's flags")
    flags = set(cpuinfo.read_text().split())
    assert native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_missing_or_foreign_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        OpenVino(tmp_path / "nope.onnx").load()
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserError):
        OpenVino(junk).load()


def test_backend_modules_import_without_openvino_or_torch():
    code = (
        "import sys\n"
        "import convforge.runtime.backends.openvino, convforge.runtime.backends.torch_program\n"
        "bad = {'openvino', 'torch'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
