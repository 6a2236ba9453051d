"""``convforge demo``: the pipeline end to end on the bundled data, ending in a report.

Like ``cli.py``, this module may use all three parts. It grows with the
project: today it shows the model zoo and the lecture's initialization
experiment; training on scikit-learn's digits, export and benchmarks join it
as those parts land. Everything goes to one folder: ``report.md`` for a
person, ``report.json`` for a machine, PNG plots beside them.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from tqdm import tqdm

from convforge import __version__
from convforge.files import ensure_dir, write_text

# The model `convforge train` defaults to: a small-stem ResNet-18 on 32 px grayscale digits.
DEFAULT_MODEL = dict(arch="resnet18", num_classes=10, in_channels=1, stem="small")
DEFAULT_INPUT_SIZE = 32


def run_demo(out: Path, json_output: bool = False) -> dict:
    """Run every demo step, write the report into ``out`` and print it; return the record."""
    import torch

    from convforge.builder import ModelConfig, list_models
    from convforge.builder import complexity as cx
    from convforge.builder import diagnose_init as di

    out = ensure_dir(out)
    started = time.perf_counter()
    report: dict = {
        "convforge_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "steps": {},
    }
    md = ["# convforge demo report", ""]
    # disable=None shows the bar only on a terminal.
    steps = tqdm(total=3, desc="demo", unit="step", disable=json_output or None)

    steps.set_postfix_str("model zoo")
    zoo = [cx.as_record(ModelConfig(n), cx.measure(ModelConfig(n), 224)) for n in list_models()]
    report["steps"]["model_zoo"] = zoo
    md += ["## Model zoo (224 px, 3 channels, 1000 classes)", "", *_code(cx.format_records(zoo))]
    steps.update()

    steps.set_postfix_str("default model")
    cfg = ModelConfig(**DEFAULT_MODEL)
    default = cx.as_record(cfg, cx.measure(cfg, DEFAULT_INPUT_SIZE))
    report["steps"]["default_model"] = default
    md += ["## The default training model (digits)", "", *_code(cx.format_records([default]))]
    steps.update()

    steps.set_postfix_str("init experiment")
    report["steps"]["init_experiment"] = []
    md += ["## Weight initialization: activation std by depth (plain 10-layer CNN, no norm)", ""]
    for activation in ("relu", "tanh"):
        base = ModelConfig(
            "plain", num_classes=10, stem="small", norm="none", activation=activation
        )
        runs = di.run_init_experiment(base, ["small", "xavier", "kaiming"])
        plot = out / f"init-plain-{activation}.png"
        di.plot_init_experiment(runs, plot)
        record = di.as_record(runs) | {"plot": plot.name}
        report["steps"]["init_experiment"].append(record)
        md += [*_code(di.format_runs(runs)), f"![init, {activation}]({plot.name})", ""]
    steps.update()
    steps.close()

    report["seconds"] = round(time.perf_counter() - started, 2)
    md.append(
        f"Finished in {report['seconds']} s with convforge {__version__}, "
        f"torch {torch.__version__}."
    )
    write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text(out / "report.md", "\n".join(md) + "\n")
    if json_output:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(md))
        print(f"\nreport: {out / 'report.md'} (JSON: {out / 'report.json'})")
    return report


def _code(text: str) -> list[str]:
    """Markdown lines that show ``text`` verbatim (a fenced block and a blank line)."""
    return ["```", text, "```", ""]
