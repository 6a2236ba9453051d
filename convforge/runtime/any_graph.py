"""Latency of ONNX graphs that are not image classifiers: detection, segmentation, several
inputs (what trtexec and benchmark_app measure).

    inputs = graph_inputs("yolo.onnx")                   # name, type, dims (None: dynamic)
    feeds = random_feeds(inputs, parse_shapes("images:1x3x640x640"), rng)
    backend.load_graph(); backend.run_feeds(feeds)       # ort-cpu and openvino

Each input gets random values of its declared type and shape: standard
normal floats, pixels 0-255 for uint8, 0 or 1 for other integers and bools
(valid indices and masks for most graphs). A dynamic dimension must be set
with ``--shapes NAME:DxDxD,...`` (trtexec's syntax); a fixed one may be
restated but not changed. Nothing here knows what the outputs mean, so no
accuracy is measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convforge import contract
from convforge.errors import UserError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    dims: tuple[int | str | None, ...]  # a fixed size, a symbolic name, or None (unnamed)

    def shape(self, given: tuple[int, ...] | None, path) -> tuple[int, ...]:
        """The shape to feed: ``given`` (checked against the fixed dims) or the declared one;
        UserError naming a dynamic dimension nobody set."""
        if given is not None:
            if len(given) != len(self.dims):
                raise UserError(f"--shapes {self.name}: {len(given)} dims given, the input "
                                f"has {len(self.dims)} ({_dims(self.dims)})")  # fmt: skip
            for got, want in zip(given, self.dims, strict=True):
                if isinstance(want, int) and got != want:
                    raise UserError(f"--shapes {self.name}: {_dims(given)} does not fit its "
                                    f"fixed dims {_dims(self.dims)}")  # fmt: skip
            return tuple(given)
        dynamic = [i for i, d in enumerate(self.dims) if not isinstance(d, int)]
        if dynamic:
            example = "x".join(str(d) if isinstance(d, int) else "N" for d in self.dims)
            raise UserError(
                f"{path}: input {self.name!r} has dynamic dims ({_dims(self.dims)}); set them "
                f"with --shapes {self.name}:{example}"
            )
        return tuple(self.dims)


def graph_inputs(path) -> list[TensorSpec]:
    """The inputs a caller feeds (initializers listed as inputs left out)."""
    from onnx import helper

    model = contract.load_onnx(path, weights=False)
    weights = {t.name for t in model.graph.initializer}
    out = []
    for value in model.graph.input:
        if value.name in weights:
            continue
        t = value.type.tensor_type
        try:
            dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name
        except (KeyError, ValueError):
            raise UserError(f"{path}: input {value.name!r} is not a tensor convforge can "
                            "fill with random values") from None  # fmt: skip
        dims = tuple(d.dim_value if d.dim_value > 0 else (d.dim_param or None) for d in t.shape.dim)
        out.append(TensorSpec(value.name, dtype, dims))
    return out


def parse_shapes(text: str | None) -> dict[str, tuple[int, ...]]:
    """``"a:1x3x640x640,b:1x10"`` -> ``{"a": (1, 3, 640, 640), "b": (1, 10)}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, dims = item.strip().rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or min(shape) < 1:
            raise UserError(
                f"--shapes takes NAME:DxDx...,... with positive sizes (trtexec's syntax, "
                f"e.g. images:1x3x640x640), got {item.strip()!r}"
            )
        shapes[name] = shape
    return shapes


def random_feeds(inputs: list[TensorSpec], shapes: dict, rng, path="the model") -> dict:
    """One random array per input (module docstring); UserError for a --shapes name the
    graph does not have."""
    unknown = sorted(set(shapes) - {i.name for i in inputs})
    if unknown:
        names = ", ".join(i.name for i in inputs)
        raise UserError(f"--shapes names {', '.join(unknown)}, not inputs of {path} ({names})")
    feeds = {}
    for spec in inputs:
        shape = spec.shape(shapes.get(spec.name), path)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.uint8:
            feeds[spec.name] = rng.integers(0, 256, shape, dtype=np.uint8)
        else:  # other integers and bools: 0 or 1
            feeds[spec.name] = rng.integers(0, 2, shape).astype(dtype)
    return feeds


def _dims(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)
