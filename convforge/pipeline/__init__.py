"""``convforge pipeline``: a recipe carried from data to a deployment decision, in a report.

    recipe = load_recipe("recipes/default.yaml")
    outcome = run_pipeline(recipe, Path("runs/default"))   # report.md, report.html, ...

Like ``cli/``, this package sees all three parts: it trains with the
builder, exports, then tunes and benchmarks with the runtime, each step a
stage that a later run reuses while its inputs stay the same
(:mod:`.stages`), and writes the report (:mod:`.report`) into the run
folder. ``convforge demo`` is the default recipe (:class:`.recipe.Recipe`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from convforge.errors import UserError
from convforge.files import together
from convforge.pipeline.recipe import Recipe, load_recipe
from convforge.pipeline.stages import STAGES, Run

__all__ = ["Outcome", "Recipe", "load_recipe", "run_pipeline"]


@dataclass
class Outcome:
    out: Path
    report_md: Path
    report_html: Path
    results: dict  # stage -> its result record
    reused: list[str]  # stages taken from an earlier run
    seconds: float


def run_pipeline(
    recipe: Recipe, out: Path, force: bool = False, log=print, progress: bool = True
) -> Outcome:
    """Run (or reuse) every stage of ``recipe`` into ``out``, then write the report.

    Each stage's files appear together when it finishes, or not at all
    (:mod:`.stages`); the report's three files likewise.
    ``log`` takes a line per stage; ``progress`` shows the training log and bars."""
    from convforge.pipeline import report
    from convforge.runtime.plan import Plan

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the run")
    started = time.perf_counter()
    run = Run(recipe, out, force=force, log=log, progress=progress)
    for stage in STAGES:
        run.run(stage)
    plan = Plan.read(out / "plan.json")
    doc = report.build(recipe, out, run.results, plan, run.reused)
    with together() as staging:
        md, html = doc.write(out, staging=staging)
        results = json.dumps(run.results, indent=2, default=str) + "\n"
        staging.file(out / "report.json").write_text(results, encoding="utf-8")
    return Outcome(out, md, html, run.results, run.reused, time.perf_counter() - started)
