"""The runtime: run exported models through ONNX Runtime, TensorRT, OpenVINO or PyTorch.

Public API::

    from convforge.runtime import load
    model = load("model.onnx", backend="auto")      # or ort-cpu, openvino, torch, ...
    model.predict(["image.jpg"], topk=5)

Imports nothing from ``convforge.builder`` or ``convforge.export`` and needs
only numpy, Pillow and onnx: each backend imports its own library when it is
used, so this package imports on a machine without torch.
"""

from convforge.runtime.backends import AUTO_ORDER, BACKENDS, BackendUnavailable
from convforge.runtime.model import Model, Prediction, load, load_plan

__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BackendUnavailable",
    "Model",
    "Prediction",
    "load",
    "load_plan",
]
