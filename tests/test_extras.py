"""Missing extras name themselves; two ONNX Runtime builds together are spotted."""

import sys
import warnings
from types import SimpleNamespace

import pytest

from convforge import extras
from convforge.errors import UserError


def test_require_names_the_library_and_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed
    with pytest.raises(UserError) as e:
        extras.require("convforge train", "numpy", "torch")
    assert str(e.value) == "convforge train needs PyTorch: pip install 'convforge[train]'"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match=r"needs ONNX Runtime: pip install 'convforge\[cpu\]' "):
        extras.require("convforge export", "onnxruntime")
    extras.require("convforge inspect", "numpy", "onnx")  # installed: no error


def test_require_engine(monkeypatch):
    extras.require_engine("convforge predict")  # onnxruntime is installed here
    for module in extras.ENGINES:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(UserError, match="convforge predict needs an inference engine"):
        extras.require_engine("convforge predict")


def _dists(*names):
    return lambda: [SimpleNamespace(metadata={"Name": n}) for n in names]


def test_onnxruntime_builds_come_from_distribution_metadata(monkeypatch):
    monkeypatch.setattr(
        extras.metadata, "distributions", _dists("numpy", "onnxruntime", "onnxruntime_gpu", "onnx")
    )
    assert extras.onnxruntime_builds() == ["onnxruntime", "onnxruntime-gpu"]
    monkeypatch.setattr(extras.metadata, "distributions", _dists("onnxruntime-gpu", "onnx"))
    assert extras.onnxruntime_builds() == ["onnxruntime-gpu"]


def test_two_builds_warn_once_with_the_fix(monkeypatch):
    monkeypatch.setattr(extras, "onnxruntime_builds", lambda: ["onnxruntime", "onnxruntime-gpu"])
    extras.check_onnxruntime_builds.cache_clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        extras.check_onnxruntime_builds()
        extras.check_onnxruntime_builds()
    extras.check_onnxruntime_builds.cache_clear()
    assert len(seen) == 1 and seen[0].category is extras.InstallWarning
    assert str(seen[0].message).endswith(
        "fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
    )


def test_one_build_is_silent(monkeypatch):
    monkeypatch.setattr(extras, "onnxruntime_builds", lambda: ["onnxruntime"])
    extras.check_onnxruntime_builds.cache_clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        extras.check_onnxruntime_builds()
    extras.check_onnxruntime_builds.cache_clear()
    assert seen == []


def test_one_install_hint_per_extra_as_backends_declare_them():
    assert extras.extra_hint("openvino") == "pip install 'convforge[openvino]'"
    assert extras.extra_hint("gpu,tensorrt") == "pip install 'convforge[gpu,tensorrt]'"
    assert extras.extra_hint("cpu") == (
        "pip install 'convforge[cpu]' (or 'convforge[gpu]' on a CUDA machine)"
    )
    assert extras.extra_hint("tensorrt") == (  # TensorRT's libraries are on NVIDIA's index
        "pip install 'convforge[tensorrt]' --extra-index-url https://pypi.nvidia.com, "
        "or use JetPack or an NGC container, which ship TensorRT"
    )
    assert extras.install_hint("onnxruntime") == extras.extra_hint("cpu")
    assert extras.install_hint("tensorrt") == extras.extra_hint("tensorrt")
