"""`convforge pipeline` end to end on a tiny recipe, then again reusing every step;
`convforge demo` is the default recipe."""

import json
import re

import pytest

from convforge.cli import main
from convforge.pipeline import Recipe

TINY = """\
name: tiny
description: a tiny recipe for the tests
model: {arch: resnet18, stem: small, options: {base_width: 8}}
train: {dataset: digits, input_size: 16, epochs: 2}
export: {fp16: true, int8: true, input_format: uint8, calib_samples: 64, val_samples: 64}
tune: {batch_sizes: [1, 4], budget_seconds: 3, rounds: 2, iters: 3, backends: [ort-cpu, torch]}
bench: {batch_sizes: [1, 4], warmup_iters: 1, warmup_seconds: 0.01, seconds: 0.05, iters: 3,
        backends: [ort-cpu, torch]}
report: {samples: 2, variants: 2, init_seeds: 2}
"""
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["'](?!data:|#)|url\(|@import|https?://""")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    (folder / "tiny.yaml").write_text(TINY)
    return folder


@pytest.mark.slow
def test_tiny_recipe_end_to_end_then_reused(tiny_run, capsys):
    recipe, out = tiny_run / "tiny.yaml", tiny_run / "run"
    assert main(["pipeline", str(recipe), "--out", str(out), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["reused"] == []
    steps = first["steps"]
    assert set(steps) == {"data", "init", "train", "export", "tune", "bench"}
    for name in ("model.onnx", "model.pt2", "model.fp16.onnx", "model.int8.onnx",
                 "model.uint8.onnx", "model.int8.uint8.onnx", "train/best.pt",
                 "train/metrics.csv", "train/curves.png", "plan.json", "bench.json",
                 "latency.png", "data.png", "sample.png", "init-relu.png", "export.json",
                 "report.md", "report.html", "report.json"):  # fmt: skip
        assert (out / name).exists(), name
    assert steps["train"]["epochs"] == 2 and steps["export"]["validation"]["passed"]
    backends = {(r["backend"], r["precision"]) for r in steps["bench"]["records"]}
    assert {("ort-cpu", "fp32"), ("ort-cpu", "int8"), ("torch", "fp32")} == backends - {
        ("ort-cpu", "fp16")
    }
    # torch, named in the recipe, runs the fp32 program only: the others are listed, not fatal.
    skipped = steps["bench"]["skipped"]
    assert any("model.int8.onnx is an int8 variant, which has none" in s for s in skipped)
    assert all(r["top1_accuracy"] > 0.5 for r in steps["bench"]["records"])

    md = (out / "report.md").read_text()
    sections = ["## Data", "## Training", "## Initialization diagnostic", "## Export",
                "## Backends", "## Recommendation", "## Use it"]  # fmt: skip
    assert [md.index(s) for s in sections] == sorted(md.index(s) for s in sections)
    assert md.index("> **Recommended:**") < md.index("## Data")
    plan = json.loads((out / "plan.json").read_text())
    chosen = plan["entries"][0]
    assert f"`{chosen['file']}` on **{chosen['backend']}**" in md
    assert f"convforge serve {out}/model.onnx --plan {out}/plan.json" in md
    assert f"convforge predict {out}/model.onnx {out}/sample.png --plan {out}/plan.json" in md

    page = (out / "report.html").read_text()
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    assert page.count('src="data:image/png;base64,') == md.count("![")

    # The same recipe again: nothing reruns, the report is rebuilt from the stamps.
    assert main(["pipeline", str(recipe), "--out", str(out), "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["reused"] == ["data", "init", "train", "export", "tune", "bench"]
    assert second["steps"]["train"] == steps["train"]

    # The command it prints runs: predict with the plan on the sample image.
    assert main(["predict", str(out / "model.onnx"), str(out / "sample.png"),
                 "--plan", str(out / "plan.json"), "--json"]) == 0  # fmt: skip
    predicted = json.loads(capsys.readouterr().out)
    assert predicted


@pytest.mark.slow
def test_a_changed_tune_setting_reruns_tune_only(tiny_run, capsys):
    out = tiny_run / "run"
    if not (out / ".steps" / "bench.json").exists():
        pytest.skip("needs the end-to-end run above")
    changed = tiny_run / "changed.yaml"
    changed.write_text(TINY.replace("budget_seconds: 3", "budget_seconds: 2"))
    assert main(["pipeline", str(changed), "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["reused"] == ["data", "init", "train", "export", "bench"]


def test_pipeline_and_demo_help(capsys):
    for command in ("pipeline", "demo"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0 and f"usage: convforge {command}" in capsys.readouterr().out


def test_demo_runs_the_default_recipe(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_run(recipe, out, force=False, log=print, progress=True):
        seen.update(recipe=recipe, out=out, force=force)
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr("convforge.pipeline.run_pipeline", fake_run)
    assert main(["demo", "--out", str(tmp_path), "--force"]) == 130
    assert seen == {"recipe": Recipe(), "out": tmp_path, "force": True}
    # Interrupted: it says how to resume.
    assert f"`convforge demo --out {tmp_path}` resumes where it stopped" in capsys.readouterr().err


def test_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(TINY)
    (tmp_path / "file").write_text("")
    assert main(["pipeline", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "file")]) == 2
    assert "is a file; give a folder for the run" in capsys.readouterr().err
