"""What every ONNX Runtime backend shares (``ort-cpu``, ``ort-cuda``, ``ort-trt``): whether
onnxruntime imports, and creating a session that holds the providers it was asked for.

onnxruntime is imported inside functions only, so ``convforge.runtime`` imports without it.
"""

from __future__ import annotations

from convforge.errors import UserError, first_line
from convforge.extras import install_hint
from convforge.runtime.backends.base import Backend, BackendUnavailable

__all__ = ["create_session", "ort_importable"]


def ort_importable() -> tuple[bool, str]:
    """(True, "") when onnxruntime imports, else (False, why, with the pip command)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False, f"onnxruntime is not installed: {install_hint('onnxruntime')}"
    return True, ""


def create_session(backend: Backend, sess_options, providers, required: str | None):
    """The InferenceSession for ``backend.path``; BackendUnavailable if ``required`` (a
    provider name) did not make it in, UserError if the file does not load or lacks the
    input ``backend.info`` names (None after ``load_graph``: any graph)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(backend.path, sess_options=sess_options, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidArgument/RuntimeException types
        first = first_line(e)
        if required is not None:
            raise BackendUnavailable(f"{backend.name}: could not create a session: {first}") from e
        raise UserError(f"{backend.name}: onnxruntime cannot load {backend.path}: {first}") from e
    if required is not None and required not in session.get_providers():
        raise BackendUnavailable(
            f"backend {backend.name!r} is not available: {required} did not load "
            f"(session providers: {', '.join(session.get_providers())}); "
            "check the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs"
        )
    names = [i.name for i in session.get_inputs()]
    if backend.info is None:  # load_graph: any graph
        return session
    if backend.info.input_name not in names:  # read_info and ORT disagree: say so, in one line
        raise UserError(
            f"{backend.path}: expected an input named {backend.info.input_name!r}, got {names}"
        )
    return session
