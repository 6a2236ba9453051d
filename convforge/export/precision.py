"""Reduced-precision variants of an exported fp32 ONNX model: fp16 and int8 (QDQ).

The precision lives in the ONNX graph itself, not in a runtime flag: TensorRT
11 removed its builder precision flags (FP16/INT8 are taken from the tensor
types and Q/DQ nodes of the network), and ONNX Runtime runs the same files on
CPU. Both converters take and return an in-memory ``onnx.ModelProto``, leave
their input untouched, keep the graph's input ``input`` and output ``logits``
in float32, carry every ``metadata_props`` entry over and set
``convforge.precision``.

* :func:`to_fp16`: fp16 weights and compute, fp32 I/O (onnxconverter-common).
* :func:`to_int8`: ONNX Runtime static quantization in QDQ format, per-channel
  int8 weights, activations calibrated on real preprocessed images. Two
  flavours: ``cpu`` (uint8 activations, 7-bit int8 weights: ONNX Runtime's
  fast U8S8 path, free of int16 saturation on CPUs without VNNI) and ``tensorrt``
  (symmetric int8 activations and weights: TensorRT rejects non-zero
  activation zero points).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx

from convforge import contract
from convforge.contract import INPUT_NAME
from convforge.errors import UserError, check_choice

INT8_TARGETS = ("cpu", "tensorrt")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
CALIBRATION_BATCH = 32  # images per calibration run: bounded memory, few session calls


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

    _require_fp32(model, "fp16")
    metadata = contract.read_props(model)
    # The converter edits the graph it is given; work on a copy so the caller's model survives.
    with warnings.catch_warnings():
        # It warns once per weight below fp16's range ("will be truncated"); validation
        # judges the converted model as a whole, so the per-weight noise is dropped.
        warnings.filterwarnings("ignore", message=".*will be truncated.*")
        converted = convert_float_to_float16(copy.deepcopy(model), keep_io_types=True)
    _set_metadata(converted, metadata, {"precision": "fp16"})
    onnx.checker.check_model(converted)
    return converted


def to_int8(
    model: onnx.ModelProto,
    calibration: np.ndarray,
    target: str = "cpu",
    method: str = "minmax",
) -> onnx.ModelProto:
    """A QDQ int8 copy of fp32 ``model``, calibrated on ``calibration``.

    ``calibration`` is float32 [N, C, H, W], already preprocessed exactly like
    inference inputs; it is fed in batches of up to ``CALIBRATION_BATCH`` to the
    graph input ``input`` (in batches of the model's own size if its batch
    dimension is fixed; a remainder that fills no batch is left out).
    ``target`` is one of ``INT8_TARGETS``:

    * ``cpu``: uint8 asymmetric activations, int8 symmetric per-channel weights
      in 7 bits (``reduce_range``), int32 biases: ONNX Runtime's U8S8 kernels.
      Without VNNI (AVX2-only x86) those kernels add pairs of u8*s8 products in
      int16, which saturates with full 8-bit weights (a digits CNN fell from
      97.7% to 89% top-1); 7-bit weights cannot saturate (that CNN kept 97.7%),
      and the file may be served on any x86 CPU.
    * ``tensorrt``: int8 symmetric activations (zero point 0) and 8-bit int8
      symmetric per-channel weights; biases stay float (TensorRT's parser
      refuses a DequantizeLinear of int32 and fuses the float bias into the int8
      conv). TensorRT accumulates in int32, so full 8-bit weights are safe
      there, but ONNX Runtime's CPU kernels on a CPU without VNNI saturate on
      this flavour (49% instead of 97.7% on that CNN): check it in ONNX Runtime
      with ``GraphOptimizationLevel.ORT_ENABLE_BASIC``, which runs each
      DequantizeLinear -> float op -> QuantizeLinear as written, the arithmetic
      TensorRT reproduces.

    ``method`` (one of ``CALIBRATION_METHODS``) picks how activation ranges are
    derived from the calibration outputs. Every Conv/Gemm/MatMul is quantized,
    the final classifier included. The model is first run through ONNX
    Runtime's ``quant_pre_process`` (shape inference + basic graph
    optimizations such as Conv+BatchNorm fusion), so the graph's node names
    may change. Metadata is kept; ``convforge.precision`` becomes "int8",
    ``convforge.int8_target`` the target and ``convforge.calibration`` a JSON
    object with ``method`` and ``samples`` (images actually used).

    Raises UserError for an unknown target or method, a calibration array that
    is empty, not float32, not 4-D, not finite or not of the model's C/H/W,
    and for a model without the input ``input`` or not in fp32.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    check_choice("int8 target", target, INT8_TARGETS)
    check_choice("calibration method", method, CALIBRATION_METHODS)
    _require_fp32(model, "int8")
    batch, fixed = _check_calibration(model, calibration)
    metadata = contract.read_props(model)

    calibrate_method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    if target == "cpu":
        activation_type = QuantType.QUInt8
        extra_options = {"WeightSymmetric": True}
    else:
        activation_type = QuantType.QInt8
        extra_options = {
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
        }
    reader = _CalibrationReader(calibration, batch, fixed)

    # quant_pre_process and quantize_static work on files: they go to a private temporary
    # folder, removed however this ends (ORT's own temporaries clean up after themselves).
    # The calibrators print progress on stdout, which belongs to the CLI's own output.
    quiet = contextlib.redirect_stdout(io.StringIO())
    with tempfile.TemporaryDirectory(prefix="convforge-int8-") as tmp, quiet:
        folder = Path(tmp)
        source, prepared, quantized = (folder / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        onnx.save_model(model, source)
        try:
            quant_pre_process(str(source), str(prepared))
        except Exception as e:  # symbolic shape inference gives up on some graphs
            logging.getLogger(__name__).debug("quant_pre_process failed (%s); retrying", e)
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=target == "cpu",  # 7-bit weights: see the docstring
            activation_type=activation_type,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate_method,
            extra_options=extra_options,
        )
        result = onnx.load_model(quantized)

    _drop_unused_opsets(result)
    _set_metadata(
        result,
        metadata,
        {
            "precision": "int8",
            "int8_target": target,
            "calibration": {"method": method, "samples": reader.used},
        },
    )
    onnx.checker.check_model(result)
    return result


class _CalibrationReader:
    """ORT CalibrationDataReader over an in-memory array: one batch per ``get_next``.

    Duck-typed (ORT's ABC recognises any class with ``get_next``) so importing this
    module does not import onnxruntime's quantization package.
    """

    def __init__(self, images: np.ndarray, batch: int, fixed: bool):
        # A fixed-batch graph takes only full batches; a dynamic one takes a short last batch.
        usable = len(images) - len(images) % batch if fixed else len(images)
        self.images = images[:usable]
        self.batch = batch
        self.used = usable
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.images):
            return None
        chunk = self.images[self.position : self.position + self.batch]
        self.position += self.batch
        return {INPUT_NAME: np.ascontiguousarray(chunk)}

    def rewind(self) -> None:
        self.position = 0


def _check_calibration(model: onnx.ModelProto, calibration) -> tuple[int, bool]:
    """Validate ``calibration`` against the model's ``input``.

    Returns the batch size to feed and whether the graph fixes it.
    """
    inputs = {i.name: i for i in model.graph.input}
    if INPUT_NAME not in inputs:
        found = ", ".join(inputs) or "none"
        raise UserError(
            f"the model has no graph input {INPUT_NAME!r} to calibrate (found: {found})"
        )
    if not isinstance(calibration, np.ndarray):
        raise UserError(f"calibration data must be a numpy array, got {type(calibration).__name__}")
    if calibration.dtype != np.float32:
        raise UserError(f"calibration data must be float32, got {calibration.dtype}")
    if calibration.ndim != 4:
        raise UserError(
            f"calibration data must be 4-D [N, C, H, W], got shape {tuple(calibration.shape)}"
        )
    if len(calibration) == 0:
        raise UserError("calibration data is empty; give at least one image")
    dims = inputs[INPUT_NAME].type.tensor_type.shape.dim
    expected = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(expected) != 4:
        raise UserError(f"the model's input {INPUT_NAME!r} is not 4-D [N, C, H, W]")
    if any(
        e is not None and e != got
        for e, got in zip(expected[1:], calibration.shape[1:], strict=True)
    ):
        shown = "x".join("?" if e is None else str(e) for e in expected[1:])
        raise UserError(
            f"calibration images are {'x'.join(map(str, calibration.shape[1:]))} (CxHxW) "
            f"but the model takes {shown}"
        )
    if not np.isfinite(calibration).all():
        raise UserError("calibration data contains NaN or infinite values")
    fixed_batch = expected[0]
    if fixed_batch is None:
        return min(CALIBRATION_BATCH, len(calibration)), False
    if len(calibration) < fixed_batch:
        raise UserError(
            f"the model's batch size is fixed at {fixed_batch}; "
            f"give at least {fixed_batch} calibration images, got {len(calibration)}"
        )
    return fixed_batch, True


def _require_fp32(model: onnx.ModelProto, wanted: str) -> None:
    """UserError unless ``model`` is an unconverted fp32 graph (converting twice is wrong)."""
    declared = contract.decode(contract.read_props(model)).get("precision", "fp32")
    have = declared if declared != "fp32" else contract.graph_precision(model)
    if have != "fp32":
        raise UserError(f"{wanted} conversion needs an fp32 model; this one is already {have}")


def _set_metadata(model: onnx.ModelProto, original: dict[str, str], updates: dict) -> None:
    """Make ``model``'s metadata exactly ``original`` (in order) with ``updates`` applied.

    Converters drop or add entries (quant_pre_process marks its output); the
    result should carry what the source carried, plus what this module states
    (``updates``: contract keys without the prefix).
    """
    contract.write_props(model, {**original, **contract.encode(updates)}, replace_all=True)


def _drop_unused_opsets(model: onnx.ModelProto) -> None:
    """Remove opset imports of domains no node (in any subgraph or function) uses.

    ORT's optimizer (inside quant_pre_process) saves its output importing every
    domain it knows (com.microsoft.nchwc, ai.onnx.training, org.pytorch.aten,
    ...); other consumers such as TensorRT's parser need not know them.
    """
    used = {"", *(f.domain for f in model.functions)}
    graphs = [model.graph]
    nodes = [n for f in model.functions for n in f.node]
    while graphs:
        graph = graphs.pop()
        nodes.extend(graph.node)
        for node in graph.node:
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else [])
                graphs.extend(attr.graphs)
    used |= {n.domain for n in nodes}
    keep = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
