"""The export report's ``compressed`` section: a compressed checkpoint against its original.

MACs, parameters and top-1 come from the checkpoint's ``compress`` record, as
``convforge compress`` measured them (top-1 on the original's validation
split). Latency is measured here and now, batch 1 on :data:`LATENCY_BACKEND`,
by :func:`convforge.export.latency.latency_probe` (the probe ``compress
--latency-ms`` uses): for the exported model, and for the original, rebuilt
from the record's ``source`` when that file is still there with the recorded
sha256 (looked for as recorded, then beside the compressed checkpoint).
Without it the section says why and gives no latency ratio; a backend that
cannot run leaves the latencies out, saying why, and never fails the export.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from convforge.contract import DefaultsWarning, sha256_of
from convforge.errors import UserError, first_line

if TYPE_CHECKING:
    from torch import nn

    from convforge.builder.checkpoint import Checkpoint

LATENCY_BACKEND = "ort-cpu"  # the CPU backend export validates with: present wherever export runs


def compressed_section(ck: Checkpoint, model: nn.Module, input_size: tuple[int, int, int]) -> dict:
    """The section for ``ck`` (a checkpoint with a ``compress`` record) whose model is
    ``model``, taking (C, H, W) inputs: original vs compressed MACs, params, top-1 and
    measured batch-1 latency (``ratio`` and ``speedup``: original / compressed)."""
    from convforge.builder.checkpoint import load_checkpoint
    from convforge.export.latency import latency_probe

    record = ck.compress
    original, why = find_original(ck)
    latency = {"backend": LATENCY_BACKEND, "batch_size": 1, "original": None,
               "compressed": None, "speedup": None}  # fmt: skip
    try:
        with warnings.catch_warnings():
            # The probe times a bare temporary export, which the runtime reads with default
            # preprocessing; the timing does not depend on it, and the user need not hear it.
            warnings.simplefilter("ignore", DefaultsWarning)
            probe = latency_probe(LATENCY_BACKEND, input_size)
            latency["compressed"] = probe(model)
            if original is not None:
                latency["original"] = probe(load_checkpoint(original).build_model())
                latency["speedup"] = round(latency["original"] / latency["compressed"], 3)
    except UserError as e:
        latency["not_measured"] = first_line(e)
    before, after = record["original"]["top1"], record["top1"]
    return {
        "source": record["source"],
        "original_checkpoint": str(original) if original else None,
        "original_missing": why or None,  # why the original is not at hand
        "macs": _pair(record["original"]["macs"], record["macs"]),
        "params": _pair(record["original"]["params"], record["params"]),
        "top1": {
            "original": before,
            "compressed": after,
            "delta_points": round(100 * (after - before), 4),
        },
        "latency_ms": latency,
    }


def find_original(ck: Checkpoint) -> tuple[Path | None, str]:
    """(the original checkpoint, "") when the record's ``source`` is found, as recorded or
    beside ``ck``, with the recorded sha256; else (None, why not)."""
    record = ck.compress
    source = Path(record["source"])
    places = [source] if source.is_absolute() else [source, ck.path.parent / source]
    places.append(ck.path.parent / source.name)
    changed = None
    for place in dict.fromkeys(places):
        if place.is_file():
            if sha256_of(place) == record["source_sha256"]:
                return place, ""
            changed = place
    if changed is not None:
        return None, (
            f"the original {changed} is not the checkpoint that was compressed (its sha256 "
            "differs from the recorded one)"
        )
    return None, f"the original {source} was not found"


def format_section(section: dict) -> list[str]:
    """The human rendering of :func:`compressed_section`: one line per measure."""
    macs, params, top1, lat = (section[k] for k in ("macs", "params", "top1", "latency_ms"))
    lines = [
        f"compressed from {section['source']} (original -> compressed):",
        f"  MACs     {_count(macs['original'])} -> {_count(macs['compressed'])} "
        f"({macs['ratio']:.2f}x fewer)",
        f"  params   {_count(params['original'])} -> {_count(params['compressed'])} "
        f"({params['ratio']:.2f}x fewer)",
        f"  top-1    {top1['original']:.2%} -> {top1['compressed']:.2%} "
        f"({top1['delta_points']:+.2f} points; compress's check on the validation split)",
    ]
    where = f"batch {lat['batch_size']} on {lat['backend']}"
    if lat["compressed"] is None:
        lines.append(f"  latency  not measured ({where}): {lat['not_measured']}")
    elif lat["original"] is None:
        missing = section["original_missing"] or lat.get("not_measured", "")
        lines.append(f"  latency  {lat['compressed']:.3f} ms ({where}); {missing}: no ratio")
    else:
        lines.append(
            f"  latency  {lat['original']:.3f} ms -> {lat['compressed']:.3f} ms "
            f"({lat['speedup']:.2f}x faster, {where})"
        )
    return lines


def _pair(original: int, compressed: int) -> dict:
    return {"original": original, "compressed": compressed,
            "ratio": round(original / compressed, 3)}  # fmt: skip


def _count(n: float) -> str:
    """12_300_000 -> '12.30 M'."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g}"
