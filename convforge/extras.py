"""Which optional library comes with which extra, and what to say when one is missing.

``pip install convforge`` is the runtime only (numpy, Pillow, onnx, tqdm);
each heavier library arrives with an extra (docs/install.md).
A command that needs a library that is not installed stops with one line
naming the library and the extra, e.g. ``convforge train needs PyTorch:
pip install 'convforge[train]'``, never an ImportError traceback.

It also spots the one broken install pip allows: two ONNX Runtime
distributions (``onnxruntime`` and ``onnxruntime-gpu``) in one environment.
Both write the same ``onnxruntime`` package, the last one installed wins,
and the CUDA and TensorRT providers can vanish.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings
from importlib import metadata

from convforge.errors import UserError

# top-level module -> (what a person calls it, the extra that installs it)
EXTRA_OF = {
    "torch": ("PyTorch", "train"),
    "torchvision": ("torchvision", "train"),
    "sklearn": ("scikit-learn", "train"),
    "matplotlib": ("matplotlib", "train"),
    "onnxscript": ("onnxscript (the ONNX exporter)", "train"),
    "onnxconverter_common": ("onnxconverter-common (fp16 conversion)", "train"),
    "yaml": ("PyYAML (pipeline recipes)", "train"),
    "torch_pruning": ("Torch-Pruning (convforge compress)", "train"),
    "onnxruntime": ("ONNX Runtime", "cpu"),
    "openvino": ("OpenVINO", "openvino"),
    "tensorrt": ("TensorRT", "tensorrt"),
    "cuda": ("cuda-bindings", "tensorrt"),
    "kserve": ("the kserve SDK", "serve"),
}
ENGINES = ("onnxruntime", "openvino", "tensorrt", "torch")  # modules that can run a model

# Distributions that each install the importable package ``onnxruntime``.
ONNXRUNTIME_BUILDS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-openvino",
    "onnxruntime-directml",
    "onnxruntime-qnn",
    "onnxruntime-rocm",
    "onnxruntime-migraphx",
    "onnxruntime-training",
    "ort-nightly",
    "ort-nightly-gpu",
)


# NVIDIA's package index: the tensorrt extra's libraries are there, not on PyPI.
NVIDIA_INDEX = "https://pypi.nvidia.com"


class InstallWarning(UserWarning):
    """The environment is installed in a way that breaks part of convforge."""


def extra_hint(extra: str) -> str:
    """How to install convforge's ``extra`` (or extras, comma-separated: ``"gpu,tensorrt"``),
    as a backend declares it (``Backend.extra``) and an error message ends with it."""
    if extra == "cpu":
        return "pip install 'convforge[cpu]' (or 'convforge[gpu]' on a CUDA machine)"
    if extra == "tensorrt":  # TensorRT's libraries are on NVIDIA's index (pyproject.toml)
        return (
            f"pip install 'convforge[tensorrt]' --extra-index-url {NVIDIA_INDEX}, "
            "or use JetPack or an NGC container, which ship TensorRT"
        )
    return f"pip install 'convforge[{extra}]'"


def install_hint(module: str) -> str:
    """The pip command that brings ``module`` (a key of :data:`EXTRA_OF`)."""
    return extra_hint(EXTRA_OF[module][1])


def require(what: str, *modules: str) -> None:
    """Import each of ``modules``; UserError ``"{what} needs X: pip install ..."`` for the
    first one that is missing (``what`` is e.g. ``"convforge train"``)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            missing = (e.name or module).split(".")[0]
            missing = missing if missing in EXTRA_OF else module
            raise UserError(missing_message(what, missing)) from None


def missing_message(what: str, module: str) -> str:
    """One line: what needs which library, and how to install it."""
    name = EXTRA_OF[module][0]
    return f"{what} needs {name}: {install_hint(module)}"


def installed(module: str) -> bool:
    """Whether ``module`` can be found, without importing it (cheap)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_engine(what: str) -> None:
    """UserError unless at least one inference engine (:data:`ENGINES`) is installed."""
    if not any(installed(m) for m in ENGINES):
        raise UserError(
            f"{what} needs an inference engine: pip install 'convforge[cpu]' "
            "(or [gpu], [openvino], [tensorrt])"
        )


def onnxruntime_builds() -> list[str]:
    """The ONNX Runtime distributions installed here, by name, from their metadata."""
    found = set()
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in ONNXRUNTIME_BUILDS:
            found.add(name)
    return sorted(found)


@functools.cache  # once per process: the warning is said once, the scan done once
def check_onnxruntime_builds() -> None:
    """Warn (:class:`InstallWarning`) when several ONNX Runtime builds are installed
    together, saying how to keep the GPU one."""
    builds = onnxruntime_builds()
    if len(builds) < 2:
        return
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in builds else builds[-1]
    warnings.warn(
        f"{' and '.join(builds)} are installed together and overwrite each other's "
        "onnxruntime package (the GPU providers may be missing); fix: "
        f"pip uninstall -y {' '.join(builds)} && pip install {keep}",
        InstallWarning,
        stacklevel=2,
    )
