"""The export command: ``export`` (checkpoint -> BatchNorm-folded, validated ONNX).

``export``'s options are generated from ``ExportOptions``.
"""

from __future__ import annotations

import argparse
import json

from convforge.cli.arguments import add_json, add_settings, settings_from


def export_parser(p: argparse.ArgumentParser) -> None:
    from convforge.export import ExportOptions

    p.description = (
        "Rebuild the model of a convforge checkpoint, fold its BatchNorm layers "
        "into the convolutions, export ONNX (input 'input' N,C,H,W with a dynamic batch, "
        "output 'logits', preprocessing in the metadata) and a torch.export program (.pt2), "
        "and validate the written file against the original model with the runtime's ort-cpu "
        "backend (optimizations off and on, batch 1 and 8) on the checkpoint's validation "
        "images (or --dataset). All or nothing: every file (variants, Triton repository and "
        "the report, <output>.export.json, included) is checked before any appears, and a "
        "failure leaves no new file and every older one as it was."
    )
    p.add_argument("checkpoint", help="a convforge checkpoint (best.pt / last.pt)")
    p.add_argument("-o", "--output", required=True, help="ONNX path, e.g. model.onnx")
    add_settings(p, ExportOptions, "export")
    add_json(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from convforge import extras
    from convforge.export import ExportOptions, export_checkpoint

    opts = settings_from(ExportOptions, args)
    if opts.fp16:
        extras.require("convforge export --fp16", "onnxconverter_common")
    report = export_checkpoint(args.checkpoint, args.output, opts)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.format())
    return 0


PARSERS = {"export": export_parser}
