"""The builder: VGG/ResNet models with the lecture's building blocks (PyTorch).

Public API::

    from convforge.builder import create_model, list_models
    model = create_model("resnet18", num_classes=10, in_channels=1, stem="small")

Importing this package registers every architecture. It imports nothing from
``convforge.export`` or ``convforge.runtime``.
"""

from convforge.builder import plain, resnet, vgg  # noqa: F401  (registers the models)
from convforge.builder.initialization import INITS
from convforge.builder.layers import ACTIVATIONS, NORMS
from convforge.builder.registry import (
    STEMS,
    ModelConfig,
    build_model,
    create_model,
    get_entry,
    list_models,
    register_model,
)

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "NORMS",
    "STEMS",
    "ModelConfig",
    "build_model",
    "create_model",
    "get_entry",
    "list_models",
    "register_model",
]
