"""``convforge demo``: the pipeline end to end on the bundled data, ending in a report.

Like ``cli.py``, this module may use all three parts. Steps today: the model
zoo, the lecture's initialization experiment, training the default recipe
(a small-stem ResNet-18) on scikit-learn's digits, and exporting it
(BatchNorm folded, validated fp32/fp16/int8 ONNX), then benchmarking the
exported files on every runtime backend that runs here. Everything goes to one folder:
``report.md`` for a person, ``report.json`` for a machine, plots and the
training run beside them.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from convforge import __version__
from convforge.files import ensure_dir, write_text


def run_demo(out: Path, epochs: int = 15, json_output: bool = False) -> dict:
    """Run every demo step, write the report into ``out`` and print it; return the record.

    ``epochs`` of the training step (the default recipe's 15; fewer for a quick look).
    """
    import torch

    out = ensure_dir(out)
    started = time.perf_counter()
    report: dict = {
        "convforge_version": __version__,
        "torch_version": str(torch.__version__),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "steps": {},
    }
    md = ["# convforge demo report", ""]
    say = (lambda *a: None) if json_output else print
    for title, step in (
        ("model zoo", _model_zoo),
        ("initialization experiment", _init_experiment),
        ("training on digits", lambda o, r, m: _train(o, r, m, epochs, json_output)),
        ("export to ONNX", _export),
        ("benchmark", _bench),
    ):
        say(f"demo: {title} ...")
        step(out, report["steps"], md)

    report["seconds"] = round(time.perf_counter() - started, 2)
    md.append(
        f"Finished in {report['seconds']} s (convforge {__version__}, torch {torch.__version__})."
    )
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text(out / "report.md", "\n".join(md) + "\n")
    if json_output:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(md))
        print(f"\nreport: {out / 'report.md'} (JSON: {out / 'report.json'})")
        print(f"serve it: convforge serve {out / 'model.onnx'}")
    return report


def _model_zoo(out: Path, steps: dict, md: list[str]) -> None:
    from convforge.builder import ModelConfig, list_models
    from convforge.builder import complexity as cx

    zoo = [cx.as_record(ModelConfig(n), cx.measure(ModelConfig(n), 224)) for n in list_models()]
    steps["model_zoo"] = zoo
    md += ["## Model zoo (224 px, 3 channels, 1000 classes)", "", *_code(cx.format_records(zoo))]


def _init_experiment(out: Path, steps: dict, md: list[str]) -> None:
    from convforge.builder import ModelConfig
    from convforge.builder import diagnose_init as di

    steps["init_experiment"] = []
    md += ["## Weight initialization: activation std by depth (plain 10-layer CNN, no norm)", ""]
    for activation in ("relu", "tanh"):
        base = ModelConfig(
            "plain", num_classes=10, stem="small", norm="none", activation=activation
        )
        runs = di.run_init_experiment(base, ["small", "xavier", "kaiming"])
        plot = out / f"init-plain-{activation}.png"
        di.plot_init_experiment(runs, plot)
        steps["init_experiment"].append(di.as_record(runs) | {"plot": plot.name})
        md += [*_code(di.format_runs(runs)), f"![init, {activation}]({plot.name})", ""]


def _train(out: Path, steps: dict, md: list[str], epochs: int, quiet: bool) -> None:
    from convforge.builder.training.config import TrainConfig, recipe_model
    from convforge.builder.training.trainer import train

    cfg = TrainConfig(epochs=epochs, out=str(out / "train"))
    result = train(recipe_model("resnet18", cfg.input_size), cfg, progress=not quiet)
    best = result.history[result.best_epoch - 1]
    steps["train"] = {
        "run": "train",
        "best_val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs_run,
        "seconds": round(result.seconds, 2),
        "images_per_s": best["images_per_s"],
        "checkpoint": "train/best.pt",
    }
    md += [
        "## Training: the default recipe on scikit-learn's digits",
        "",
        f"Small-stem ResNet-18 (base width 16), 32 px, {epochs} epochs, SGD + cosine: "
        f"best validation accuracy **{result.best_val_acc:.2%}** at epoch {result.best_epoch} "
        f"({result.seconds:.0f} s, {best['images_per_s']:.0f} training images/s). "
        "Checkpoint `train/best.pt`, per-epoch numbers in `train/metrics.csv`.",
        "",
        "![training curves](train/curves.png)",
        "",
    ]


def _export(out: Path, steps: dict, md: list[str]) -> None:
    from convforge.export import ExportOptions, export_checkpoint

    report = export_checkpoint(
        out / "train" / "best.pt", out / "model.onnx", ExportOptions(fp16=True, int8=True)
    )
    steps["export"] = report.as_dict()
    md += [
        "## Export: BatchNorm folded, validated ONNX (fp32, fp16, int8)",
        "",
        *_code(report.format()),
        "`model.onnx` carries its preprocessing in its metadata (`convforge inspect model.onnx`); "
        "`model.pt2` is the same folded model as a torch.export program.",
        "",
    ]


def _bench(out: Path, steps: dict, md: list[str]) -> None:
    from convforge.runtime import bench

    cfg = bench.BenchConfig(batch_sizes=(1, 8), warmup_seconds=0.5, seconds=1.0, iters=20)
    models = [str(out / "model.onnx"), str(out / "model.int8.onnx")]
    records, skipped = bench.bench_matrix(models, None, cfg)
    steps["bench"] = {"environment": bench.environment(), "records": records, "skipped": skipped}
    md += [
        "## Benchmark of the exported model (batch 1 and 8, end to end)",
        "",
        *_code(bench.format_table(records)),
        *(f"- not run: {s}" for s in skipped),
        "",
    ]


def _code(text: str) -> list[str]:
    """Markdown lines that show ``text`` verbatim (a fenced block and a blank line)."""
    return ["```", text, "```", ""]
