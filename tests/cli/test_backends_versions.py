"""`convforge backends` reports the GPU stack (driver, CUDA runtime, cuDNN, TensorRT,
onnxruntime's build, cuda-python) before the backend list: versions with their source,
or why not, and the mismatches between them. The probes are patched at their boundary:
the files they read, the ctypes loader, the modules they import."""

import json
import sys
import types
from pathlib import Path

import pytest

from convforge.cli import main
from convforge.runtime import gpu_stack
from convforge.runtime.backends import AUTO_ORDER

NAMES = ["driver", "CUDA runtime", "cuDNN", "TensorRT", "onnxruntime", "cuda-python"]
NVRM = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
TEGRA = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n"


class FakeLib:
    """A loaded library: each named C function returns 0 and writes ``value`` through its
    int pointer (the CUDA ``f(int *)`` convention), or returns ``value`` (cudnnGetVersion,
    getInferLibVersion)."""

    def __init__(self, **functions):
        for name, (kind, value) in functions.items():
            setattr(self, name, self._out(value) if kind == "out" else self._ret(value))

    @staticmethod
    def _out(value):
        def function(ref):
            ref._obj.value = value
            return 0

        return function

    @staticmethod
    def _ret(value):
        def function():
            return value

        return function


def fake_loader(libraries: dict):
    """ctypes.CDLL for the libraries in ``libraries`` (by file name), OSError otherwise."""

    def load(name):
        lib = libraries.get(Path(name).name)
        if lib is None:
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
        return lib

    return load


def fake_module(monkeypatch, name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.fixture
def nothing_here(monkeypatch, tmp_path):
    """A machine with no driver, no NVIDIA library, no tensorrt, onnxruntime or
    cuda-python."""
    monkeypatch.setattr(gpu_stack, "DRIVER_VERSION_FILE", tmp_path / "no-driver")
    monkeypatch.setattr(gpu_stack, "TEGRA_RELEASE_FILE", tmp_path / "no-tegra")
    monkeypatch.setattr(gpu_stack, "_cdll", fake_loader({}))
    monkeypatch.setattr(gpu_stack, "_distributions", lambda prefix: {})
    for name in ("tensorrt", "onnxruntime", "cuda", "cuda.bindings", "cuda.bindings.runtime"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ModuleNotFoundError


@pytest.fixture
def h100_stack(monkeypatch, tmp_path):
    """A CUDA 12 server: driver 550 (CUDA 12.4), CUDA runtime 12.8, cuDNN 9.1.0, TensorRT
    10.16, onnxruntime-gpu 1.26 built for CUDA 12.8, cuda-python 12.9."""
    driver = tmp_path / "version"
    driver.write_text(NVRM)
    monkeypatch.setattr(gpu_stack, "DRIVER_VERSION_FILE", driver)
    monkeypatch.setattr(gpu_stack, "TEGRA_RELEASE_FILE", tmp_path / "no-tegra")
    monkeypatch.setattr(gpu_stack, "_site_folders", lambda: [])
    libraries = {
        "libcuda.so.1": FakeLib(cuDriverGetVersion=("out", 12040)),
        "libcudart.so.12": FakeLib(cudaRuntimeGetVersion=("out", 12080)),
        "libcudnn.so.9": FakeLib(cudnnGetVersion=("ret", 90100)),
    }
    monkeypatch.setattr(gpu_stack, "_cdll", fake_loader(libraries))
    dists = {"cuda-bindings": {"cuda-bindings": "12.9.4"}, "tensorrt": {"tensorrt-cu12": "10.16"}}
    monkeypatch.setattr(gpu_stack, "_distributions", lambda prefix: dists.get(prefix, {}))
    fake_module(monkeypatch, "tensorrt", __version__="10.16.1.11")
    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    fake_module(
        monkeypatch, "onnxruntime", __version__="1.26.0", get_available_providers=lambda: providers
    )
    fake_module(monkeypatch, "onnxruntime.capi")
    fake_module(
        monkeypatch,
        "onnxruntime.capi.build_and_package_info",
        package_name="onnxruntime-gpu",
        __version__="1.26.0",
        cuda_version="12.8",
    )
    return fake_cuda_python(monkeypatch, runtime=12090)


def fake_cuda_python(monkeypatch, runtime: int) -> types.ModuleType:
    errors = types.SimpleNamespace(cudaSuccess=0)
    rt = fake_module(
        monkeypatch,
        "cuda.bindings.runtime",
        cudaError_t=errors,
        cudaRuntimeGetVersion=lambda: (0, runtime),
    )
    fake_module(monkeypatch, "cuda")
    fake_module(monkeypatch, "cuda.bindings", runtime=rt)
    return rt


def test_nothing_found_is_said_with_a_reason_for_each_part(nothing_here):
    stack = gpu_stack.report()
    assert [c.name for c in stack.components] == NAMES
    assert all(c.version is None and c.why for c in stack.components)
    lines = stack.lines()
    assert lines[0].startswith("driver       not found: no NVIDIA driver")
    assert "libcuda.so.1 does not load" in lines[0]
    assert "libcudart.so.12" in stack.get("CUDA runtime").why
    assert "https://pypi.nvidia.com" in stack.get("TensorRT").why
    assert stack.get("onnxruntime").why == "pip install 'convforge[gpu]' (or [cpu])"
    assert stack.get("cuda-python").why == "pip install 'convforge[tensorrt]'"
    assert stack.mismatches == []


def test_a_found_stack_is_printed_with_versions_and_sources(h100_stack):
    stack = gpu_stack.report()
    assert stack.lines() == [
        f"driver       550.54.15 ({gpu_stack.DRIVER_VERSION_FILE}); supports CUDA 12.4 "
        "(libcuda.so.1)",
        "CUDA runtime 12.8 (libcudart.so.12)",
        "cuDNN        9.1.0 (libcudnn.so.9)",
        "TensorRT     10.16.1.11 (import tensorrt)",
        "onnxruntime  1.26.0 (import onnxruntime); onnxruntime-gpu, built for CUDA 12.8; "
        "providers TensorRT, CUDA, CPU",
        "cuda-python  12.9.4 (cuda.bindings.runtime); CUDA runtime 12.9",
    ]
    assert stack.mismatches == []  # minor versions above the driver's: CUDA 12 compatibility


def test_mismatches_are_named(h100_stack, monkeypatch):
    fake_cuda_python(monkeypatch, runtime=13000)  # cuda-python 13 on a CUDA 12.4 driver
    fake_module(monkeypatch, "tensorrt", __version__="11.4.0.106")
    libraries = {
        "libcuda.so.1": FakeLib(cuDriverGetVersion=("out", 12040)),
        "libcudart.so.13": FakeLib(cudaRuntimeGetVersion=("out", 13000)),  # no .so.12
        "libcudnn.so.8": FakeLib(cudnnGetVersion=("ret", 8907)),
    }
    monkeypatch.setattr(gpu_stack, "_cdll", fake_loader(libraries))
    stack = gpu_stack.report()
    assert stack.get("cuDNN").version == "8.9.7"
    found = "\n".join(stack.mismatches)
    assert "the driver supports CUDA 12.4, the CUDA runtime 13.0 needs CUDA 13.x" in found
    assert "the driver supports CUDA 12.4, cuda-python needs CUDA 13.x" in found
    assert "onnxruntime-gpu 1.26.0 is built for CUDA 12, the CUDA runtime found is 13.0" in found
    assert "onnxruntime-gpu 1.26.0 needs cuDNN 9, found 8.9.7" in found
    assert "loads libnvinfer.so.10 (TensorRT 10), TensorRT 11.4.0.106 is installed" in found
    assert all(line.startswith("mismatch: ") for line in stack.lines()[6:])


def test_tensorrt_bindings_without_their_libraries_say_so_and_where_they_are(
    nothing_here, monkeypatch, tmp_path
):
    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise ImportError('libnvinfer.so.10: cannot open shared object file: "
        "No such file or directory')\n"
    )
    monkeypatch.delitem(sys.modules, "tensorrt")
    monkeypatch.syspath_prepend(str(tmp_path))
    line = gpu_stack.report().get("TensorRT").line()
    assert line.startswith("TensorRT     not found: tensorrt's Python bindings are installed but")
    assert "(libnvinfer.so.10: cannot open shared object file" in line
    assert "--extra-index-url https://pypi.nvidia.com" in line


def test_a_jetson_reports_l4t_and_jetpacks_tensorrt(nothing_here, monkeypatch, tmp_path):
    tegra = tmp_path / "nv_tegra_release"
    tegra.write_text(TEGRA)
    monkeypatch.setattr(gpu_stack, "TEGRA_RELEASE_FILE", tegra)
    libraries = {
        "libcuda.so.1": FakeLib(cuDriverGetVersion=("out", 12060)),
        "libnvinfer.so.10": FakeLib(getInferLibVersion=("ret", 100300)),
    }
    monkeypatch.setattr(gpu_stack, "_cdll", fake_loader(libraries))
    stack = gpu_stack.report()
    assert stack.get("driver").line() == (
        f"driver       L4T R36.4.3 ({tegra}); supports CUDA 12.6 (libcuda.so.1)"
    )
    trt = stack.get("TensorRT")
    assert (trt.version, trt.source) == ("10.3.0", "libnvinfer.so.10 getInferLibVersion")
    assert "--system-site-packages" in trt.note


def test_a_probe_that_breaks_is_a_reason_not_a_crash(nothing_here, monkeypatch):
    def broken(name):
        raise RuntimeError("loader exploded")

    monkeypatch.setattr(gpu_stack, "_cdll", broken)
    stack = gpu_stack.report()
    assert stack.get("driver").why == "probe failed: loader exploded"
    assert stack.get("cuDNN").why == "probe failed: loader exploded"


def test_backends_prints_the_stack_first_and_puts_it_in_the_json(h100_stack, monkeypatch, capsys):
    stack = gpu_stack.report()
    monkeypatch.undo()  # the backend list itself runs on what is really installed
    monkeypatch.setattr(gpu_stack, "report", lambda: stack)
    assert main(["backends"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "GPU stack:"
    assert out[1:7] == [f"  {line}" for line in stack.lines()]
    assert out[7] == "" and out[8].startswith(f"{AUTO_ORDER[0]} (")  # in auto order
    assert main(["backends", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in record["gpu_stack"]["components"]] == NAMES
    assert record["gpu_stack"]["components"][3]["version"] == "10.16.1.11"
    assert record["gpu_stack"]["mismatches"] == []
    assert [b["backend"] for b in record["backends"]] == list(AUTO_ORDER)


def test_backends_on_this_machine_does_not_crash(capsys):
    assert main(["backends", "--json"]) == 0
    components = json.loads(capsys.readouterr().out)["gpu_stack"]["components"]
    assert [c["name"] for c in components] == NAMES
    assert all(c["version"] or c["why"] for c in components)
