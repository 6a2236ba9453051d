"""`convforge demo`: the pipeline end to end on one epoch."""

import json

import pytest

from convforge.cli import main


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0 and "usage: convforge demo" in capsys.readouterr().out


def test_demo_writes_a_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "1", "--json"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert {"model_zoo", "init_experiment", "train", "export", "bench"} <= set(report["steps"])
    backends = {(r["backend"], r["precision"]) for r in report["steps"]["bench"]["records"]}
    assert {("ort-cpu", "fp32"), ("ort-cpu", "int8"), ("torch", "fp32")} <= backends
    assert report["steps"]["export"]["validation"]["passed"]
    assert set(report["steps"]["export"]["variants"]) == {"fp16", "int8"}
    for name in ("model.onnx", "model.pt2", "model.fp16.onnx", "model.int8.onnx"):
        assert (tmp_path / name).exists()
    assert report["steps"]["train"]["epochs"] == 1
    assert (tmp_path / "train" / "best.pt").exists()
    assert (tmp_path / "report.md").read_text().startswith("# convforge demo report")
    for activation in ("relu", "tanh"):
        assert (tmp_path / f"init-plain-{activation}.png").exists()
    # The torch backend runs the fp32 program only, and says so for the int8 file.
    skipped = report["steps"]["bench"]["skipped"]
    assert any("model.int8.onnx is an int8 variant, which has none" in s for s in skipped)
