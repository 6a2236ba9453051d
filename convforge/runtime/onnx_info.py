"""``convforge inspect``: what an ONNX file holds, without running it (onnx only, no torch)."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from convforge import contract


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type, most frequent first."""
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def _tensor_info(value) -> dict:
    t = value.type.tensor_type
    dims = [d.dim_param or d.dim_value for d in t.shape.dim]
    return {
        "name": value.name,
        "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name,
        "shape": dims,
    }


def describe(path: str | os.PathLike) -> dict:
    """JSON-ready summary: versions, I/O, op histogram, parameters, size, metadata, BN count;
    ``compressed``: a compressed model's summary (the ``compressed`` key), else None."""
    model = contract.load_onnx(path)
    metadata = contract.decode(contract.read_props(model))
    compressed = metadata.get("compressed")
    params = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    nodes = op_histogram(model)
    return {
        "path": str(path),
        "file_bytes": Path(path).stat().st_size,
        "ir_version": model.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [_tensor_info(v) for v in model.graph.input],
        "outputs": [_tensor_info(v) for v in model.graph.output],
        "parameters": params,
        "nodes": sum(nodes.values()),
        "op_histogram": nodes,
        "batchnorm_nodes": nodes.get("BatchNormalization", 0),
        "precision": contract.graph_precision(model),
        "metadata": metadata,
        "compressed": compressed if isinstance(compressed, dict) else None,
    }


def format_description(info: dict) -> str:
    """The human rendering of :func:`describe`."""
    io_lines = [
        f"  {kind} {v['name']}: {v['dtype']} [{', '.join(map(str, v['shape']))}]"
        for kind, values in (("input ", info["inputs"]), ("output", info["outputs"]))
        for v in values
    ]
    ops = ", ".join(f"{op} {n}" for op, n in info["op_histogram"].items())
    compressed = info.get("compressed")  # its own line, not again among the metadata
    meta = {k: v for k, v in info["metadata"].items() if not (compressed and k == "compressed")}
    md = [f"  {k}: {v}" for k, v in meta.items()] or ["  (no convforge metadata)"]
    opsets = ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
    return "\n".join(
        [
            f"{info['path']}: {info['file_bytes'] / 1e6:.2f} MB, IR version {info['ir_version']}, "
            f"opset {opsets}, producer {info['producer'] or 'unknown'}",
            *io_lines,
            f"parameters: {info['parameters']:,}; nodes: {info['nodes']} "
            f"(BatchNormalization: {info['batchnorm_nodes']}); "
            f"precision in the graph: {info['precision']}",
            f"ops: {ops}",
            *([compressed_line(compressed)] if compressed else []),
            "metadata:",
            *md,
        ]
    )


def compressed_line(c: dict) -> str:
    """One line: a compressed model against its original (MACs, params, top-1)."""
    try:
        o = c["original"]
        return (
            f"compressed: {c['speedup']:.2f}x fewer MACs than the original "
            f"({_count(o['macs'])} -> {_count(c['macs'])}), params {_count(o['params'])} -> "
            f"{_count(c['params'])}, top-1 {o['top1']:.2%} -> {c['top1']:.2%} "
            f"({100 * (c['top1'] - o['top1']):+.2f} points; original checkpoint sha256 "
            f"{str(c['source_sha256'])[:12]})"
        )
    except (KeyError, TypeError, ValueError):  # written by something other than convforge
        return f"compressed: {c}"


def _count(n: float) -> str:
    """12_300_000 -> '12.30 M'."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g}"
