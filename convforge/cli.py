"""``convforge <command>``: parses arguments and calls the parts; no logic of its own.

Every command exits 0 on success, 2 with one line ``convforge: error: ...``
on a user mistake (no traceback), and 130 when interrupted. ``--json`` prints
a machine-readable result on stdout instead of the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from convforge import __version__
from convforge.errors import UserError


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _add_model_args(p: argparse.ArgumentParser, *, model: str, stem: str, norm: str | None) -> None:
    """The ModelConfig fields as options (see `convforge models` for names)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=model, help=f"architecture name (default: {model})")
    g.add_argument("--stem", default=stem, help="imagenet (~224 px) or small (8-64 px)")
    g.add_argument(
        "--activation",
        default="relu",
        help="relu, leaky_relu, tanh, sigmoid, gelu or silu (default: relu)",
    )
    g.add_argument("--leaky-slope", type=float, default=0.01, help="Leaky ReLU slope for x<0")
    g.add_argument(
        "--norm",
        default=norm,
        help=f"batch, group, layer, instance or none (default: {norm or 'the model default'})",
    )
    g.add_argument("--num-groups", type=int, default=32, help="groups for --norm group")
    g.add_argument("--in-channels", type=int, default=3, help="input channels (1 = grayscale)")
    g.add_argument("--num-classes", type=int, default=1000, help="output classes")
    g.add_argument("--depth", type=int, help="plain net only: number of conv layers (10)")
    g.add_argument("--width", type=int, help="plain net only: channels per layer (64)")


def _model_config(args, init: str | None = None):
    from convforge.builder import ModelConfig

    options = {k: getattr(args, k) for k in ("depth", "width") if getattr(args, k) is not None}
    return ModelConfig(
        args.model,
        num_classes=args.num_classes,
        in_channels=args.in_channels,
        stem=args.stem,
        activation=args.activation,
        leaky_slope=args.leaky_slope,
        norm=args.norm,
        num_groups=args.num_groups,
        init=init,
        options=options,
    )


def cmd_models(args) -> int:
    from tqdm import tqdm

    from convforge.builder import ModelConfig, list_models
    from convforge.builder.complexity import as_record, format_records, measure

    names = list_models()
    records = []
    # disable=None shows the bar only on a terminal.
    bar = tqdm(names, desc="measuring", unit="model", leave=False, disable=args.json or None)
    for name in bar:
        cfg = ModelConfig(
            name, num_classes=args.num_classes, in_channels=args.in_channels, stem=args.stem
        )
        records.append(as_record(cfg, measure(cfg, args.input_size)))
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    print(format_records(records))
    return 0


def cmd_diagnose_init(args) -> int:
    from convforge.builder.diagnose_init import (
        as_record,
        format_runs,
        plot_init_experiment,
        run_init_experiment,
    )
    from convforge.files import ensure_dir, write_text

    inits = _csv(args.init)
    if not inits:
        raise UserError("--init needs at least one of: small, xavier, kaiming")
    runs = run_init_experiment(
        _model_config(args), inits, args.input_size, args.batch_size, args.seed
    )
    cfg = runs[0].config
    out = ensure_dir(args.out)
    stem = f"init-{cfg.arch}-{cfg.activation}-{cfg.norm}"
    plot_init_experiment(runs, out / f"{stem}.png")
    record = as_record(runs)
    record["plot"] = str(out / f"{stem}.png")
    write_text(out / f"{stem}.json", json.dumps(record, indent=2) + "\n")
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    print(format_runs(runs))
    print(f"\nplot: {out / f'{stem}.png'}\njson: {out / f'{stem}.json'}")
    return 0


def cmd_demo(args) -> int:
    from convforge.demo import run_demo

    run_demo(Path(args.out), json_output=args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convforge",
        description="Train VGG/ResNet image classifiers, export validated ONNX, "
        "and run them fast with honest latency numbers.",
    )
    parser.add_argument("--version", action="version", version=f"convforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "models",
        help="list every model with parameters and compute",
        description="List every registered model with its parameter count and "
        "compute (GMACs/GFLOPs) for one image at --input-size.",
    )
    p.add_argument("--input-size", type=int, default=224, help="square input side in px (224)")
    p.add_argument("--stem", default="imagenet", help="imagenet or small (default: imagenet)")
    p.add_argument("--in-channels", type=int, default=3, help="input channels (default: 3)")
    p.add_argument("--num-classes", type=int, default=1000, help="output classes (default: 1000)")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "diagnose",
        help="diagnostic experiments (init)",
        description="Diagnostic experiments from the CNN-training lecture.",
    )
    dsub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    p = dsub.add_parser(
        "init",
        help="per-layer activation statistics under each weight init",
        description="The lecture's weight-initialization experiment: push one batch of "
        "unit-Gaussian inputs through a fresh model and report each activation layer's mean "
        "and std, once per init rule, as a table, a PNG plot and JSON. Too small an init "
        "collapses activations toward 0 with depth; kaiming (relu) and xavier (tanh) keep "
        "them steady. Normalization is off by default so only the weights act.",
    )
    _add_model_args(p, model="plain", stem="small", norm="none")
    p.add_argument(
        "--init",
        default="small,xavier,kaiming",
        help="comma-separated init rules to compare (default: small,xavier,kaiming)",
    )
    p.add_argument("--input-size", type=int, default=32, help="square input side in px (32)")
    p.add_argument("--batch-size", type=int, default=32, help="images in the batch (32)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (0)")
    p.add_argument("--out", default="runs/diagnose", help="folder for the PNG and JSON")
    p.add_argument("--json", action="store_true", help="print the JSON record instead of a table")
    p.set_defaults(func=cmd_diagnose_init)

    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the bundled dataset, with a report",
        description="Run the demo pipeline on the bundled dataset and write a "
        "report (report.md, report.json, plots) to --out.",
    )
    p.add_argument("--out", default="runs/demo", help="report folder (default: runs/demo)")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``convforge`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"convforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("convforge: interrupted", file=sys.stderr)
        return 130
