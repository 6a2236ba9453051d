"""TensorRT backend: what runs without TensorRT here, and GPU tests that skip elsewhere."""

import subprocess
import sys

import numpy as np
import pytest

from convforge.errors import UserError
from convforge.runtime.backends.base import BackendUnavailable
from convforge.runtime.backends.tensorrt import (
    TensorRT,
    engine_cache_key,
    profile_from_options,
)

OK, WHY = TensorRT.available()
needs_trt = pytest.mark.skipif(not OK, reason=f"TensorRT backend unavailable: {WHY}")


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(_has_tensorrt(), reason="tensorrt is installed here")
def test_unavailable_without_tensorrt_says_why():
    ok, why = TensorRT.available()
    assert not ok
    assert "tensorrt is not installed" in why
    assert "pip install 'convforge[tensorrt]'" in why


@pytest.mark.skipif(OK, reason="the TensorRT backend is available here")
def test_load_raises_backend_unavailable_with_the_reason(tmp_path):
    backend = TensorRT(str(tmp_path / "missing.onnx"), cache_dir=str(tmp_path))
    with pytest.raises(BackendUnavailable) as e:
        backend.load()
    assert "'tensorrt' is not available" in str(e.value)
    assert WHY in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing built or cached, no fallback


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


def test_profile_options_are_checked():
    assert profile_from_options({}) == (1, 8, 32)
    assert profile_from_options({"max_batch": 64, "opt_batch": 16}) == (1, 16, 64)
    with pytest.raises(UserError, match="min_batch <= opt_batch <= max_batch"):
        profile_from_options({"opt_batch": 64})
    with pytest.raises(UserError, match="1 <= min_batch"):
        TensorRT("m.onnx", min_batch=0)


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
