"""Raw-pixel input: a graph pass that moves the /255, mean and std into the model.

:func:`to_uint8_input` turns an exported model whose input ``input`` takes
normalized float32 [N, C, H, W] into one whose input ``input`` takes uint8
pixels [N, H, W, C] (0-255), by prepending four nodes::

    input (uint8 NHWC) -> Cast(float32) -> Transpose(0, 3, 1, 2) -> Mul(scale) -> Add(bias)
        -> what the old input fed

with, per channel c, ``scale[c] = 1 / (255 std[c])`` and ``bias[c] = -mean[c] / std[c]``,
so ``p * scale + bias = (p / 255 - mean) / std``: the training evaluation
transform's ``ToDtype(scale=True)`` + ``Normalize`` in one multiply-add.

Why NHWC: decoders (PIL, libjpeg, OpenCV, a browser's ImageData) hand out
height x width x channels interleaved, so a client sends the decoded buffer
as it is, with no transpose and no float conversion, 4x fewer bytes than
float32. The transpose then runs inside the engine as one copy of the pixels
(OpenVINO moves it before the Cast, onto the uint8 tensor, and folds the Mul
and Add into an int8 model's first quantization). NCHW would keep the float
model's shape, but every client would pay a strided copy for it, and that
copy is what this format exists to remove. The Cast comes first because
TensorRT's documentation asks for a uint8 network input to be converted to
float before any other layer (the TensorRT path has not run on a GPU yet).

The pass is pure (``ModelProto -> ModelProto``; the argument is untouched),
works on the fp32, fp16 (float32 I/O) and int8 (QDQ, float32 I/O) exports
alike, renames nothing but the old input's uses, keeps the output, carries
every ``metadata_props`` entry and sets ``convforge.input_format`` to
``uint8``; the result passes ``onnx.checker`` with shape inference.
:func:`pixels_of` and :func:`normalized` give the validation data: the
uint8 pixels behind preprocessed float samples, and the float samples the
float model sees for given pixels.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from convforge import contract
from convforge.contract import INPUT_NAME
from convforge.errors import UserError

_PREFIX = "convforge_pixels_"  # names of the added nodes and tensors


def to_uint8_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` taking uint8 [N, H, W, C] pixels through ``input``.

    ``model`` must be a convforge export: input ``input`` float32 [N, C, H, W]
    and ``convforge.mean``/``.std`` metadata with one value per channel.
    Raises UserError naming what is missing otherwise (including a model whose
    input is uint8 already).
    """
    meta = contract.decode(contract.read_props(model))
    graph_inputs = [i for i in model.graph.input if i.name == INPUT_NAME]
    if not graph_inputs:
        names = [i.name for i in model.graph.input]
        raise UserError(f"the model has no input {INPUT_NAME!r} (inputs: {names})")
    tensor = graph_inputs[0].type.tensor_type
    if tensor.elem_type != TensorProto.FLOAT or meta.get("input_format", "float32") != "float32":
        kind = TensorProto.DataType.Name(tensor.elem_type).lower()
        raise UserError(f"a uint8-input variant is made from a float32-input model, got {kind}")
    dims = list(tensor.shape.dim)
    if len(dims) != 4 or any(d.dim_value <= 0 for d in dims[1:]):
        raise UserError(f"the model's input must be [N, C, H, W] with fixed C, H, W; got {dims}")
    channels = dims[1].dim_value
    scale, bias = scale_and_bias(meta.get("mean"), meta.get("std"), channels)

    out = copy.deepcopy(model)
    graph = out.graph
    normalized = _PREFIX + "normalized"  # what the old input fed now reads this
    for node in graph.node:
        node.input[:] = [normalized if name == INPUT_NAME else name for name in node.input]
    new_input = helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, None)
    shape = new_input.type.tensor_type.shape
    for d in (dims[0], dims[2], dims[3], dims[1]):  # N, H, W, C
        shape.dim.add().CopyFrom(d)
    index = list(graph.input).index(graph_inputs[0])
    graph.input.remove(graph_inputs[0])
    graph.input.insert(index, new_input)
    graph.initializer.extend(
        [
            numpy_helper.from_array(scale.reshape(1, channels, 1, 1), _PREFIX + "scale"),
            numpy_helper.from_array(bias.reshape(1, channels, 1, 1), _PREFIX + "bias"),
        ]
    )
    nodes = [
        helper.make_node(
            "Cast", [INPUT_NAME], [_PREFIX + "float"], _PREFIX + "cast", to=TensorProto.FLOAT
        ),
        helper.make_node(
            "Transpose",
            [_PREFIX + "float"],
            [_PREFIX + "nchw"],
            _PREFIX + "nchw",
            perm=[0, 3, 1, 2],
        ),  # fmt: skip
        helper.make_node(
            "Mul", [_PREFIX + "nchw", _PREFIX + "scale"], [_PREFIX + "scaled"], _PREFIX + "mul"
        ),
        helper.make_node(
            "Add", [_PREFIX + "scaled", _PREFIX + "bias"], [normalized], _PREFIX + "add"
        ),
    ]
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)
    contract.write_props(out, contract.encode({"input_format": "uint8"}))
    onnx.checker.check_model(out, full_check=True)
    return out


def scale_and_bias(mean, std, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``(1 / (255 std), -mean / std)`` per channel
    (:func:`convforge.contract.pixel_normalization`).

    UserError when ``mean`` or ``std`` is missing, not one value per channel,
    or a std is not positive.
    """
    for name, values in (("mean", mean), ("std", std)):
        if not isinstance(values, list) or len(values) != channels:
            raise UserError(
                f"a uint8-input variant needs convforge.{name} metadata with {channels} "
                f"value(s), one per channel; the model has {values!r}"
            )
    if not all(s > 0 for s in std):
        raise UserError(f"convforge.std must be positive, got {std}")
    return contract.pixel_normalization(mean, std)


def pixels_of(samples: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [N, H, W, C]: the pixels behind normalized float32 [N, C, H, W] ``samples``.

    Exact for samples the evaluation transform made from uint8 images (they
    are ``(p / 255 - mean) / std`` for integer ``p``); anything else (random
    samples) is rounded and clipped to 0-255.
    """
    c = samples.shape[1]
    mean64 = np.asarray(mean, np.float64).reshape(1, c, 1, 1)
    std64 = np.asarray(std, np.float64).reshape(1, c, 1, 1)
    pixels = np.rint((samples.astype(np.float64) * std64 + mean64) * 255)
    return np.clip(pixels, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def normalized(pixels: np.ndarray, mean, std) -> np.ndarray:
    """float32 [N, C, H, W] for uint8 [N, H, W, C] ``pixels``, as the evaluation transform
    computes it (float32 ``p / 255``, then ``(x - mean) / std``): the float model's input."""
    c = pixels.shape[3]
    x = pixels.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
    mean32 = np.asarray(mean, np.float32).reshape(1, c, 1, 1)
    std32 = np.asarray(std, np.float32).reshape(1, c, 1, 1)
    return np.ascontiguousarray((x - mean32) / std32)
