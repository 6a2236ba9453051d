"""Make a trained model smaller: structured pruning, fine-tuning and distillation."""

from convforge.builder.compress.job import CompressOptions, CompressResult, compress
from convforge.builder.compress.pruning import IMPORTANCES, macs_and_params, prune_to

__all__ = ["IMPORTANCES", "CompressOptions", "CompressResult", "compress", "macs_and_params",
           "prune_to"]  # fmt: skip
