"""``convforge pipeline`` and ``convforge demo`` (the default recipe): see
:mod:`convforge.pipeline`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from convforge import extras
from convforge.cli.arguments import add_json


def pipeline_parser(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Carry a recipe (YAML; see recipes/) from data to a deployment decision: train, "
        "export (fp32, fp16, int8), tune, benchmark, and write report.html and report.md to "
        "the run folder. Finished steps are reused while their inputs stay the same; an "
        "interrupted run resumes where it stopped."
    )
    p.add_argument("recipe", help="the recipe file, e.g. recipes/default.yaml")
    _add_run_options(p, "runs/<the recipe's name>")
    p.set_defaults(func=cmd_pipeline)


def demo_parser(p: argparse.ArgumentParser) -> None:
    p.description = (
        "The default recipe (recipes/default.yaml: the small-stem ResNet-18 on the bundled "
        "digits) through the whole pipeline, ending in a report."
    )
    _add_run_options(p, "runs/default")
    p.set_defaults(func=cmd_demo)


def _add_run_options(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", help=f"the run folder (default: {default_out})")
    p.add_argument("--force", action="store_true", help="rerun every step, even those already done")
    add_json(p)


def cmd_pipeline(args) -> int:
    from convforge.pipeline import load_recipe

    return _run(load_recipe(args.recipe), args, "pipeline")


def cmd_demo(args) -> int:
    from convforge.pipeline import Recipe

    return _run(Recipe(), args, "demo")


def _run(recipe, args, command: str) -> int:
    from convforge.pipeline import run_pipeline

    extras.require_engine(f"convforge {command}")
    out = Path(args.out or f"runs/{recipe.name}")
    log = (lambda *a: None) if args.json else print
    try:
        outcome = run_pipeline(recipe, out, force=args.force, log=log, progress=not args.json)
    except KeyboardInterrupt:
        again = f"convforge {command}" + (f" {args.recipe}" if command == "pipeline" else "")
        print(f"\nstopped; `{again} --out {out}` resumes where it stopped", file=sys.stderr)
        raise
    if args.json:
        record = {"out": str(out), "report_md": str(outcome.report_md),
                  "report_html": str(outcome.report_html), "reused": outcome.reused,
                  "seconds": round(outcome.seconds, 1), "steps": outcome.results}  # fmt: skip
        print(json.dumps(record, indent=2, default=str))
        return 0
    print(f"\nreport: {outcome.report_html} (Markdown: {outcome.report_md})")
    print(f"serve it: convforge serve {out / 'model.onnx'} --plan {out / 'plan.json'}")
    print(
        f"finished in {outcome.seconds:.0f} s"
        + (f" (reused: {', '.join(outcome.reused)})" if outcome.reused else "")
    )
    return 0


PARSERS = {"pipeline": pipeline_parser, "demo": demo_parser}
