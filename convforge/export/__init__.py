"""Export: BatchNorm folding, validated ONNX with metadata, FP16/INT8 variants, Triton.

Public API::

    from convforge.export import fold_batchnorm, export_onnx
    folded, report = fold_batchnorm(model.eval())
    report = export_onnx(model, "model.onnx", input_size=(3, 224, 224))

Uses torch and onnx, and the builder's model definitions to rebuild a
checkpoint; the builder and the runtime never import it.
"""

from convforge.export.exporter import ExportOptions, ExportReport, export_checkpoint, export_onnx
from convforge.export.fold import FoldReport, fold_batchnorm

__all__ = [
    "ExportOptions",
    "ExportReport",
    "FoldReport",
    "export_checkpoint",
    "export_onnx",
    "fold_batchnorm",
]
