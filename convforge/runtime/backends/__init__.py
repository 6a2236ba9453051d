"""Backends by name, and ``auto``: the fastest one that can run this file here.

A backend is one class in one module (its facts declared on the class, see
:class:`~.base.Backend`) and one line in :data:`BACKENDS`, whose order is the
order ``auto`` tries: tensorrt > ort-trt > ort-cuda (an NVIDIA GPU: native
TensorRT engines are the fastest, ONNX Runtime's TensorRT and CUDA providers
next) > openvino > ort-cpu (on x86 CPUs OpenVINO measured about 2x faster
than ONNX Runtime fp32 on ResNet-18/50 here) > torch. It does not stop at the
first backend whose library is installed: it loads each candidate in turn and
keeps the first that loads, recording every one it skipped and why (a
provider that is listed but whose libraries are missing, an int8 file
TensorRT cannot build, ...). A backend asked for by name that cannot run is
an error naming the reason; there is never a silent fallback.

Choosing ``auto`` or a GPU backend first checks the install: onnxruntime and
onnxruntime-gpu installed together overwrite each other, and a warning says
how to fix it (:func:`convforge.extras.check_onnxruntime_builds`).
"""

from __future__ import annotations

import importlib

from convforge.errors import UserError, check_choice
from convforge.extras import check_onnxruntime_builds
from convforge.runtime.backends.base import (
    Backend,
    BackendUnavailable,
    DeviceResident,
    InputSpec,
)

# name -> (module, class), in the order auto tries them; imported on use so that unused
# backends cost nothing.
BACKENDS = {
    "tensorrt": ("convforge.runtime.backends.tensorrt", "TensorRT"),
    "ort-trt": ("convforge.runtime.backends.ort_trt", "OrtTensorRT"),
    "ort-cuda": ("convforge.runtime.backends.ort_cuda", "OrtCuda"),
    "openvino": ("convforge.runtime.backends.openvino", "OpenVino"),
    "ort-cpu": ("convforge.runtime.backends.ort", "OrtCpu"),
    "torch": ("convforge.runtime.backends.torch_program", "TorchProgram"),
}
AUTO_ORDER = tuple(BACKENDS)

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "GPU_BACKENDS",
    "Backend",
    "BackendUnavailable",
    "DeviceResident",
    "InputSpec",
    "backend_class",
    "check_onnxruntime_builds",
    "create",
    "load_backend",
]


def __getattr__(name: str):
    # GPU_BACKENDS comes from the classes' `gpu`: computed on first use, so that importing
    # this package imports no backend module.
    if name == "GPU_BACKENDS":
        return tuple(n for n in BACKENDS if backend_class(n).gpu)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name`` (UserError listing the names if unknown)."""
    module, cls = BACKENDS[check_choice("backend", name, list(BACKENDS))]
    return getattr(importlib.import_module(module), cls)


def create(name: str, path: str, overrides=None, **options) -> Backend:
    """An unloaded backend ``name`` (not ``auto``: that one is chosen by loading) that reads
    ``path`` with ``overrides`` (a :class:`~convforge.overrides.ModelOverrides`, or None)."""
    cls = backend_class(name)
    if cls.gpu:
        check_onnxruntime_builds()
    return cls(path, overrides=overrides, **options)


def load_backend(name: str, path: str, overrides=None, **options) -> tuple[Backend, list[dict]]:
    """A loaded backend for the model at ``path``, and the ``auto`` candidates it skipped.

    ``name`` is a backend name (loaded as asked, or an error) or ``auto``: each
    of :data:`AUTO_ORDER` is loaded in turn until one loads; the skipped ones
    come back as ``{"backend", "why"}`` records. A candidate is skipped only
    for :class:`BackendUnavailable` (it cannot run this file here); any other
    error, such as a missing or unreadable file, is raised at once. ``options``
    need a named backend. ``overrides``: as :func:`create` takes them.
    """
    if name != "auto":
        return create(name, path, overrides=overrides, **options).load(), []
    if options:
        raise UserError(f"backend options ({', '.join(options)}) need a named backend, not auto")
    check_onnxruntime_builds()
    skipped: list[dict] = []
    for candidate in AUTO_ORDER:
        cls = backend_class(candidate)
        ok, why = cls.available()
        if ok and not cls.runs(path):
            ok, why = False, f"runs {' and '.join(cls.suffixes)} files"
        if not ok:
            skipped.append({"backend": candidate, "why": why})
            continue
        try:
            return cls(path, overrides=overrides).load(), skipped
        except BackendUnavailable as e:
            skipped.append({"backend": candidate, "why": str(e)})
    reasons = "; ".join(f"{s['backend']}: {s['why']}" for s in skipped)
    raise BackendUnavailable(f"no backend can run {path} here: {reasons}")
