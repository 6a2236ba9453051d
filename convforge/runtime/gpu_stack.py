"""The GPU stack this machine would run on: the NVIDIA driver, the CUDA runtime, cuDNN,
TensorRT, onnxruntime's build and cuda-python, each with where its version was read or
one short reason why it was not found, and the mismatches between them.

``convforge backends`` prints :func:`report` before the backend list, so that a user
sees in one command why a GPU backend does not load (a driver too old for the CUDA a
library was built for, onnxruntime-gpu for CUDA 12 beside CUDA 13 libraries, TensorRT's
Python bindings without its libraries).

Every probe is best effort: it never raises and takes a moment at most. None imports
torch. Versions come from what the GPU backends themselves load:

* driver: ``/proc/driver/nvidia/version`` (its release; a Jetson's L4T release from
  ``/etc/nv_tegra_release``) and ``cuDriverGetVersion`` of ``libcuda.so.1`` (the newest
  CUDA it runs). No ``nvidia-smi``: a subprocess per call is not a moment.
* CUDA runtime and cuDNN: ``cudaRuntimeGetVersion`` of ``libcudart.so.N`` and
  ``cudnnGetVersion`` of ``libcudnn.so.9`` (or ``.8``), looked for where
  ``onnxruntime.preload_dlls()`` looks: the nvidia-* pip packages in site-packages
  first, then the loader's search path.
* TensorRT: ``tensorrt.__version__``; when the module does not import, the library's
  ``getInferLibVersion()`` (a JetPack or tar install), and otherwise the tensorrt
  backend's reason, such as bindings without ``tensorrt-cu12-libs``, which only NVIDIA's
  index has.
* onnxruntime: its version, ``onnxruntime.capi.build_and_package_info.cuda_version``
  (the CUDA a GPU build was made for) and its available providers.
* cuda-python: the distribution's version and ``cudaRuntimeGetVersion()`` of
  ``cuda.bindings.runtime`` (``cuda.cudart`` before 12.6.1), the CUDA runtime that the
  native ``tensorrt`` backend calls (statically linked into the bindings).

Version encodings (checked against the headers' documentation): CUDA's
``1000 * major + 10 * minor``; cuDNN 9's ``10000 * major + 100 * minor + patch`` (8's:
``1000 * major + 100 * minor + patch``); TensorRT 10's ``10000 * major + 100 * minor +
patch`` (8's: ``1000 * major + 100 * minor + patch``).
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
TEGRA_RELEASE_FILE = Path("/etc/nv_tegra_release")
# Where the pip wheels put each library, relative to a site-packages folder (the CUDA 12
# wheels: one folder per library; the CUDA 13 wheels: one nvidia/cu13/lib for all).
PIP_DIRS = {
    "cudart": ("nvidia/cuda_runtime/lib", "nvidia/cu13/lib"),
    "cudnn": ("nvidia/cudnn/lib",),
    "nvinfer": ("tensorrt_libs",),
}
# onnxruntime-gpu releases whose TensorRT provider links libnvinfer.so.10 (readelf of the
# 1.26.0 and 1.27.0 wheels; ONNX Runtime's TensorRT provider requirements for 1.18-1.22).
ORT_NVINFER_10 = ((1, 18), (1, 27))

_cdll: Callable[[str], ctypes.CDLL] = ctypes.CDLL  # the one way a library is loaded (tests)


@dataclass(frozen=True)
class Component:
    """One part of the stack: its ``version`` (None: not found) and the ``source`` it was
    read from, ``note`` (further facts, e.g. the CUDA a driver supports) or ``why`` it
    was not found (one short line)."""

    name: str
    version: str | None
    source: str = ""
    note: str = ""
    why: str = ""

    def line(self) -> str:
        if self.version is None:
            return f"{self.name:<12} not found: {self.why}"
        source = f" ({self.source})" if self.source else ""
        note = f"; {self.note}" if self.note else ""
        return f"{self.name:<12} {self.version}{source}{note}"


@dataclass(frozen=True)
class Stack:
    """Every component, in the order printed, and the mismatches found between them."""

    components: list[Component]
    mismatches: list[str]

    def get(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)

    def lines(self) -> list[str]:
        return [c.line() for c in self.components] + [f"mismatch: {m}" for m in self.mismatches]

    def as_dict(self) -> dict:
        return {
            "components": [asdict(c) for c in self.components],
            "mismatches": list(self.mismatches),
        }


def report() -> Stack:
    """The stack found here (never raises; each probe that fails says why)."""
    ort = _probe("onnxruntime", _onnxruntime)
    components = [
        _probe("driver", _driver),
        _probe("CUDA runtime", lambda: _cuda_runtime(_cuda_major(ort))),
        _probe("cuDNN", _cudnn),
        _probe("TensorRT", _tensorrt),
        ort,
        _probe("cuda-python", _cuda_python),
    ]
    try:
        mismatches = _mismatches(components)
    except Exception as e:  # noqa: BLE001 (the report still stands without this check)
        mismatches = [f"the check failed: {_first_line(e)}"]
    return Stack(components, mismatches)


# -- probes ------------------------------------------------------------------------------


def _probe(name: str, probe: Callable[[], Component]) -> Component:
    try:
        return probe()
    except Exception as e:  # noqa: BLE001 (a probe that breaks is a reason, never a crash)
        return Component(name, None, why=f"probe failed: {_first_line(e)}")


def _driver() -> Component:
    release, source = None, ""
    text = _read(DRIVER_VERSION_FILE)
    match = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+([0-9][0-9.]*)", text or "")
    if match:
        release, source = match.group(1), str(DRIVER_VERSION_FILE)
    tegra = _read(TEGRA_RELEASE_FILE)
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)", tegra or "")
    if match and release is None:
        release, source = f"L4T R{match.group(1)}.{match.group(2)}", str(TEGRA_RELEASE_FILE)
    lib, where = _load(("libcuda.so.1",), ())
    supports = _int_out(lib.cuDriverGetVersion) if lib is not None else None
    if release is None and not supports:
        why = "libcuda.so.1 does not load" if lib is None else "cuDriverGetVersion says 0"
        return Component("driver", None, why=f"no NVIDIA driver (no {DRIVER_VERSION_FILE}, {why})")
    note = f"supports CUDA {_cuda(supports)} (libcuda.so.1)" if supports else where
    return Component("driver", release or "release unknown", source, note)


def _cuda_runtime(major: int | None) -> Component:
    majors = [m for m in (major, 12, 13) if m is not None]
    names = tuple(dict.fromkeys(f"libcudart.so.{m}" for m in majors))
    lib, where = _load(names, PIP_DIRS["cudart"])
    if lib is None:
        return Component("CUDA runtime", None, why=where)
    version = _int_out(lib.cudaRuntimeGetVersion)
    if version is None:
        return Component("CUDA runtime", None, why=f"cudaRuntimeGetVersion failed in {where}")
    return Component("CUDA runtime", _cuda(version), _short(where))


def _cudnn() -> Component:
    lib, where = _load(("libcudnn.so.9", "libcudnn.so.8"), PIP_DIRS["cudnn"])
    if lib is None:
        return Component("cuDNN", None, why=where)
    lib.cudnnGetVersion.restype = ctypes.c_size_t
    v = int(lib.cudnnGetVersion())
    scale = 10000 if v >= 90000 else 1000  # cuDNN 9 widened the minor field
    return Component("cuDNN", f"{v // scale}.{v % scale // 100}.{v % 100}", _short(where))


def _tensorrt() -> Component:
    # The backend's own test of the import, so both say the same (its reason tells "not
    # installed" from bindings whose libraries do not load, and where TensorRT comes from).
    from convforge.runtime.backends.tensorrt import tensorrt_import_error

    why = tensorrt_import_error()
    if why is None:
        return Component("TensorRT", str(sys.modules["tensorrt"].__version__), "import tensorrt")
    libraries = ("libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so.8")
    lib, where = _load(libraries, PIP_DIRS["nvinfer"])
    if lib is None:
        return Component("TensorRT", None, why=why)
    # The libraries without a Python module that imports them: the version is theirs.
    v = int(lib.getInferLibVersion())
    scale = 10000 if v >= 100000 else 1000
    version = f"{v // scale}.{v % scale // 100}.{v % 100}"
    note = "no Python module"
    if "site-packages" not in where:  # JetPack's (or a tar install): a system module
        note += " (a venv sees JetPack's with --system-site-packages)"
    return Component("TensorRT", version, f"{_short(where)} getInferLibVersion", f"{note}: {why}")


def _onnxruntime() -> Component:
    try:
        ort = importlib.import_module("onnxruntime")
    except Exception as e:  # noqa: BLE001
        missing = isinstance(e, ModuleNotFoundError)
        why = "pip install 'convforge[gpu]' (or [cpu])" if missing else _first_line(e)
        return Component("onnxruntime", None, why=why)
    info = importlib.import_module("onnxruntime.capi.build_and_package_info")
    package = getattr(info, "package_name", "onnxruntime")
    cuda = getattr(info, "cuda_version", None)
    built = f"built for CUDA {cuda}" if cuda else "no CUDA (CPU build)"
    providers = ", ".join(
        "TensorRT" if p == "TensorrtExecutionProvider" else p.removesuffix("ExecutionProvider")
        for p in ort.get_available_providers()
    )
    note = f"{package}, {built}; providers {providers}"
    return Component("onnxruntime", str(ort.__version__), "import onnxruntime", note)


def _cuda_python() -> Component:
    from convforge.runtime.backends.cuda_runtime import cudart

    dists = _distributions("cuda-bindings") or _distributions("cuda-python")
    try:
        rt = cudart()
    except ImportError:
        return Component("cuda-python", None, why="pip install 'convforge[tensorrt]'")
    version = next(iter(dists.values()), "version unknown")
    source = getattr(rt, "__name__", "cuda.bindings.runtime")
    err, runtime = rt.cudaRuntimeGetVersion()
    if err != rt.cudaError_t.cudaSuccess:
        return Component("cuda-python", version, source, note="cudaRuntimeGetVersion failed")
    return Component("cuda-python", version, source, note=f"CUDA runtime {_cuda(runtime)}")


# -- mismatches --------------------------------------------------------------------------


def _mismatches(components: list[Component]) -> list[str]:
    """What cannot work together, one line each (only what the versions prove)."""
    by = {c.name: c for c in components}
    found = []
    driver = _major_minor(by["driver"].note.removeprefix("supports CUDA "))
    ort = by["onnxruntime"]
    ort_cuda = _cuda_major(ort)
    needs = [
        (
            f"the CUDA runtime {by['CUDA runtime'].version}",
            _major_minor(by["CUDA runtime"].version),
        ),
        (f"{ort.note.split(',')[0]} {ort.version}", (ort_cuda, 0) if ort_cuda else None),
        ("cuda-python", _major_minor(by["cuda-python"].note.removeprefix("CUDA runtime "))),
    ]
    if driver:
        for what, need in needs:
            if need and need[0] > driver[0]:
                found.append(
                    f"the driver supports CUDA {driver[0]}.{driver[1]}, {what} needs CUDA "
                    f"{need[0]}.x: a newer driver is needed (CUDA 12: r525+, CUDA 13: r580+)"
                )
    cudart = _major_minor(by["CUDA runtime"].version)
    if ort_cuda and cudart and cudart[0] != ort_cuda:
        found.append(
            f"onnxruntime-gpu {ort.version} is built for CUDA {ort_cuda}, the CUDA runtime "
            f"found is {by['CUDA runtime'].version}: pip install 'convforge[gpu]' brings CUDA "
            f"{ort_cuda}'s"
        )
    ort_version = _major_minor(ort.version)
    cudnn = _major_minor(by["cuDNN"].version)
    if ort_cuda and ort_version and ort_version >= (1, 19) and cudnn and cudnn[0] != 9:
        found.append(f"onnxruntime-gpu {ort.version} needs cuDNN 9, found {by['cuDNN'].version}")
    trt = _major_minor(by["TensorRT"].version)
    low, high = ORT_NVINFER_10
    if (
        trt
        and trt[0] != 10
        and "TensorRT" in ort.note
        and ort_version
        and low <= ort_version <= high
    ):
        found.append(
            f"onnxruntime-gpu {ort.version}'s TensorRT provider loads libnvinfer.so.10 "
            f"(TensorRT 10), TensorRT {by['TensorRT'].version} is installed: ort-trt fails"
        )
    return found


# -- helpers -----------------------------------------------------------------------------


def _load(names: tuple[str, ...], pip_dirs: tuple[str, ...]):
    """(library, where it was loaded from) for the first of ``names`` that loads: from the
    pip packages' folders in site-packages first (as onnxruntime.preload_dlls does), then
    by name from the loader's search path; (None, why) when none loads."""
    for name in names:
        for folder in _site_folders():
            for sub in pip_dirs:
                path = folder / sub / name
                if path.is_file():
                    try:
                        return _cdll(str(path)), str(path)
                    except OSError:
                        continue
        try:
            return _cdll(name), name
        except OSError:
            continue
    return None, f"{' / '.join(names)} not found (site-packages or the loader's path)"


def _site_folders() -> list[Path]:
    folders = []
    for entry in sys.path:
        if entry and entry.endswith(("site-packages", "dist-packages")):
            folder = Path(entry)
            if folder.is_dir():
                folders.append(folder)
    return folders


def _int_out(function) -> int | None:
    """The int a ``CUresult f(int *)``-style call writes, or None when it fails."""
    value = ctypes.c_int(0)
    if function(ctypes.byref(value)) != 0:
        return None
    return int(value.value)


def _distributions(prefix: str) -> dict[str, str]:
    """Installed distributions named ``prefix`` or ``prefix-*`` -> version."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name == prefix or name.startswith(prefix + "-"):
            found[name] = dist.version
    return found


def _cuda_major(ort: Component) -> int | None:
    match = re.search(r"built for CUDA (\d+)", ort.note)
    return int(match.group(1)) if match else None


def _cuda(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def _major_minor(text: str | None) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def _short(path: str) -> str:
    """A library path with everything up to site-packages/ left out."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return marker + path.split(marker, 1)[1]
    return path


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 120 else line[:117] + "..."
