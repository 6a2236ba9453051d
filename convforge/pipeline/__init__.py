"""``convforge pipeline``: a recipe carried from data to a deployment decision, in a report.

    recipe = load_recipe("recipes/default.yaml")
    outcome = run_pipeline(recipe, Path("runs/default"))   # report.md, report.html, ...

Like ``cli/``, this package sees all three parts: it trains (and, when the
recipe says so, compresses) with the builder, exports, then tunes and
benchmarks with the runtime, each step a step that a later run reuses while
its inputs stay the same (:mod:`.steps`, :mod:`.deploy`), and writes the
report (:mod:`.report`, its chart :mod:`.tradeoff`) into the run folder.
``convforge demo`` is the default recipe (:class:`.recipe.Recipe`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from convforge import extras
from convforge.errors import UserError
from convforge.files import together
from convforge.pipeline.recipe import Recipe, load_recipe
from convforge.pipeline.steps import STEPS, Run

__all__ = ["Outcome", "Recipe", "load_recipe", "run_pipeline"]


@dataclass
class Outcome:
    out: Path
    report_md: Path
    report_html: Path
    results: dict  # step -> its result record
    reused: list[str]  # steps taken from an earlier run
    seconds: float


def run_pipeline(
    recipe: Recipe, out: Path, force: bool = False, log=print, progress: bool = True
) -> Outcome:
    """Run (or reuse) every step of ``recipe`` into ``out``, then write the report.

    Each step's files appear together when it finishes, or not at all
    (:mod:`.steps`); the report's files (report.md, report.html, report.json and its
    chart tradeoff.png) likewise.
    ``log`` takes a line per step; ``progress`` shows the training log and bars."""
    from convforge.pipeline import report
    from convforge.runtime.plan import Plan

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the run")
    if recipe.compress is not None:  # before anything runs, not after training
        extras.require("a recipe with a compress step", "torch_pruning")
    started = time.perf_counter()
    run = Run(recipe, out, force=force, log=log, progress=progress)
    for step in STEPS:
        run.run(step)
    plan = Plan.read(out / "plan.json")
    with together() as staging:
        doc = report.build(recipe, out, run.results, plan, run.reused, staging=staging)
        md, html = doc.write(out, staging=staging)
        results = json.dumps(run.results, indent=2, default=str) + "\n"
        staging.file(out / "report.json").write_text(results, encoding="utf-8")
    return Outcome(out, md, html, run.results, run.reused, time.perf_counter() - started)
