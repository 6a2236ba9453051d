"""The export commands: ``export`` (checkpoint -> validated ONNX) and ``inspect`` (torch-free).

``export``'s options are generated from ``ExportOptions``.
"""

from __future__ import annotations

import argparse
import json

from convforge.cli.options import add_json, add_settings, float_list, read_labels, settings_from


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


def annotate_parser(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Write convforge metadata (labels, mean/std, resize, layout, the output to read) into "
        "an ONNX file made elsewhere, so predict, serve, bench and tune run it with the right "
        "preprocessing and labels. Nothing else in the file changes; the written file is "
        "checked to give the same logits as the original before it is saved. Values not "
        "given are the defaults a file without metadata runs with (ImageNet mean/std, "
        "resize to input / 0.875), written out."
    )
    p.add_argument("model", help="an .onnx file")
    p.add_argument("-o", "--out", required=True, help="the annotated .onnx to write")
    p.add_argument("--labels", help="a text file, one class name per line, in logit order")
    p.add_argument("--mean", type=float_list, help="per-channel mean of [0, 1] pixels, e.g. "
                   "0.485,0.456,0.406")  # fmt: skip
    p.add_argument("--std", type=float_list, help="per-channel std, e.g. 0.229,0.224,0.225")
    p.add_argument("--resize", type=int, help="resize the shorter side to this, then crop")
    p.add_argument("--output", help="the graph output holding the class scores (default: "
                   "'logits' if present, else the first)")  # fmt: skip
    p.add_argument("--layout", choices=("NCHW", "NHWC"), help="the input's layout (default: "
                   "inferred from its shape)")  # fmt: skip
    add_json(p)
    p.set_defaults(func=cmd_annotate)


def cmd_annotate(args) -> int:
    from convforge import extras
    from convforge.runtime.annotate import annotate

    extras.require_engine("convforge annotate")
    labels = read_labels(args.labels) if args.labels else None
    done = annotate(args.model, args.out, labels=labels, mean=args.mean, std=args.std,
                    resize=args.resize, output=args.output, layout=args.layout)  # fmt: skip
    if args.json:
        print(json.dumps(done, indent=2))
        return 0
    meta, checked = done["metadata"], done["checked"]
    classes = f"{len(meta['classes'])} labels" if "classes" in meta else "index labels"
    print(
        f"wrote {done['path']}: {classes}, mean {meta['mean']}, std {meta['std']}, resize "
        f"{meta['resize_size']} + crop {meta['input_size']}, {meta['layout']}, output "
        f"{meta['output']!r}; logits identical to {args.model} on {checked['backend']}"
    )
    return 0


PARSERS = {"export": export_parser, "inspect": inspect_parser, "annotate": annotate_parser}
