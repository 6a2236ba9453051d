"""``convforge tune``: search, write the plan, print every candidate and the choice.

``tune`` checks everything it can before the search (files, backends, output
folder, the images), runs :func:`convforge.runtime.tune.tune` with a progress
bar, writes the plan and prints every candidate and the choice per batch size.

The accuracy check runs on the first file's own dataset: a convforge export
names it, with how its validation split was drawn, in its ``dataset``
metadata (top-1 against the labels; the builder loads it, so this needs the
train extra). ``--dataset SPEC`` names another labelled dataset;
``--images PATH...`` (image files or folders, unlabelled) checks top-1
agreement with the fp32 file and needs no torch. When none of these can be
had, tune stops before measuring anything.

``--plan`` (predict, bench, serve) is :mod:`convforge.cli.plan`. The plan is
written beside the models (or in a folder above them), so tune refuses an
output folder elsewhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from convforge import extras
from convforge.cli.arguments import (
    add_json,
    add_model_overrides,
    add_settings,
    csv,
    model_overrides,
    settings_from,
)
from convforge.cli.plan import options_text
from convforge.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def tune_parser(p: argparse.ArgumentParser) -> None:
    from convforge.runtime.tune import TuneConfig

    p.description = (
        "Find the fastest backend x precision variant x settings per batch size on this "
        "machine, within an accuracy budget against the fp32 file, and write a plan that "
        "predict, bench and serve run with --plan. Candidates are timed in interleaved "
        "rounds (medians over rounds); slow ones are pruned to fit --budget-seconds."
    )
    p.add_argument("models", nargs="+", help="the fp32 .onnx and its variants (fp16, int8, ...)")
    g = p.add_argument_group("accuracy check (default: the dataset the first file names)")
    g.add_argument("--dataset", help="dataset spec: top-1 on its labelled val split (needs torch)")
    g.add_argument(
        "--images", nargs="+", metavar="PATH", help="image files or folders: top-1 agreement "
        "with the fp32 file (unlabelled)",
    )  # fmt: skip
    p.add_argument(
        "--backends", default="available", help="comma-separated backends, or 'available' "
        "(every one that runs here)",
    )  # fmt: skip
    add_settings(p, TuneConfig, "search")
    p.add_argument("-o", "--output", required=True, help="the plan to write (JSON)")
    add_model_overrides(p, output_flags=("--output-name",))
    add_json(p)
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    from convforge.contract import read_info
    from convforge.runtime.backends import BACKENDS
    from convforge.runtime.plan import plan_path
    from convforge.runtime.tune import TuneConfig, tune

    extras.require_engine("convforge tune")
    cfg = settings_from(TuneConfig, args).check()
    overrides = model_overrides(args)
    for path in args.models:
        read_info(path, overrides)  # UserError: missing or not a model
    names = None
    if args.backends != "available":
        names = csv(args.backends)
        unknown = [n for n in names if n not in BACKENDS]
        if unknown or not names:
            raise UserError(
                f"unknown backend {', '.join(map(repr, unknown)) or repr(args.backends)}; "
                f"choose from: {', '.join(BACKENDS)} or 'available'"
            )
    out = Path(args.output)
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: folder {out.parent} does not exist")
    for path in args.models:
        plan_path(path, out)  # UserError: a plan names files inside its own folder only
    if args.dataset and args.images:
        raise UserError("give --dataset or --images, not both")
    images, labels, dataset = _accuracy_data(args, overrides)
    plan = tune(args.models, images, labels, cfg, names, progress=not args.json,
                dataset=dataset, overrides=overrides)  # fmt: skip
    plan.write(out)
    if args.json:
        print(json.dumps({"format": plan.format, **dataclasses.asdict(plan)}, indent=2))
        return 0
    print(format_plan(plan))
    print(f"wrote {out}")
    return 0


def _accuracy_data(args, overrides=None) -> tuple[list, list | None, str | None]:
    """Images, labels (None: agreement with fp32) and dataset name for tune's accuracy check,
    the first file read with ``overrides`` (--labels, ...).

    ``--dataset`` or ``--images`` when given, else the dataset the first file's
    metadata names (convforge exports record it, with its validation split).
    """
    from convforge.cli.runtime import _labelled_images
    from convforge.contract import read_info

    what = "convforge tune"
    if args.dataset:
        labelled = _labelled_images(args.dataset, args.models[0], f"{what} --dataset", overrides)
        return (*labelled, args.dataset)
    if args.images:
        return image_files(args.images), None, None
    own = read_info(args.models[0], overrides).metadata.get("dataset")
    if not own:
        raise UserError(
            f"{args.models[0]} does not name its dataset; give --dataset SPEC (top-1 on its "
            "labelled val split, e.g. digits) or --images PATH... (agreement with the fp32 file)"
        )
    try:
        split = {"val_fraction": own["val_fraction"], "seed": own["seed"]}
        images, labels = _labelled_images(own["spec"], args.models[0], what, overrides, **split)
    except UserError as e:
        raise UserError(
            f"{args.models[0]} was trained on {own['spec']}, which cannot be loaded here ({e}); "
            "give --dataset SPEC or --images PATH..."
        ) from None
    return images, labels, own["spec"]


def image_files(paths: list[str]) -> list[Path]:
    """Image files among ``paths``, folders searched recursively (by suffix), sorted;
    UserError for a path that does not exist or a folder without images."""
    files: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found = sorted(f for f in item.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"folder {item} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise UserError(f"image {item} does not exist")
    return files


def format_plan(plan) -> str:
    """Every candidate (a table), then the choice per batch size, skips and the machine."""
    from convforge.console import format_table

    def num(value, digits):
        return "-" if value is None else round(value, digits)

    rows = [
        [
            r["batch_size"], r["backend"], Path(r["file"]).name, options_text(r["options"]),
            r["precision"] or "-", num(r["accuracy_delta_points"], 2), num(r["p50_ms"], 3),
            num(r["p99_ms"], 3), num(r["throughput_ips"], 1), r["status"],
            r["why"] if r["status"] != "chosen" else "",
        ]
        for r in sorted(plan.candidates, key=lambda r: (r["batch_size"], r["p50_ms"] or 1e30))
    ]  # fmt: skip
    headers = ["batch", "backend", "file", "settings", "precision", "top-1 pts", "p50 ms", "p99 ms",
               "images/s", "status", "why"]  # fmt: skip
    acc = plan.accuracy
    metric = "top-1" if acc["metric"] == "top1" else "top-1 agreement with the fp32 file"
    lines = [
        format_table(headers, rows),
        "",
        f"accuracy: {metric} on {acc['images']} images"
        + (f" of {acc['dataset']}" if acc["dataset"] else "")
        + f" (one image: {100 / acc['images']:.2g} points); reference "
        f"{Path(plan.model).name} on {acc['reference_backend']}: {acc['reference']:.2%}; "
        f"at most {acc['max_drop_points']} points below allowed",
    ]
    for e in plan.entries:
        lines.append(
            f"batch {e.batch_size}: {e.backend} {Path(e.file).name} {options_text(e.options)} "
            f"({e.precision}): p50 {e.p50_ms:.3f} ms, p99 {e.p99_ms:.3f} ms, "
            f"{e.throughput_ips:,.0f} images/s, top-1 {e.accuracy_delta_points:+.2f} points"
        )
    lines += [f"skipped: {s}" for s in plan.skipped]
    env, search = plan.environment, plan.search
    gpu = f", {env['gpu']}" if env.get("gpu") else ""
    lines.append(
        f"{env.get('cpu')}, {env.get('logical_cores')} logical cores{gpu}; searched "
        f"{search['candidates']} candidates in {search['seconds']} s "
        f"(budget {search['budget_seconds']:g} s)"
    )
    return "\n".join(lines)


PARSERS = {"tune": tune_parser}
