"""The steps after training: compress (optional), export, tune, bench.

Each body takes the running :class:`~convforge.pipeline.steps.Run` and
returns its result record (``outputs``: the files it wrote, relative to the
run folder), as :mod:`.steps` describes. The compress step makes the train
step's ``best.pt`` smaller (``compress/small.pt``, :func:`compress_step`);
export then writes ``small.onnx`` and the same variants beside ``model.onnx``
and its own, and tune and bench take every file, the original's fp32 file
first: it is the accuracy reference.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

SMALL = "small.pt"  # the compress step's checkpoint, in <run>/compress/


def exported_files(export: dict) -> list[str]:
    """The .onnx files of one export record: its fp32 file, then its variants."""
    return [export["onnx"], *(v["path"] for v in export["variants"].values())]


# -- compress ----------------------------------------------------------------------------------


def compress_step(run) -> dict:
    """``convforge compress`` on the train step's ``best.pt`` into ``compress/small.pt``.
    Its rounds are kept in the step's partial folder, so an interrupted step resumes at
    the round it was in; its log lines and a UserError name the recipe keys
    (``compress.max_drop``), not the command-line options."""
    from convforge.builder.compress.job import CompressOptions, compress
    from convforge.pipeline.recipe import as_keys, keyed

    partial = run.partial("compress")
    if not run.resumable("compress"):
        run.start_afresh("compress")
    checkpoint = run.out / run.results["train"]["checkpoint"]
    opts = dataclasses.replace(run.recipe.compress, checkpoint=str(checkpoint),
                               out=str(partial / SMALL), work=str(partial / "rounds"))  # fmt: skip
    probe = _latency_probe(checkpoint, opts)

    def log(line: str) -> None:  # compress's lines name its options; here they are keys
        run.log(keyed(line, CompressOptions, "compress."))

    result = as_keys(lambda: compress(opts, latency=probe, log=log, progress=run.progress),
                     CompressOptions, "compress.")  # fmt: skip
    run.staging.adopt(partial, run.out / "compress")  # kept for resuming if the step fails
    return {
        **result.record,
        "checkpoint": f"compress/{SMALL}",
        "seconds": round(result.seconds, 1),
        "peak_memory_mb": result.peak_memory_mb,
        "outputs": [f"compress/{SMALL}"],
    }


def _latency_probe(checkpoint: Path, opts):
    """The batch-1 latency probe a ``latency_ms`` target needs (None for a MAC target), as
    ``convforge compress`` builds it."""
    if opts.latency_ms is None:
        return None
    from convforge.builder.checkpoint import load_checkpoint
    from convforge.export.latency import latency_probe

    data = load_checkpoint(checkpoint).data_config
    size = data["input_size"]
    return latency_probe(opts.backend, (data["channels"], size, size))


# -- export ------------------------------------------------------------------------------------


def export_step(run) -> dict:
    """The train step's checkpoint as ``model.onnx`` and its variants; after a compress
    step, its checkpoint as ``small.onnx`` with the same variants, under ``small``.
    Every file is staged with the step's own, so all appear together or none."""
    record = _export_one(run, run.results["train"]["checkpoint"], "model.onnx")
    text = record["text"]
    if "compress" in run.results:
        small = _export_one(run, run.results["compress"]["checkpoint"], "small.onnx")
        record["small"] = small
        text += f"\n\ncompressed model ({small['checkpoint']}):\n{small['text']}"
    run.output("export.json").write_text(
        json.dumps(_without_text(record), indent=2) + "\n", encoding="utf-8"
    )
    run.output("export.txt").write_text(text + "\n", encoding="utf-8")
    small_files = record.get("small", {}).get("files", [])
    record["outputs"] = record["files"] + small_files + ["export.json", "export.txt"]
    return record


def _export_one(run, checkpoint: str, name: str) -> dict:
    """Export ``<run>/<checkpoint>`` to ``<run>/<name>`` and its variants: the export
    report's record with absolute paths, plus ``checkpoint``, ``files`` (the .onnx names)
    and ``text`` (the report as ``convforge export`` prints it)."""
    from convforge.export import export_checkpoint

    report = export_checkpoint(
        run.out / checkpoint, run.out / name, run.recipe.export, staging=run.staging
    )
    record = report.as_dict()
    files = [report.onnx, *(v["path"] for v in record["variants"].values())]
    record["files"] = [Path(f).name for f in files]
    record["text"] = report.format()
    record["checkpoint"] = checkpoint
    record["onnx"] = str(Path(report.onnx).resolve())
    for v in record["variants"].values():
        v["path"] = str(Path(v["path"]).resolve())
    return record


def _without_text(record: dict) -> dict:
    """``record`` for export.json: the text reports are in export.txt."""
    out = {k: v for k, v in record.items() if k != "text"}
    if "small" in out:
        out["small"] = _without_text(out["small"])
    return out


# -- tune, bench -------------------------------------------------------------------------------


def tune_step(run) -> dict:
    """``convforge tune`` over every exported file (original and compressed) -> plan.json."""
    from convforge.runtime.tune import tune

    images, labels = run.val_images()
    section = run.recipe.tune
    plan = tune(run.model_files(), images, labels, section.settings, section.backends,
                progress=run.progress, dataset=run.recipe.train.dataset)  # fmt: skip
    plan.write(run.output("plan.json"))
    return {"plan": "plan.json", "outputs": ["plan.json"]}


def bench_step(run) -> dict:
    """Every exported file on every backend, with its top-1 -> bench.json, latency.png."""
    from convforge.runtime import bench
    from convforge.runtime.environment import environment

    section = run.recipe.bench
    # A backend the recipe names that cannot run one of the files (torch: fp32 only) is
    # listed as not run in the report, as with every backend available here.
    records, skipped = bench.bench_matrix(
        run.model_files(), section.backends, section.settings, labelled=run.val_images(),
        skip_failures=True,
    )  # fmt: skip
    env = environment()
    bench.write_json(run.output("bench.json"), records, env)
    bench.plot(run.output("latency.png"), records)
    return {
        "records": records,
        "skipped": skipped,
        "environment": env,
        "plot": "latency.png",
        "outputs": ["bench.json", "latency.png"],
    }
