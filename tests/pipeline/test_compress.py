"""A recipe with a compress step: the train step's best.pt made smaller, exported beside the
original, tuned and benchmarked with it, and charted in the report; reused and resumed like
the other steps."""

import json
import sys
from pathlib import Path

import pytest

from convforge.errors import UserError
from convforge.pipeline import load_recipe, run_pipeline, tradeoff
from convforge.pipeline.recipe import Recipe, as_keys
from convforge.pipeline.steps import STEPS, Run

RECIPES = Path(__file__).parents[2] / "recipes"

TINY = """\
name: tinyc
model: {arch: resnet18, stem: small, options: {base_width: 8}}
train: {dataset: 'synthetic:classes=4,size=16,per_class=30', input_size: 16, epochs: 1}
compress: {speedup: 1.5, rounds: 1, epochs: 1, max_drop: 100, round_to: 1}
export: {int8: true, calib_samples: 32, val_samples: 32}
tune: {batch_sizes: [1], budget_seconds: 1, rounds: 1, iters: 3, max_drop: 100,
       backends: [ort-cpu]}
bench: {batch_sizes: [1], warmup_iters: 1, warmup_seconds: 0.01, seconds: 0.05, iters: 3,
        backends: [ort-cpu]}
report: {samples: 2, variants: 2, init_diagnostic: false}
"""
STEP_NAMES = ["data", "train", "compress", "export", "tune", "bench"]
FILES = ["model.onnx", "model.int8.onnx", "small.onnx", "small.int8.onnx"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny recipe run once: (recipe, run folder, outcome, log lines)."""
    folder = tmp_path_factory.mktemp("compress")
    (folder / "tiny.yaml").write_text(TINY)
    recipe = load_recipe(folder / "tiny.yaml")
    lines: list[str] = []
    outcome = run_pipeline(recipe, folder / "run", log=lines.append, progress=False)
    return recipe, folder / "run", outcome, lines


@pytest.mark.slow
def test_compress_step_end_to_end(tiny):
    """small.pt is exported beside the original, tune and bench get all four files, and the
    report has the compression section, the chart and the recommendation with its why."""
    _, out, outcome, _ = tiny
    assert list(outcome.results) == STEP_NAMES and outcome.reused == []
    compress = outcome.results["compress"]
    assert compress["checkpoint"] == "compress/small.pt" and compress["kept"] == 1
    assert compress["macs"] < compress["original"]["macs"]
    for name in [*FILES, "small.pt2", "compress/small.pt", "tradeoff.png", "report.html"]:
        assert (out / name).exists(), name
    assert not (out / ".steps" / "compress.partial").exists()  # became compress/

    export = outcome.results["export"]
    assert [Path(f).name for f in (export["onnx"], export["small"]["onnx"])] == FILES[::2]
    assert export["small"]["validation"]["passed"]
    plan = json.loads((out / "plan.json").read_text())
    assert sorted(Path(f).name for f in plan["files"]) == sorted(FILES)  # tune saw both
    assert Path(plan["model"]).name == "model.onnx"  # the original fp32 is the reference
    benched = {Path(r["model"]).name for r in outcome.results["bench"]["records"]}
    assert benched == set(FILES)

    md = (out / "report.md").read_text()
    sections = ["## Training", "## Compression", "## Export", "## Backends",
                "## Accuracy and latency", "## Recommendation", "## Use it"]  # fmt: skip
    assert [md.index(s) for s in sections] == sorted(md.index(s) for s in sections)
    assert "![top-1 against p50 latency at batch 1](tradeoff.png)" in md
    assert "> **Compressed:** `compress/small.pt`" in md
    chosen = plan["entries"][0]
    why = f"Recommended at batch 1: `{Path(chosen['file']).name}` on **{chosen['backend']}**"
    assert why in md and "the fastest of the 4 points within the 100-point" in md
    for name in FILES:  # one row per point in the chart's table
        model = "compressed" if name.startswith("small") else "original"
        assert f"| `{name}` | {model} |" in md
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == md.count("![")


@pytest.mark.slow
def test_a_second_run_reuses_the_compress_step(tiny):
    recipe, out, first, _ = tiny
    lines: list[str] = []
    again = run_pipeline(recipe, out, log=lines.append, progress=False)
    assert again.reused == STEP_NAMES
    assert again.results["compress"] == first.results["compress"]
    assert any(line.startswith("compress: reused") for line in lines)
    assert (out / "tradeoff.png").exists()


@pytest.mark.slow
def test_an_interrupted_compress_step_resumes_at_its_round(tiny, tmp_path, monkeypatch):
    """Stopped in round 2, the step starts again from round 2: round 1 is read back."""
    import dataclasses
    import shutil

    from convforge.builder.compress import job

    recipe, out, _, _ = tiny
    shutil.copytree(out / "train", tmp_path / "train")
    opts = dataclasses.replace(recipe.compress, rounds=2, epochs=0, speedup=2.0)
    recipe = dataclasses.replace(recipe, compress=opts)
    step = next(s for s in STEPS if s.name == "compress")
    real, calls = job.prune_to, []

    def stop_in_round_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(job, "prune_to", stop_in_round_two)
    run = Run(recipe, tmp_path, log=lambda *a: None, progress=False)
    run.results["train"] = {"checkpoint": "train/best.pt"}
    with pytest.raises(KeyboardInterrupt):
        run.run(step)
    assert (tmp_path / ".steps/compress.partial/rounds/round1/result.json").exists()
    assert not (tmp_path / "compress").exists()
    lines: list[str] = []
    run = Run(recipe, tmp_path, log=lines.append, progress=False)
    run.results["train"] = {"checkpoint": "train/best.pt"}
    run.run(step)
    assert len(calls) == 3  # round 2 again, not round 1
    assert any(line.startswith("round 1:") and "done before" in line for line in lines)
    assert [r["round"] for r in run.results["compress"]["rounds"]] == [1, 2]
    assert (tmp_path / "compress" / "small.pt").exists()


def test_compress_recipe_and_the_default_one():
    """recipes/compress.yaml has the step; the default recipe (make demo) does not."""
    recipe = load_recipe(RECIPES / "compress.yaml")
    assert recipe.compress.speedup == 2.0 and recipe.compress.checkpoint == ""
    assert [s.name for s in STEPS if s.wanted(recipe)][1:3] == ["train", "compress"]
    assert Recipe().compress is None and load_recipe(RECIPES / "default.yaml").compress is None
    assert "compress" not in [s.name for s in STEPS if s.wanted(Recipe())]


def test_a_compress_recipe_needs_torch_pruning_before_anything_runs(tmp_path, monkeypatch):
    recipe = load_recipe(RECIPES / "compress.yaml")
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # its import fails
    with pytest.raises(UserError, match="a recipe with a compress step needs Torch-Pruning"):
        run_pipeline(recipe, tmp_path / "run", log=lambda *a: None)
    assert not (tmp_path / "run").exists()


def test_a_compress_failure_names_the_recipe_key():
    """compress's own messages name command-line options; in a recipe they name keys."""
    from convforge.builder.compress.job import CompressOptions

    def fails():
        raise UserError("no pruning stayed within --max-drop 0.5: ...; see --rounds, --x-y")

    with pytest.raises(UserError) as e:
        as_keys(fails, CompressOptions, "compress.")
    assert str(e.value) == (
        "no pruning stayed within compress.max_drop 0.5: ...; see compress.rounds, --x-y"
    )


# -- the chart's points and sentence, from a plan made by hand ---------------------------------


class FakePlan:
    search = {"batch_sizes": [1, 8]}
    accuracy = {"reference": 0.9, "max_drop_points": 0.5, "metric": "top1"}

    def __init__(self, candidates, chosen):
        self.candidates = candidates
        self.entries = [chosen]


def _cand(file, backend, precision, p50, acc, status, bs=1):
    delta = None if acc is None else round((acc - 0.9) * 100, 4)
    return {"batch_size": bs, "file": f"/r/{file}", "backend": backend, "precision": precision,
            "p50_ms": p50, "accuracy": acc, "accuracy_delta_points": delta, "status": status,
            "options": {}}  # fmt: skip


def test_the_chart_has_a_point_per_model_precision_backend_and_marks_the_choice(tmp_path):
    from convforge.runtime.plan import PlanEntry

    cands = [
        _cand("model.onnx", "ort-cpu", "fp32", 2.0, 0.9, "measured"),
        _cand("model.onnx", "ort-cpu", "fp32", 1.8, 0.9, "measured"),  # other settings: faster
        _cand("model.uint8.onnx", "ort-cpu", "fp32", 1.9, 0.9, "pruned"),
        _cand("small.onnx", "ort-cpu", "fp32", 1.0, 0.898, "chosen"),
        _cand("small.int8.onnx", "ort-cpu", "int8", None, 0.85, "rejected"),
        _cand("small.onnx", "openvino", "fp32", None, None, "failed"),  # no accuracy: no point
        _cand("small.onnx", "ort-cpu", "fp32", 0.1, 0.898, "measured", bs=8),  # not batch 1
    ]
    record = {**cands[3], "settings": {}, "p99_ms": 1.2, "throughput_ips": 1000.0}
    chosen = PlanEntry(**{f: record[f] for f in PlanEntry.__dataclass_fields__})
    plan = FakePlan(cands, chosen)
    bench = [{"model": "/r/small.int8.onnx", "backend": "ort-cpu", "batch_size": 1,
              "timing": "end-to-end", "p50_ms": 0.6}]  # fmt: skip
    pts = tradeoff.points(plan, bench, {"small.onnx", "small.int8.onnx"})
    got = {(p.model, p.precision, p.backend): (p.file, p.p50_ms, p.within, p.timed_by)
           for p in pts}  # fmt: skip
    assert got == {
        ("original", "fp32", "ort-cpu"): ("model.onnx", 1.8, True, "tune"),
        ("compressed", "fp32", "ort-cpu"): ("small.onnx", 1.0, True, "tune"),
        ("compressed", "int8", "ort-cpu"): ("small.int8.onnx", 0.6, False, "bench"),
    }
    assert [p.file for p in pts if p.recommended] == ["small.onnx"]
    why = tradeoff.why(pts, plan)
    assert why.startswith("Recommended at batch 1: `small.onnx` on **ort-cpu** (compressed")
    assert "the fastest of the 2 points within the 0.5-point accuracy budget" in why
    assert "1.80x faster than the original fp32 file at its fastest (ort-cpu" in why
    assert "Faster but over the budget: `small.int8.onnx` on ort-cpu (0.600 ms, -5.00" in why
    tradeoff.draw(pts, plan, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes().startswith(b"\x89PNG")
