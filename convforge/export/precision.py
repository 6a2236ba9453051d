"""Reduced-precision variants of an exported fp32 ONNX model: the fp16 converter.

The precision lives in the ONNX graph itself, not in a runtime flag: TensorRT
11 removed its builder precision flags (FP16/INT8 are taken from the tensor
types and Q/DQ nodes of the network), and ONNX Runtime runs the same files on
CPU. Converters take and return an in-memory ``onnx.ModelProto``, leave
their input untouched, keep the graph's input ``input`` and output ``logits``
in float32, carry every ``metadata_props`` entry over and set
``convforge.precision``.

* :func:`to_fp16` (here): fp16 weights and compute, fp32 I/O (onnxconverter-common).
* :func:`convforge.export.int8.to_int8`: ONNX Runtime static quantization in QDQ
  format; :mod:`convforge.export.int8_accuracy` keeps layers in float until the
  accuracy fits a budget.
"""

from __future__ import annotations

import copy
import warnings

import onnx

from convforge import contract
from convforge.errors import UserError


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of fp32 ``model`` with fp16 weights and compute and fp32 inputs/outputs.

    Uses onnxconverter-common's converter with ``keep_io_types=True`` (a Cast
    after each graph input and before each output), so callers keep feeding
    float32 and reading float32 logits. Its default op block list keeps ops
    without (correct) fp16 kernels in fp32, e.g. Resize, Range, TopK.
    Weights beyond fp16's range are clamped to +-1e4 by the converter.
    Metadata is kept; ``convforge.precision`` becomes "fp16". The result
    passes ``onnx.checker``. Raises UserError if ``model`` is not fp32.
    """
    from onnxconverter_common.float16 import convert_float_to_float16

    require_fp32(model, "fp16")
    metadata = contract.read_props(model)
    # The converter edits the graph it is given; work on a copy so the caller's model survives.
    with warnings.catch_warnings():
        # It warns once per weight below fp16's range ("will be truncated"); validation
        # judges the converted model as a whole, so the per-weight noise is dropped.
        warnings.filterwarnings("ignore", message=".*will be truncated.*")
        converted = convert_float_to_float16(copy.deepcopy(model), keep_io_types=True)
    set_metadata(converted, metadata, {"precision": "fp16"})
    onnx.checker.check_model(converted)
    return converted


def require_fp32(model: onnx.ModelProto, wanted: str) -> None:
    """UserError unless ``model`` is an unconverted fp32 graph (converting twice is wrong)."""
    declared = contract.decode(contract.read_props(model)).get("precision", "fp32")
    have = declared if declared != "fp32" else contract.graph_precision(model)
    if have != "fp32":
        raise UserError(f"{wanted} conversion needs an fp32 model; this one is already {have}")


def set_metadata(model: onnx.ModelProto, original: dict[str, str], updates: dict) -> None:
    """Make ``model``'s metadata exactly ``original`` (in order) with ``updates`` applied.

    Converters drop or add entries (quant_pre_process marks its output); the
    result should carry what the source carried, plus what this module states
    (``updates``: contract keys without the prefix).
    """
    contract.write_props(model, {**original, **contract.encode(updates)}, replace_all=True)
