"""``--plan`` for ``predict``, ``bench`` and ``serve``: a plan from ``convforge tune`` runs
as tuned.

The model files given must be ones the plan was made for (the reference or a
variant, by path or content); the plan's entry then runs as tuned: predict
takes the entry closest to the number of images (at most 32, its chunk),
bench the entry closest to each batch size (default: the plan's), serve the
entry closest to ``--max-batch-size`` (under load the batcher fills batches
up to it). ``--backend``/``--backends``/``--set`` with ``--plan`` are an
error: the plan says what runs. A plan runs only files inside its own folder,
and only as they were when tuned: a changed file (sha256) is an error unless
``--force-plan`` (then a warning).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from convforge.cli.arguments import given, settings_from
from convforge.errors import UserError

PLAN_HELP = "a plan from `convforge tune`: run its backend, file and options"
FORCE_PLAN_HELP = "with --plan: run its files even if they changed since tuning (warns)"


def options_text(options: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def use_plan(path: str, models: list[str], conflicts: dict[str, bool], force: bool = False):
    """The plan at ``path`` after checking that no option in ``conflicts`` was given (the
    plan says what runs), that every file in ``models`` belongs to it, and the machine
    (a warning when the plan was measured elsewhere). ``force`` (--force-plan): its
    changed files run, with a warning, instead of being an error (:attr:`Plan.force`)."""
    from convforge.runtime.plan import Plan

    given = [flag for flag, set_ in conflicts.items() if set_]
    if given:
        raise UserError(f"--plan runs the plan's backend and options; drop {' and '.join(given)}")
    plan = Plan.read(path)
    plan.force = force
    for model in models:
        plan.check_model(model)
    plan.check_environment()
    return plan


def bench_with_plan(args, cfg, labelled, overrides=None) -> list[dict]:
    """``bench --plan``'s records: the plan's entry closest to each batch size (the
    plan's own batch sizes unless --batch-sizes names some, even the default ones), its
    files read with ``overrides`` (--mean, --labels, ...)."""
    from convforge.runtime.bench import bench_plan

    plan = use_plan(args.plan, args.models, {"--backends": args.backends != "available",
                                             "--set": bool(args.set)}, args.force_plan)  # fmt: skip
    if not given(args, "batch_sizes"):
        cfg = dataclasses.replace(cfg, batch_sizes=tuple(e.batch_size for e in plan.entries))
    if not args.json:
        for bs in cfg.batch_sizes:
            e = plan.entry(bs)
            print(f"plan, batch {bs}: {e.backend} {Path(e.file).name} {options_text(e.options)}")
    return bench_plan(plan, cfg, labelled, overrides)


def serve_with_plan(args, models: dict[str, str], batching, overrides=None):
    """``serve --plan``'s ServeConfig: the one model given, served from the plan's file,
    backend and options of the entry closest to ``--max-batch-size``, read with
    ``overrides`` (--mean, --labels, ...)."""
    from convforge.runtime.serve.server import ServeConfig

    if len(models) != 1:
        raise UserError(f"--plan serves one model (its plan's), got {len(models)}")
    plan = use_plan(args.plan, list(models.values()), {"--backend": args.backend != "auto",
                                                       "--set": bool(args.set)},
                    args.force_plan)  # fmt: skip
    entry = plan.entry(batching.max_batch_size)
    plan.check_file(entry)
    (name,) = models
    return settings_from(ServeConfig, args, models={name: entry.file}, backend=entry.backend,
                         options=dict(entry.options), batching=batching,
                         overrides=overrides)  # fmt: skip
