"""Parameter and compute counts, measured on the meta device (no memory, no math).

MACs are the multiply-accumulates of the conv and linear layers for one image
(norms, activations and pooling are not counted, as in torchvision's and
fvcore's tables). torchvision's model table labels this number "GFLOPS"
(1.81 for ResNet-18); FLOPs proper are 2 x MACs, and both are reported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from convforge.builder.registry import ModelConfig, build_model, get_entry
from convforge.console import format_table
from convforge.errors import UserError, check_int, first_line


@dataclass(frozen=True)
class Complexity:
    params: int  # learnable parameters
    macs: int  # multiply-accumulates for one image at the given input size
    input_size: int  # square input side in pixels

    @property
    def flops(self) -> int:
        return 2 * self.macs


def measure(config: ModelConfig, input_size: int) -> Complexity:
    """Count parameters and MACs of ``config``'s model for one ``input_size`` px image.

    The model is built on the meta device, so even VGG-19 costs no memory and
    about a second. Raises UserError if the input is too small for the model.
    """
    check_int("input size (px)", input_size)
    with torch.device("meta"):
        model = build_model(config).eval()
        x = torch.empty(1, config.in_channels, input_size, input_size)
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(x)
    except (RuntimeError, ValueError) as e:
        raise UserError(
            f"{config.arch} with stem {config.stem!r} cannot take {input_size} px input: "
            f"{first_line(e)}"
        ) from None
    params = sum(p.numel() for p in model.parameters())
    return Complexity(params, counter.get_total_flops() // 2, input_size)


def as_record(config: ModelConfig, c: Complexity) -> dict:
    """A flat JSON-ready record of one model's complexity."""
    return {
        "model": config.arch,
        **{k: v for k, v in dataclasses.asdict(config.resolved()).items() if k != "arch"},
        "params": c.params,
        "gmacs": round(c.macs / 1e9, 4),
        "gflops": round(c.flops / 1e9, 4),
        "input_size": c.input_size,
    }


def format_records(records: list[dict]) -> str:
    """Terminal table of :func:`as_record` results, with a line saying what was measured."""
    rows = [
        [
            r["model"],
            r["norm"],
            round(r["params"] / 1e6, 2),
            r["gmacs"],
            r["gflops"],
            get_entry(r["model"]).summary,
        ]
        for r in records
    ]
    r = records[0]
    return (
        format_table(["model", "norm", "params (M)", "GMACs", "GFLOPs", "description"], rows)
        + f"\n\n{r['input_size']}x{r['input_size']} input, {r['in_channels']} channel(s), "
        f"stem {r['stem']!r}, {r['num_classes']} classes. GMACs: multiply-accumulates of conv "
        "and linear layers per image (torchvision's table calls these GFLOPS); "
        "GFLOPs = 2 x GMACs."
    )
