"""``convforge demo``: the pipeline on the bundled dataset (see :mod:`convforge.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from convforge.cli.options import add_json


def demo_parser(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run the demo pipeline on the bundled dataset and write a "
        "report (report.md, report.json, plots) to --out."
    )
    p.add_argument("--out", default="runs/demo", help="report folder (default: runs/demo)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (the recipe's 15)")
    add_json(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from convforge.demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs, json_output=args.json)
    return 0


PARSERS = {"demo": demo_parser}
