"""The file contract between export and runtime: names, metadata keys, their encoding.

An exported ``.onnx`` takes images through the graph input :data:`INPUT_NAME`
(float32 [N, C, H, W], N dynamic and named :data:`BATCH_DIM`; or, for a raw-pixel
variant, uint8 [N, H, W, C]: see :data:`INPUT_FORMATS`) and gives class scores
through the output :data:`OUTPUT_NAME` (float32 [N, K]). What the
runtime needs to serve it (preprocessing, class names, precision) rides in the
file's ``metadata_props`` under the keys of :data:`KEYS`, each prefixed with
:data:`PREFIX`. ONNX stores strings only: every value is stored as JSON, strings
too (:func:`decode` reads older files too). The ``.pt2`` program written beside
the ONNX carries the same mapping, as JSON, in its extra file :data:`PT2_METADATA`.

Export writes through :func:`metadata` and :func:`write_props`; the runtime
reads through :func:`read_info`; export reads its own files back through
:func:`read_info` too, so both sides agree by construction. This module
imports onnx and the standard library only (no torch, no onnxruntime).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from convforge import __version__
from convforge.errors import UserError, first_line

INPUT_NAME = "input"  # graph input: preprocessed images
OUTPUT_NAME = "logits"  # graph output: one score per class
BATCH_DIM = "batch"  # dim_param of the dynamic batch dimension
PREFIX = "convforge."  # of every metadata_props key convforge writes
PT2_METADATA = "convforge.json"  # extra file of the .pt2 archive holding the metadata
_QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul")

# The value of the ``input_format`` key -> (numpy dtype name, layout) of the graph input.
# float32: preprocessed, normalized images (the default; a file without the key is one).
# uint8: raw pixels 0-255 as decoders hand them out, height x width x channels, so a client
# sends the decoded buffer as is; the graph does the /255, mean and std itself
# (convforge.export.input_format).
INPUT_FORMATS = {"float32": ("float32", "NCHW"), "uint8": ("uint8", "NHWC")}
# Graph input element types a runtime can feed: TensorProto number -> numpy dtype name.
INPUT_DTYPES = {1: "float32", 10: "float16", 2: "uint8"}
# Preprocessing for a file made elsewhere (no convforge metadata): torchvision's ImageNet
# evaluation transform (resize the shorter side to input / 0.875, centre-crop, normalize).
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CROP_FRACTION = 0.875

# key (without PREFIX) -> what its value means. Every value is stored as JSON (see encode).
KEYS = {
    "version": "convforge version that wrote the file",
    "arch": 'architecture name, e.g. "resnet18"',
    "classes": "list of class names, index = logit position",
    "mean": "per-channel mean, for pixels scaled to [0, 1]",
    "std": "per-channel std",
    "input_size": "square side in px the model takes",
    "resize_size": "resize the shorter side to this, then center-crop input_size "
    "(equal to input_size: plain resize)",
    "channels": "1 (grayscale) or 3 (RGB)",
    "precision": "fp32, fp16 or int8",
    "int8_target": "int8 only: cpu (uint8 asymmetric activations) or tensorrt (symmetric int8)",
    "calibration": 'int8 only: {"method": ..., "samples": ...}',
    "folded_bn": "BatchNorm layers folded into convolutions",
    "source_sha256": "sha256 of the checkpoint the model came from",
    "dataset": '{"spec": ..., "val_fraction": ..., "seed": ...}: the dataset the model was '
    "trained on and how its validation split was drawn (what tune checks accuracy on)",
    "input_format": "float32 (normalized [N, C, H, W], the default when absent) or uint8 "
    "(pixels 0-255 [N, H, W, C]; /255, mean and std inside the graph)",
    "layout": "NCHW or NHWC: the input's layout, for a file made elsewhere "
    "(`convforge annotate`); wins over the one input_format implies",
    "output": "the graph output holding the class scores, for a file made elsewhere with "
    "several outputs (`convforge annotate --output`)",
    "compressed": "a model `convforge compress` made: {source_sha256, speedup (the original's "
    "MACs / its), macs, params, top1 (in [0, 1]), original: {macs, params, top1}}",
}
LAYOUTS = ("NCHW", "NHWC")
# Keys whose value is text, even where an old file stored "191" as-is (see decode).
TEXT_KEYS = "version arch precision int8_target source_sha256 input_format layout output".split()
# The ``compressed`` key's entries from a compress record (and its original's macs, params, top1).
COMPRESSED_FIELDS = ("source_sha256", "speedup", "macs", "params", "top1")


def encode(values: Mapping[str, object]) -> dict[str, str]:
    """``{"arch": "x"}`` -> ``{"convforge.arch": '"x"'}``: every value as JSON, strings too.
    Raises ValueError for a key outside :data:`KEYS` (a bug in the writer, not a user
    mistake: the contract has no room for ad-hoc keys)."""
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ValueError(f"not keys of the convforge file contract: {unknown}")
    return {PREFIX + k: json.dumps(v) for k, v in values.items()}


def decode(props: Mapping[str, str]) -> dict:
    """The ``convforge.*`` entries of ``props``, prefix removed, JSON values decoded. A file
    from before :func:`encode` made every value JSON reads as before: a value that is not JSON
    is that string, and so is a :data:`TEXT_KEYS` value that parses as no string ("191")."""
    out = {}
    ours = {key[len(PREFIX) :]: raw for key, raw in props.items() if key.startswith(PREFIX)}
    for name, raw in ours.items():
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[name] = raw if name in TEXT_KEYS and not isinstance(value, str) else value
    return out


def metadata(
    *,
    arch: str,
    classes: list[str],
    mean: list[float],
    std: list[float],
    input_size: int,
    resize_size: int,
    channels: int,
    source_sha256: str,
    folded_bn: int = 0,
    precision: str = "fp32",
    dataset: dict | None = None,
    compressed: dict | None = None,  # a compressed model's checkpoint's compress record
) -> dict[str, str]:
    """The encoded metadata of one fp32 export (variants update ``precision`` and add keys)."""
    values = {
        "version": __version__,
        "arch": arch,
        "classes": list(classes),
        "mean": list(mean),
        "std": list(std),
        "input_size": input_size,
        "resize_size": resize_size,
        "channels": channels,
        "precision": precision,
        "folded_bn": folded_bn,
        "source_sha256": source_sha256,
    }
    if dataset:
        values["dataset"] = dict(dataset)
    if compressed:
        values["compressed"] = {
            **{k: compressed[k] for k in COMPRESSED_FIELDS},
            "original": {k: compressed["original"][k] for k in ("macs", "params", "top1")},
        }
    return encode(values)


def pixel_normalization(mean, std):
    """float32 ``(scale, bias)`` per channel with ``p * scale + bias = (p / 255 - mean) / std``.

    How a uint8-input file's pixels ``p`` become its float model's input: the
    graph of such a file multiplies and adds by exactly these (computed in
    float64, rounded to float32), and a runtime feeding pixels to the float
    model does the same.
    """
    import numpy as np

    mean64, std64 = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return (1 / (255 * std64)).astype(np.float32), (-mean64 / std64).astype(np.float32)


def graph_precision(model) -> str:
    """fp32, fp16, bf16 or int8, read from an ``onnx.ModelProto``'s graph, not its metadata.

    Quantize/Dequantize (or QLinear) nodes mean int8; 16-bit float weights mean
    fp16 or bf16. What a file made elsewhere declares about itself, in effect.
    """
    if any(n.op_type in _QUANTIZED_OPS for n in model.graph.node):
        return "int8"
    types = {t.data_type for t in model.graph.initializer}
    for onnx_type, name in ((10, "fp16"), (16, "bf16")):  # TensorProto.FLOAT16, BFLOAT16
        if onnx_type in types:
            return name
    return "fp32"


def int8_symmetric(model) -> bool | None:
    """Whether every Q/DQ node of an ``onnx.ModelProto`` quantizes symmetrically to int8.

    True when each zero point is an int8 initializer of zeros (what TensorRT
    accepts), False when any is uint8 or non-zero (ONNX Runtime's CPU-friendly
    asymmetric scheme, or a missing zero point, which means uint8), None when
    a zero point is computed in the graph and cannot be read.
    """
    import numpy as np
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not nodes:
        return None
    for node in nodes:
        if len(node.input) < 3 or not node.input[2]:
            return False  # no zero point: uint8
        zero = inits.get(node.input[2])
        if zero is None:
            return None
        if zero.data_type != TensorProto.INT8 or np.any(numpy_helper.to_array(zero)):
            return False
    return True


def read_props(model) -> dict[str, str]:
    """Every ``metadata_props`` entry of an ``onnx.ModelProto``, in order (raw strings)."""
    return {p.key: p.value for p in model.metadata_props}


def write_props(model, props: Mapping[str, str], replace_all: bool = False) -> None:
    """Set ``props`` on an ``onnx.ModelProto`` in place.

    Keys already there keep their position and take the new value; new keys
    are appended. ``replace_all`` drops every entry not in ``props`` first.
    """
    merged = {} if replace_all else read_props(model)
    merged.update(props)
    del model.metadata_props[:]
    for key, value in merged.items():
        model.metadata_props.add(key=key, value=value)


_WARNED: set[str] = set()  # files whose defaults were already said


class DefaultsWarning(UserWarning):
    """A file made elsewhere runs with default preprocessing (ImageNet mean/std, resize and
    centre crop, index labels): said whenever the defaults are used."""


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: ``dtype`` batches in ``layout``, N dynamic.

    float32 NCHW (normalized images) unless the file's ``input_format`` is
    uint8, which is NHWC pixels (see :data:`INPUT_FORMATS`).
    """

    channels: int
    height: int
    width: int
    dtype: str = "float32"  # numpy dtype name of the graph input
    layout: str = "NCHW"  # NCHW or NHWC
    batch: int | None = None  # the graph's fixed batch size; None: any

    def takes(self, n: int) -> bool:
        """Whether a batch of ``n`` fits the graph's batch dimension."""
        return self.batch is None or n == self.batch

    def shape(self, n: int) -> tuple[int, int, int, int]:
        """The input shape of a batch of ``n`` in this spec's layout."""
        return (n, *self.sample_shape)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """One image: (C, H, W) for NCHW, (H, W, C) for NHWC."""
        c, h, w = self.channels, self.height, self.width
        return (h, w, c) if self.layout == "NHWC" else (c, h, w)


@dataclass(frozen=True)
class ModelInfo:
    """What serving an exported file needs to know, read from the file itself."""

    path: str
    spec: InputSpec  # input channels, height, width
    classes: list[str]  # logit index -> name ("0".."K-1" when the file has none)
    mean: list[float]  # per channel, for pixels scaled to [0, 1]
    std: list[float]
    resize_size: int  # resize the shorter side to this, then center-crop spec.height
    precision: str  # fp32, fp16 or int8
    arch: str
    metadata: dict  # every convforge.* entry, decoded, without the prefix (and precision)
    int8_symmetric: bool | None = None  # int8 files: see int8_symmetric(); else None
    input_name: str = INPUT_NAME  # the graph's image input
    output_name: str = OUTPUT_NAME  # the graph output read as class scores
    defaults: tuple[str, ...] = ()  # what a file made elsewhere left to defaults (see below)

    @property
    def defaults_note(self) -> str | None:
        """One line naming the preprocessing defaults in use, or None (a convforge export)."""
        if not self.defaults:
            return None
        return (
            f"{Path(self.path).name} has no convforge metadata; using "
            + ", ".join(self.defaults)
            + "; if the model was trained with others, its predictions will be off"
        )

    @property
    def int8_target(self) -> str | None:
        """cpu or tensorrt for an int8 export, else None."""
        return self.metadata.get("int8_target")

    @property
    def compressed(self) -> dict | None:
        """The ``compressed`` key of a model `convforge compress` made (a dict), else None."""
        return value if isinstance(value := self.metadata.get("compressed"), dict) else None

    @property
    def input_format(self) -> str:
        """float32 or uint8: what the graph input takes (see :data:`INPUT_FORMATS`)."""
        return "uint8" if self.spec.dtype == "uint8" else "float32"


def read_info(path: str | os.PathLike, overrides=None) -> ModelInfo:
    """The model's input spec and preprocessing; UserError for a missing or foreign file.

    Takes an ``.onnx`` (metadata_props, input shape from the graph) or a ``.pt2``
    (the :data:`PT2_METADATA` extra file, which must then hold channels and
    input_size). ``overrides`` (a :class:`convforge.overrides.ModelOverrides`: ``--mean``,
    ``--labels``, ...) win over an ``.onnx`` file's own metadata, checked here.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    symmetric, names = None, (INPUT_NAME, OUTPUT_NAME)
    if path.suffix == ".pt2":
        meta, spec = _pt2_metadata(path), None
    else:
        meta, spec, symmetric, names = _onnx_metadata(path, overrides)
    c = meta.get("channels", spec.channels if spec else None)
    size = meta.get("input_size", spec.height if spec else None)
    if c is None or size is None:
        raise UserError(
            f"{path} has no convforge metadata (channels, input_size); "
            "export it with `convforge export`"
        )
    if spec is None:
        spec = InputSpec(int(c), int(size), int(size))
    n_classes = len(meta["classes"]) if "classes" in meta else 0
    mean, std, resize, defaults = _preprocessing(meta, spec)
    info = ModelInfo(
        path=str(path),
        spec=spec,
        classes=list(meta.get("classes") or [str(i) for i in range(n_classes)]),
        mean=mean,
        std=std,
        resize_size=resize,
        precision=str(meta.get("precision", "fp32")),
        arch=str(meta.get("arch", "unknown")),
        metadata=meta,
        int8_symmetric=symmetric,
        input_name=names[0],
        output_name=names[1],
        defaults=defaults,
    )
    if info.defaults_note and str(path) not in _WARNED:  # once per file and process
        _WARNED.add(str(path))
        warnings.warn(DefaultsWarning(info.defaults_note), stacklevel=2)
    return info


def _preprocessing(meta: dict, spec: InputSpec) -> tuple[list, list, int, tuple[str, ...]]:
    """mean, std and resize size from the metadata (or the overrides given for it), else
    the defaults for a file made elsewhere (ImageNet statistics, torchvision's resize + centre
    crop), and which were defaulted. A uint8-input graph normalizes inside, so its mean and
    std are never defaulted. UserError for a mean/std of the wrong length or a resize below
    the input size."""
    own = "input_size" in meta or "channels" in meta  # a convforge export (or annotated)
    defaults = []
    c = spec.channels
    plain = own or spec.dtype == "uint8"  # no normalization default applies
    stats = {}
    for name, imagenet, neutral in (("mean", IMAGENET_MEAN, 0.0), ("std", IMAGENET_STD, 1.0)):
        if name in meta or plain:
            stats[name] = list(meta.get(name, [neutral] * c))
        else:
            stats[name] = list(imagenet) if c == 3 else [0.5] * c
            defaults.append(f"{'ImageNet ' if c == 3 else ''}{name} {stats[name]}")
    mean, std = stats["mean"], stats["std"]
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != c:
            raise UserError(f"--{name} takes {c} value(s) for this {c}-channel model, got "
                            f"{len(values)}")  # fmt: skip
    if any(v <= 0 for v in std):
        raise UserError(f"--std must be positive, got {std}")
    if "resize_size" in meta or own:
        resize = int(meta.get("resize_size", spec.height))
    else:
        resize = round(spec.height / CROP_FRACTION) if spec.height == spec.width else spec.height
        defaults.append(f"resize {resize} + centre crop {spec.height}")
    if resize < spec.height:
        raise UserError(f"--resize {resize} is below the input size {spec.height}")
    if not own and "classes" not in meta:
        defaults.append("class indices as labels")
    return mean, std, resize, tuple(defaults)


def load_onnx(path: str | os.PathLike, weights: bool = True):
    """Parse an ONNX file; UserError when it is missing, truncated or not ONNX."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=weights)
    except Exception as e:  # protobuf raises DecodeError; onnx wraps others
        raise UserError(f"{path} is not a readable ONNX model: {first_line(e)}") from None
    if not model.graph.node:
        raise UserError(f"{path} is not a readable ONNX model: the graph has no nodes")
    return model


def _onnx_metadata(
    path: Path, overrides=None
) -> tuple[dict, InputSpec, bool | None, tuple[str, str]]:
    """metadata, input spec, int8 symmetry and (input name, output name) of an ONNX file.

    The input is the graph input named :data:`INPUT_NAME`, else the graph's one
    input (initializers listed as inputs do not count); the output is the one
    named :data:`OUTPUT_NAME`, else the first. A file without ``input_format``
    metadata gets its layout from the shape: NHWC when the last axis holds 1 or
    3 channels and the second does not, else NCHW.
    """
    model = load_onnx(path, weights=False)
    weights = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if not inputs:
        raise UserError(f"{path} is not a readable ONNX model: it has no inputs")
    named = [i for i in inputs if i.name == INPUT_NAME]
    if not named and len(inputs) > 1:
        listed = ", ".join(i.name for i in inputs)
        raise UserError(f"{path} has {len(inputs)} inputs ({listed}); an image classifier has one")
    graph_input = (named or inputs)[0]
    tensor = graph_input.type.tensor_type
    outputs = [o.name for o in model.graph.output]
    meta = {**decode(read_props(model)), **(overrides.metadata() if overrides else {})}
    output = meta.get("output") or (OUTPUT_NAME if OUTPUT_NAME in outputs else outputs[0])
    if output not in outputs:
        raise UserError(
            f"{path} has no output {output!r} (asked by --output or its metadata); its "
            f"outputs: {', '.join(outputs)}"
        )
    dims = [d.dim_value if d.dim_value > 0 else None for d in tensor.shape.dim]
    dtype = INPUT_DTYPES.get(tensor.elem_type)
    if dtype is None:
        raise UserError(
            f"{path}: its input {graph_input.name!r} has element type {tensor.elem_type} "
            f"(onnx.TensorProto); accepted: {', '.join(INPUT_DTYPES.values())}"
        )
    layout = _layout(path, meta, dtype, dims)
    if len(dims) != 4 or None in dims[1:]:
        axes = ", ".join(layout[1:])  # "C, H, W" or "H, W, C"
        raise UserError(f"{path}: input must be [N, {axes}] with fixed {axes}; got {dims}")
    meta.setdefault("precision", graph_precision(model))
    symmetric = int8_symmetric(model) if meta["precision"] == "int8" else None
    c, h, w = (dims[3], dims[1], dims[2]) if layout == "NHWC" else dims[1:]
    spec = InputSpec(c, h, w, dtype, layout, dims[0])
    return meta, spec, symmetric, (graph_input.name, output)


def _layout(path: Path, meta: dict, dtype: str, dims: list) -> str:
    """The input's layout: the file's ``layout`` metadata, else the one its input_format
    implies (checked against the graph's type), else the one its shape suggests."""
    fmt = meta.get("input_format")
    if fmt is not None:
        if fmt not in INPUT_FORMATS:
            raise UserError(
                f"{path}: unknown input_format {fmt!r}; accepted: {', '.join(INPUT_FORMATS)}"
            )
        if (dtype == "uint8") != (fmt == "uint8"):
            raise UserError(
                f"{path}: its metadata says input_format {fmt}, but the graph input is "
                f"{'uint8' if dtype == 'uint8' else 'not uint8'}"
            )
    layout = meta.get("layout")
    if layout is not None:
        if layout not in LAYOUTS:
            raise UserError(f"{path}: unknown layout {layout!r}; accepted: {', '.join(LAYOUTS)}")
        return layout
    if fmt is not None:
        return INPUT_FORMATS[fmt][1]
    if len(dims) == 4 and dims[3] in (1, 3) and dims[1] not in (1, 3):
        return "NHWC"
    return "NCHW"


def _pt2_metadata(path: Path) -> dict:
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/" + PT2_METADATA)), None)
            if name is None:
                raise UserError(f"{path} has no {PT2_METADATA}: export it with `convforge export`")
            raw = json.loads(archive.read(name))
    except zipfile.BadZipFile:
        raise UserError(f"{path} is not a torch.export program (.pt2)") from None
    return decode(raw)


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (a checkpoint's identity; a model's cache key)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
