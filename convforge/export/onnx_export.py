"""PyTorch module -> torch.export program -> ONNX, checked, with a dynamic batch.

One trace serves both artifacts: ``torch.export.export`` produces the
program saved as ``.pt2`` (the runtime's PyTorch backend runs it without any
builder code) and the same program goes through the dynamo ONNX exporter.
Spatial dimensions are static: VGG's AdaptiveAvgPool2d((7, 7)) exported with
dynamic H/W gives silently wrong ONNX with the dynamo exporter, and a
classifier is served at one input size anyway.

Opset 18 by default: the dynamo exporter's native opset, parsed by ONNX
Runtime and by TensorRT 10.x (JetPack 6 ships 10.3, whose parser supports
opsets 9-20) and 11.x.
"""

from __future__ import annotations

import io
import json
import os

import onnx
import torch
from torch import nn
from torch.export import Dim

from convforge.contract import BATCH_DIM, INPUT_NAME, OUTPUT_NAME, PT2_METADATA
from convforge.errors import UserError, first_line
from convforge.files import atomic_write

DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 18, 20  # the dynamo exporter starts at 18; TensorRT 10.3 parses up to 20
MAX_BATCH = 4096  # upper bound torch.export may assume for the batch dimension


def trace(module: nn.Module, input_size: tuple[int, int, int]) -> torch.export.ExportedProgram:
    """``torch.export`` of ``module`` (eval mode) for [N, C, H, W] inputs, N dynamic."""
    c, h, w = input_size
    example = torch.randn(2, c, h, w)
    batch = Dim(BATCH_DIM, min=1, max=MAX_BATCH)
    try:
        return torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch.export raises many types; all mean "cannot trace"
        raise UserError(
            f"torch.export could not trace the model at {c}x{h}x{w}: {first_line(e)}"
        ) from None


def to_onnx(program: torch.export.ExportedProgram, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The ONNX model of ``program`` with the contract's input, output and batch-dim names.

    Checked with ``onnx.checker`` (full check) and strict shape inference.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")
    onnx_program = torch.onnx.export(
        program,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        opset_version=opset,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    model = onnx_program.model_proto
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def serialize(model: onnx.ModelProto) -> bytes:
    """``model`` as one file's bytes (weights inside); UserError past the 2 GB protobuf limit."""
    data = model.SerializeToString()
    if len(data) >= 2**31:
        raise UserError("the model is over 2 GB, the single-file ONNX limit")
    return data


def save_program(
    program: torch.export.ExportedProgram, path: str | os.PathLike, meta: dict[str, str]
) -> None:
    """Write the ``.pt2`` program with ``meta`` inside, atomically (load: torch.export.load)."""
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={PT2_METADATA: json.dumps(meta)})
    with atomic_write(path) as f:
        f.write(buf.getvalue())
