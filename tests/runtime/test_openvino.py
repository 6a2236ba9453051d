"""The OpenVINO CPU backend against the PyTorch model it was exported from."""

import subprocess
import sys

import numpy as np
import onnx
import pytest

from convforge.errors import UserError
from convforge.runtime.backends.openvino import OpenVino
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


def test_default_precision_is_read_back_from_the_compiled_model(exported):
    """precision=None lets OpenVINO choose; describe() reports what it chose, not a guess."""
    path, model = exported
    x = random_batch(5, seed=2)
    want = torch_logits(model, x)
    with OpenVino(path) as backend:
        got = backend.run(x)
        info = backend.describe()
    assert info["requested_precision"] is None
    assert info["precision"] in ("fp32", "bf16")
    assert info["precision"] == {"f32": "fp32", "bf16": "bf16"}[info["inference_precision"]]
    assert (got.argmax(1) == want.argmax(1)).all()
    assert np.abs(got - want).max() <= _tolerance(info["precision"]) * np.abs(want).max()


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


def test_int8_model_reports_int8(exported, tmp_path):
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
    assert np.abs(got - want).max() <= 0.2 * np.abs(want).max()


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
