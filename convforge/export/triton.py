"""A Triton Inference Server model repository entry for an exported ONNX model.

:func:`write_triton_repo` lays out one model the way Triton's ONNX Runtime
backend expects it::

    <repo_dir>/<name>/config.pbtxt     platform "onnxruntime_onnx", batching, I/O
    <repo_dir>/<name>/1/model.onnx     a byte-for-byte copy of the exported model
    <repo_dir>/<name>/labels.txt       class names, one per line (label_filename)

Input and output names, data types and shapes come from the ONNX graph
itself, never from assumptions about convforge's own names, so a config cannot
drift from the model it describes. Triton's ``dims`` leave out the batch
dimension when ``max_batch_size`` > 0, which is why the graph's first
dimension must be dynamic. The config text is written by hand (Triton's
protobuf ships with tritonclient, which convforge does not need at run time);
the tests parse it with that protobuf.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import onnx

from convforge.errors import UserError, check_choice
from convforge.files import Staging, together

PLATFORM = "onnxruntime_onnx"
KINDS = ("KIND_CPU", "KIND_GPU")
VERSION = "1"  # the one model version written; Triton serves the highest number present
MODEL_FILE = "model.onnx"  # the ONNX Runtime backend's default_model_filename
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"
LABELS_OUTPUT = "logits"  # the ONNX contract's class-score output, when there are several

# A folder name Triton and every filesystem accept; no leading dot, so that the
# hidden staging folders used while writing can never be mistaken for a model.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

# ONNX TensorProto element type -> Triton DataType (model_config.proto).
_TRITON_TYPES = {
    onnx.TensorProto.BOOL: "TYPE_BOOL",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32",
    onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.STRING: "TYPE_STRING",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16",
}


def write_triton_repo(
    onnx_path: str | os.PathLike,
    repo_dir: str | os.PathLike,
    name: str,
    classes: list[str],
    max_batch_size: int = 32,
    instance_count: int = 1,
    kind: str = "KIND_CPU",
    preferred_batch_sizes: list[int] | None = None,
    max_queue_delay_us: int = 2000,
    staging: Staging | None = None,
) -> Path:
    """Write model ``name`` into the Triton repository ``repo_dir``; return its folder.

    ``repo_dir`` is created if missing. The model's folder is assembled in a
    hidden staging folder (:meth:`convforge.files.Staging.folder`) and then
    renamed into place, replacing an existing ``repo_dir/name`` folder whole:
    no mix of old and new files is ever visible, and on failure the old folder
    is left as it was and no new folder appears. With ``staging``, the folder
    is staged in it, for the caller to publish with its other files; then
    ``onnx_path`` may be a file staged there too.

    The config has dynamic batching (``preferred_batch_sizes``, written sorted
    without repeats and left out when None or empty, and
    ``max_queue_delay_us``) and ``instance_count`` instances of ``kind``.
    ``classes`` become ``labels.txt``, attached to the class-score output: the
    only output, else the one named ``logits``.

    Raises UserError for an invalid model name, ``max_batch_size`` < 1,
    ``instance_count`` < 1, a kind not in ``KINDS``, preferred sizes outside
    1..max_batch_size, a negative queue delay, empty or multi-line class
    names, a missing or unreadable ONNX file, one with external weights, and a
    graph whose inputs/outputs have a fixed batch dimension, an element type
    Triton lacks, or a class-score output that does not fit ``classes``.
    """
    settings = _Settings.checked(
        name, max_batch_size, instance_count, kind, preferred_batch_sizes, max_queue_delay_us
    )
    labels = _labels_text(classes)
    source = Path(onnx_path)
    inputs, outputs = _io(_load(source))
    for tensor in (*inputs, *outputs):
        tensor.check_batch(max_batch_size)
    labelled = _labelled_output(outputs, len(classes))
    shown = staging.final(source) if staging else source
    config = _config_text(settings, inputs, outputs, labelled, shown.name)

    target = Path(repo_dir) / name
    with together(staging) as group:
        folder = group.folder(target)
        (folder / VERSION).mkdir()
        shutil.copyfile(source, folder / VERSION / MODEL_FILE)
        (folder / LABELS_FILE).write_text(labels)
        (folder / CONFIG_FILE).write_text(config)
    return target


@dataclass(frozen=True)
class _Settings:
    """The config's own values (everything but the graph's tensors), checked."""

    name: str  # the model's folder name and Triton model name
    max_batch_size: int  # >= 1
    instance_count: int  # >= 1
    kind: str  # one of KINDS
    preferred: tuple[int, ...]  # sorted, no repeats, each in 1..max_batch_size; may be empty
    max_queue_delay_us: int  # >= 0

    @classmethod
    def checked(
        cls, name, max_batch_size, instance_count, kind, preferred_batch_sizes, max_queue_delay_us
    ) -> _Settings:
        """The settings, or a UserError naming the first value out of range."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise UserError(
                f"invalid Triton model name {name!r}; use 1-128 letters, digits, '_', '-' or '.', "
                "not starting with '.' or '-'"
            )
        _check_int("max_batch_size", max_batch_size, 1)
        _check_int("instance_count", instance_count, 1)
        _check_int("max_queue_delay_us", max_queue_delay_us, 0)
        check_choice("Triton instance kind", kind, KINDS)
        preferred = tuple(sorted(set(preferred_batch_sizes or ())))
        for size in preferred:
            _check_int("each preferred batch size", size, 1, max_batch_size)
        return cls(name, max_batch_size, instance_count, kind, preferred, max_queue_delay_us)


class _Tensor:
    """One graph input or output as Triton sees it."""

    def __init__(self, value: onnx.ValueInfoProto, role: str):
        self.name = value.name
        self.role = role
        if not value.type.HasField("tensor_type"):
            raise UserError(f"{role} {self.name!r} is not a tensor; Triton serves tensors only")
        tensor = value.type.tensor_type
        if tensor.elem_type not in _TRITON_TYPES:
            type_name = onnx.TensorProto.DataType.Name(tensor.elem_type)
            raise UserError(f"{role} {self.name!r} has type {type_name}, which Triton lacks")
        if not tensor.HasField("shape"):
            raise UserError(f"{role} {self.name!r} has no shape in the ONNX graph")
        self.data_type = _TRITON_TYPES[tensor.elem_type]
        # Static sizes stay; named (symbolic) or unknown sizes are variable: -1 for Triton.
        self.shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]

    def check_batch(self, max_batch_size: int) -> None:
        if not self.shape:
            raise UserError(
                f"{self.role} {self.name!r} is a scalar; Triton batching "
                f"(max_batch_size {max_batch_size}) needs a first, batch dimension"
            )
        if self.shape[0] != -1:
            raise UserError(
                f"{self.role} {self.name!r} has a fixed batch dimension of {self.shape[0]}; "
                f"Triton batching (max_batch_size {max_batch_size}) needs a dynamic one: "
                "export with a dynamic batch"
            )

    @property
    def dims(self) -> list[int]:
        """The shape without the batch dimension (Triton adds it when batching)."""
        return self.shape[1:]


def _load(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise UserError(f"ONNX model {path} does not exist")
    try:
        model = onnx.load_model(path, load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and others for a non-ONNX file
        raise UserError(f"cannot read {path} as an ONNX model ({type(e).__name__})") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise UserError(
            f"{path} keeps its weights in external files; only single-file models are copied"
        )
    return model


def _io(model: onnx.ModelProto) -> tuple[list[_Tensor], list[_Tensor]]:
    # Older IR versions list initializers among the graph inputs; Triton never feeds those.
    weights = {t.name for t in model.graph.initializer}
    inputs = [_Tensor(v, "input") for v in model.graph.input if v.name not in weights]
    outputs = [_Tensor(v, "output") for v in model.graph.output]
    if not inputs or not outputs:
        raise UserError("the ONNX graph needs at least one input and one output to be served")
    return inputs, outputs


def _labelled_output(outputs: list[_Tensor], num_classes: int) -> _Tensor:
    """The output holding one score per class, checked against ``num_classes``."""
    if len(outputs) == 1:
        output = outputs[0]
    else:
        named = [o for o in outputs if o.name == LABELS_OUTPUT]
        if not named:
            found = ", ".join(o.name for o in outputs)
            raise UserError(
                f"cannot tell which output holds the class scores: expected one output or "
                f"one named {LABELS_OUTPUT!r}, found {found}"
            )
        output = named[0]
    if len(output.dims) != 1:
        raise UserError(
            f"output {output.name!r} has shape {output.shape}; class scores must be "
            "[batch, num_classes]"
        )
    if output.dims[0] not in (-1, num_classes):
        raise UserError(
            f"output {output.name!r} has {output.dims[0]} class scores but "
            f"{num_classes} class names were given"
        )
    return output


def _labels_text(classes) -> str:
    if isinstance(classes, str) or not classes:
        raise UserError("classes must be a non-empty list of class names")
    for c in classes:
        if not isinstance(c, str) or not c.strip() or "\n" in c or "\r" in c:
            raise UserError(
                f"invalid class name {c!r}; each must be a non-empty string on one line"
            )
    return "".join(f"{c}\n" for c in classes)


def _config_text(
    settings: _Settings,
    inputs: list[_Tensor],
    outputs: list[_Tensor],
    labelled: _Tensor,
    source_name: str,
) -> str:
    """config.pbtxt in protobuf text format (Triton's ModelConfig message)."""

    def tensor_block(tensor: _Tensor) -> list[str]:
        lines = [
            "  {",
            f"    name: {_quote(tensor.name)}",
            f"    data_type: {tensor.data_type}",
            f"    dims: [ {', '.join(map(str, tensor.dims))} ]",
        ]
        if tensor is labelled:
            lines.append(f"    label_filename: {_quote(LABELS_FILE)}")
        return [*lines, "  }"]

    def listing(field: str, tensors: list[_Tensor]) -> list[str]:
        body = []
        for i, tensor in enumerate(tensors):
            block = tensor_block(tensor)
            if i < len(tensors) - 1:
                block[-1] += ","  # list entries are comma-separated in text format
            body += block
        return [f"{field} [", *body, "]"]

    batching = ["dynamic_batching {"]
    if settings.preferred:
        sizes = ", ".join(map(str, settings.preferred))
        batching.append(f"  preferred_batch_size: [ {sizes} ]")
    batching += [f"  max_queue_delay_microseconds: {settings.max_queue_delay_us}", "}"]
    lines = [
        f"# Written by convforge from {source_name}; Triton serves {VERSION}/{MODEL_FILE}.",
        f"name: {_quote(settings.name)}",
        f"platform: {_quote(PLATFORM)}",
        f"max_batch_size: {settings.max_batch_size}",
        *listing("input", inputs),
        *listing("output", outputs),
        "instance_group [",
        "  {",
        f"    count: {settings.instance_count}",
        f"    kind: {settings.kind}",
        "  }",
        "]",
        *batching,
    ]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """A protobuf text-format string literal (UTF-8 passes through)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _check_int(what: str, value, low: int, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        accepted = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        raise UserError(f"{what} must be {accepted}, got {value!r}")
