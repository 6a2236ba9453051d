"""The ``convforge.*`` metadata_props of an exported ONNX model (DESIGN.md).

Values are strings, as ONNX requires; lists and numbers are JSON. The runtime
reads preprocessing from here, so an .onnx file alone is enough to serve:

=========================  ==================================================
key                        value
=========================  ==================================================
convforge.version          convforge version that wrote the file
convforge.arch             architecture name, e.g. "resnet18"
convforge.classes          JSON list of class names, index = logit position
convforge.mean             JSON list, per channel, for images scaled to [0, 1]
convforge.std              JSON list, per channel
convforge.input_size       JSON int: square side in px the model takes
convforge.resize_size      JSON int: resize the shorter side to this, then
                           center-crop input_size (equal: plain resize)
convforge.channels         JSON int: 1 (grayscale) or 3 (RGB)
convforge.precision        fp32, fp16 or int8
convforge.folded_bn        JSON int: BatchNorm layers folded into convs
convforge.source_sha256    sha256 of the checkpoint the model came from
=========================  ==================================================
"""

from __future__ import annotations

import hashlib
import json
import os

import onnx

from convforge import __version__

PREFIX = "convforge."
REQUIRED = ("arch", "classes", "mean", "std", "input_size", "channels", "precision")


def build(
    *,
    arch: str,
    classes: list[str],
    mean: list[float],
    std: list[float],
    input_size: int,
    resize_size: int,
    channels: int,
    folded_bn: int,
    source_sha256: str,
    precision: str = "fp32",
) -> dict[str, str]:
    """The metadata dict for one export (every value already a string)."""
    values = {
        "version": __version__,
        "arch": arch,
        "classes": classes,
        "mean": mean,
        "std": std,
        "input_size": input_size,
        "resize_size": resize_size,
        "channels": channels,
        "precision": precision,
        "folded_bn": folded_bn,
        "source_sha256": source_sha256,
    }
    return {PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def write(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Set ``meta`` on ``model`` in place, replacing keys of the same name."""
    keep = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)


def read(model: onnx.ModelProto) -> dict[str, str]:
    """All ``convforge.*`` metadata of ``model`` (raw strings)."""
    return {p.key: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}


def decoded(model: onnx.ModelProto) -> dict:
    """The convforge metadata with JSON values decoded, keys without the prefix."""
    out = {}
    for key, value in read(model).items():
        name = key[len(PREFIX) :]
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (the checkpoint an export came from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
