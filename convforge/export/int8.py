"""INT8 (QDQ) variants of an exported fp32 ONNX model, calibrated once, quantized many times.

ONNX Runtime's static quantization in QDQ format: per-channel int8 weights,
activations calibrated on real preprocessed images. Two flavours (``target``):

* ``cpu``: uint8 asymmetric activations, int8 symmetric per-channel weights in
  7 bits (``reduce_range``), int32 biases: ONNX Runtime's U8S8 kernels.
  Without VNNI (AVX2-only x86) those kernels add pairs of u8*s8 products in
  int16, which saturates with full 8-bit weights (a digits CNN fell from
  97.7% to 89% top-1); 7-bit weights cannot saturate (that CNN kept 97.7%),
  and the file may be served on any x86 CPU.
* ``tensorrt``: int8 symmetric activations (zero point 0) and 8-bit int8
  symmetric per-channel weights; biases stay float (TensorRT's parser refuses
  a DequantizeLinear of int32 and fuses the float bias into the int8 conv).
  TensorRT accumulates in int32, so full 8-bit weights are safe there, but
  ONNX Runtime's CPU kernels on a CPU without VNNI saturate on this flavour
  (49% instead of 97.7% on that CNN): check it in ONNX Runtime with
  ``GraphOptimizationLevel.ORT_ENABLE_BASIC``, which runs each
  DequantizeLinear -> float op -> QuantizeLinear as written, the arithmetic
  TensorRT reproduces.

:class:`Int8Quantizer` calibrates once and then writes any number of variants
that keep chosen layers in float (what the accuracy-aware search in
:mod:`convforge.export.int8_accuracy` needs); :func:`to_int8` is the one-shot
form. Calibration memory is bounded: the calibration model outputs every
activation, so images are fed in chunks sized to :data:`CALIBRATION_MEMORY`
and ONNX Runtime merges each chunk's ranges or histograms into the last.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from convforge import contract
from convforge.contract import INPUT_NAME
from convforge.errors import UserError, check_choice
from convforge.export.precision import require_fp32, set_metadata

INT8_TARGETS = ("cpu", "tensorrt")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
CALIBRATION_BATCH = 32  # images per calibration run at most: few session calls
# Activations one calibration run may hold. The calibration graph outputs every
# activation (no buffer reuse), and ONNX Runtime copies them once more while merging, so
# the process peaks at about 2-3x this; ResNet-50 at 224 px holds ~110 MB per image.
CALIBRATION_MEMORY = 1 << 30
# The nodes a search may keep in float: those around which ONNX Runtime's QDQ quantizer puts
# Q/DQ pairs of their own (weights, or activations into and out of an int8 kernel: a residual
# Add or a pooling runs int8 too). Data movement (Reshape, Transpose, ...) and activations
# (Relu, Clip) follow their producer's quantization, so keeping them float alone changes little.
QUANTIZED_OPS = (
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "Add",
    "Mul",
    "Concat",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Resize",
    "BatchNormalization",
    "InstanceNormalization",
    "LayerNormalization",
)
MIN_ONNXRUNTIME = "1.27"  # quantize_static's calibration_cache_path


def to_int8(
    model: onnx.ModelProto,
    calibration: np.ndarray,
    target: str = "cpu",
    method: str = "minmax",
) -> onnx.ModelProto:
    """A QDQ int8 copy of fp32 ``model``, calibrated on ``calibration``, every layer quantized.

    See :class:`Int8Quantizer` for the arguments and errors.
    """
    with Int8Quantizer(model, calibration, target, method) as quantizer:
        return quantizer.quantize()


class Int8Quantizer:
    """Calibrate ``model`` once on ``calibration``; :meth:`quantize` it with layers kept float.

    ``calibration`` is float32 [N, C, H, W], already preprocessed exactly like
    inference inputs, fed to the graph input ``input`` in chunks of up to
    ``CALIBRATION_BATCH`` images and at most ``CALIBRATION_MEMORY`` bytes of
    activations (in chunks of the model's own size if its batch dimension is
    fixed; a remainder that fills no chunk is left out). ``target`` is one of
    ``INT8_TARGETS`` (see the module docstring); ``method`` one of
    ``CALIBRATION_METHODS`` picks how activation ranges are derived.

    The model is first run through ONNX Runtime's ``quant_pre_process``
    (shape inference and basic optimizations such as Conv+BatchNorm fusion), so
    node names are those of the prepared graph: :attr:`layers` lists its
    quantizable layers. Calibration runs on the first :meth:`quantize` and is
    cached (ONNX Runtime's ``calibration_cache_path``) for the next ones.
    Temporary files live in a private folder removed by :meth:`close`.

    Raises UserError for an unknown target or method, a calibration array that
    is empty, not float32, not 4-D, not finite or not of the model's C/H/W,
    a model without the input ``input`` or not in fp32, and an onnxruntime
    older than ``MIN_ONNXRUNTIME``.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        calibration: np.ndarray,
        target: str = "cpu",
        method: str = "minmax",
    ) -> None:
        from onnxruntime.quantization import quant_pre_process

        check_choice("int8 target", target, INT8_TARGETS)
        check_choice("calibration method", method, CALIBRATION_METHODS)
        _require_calibration_cache()
        require_fp32(model, "int8")
        batch, fixed = _check_calibration(model, calibration)
        self.target, self.method = target, method
        self.metadata = contract.read_props(model)
        self._tmp = tempfile.TemporaryDirectory(prefix="convforge-int8-")
        folder = Path(self._tmp.name)
        self._prepared, self._cache = folder / "pre.onnx", folder / "calibration.json"
        source = folder / "fp32.onnx"
        onnx.save_model(model, source)
        try:
            with _quiet():
                try:
                    quant_pre_process(str(source), str(self._prepared))
                except Exception as e:  # symbolic shape inference gives up on some graphs
                    logging.getLogger(__name__).debug("quant_pre_process failed (%s); retrying", e)
                    quant_pre_process(str(source), str(self._prepared), skip_symbolic_shape=True)
            prepared = onnx.load_model(self._prepared, load_external_data=False)
        except BaseException:
            self.close()
            raise
        if not fixed:
            batch = min(batch, max(1, CALIBRATION_MEMORY // max(1, _activation_bytes(prepared))))
        self._reader = _CalibrationReader(calibration, batch, fixed)
        self.layers = [n.name for n in prepared.graph.node if n.op_type in QUANTIZED_OPS and n.name]

    @property
    def samples(self) -> int:
        """Calibration images actually used."""
        return self._reader.used

    @property
    def chunk(self) -> int:
        """Calibration images per session run."""
        return self._reader.batch

    def quantize(self, keep_float: Iterable[str] = ()) -> onnx.ModelProto:
        """The QDQ int8 model with the layers named in ``keep_float`` left in float.

        Names come from :attr:`layers`; an unknown name is a ValueError (a bug,
        not a user mistake). Metadata is the source's; ``convforge.precision``
        becomes "int8", ``convforge.int8_target`` the target and
        ``convforge.calibration`` a JSON object with ``method``, ``samples``
        and, when any layer stays float, ``float_layers``.
        """
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        keep_float = list(keep_float)
        unknown = sorted(set(keep_float) - set(self.layers))
        if unknown:
            raise ValueError(f"not quantizable layers of this model: {unknown}")
        if self.target == "cpu":
            activation_type = QuantType.QUInt8
            extra_options = {"WeightSymmetric": True}
        else:
            activation_type = QuantType.QInt8
            extra_options = {
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
            }
        # One session run per collect_data call, each merged into the ranges so far: only
        # one chunk's activations are ever held (the reader's set_range, in chunks).
        extra_options["CalibStridedMinMax"] = 1
        calibrated = self._cache.exists()
        out = Path(self._tmp.name) / "int8.onnx"
        with _quiet():
            quantize_static(
                str(self._prepared),
                str(out),
                None if calibrated else self._reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=self.target == "cpu",  # 7-bit weights: see the module docstring
                activation_type=activation_type,
                weight_type=QuantType.QInt8,
                calibrate_method={
                    "minmax": CalibrationMethod.MinMax,
                    "entropy": CalibrationMethod.Entropy,
                    "percentile": CalibrationMethod.Percentile,
                }[self.method],
                nodes_to_exclude=keep_float,
                extra_options=extra_options,
                calibration_cache_path=str(self._cache),
            )
        result = onnx.load_model(out)
        _drop_unused_opsets(result)
        calibration = {"method": self.method, "samples": self.samples}
        if keep_float:
            calibration["float_layers"] = keep_float
        updates = {"precision": "int8", "int8_target": self.target, "calibration": calibration}
        set_metadata(result, self.metadata, updates)
        onnx.checker.check_model(result)
        return result

    def close(self) -> None:
        self._tmp.cleanup()

    def __enter__(self) -> Int8Quantizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _CalibrationReader:
    """ORT CalibrationDataReader over an in-memory array, in chunks of ``batch`` images.

    Duck-typed (ORT recognises any class with ``get_next``) so importing this
    module does not import onnxruntime. ``len`` and ``set_range`` count chunks:
    ``quantize_static`` with ``CalibStridedMinMax`` calls them to feed one
    range of chunks per calibration pass.
    """

    def __init__(self, images: np.ndarray, batch: int, fixed: bool):
        # A fixed-batch graph takes only full batches; a dynamic one takes a short last batch.
        usable = len(images) - len(images) % batch if fixed else len(images)
        self.images = images[:usable]
        self.batch = batch
        self.used = usable
        self.set_range(0, len(self))

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.position = start_index * self.batch
        self.end = min(end_index * self.batch, len(self.images))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            return None
        chunk = self.images[self.position : min(self.position + self.batch, self.end)]
        self.position += self.batch
        return {INPUT_NAME: np.ascontiguousarray(chunk)}

    def rewind(self) -> None:
        self.set_range(0, len(self))


def _activation_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every float activation of one image, from the graph's inferred shapes.

    Unknown dimensions (other than the batch) count as 1, so this may
    underestimate a graph whose shapes inference could not resolve.
    """
    total = 0
    for value in [*model.graph.value_info, *model.graph.output]:
        tensor = value.type.tensor_type
        if tensor.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim[1:]]
        total += 4 * int(np.prod(dims, dtype=np.int64))
    return total


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


def _require_calibration_cache() -> None:
    """UserError unless this onnxruntime's quantize_static can cache its calibration."""
    import onnxruntime
    from onnxruntime.quantization import quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise UserError(
            f"int8 export needs onnxruntime >= {MIN_ONNXRUNTIME} (its calibration cache); "
            f"this is {onnxruntime.__version__}: pip install -U onnxruntime"
        )


def _quiet():
    # The calibrators print progress on stdout, which belongs to the CLI's own output.
    return contextlib.redirect_stdout(io.StringIO())


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
