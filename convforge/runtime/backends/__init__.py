"""Backends by name, and ``auto``: the fastest one that can run here.

Names (CLI and JSON): ort-cpu, ort-cuda, ort-trt, tensorrt, openvino, torch.
``auto`` tries, in order, tensorrt > ort-trt > ort-cuda (an NVIDIA GPU: native
TensorRT engines are the fastest, ONNX Runtime's TensorRT and CUDA providers
next) > openvino > ort-cpu (on x86 CPUs OpenVINO measured about 2x faster
than ONNX Runtime fp32 on ResNet-18/50 here) > torch, and takes the first
whose ``available()`` is true. A backend asked for by name that cannot run
is an error naming the reason; there is never a silent fallback.

Choosing ``auto`` or a GPU backend first checks the install: onnxruntime and
onnxruntime-gpu installed together overwrite each other, and a warning says
how to fix it (:func:`convforge.extras.check_onnxruntime_builds`).
"""

from __future__ import annotations

import importlib

from convforge.errors import check_choice
from convforge.extras import check_onnxruntime_builds
from convforge.runtime.backends.base import Backend, BackendUnavailable, InputSpec

# name -> (module, class); imported on use so that unused backends cost nothing.
BACKENDS = {
    "ort-cpu": ("convforge.runtime.backends.ort", "OrtCpu"),
    "ort-cuda": ("convforge.runtime.backends.ort", "OrtCuda"),
    "ort-trt": ("convforge.runtime.backends.ort", "OrtTensorRT"),
    "tensorrt": ("convforge.runtime.backends.tensorrt", "TensorRT"),
    "openvino": ("convforge.runtime.backends.openvino", "OpenVino"),
    "torch": ("convforge.runtime.backends.torch_program", "TorchProgram"),
}
AUTO_ORDER = ("tensorrt", "ort-trt", "ort-cuda", "openvino", "ort-cpu", "torch")
GPU_BACKENDS = ("tensorrt", "ort-trt", "ort-cuda")

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "Backend",
    "BackendUnavailable",
    "InputSpec",
    "GPU_BACKENDS",
    "backend_class",
    "check_onnxruntime_builds",
    "create",
    "resolve",
]


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name`` (UserError listing the names if unknown)."""
    module, cls = BACKENDS[check_choice("backend", name, list(BACKENDS))]
    return getattr(importlib.import_module(module), cls)


def resolve(name: str) -> str:
    """``name`` itself, or for ``auto`` the first available backend of :data:`AUTO_ORDER`."""
    if name == "auto" or name in GPU_BACKENDS:
        check_onnxruntime_builds()
    if name != "auto":
        backend_class(name)
        return name
    reasons = []
    for candidate in AUTO_ORDER:
        ok, why = backend_class(candidate).available()
        if ok:
            return candidate
        reasons.append(f"{candidate}: {why}")
    raise BackendUnavailable("no backend can run here: " + "; ".join(reasons))


def create(name: str, path: str, **options) -> Backend:
    """An unloaded backend ``name`` (or ``auto``) for the model at ``path``."""
    return backend_class(resolve(name))(path, **options)
