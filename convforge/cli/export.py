"""The export commands: ``export`` (checkpoint -> validated ONNX) and ``inspect`` (torch-free).

``export``'s options are generated from ``ExportOptions``.
"""

from __future__ import annotations

import argparse
import json

from convforge.cli.options import add_json, add_settings, settings_from


def export_parser(p: argparse.ArgumentParser) -> None:
    from convforge.export import ExportOptions

    p.description = (
        "Rebuild the model of a convforge checkpoint, fold its BatchNorm layers "
        "into the convolutions, export ONNX (input 'input' N,C,H,W with a dynamic batch, "
        "output 'logits', preprocessing in the metadata) and a torch.export program (.pt2), "
        "and validate the written file against the original model with the runtime's ort-cpu "
        "backend (optimizations off and on, batch 1 and 8) on the checkpoint's validation "
        "images. Nothing is written unless validation passes. A report goes to "
        "<output>.export.json."
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


def inspect_parser(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Print an ONNX model's opset, IR version, inputs and outputs, op "
        "histogram, parameter count, file size, precision, convforge metadata and "
        "BatchNorm count."
    )
    p.add_argument("model", help="an .onnx file")
    add_json(p)
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from convforge.runtime.onnx_info import describe, format_description

    info = describe(args.model)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


PARSERS = {"export": export_parser, "inspect": inspect_parser}
