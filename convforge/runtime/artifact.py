"""What a served model needs to know, read from the exported file itself.

An exported ``.onnx`` carries its preprocessing in ``convforge.*``
metadata_props (DESIGN.md); the ``.pt2`` program beside it carries the same
dict as the extra file ``convforge.json``. :func:`read_info` returns it for
either, so the runtime needs nothing but the file. This module imports onnx
only (no torch).
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from convforge.errors import UserError
from convforge.runtime.backends.base import InputSpec

PREFIX = "convforge."
PT2_METADATA = "convforge.json"


@dataclass(frozen=True)
class ModelInfo:
    path: str
    spec: InputSpec  # input channels, height, width
    classes: list[str]  # logit index -> name ("0".."K-1" when the file has none)
    mean: list[float]  # per channel, for pixels scaled to [0, 1]
    std: list[float]
    resize_size: int  # resize the shorter side to this, then center-crop spec.height
    precision: str  # fp32, fp16 or int8
    arch: str
    metadata: dict  # every convforge.* entry, JSON-decoded, without the prefix


def _decode(raw: dict[str, str]) -> dict:
    out = {}
    for key, value in raw.items():
        if not key.startswith(PREFIX):
            continue
        try:
            out[key[len(PREFIX) :]] = json.loads(value)
        except json.JSONDecodeError:
            out[key[len(PREFIX) :]] = value
    return out


def read_info(path: str | os.PathLike) -> ModelInfo:
    """The model's input spec and preprocessing; UserError for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    if path.suffix == ".pt2":
        meta = _pt2_metadata(path)
        spec = None
    else:
        meta, spec = _onnx_metadata(path)
    c = meta.get("channels", spec.channels if spec else None)
    size = meta.get("input_size", spec.height if spec else None)
    if c is None or size is None:
        raise UserError(
            f"{path} has no convforge metadata (channels, input_size); "
            "export it with `convforge export`"
        )
    if spec is None:
        spec = InputSpec(int(c), int(size), int(size))
    n_classes = len(meta["classes"]) if "classes" in meta else None
    return ModelInfo(
        path=str(path),
        spec=spec,
        classes=list(meta.get("classes") or [str(i) for i in range(n_classes or 0)]),
        mean=list(meta.get("mean", [0.0] * spec.channels)),
        std=list(meta.get("std", [1.0] * spec.channels)),
        resize_size=int(meta.get("resize_size", spec.height)),
        precision=str(meta.get("precision", "fp32")),
        arch=str(meta.get("arch", "unknown")),
        metadata=meta,
    )


def _onnx_metadata(path: Path) -> tuple[dict, InputSpec]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(f"{path} is not a readable ONNX model: {str(e).splitlines()[0]}") from None
    inputs = [i for i in model.graph.input if i.name == "input"] or list(model.graph.input)
    if not inputs:
        raise UserError(f"{path} is not a readable ONNX model: it has no inputs")
    dims = [d.dim_value if d.dim_value > 0 else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or None in dims[1:]:
        raise UserError(f"{path}: input must be [N, C, H, W] with fixed C, H, W; got {dims}")
    meta = _decode({p.key: p.value for p in model.metadata_props})
    return meta, InputSpec(dims[1], dims[2], dims[3])


def _pt2_metadata(path: Path) -> dict:
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/" + PT2_METADATA)), None)
            if name is None:
                raise UserError(f"{path} has no {PT2_METADATA}: export it with `convforge export`")
            raw = json.loads(archive.read(name))
    except zipfile.BadZipFile:
        raise UserError(f"{path} is not a torch.export program (.pt2)") from None
    return _decode(raw)
