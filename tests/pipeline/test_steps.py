"""Step bookkeeping: reuse while inputs are the same, rerun what changed and what follows,
resume after an interruption (training from its last.pt)."""

import dataclasses
import os
from unittest import mock

import pytest

from convforge.pipeline import steps
from convforge.pipeline.recipe import Recipe
from convforge.pipeline.steps import Run, Step


class Counting:
    """Steps a -> b -> c whose settings come from ``self.settings``; counts each run."""

    def __init__(self):
        self.settings = {"a": 1, "b": 1, "c": 1}
        self.calls: list[str] = []
        self.fail: str | None = None

    def body(self, name):
        def run(r: Run) -> dict:
            if self.fail == name:
                raise KeyboardInterrupt
            self.calls.append(name)
            (r.out / f"{name}.txt").write_text(name)
            return {"value": self.settings[name], "outputs": [f"{name}.txt"]}

        return run

    def steps(self):
        return [
            Step("a", (), lambda rc: self.settings["a"], self.body("a")),
            Step("b", ("a",), lambda rc: self.settings["b"], self.body("b")),
            Step("c", ("b",), lambda rc: self.settings["c"], self.body("c")),
        ]

    def run(self, out, force=False):
        run = Run(Recipe(), out, force=force, log=lambda *a: None)
        for step in self.steps():
            run.run(step)
        return run


def test_a_second_run_reuses_every_step(tmp_path):
    c = Counting()
    c.run(tmp_path)
    run = c.run(tmp_path)
    assert c.calls == ["a", "b", "c"] and run.reused == ["a", "b", "c"]
    assert run.results["c"] == {"value": 1, "outputs": ["c.txt"]}


def test_a_changed_setting_reruns_its_step_and_those_after_it(tmp_path):
    c = Counting()
    c.run(tmp_path)
    c.settings["b"] = 2
    run = c.run(tmp_path)
    assert c.calls == ["a", "b", "c", "b", "c"] and run.reused == ["a"]
    assert run.results["b"]["value"] == 2


def test_force_reruns_everything(tmp_path):
    c = Counting()
    c.run(tmp_path)
    c.run(tmp_path, force=True)
    assert c.calls == ["a", "b", "c"] * 2


def test_a_missing_output_reruns_the_step(tmp_path):
    c = Counting()
    c.run(tmp_path)
    (tmp_path / "c.txt").unlink()
    c.run(tmp_path)
    assert c.calls == ["a", "b", "c", "c"]


def test_an_interrupted_run_resumes_at_the_step_it_stopped_in(tmp_path):
    c = Counting()
    c.fail = "b"
    with pytest.raises(KeyboardInterrupt):
        c.run(tmp_path)
    assert not (tmp_path / ".steps" / "b.json").exists()
    c.fail = None
    run = c.run(tmp_path)
    assert c.calls == ["a", "b", "c"] and run.reused == ["a"]


def test_a_corrupt_stamp_reruns_the_step(tmp_path):
    c = Counting()
    c.run(tmp_path)
    (tmp_path / ".steps" / "a.json").write_text("{not json")
    c.run(tmp_path)
    assert c.calls == ["a", "b", "c", "a"]  # same fingerprint: b and c still reused


TINY = Recipe(
    name="tiny",
    model={"arch": "resnet18", "stem": "small", "options": {"base_width": 8}},
    train=dataclasses.replace(Recipe().train, input_size=16, epochs=2),
)


def test_training_resumes_from_last_pt_after_an_interruption(tmp_path):
    """Interrupted in epoch 2, the train step resumes the same run from its last.pt."""
    from convforge.builder.training import trainer

    real = trainer._Run._epoch

    def stop_in_epoch_two(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch)

    train = next(s for s in steps.STEPS if s.name == "train")
    lines: list[str] = []
    run = Run(TINY, tmp_path, log=lines.append)
    with mock.patch.object(trainer._Run, "_epoch", stop_in_epoch_two):
        with pytest.raises(KeyboardInterrupt):
            run.run(train)
    assert (tmp_path / ".steps" / "train.partial" / "last.pt").exists()
    assert not (tmp_path / "train").exists()  # appears only when the step finishes
    run = Run(TINY, tmp_path, log=lines.append)
    with mock.patch.object(trainer._Run, "_epoch", autospec=True, side_effect=real) as epoch:
        run.run(train)
    assert [c.args[1] for c in epoch.call_args_list] == [1]  # only epoch 2 ran again
    assert any("resuming the interrupted run" in line for line in lines)
    assert run.results["train"]["epochs"] == 2 and len(run.results["train"]["history"]) == 2
    assert (tmp_path / "train" / "best.pt").exists()
    assert not (tmp_path / ".steps" / "train.partial").exists()


def test_changed_training_settings_start_afresh(tmp_path):
    """A last.pt from other settings is not resumed: its folder is cleared and training starts
    over (so a stale best.pt can never be taken for the new run's). The finished training of
    earlier settings stays until the new one has finished."""
    (tmp_path / ".steps").mkdir()
    (tmp_path / ".steps" / "train.started").write_text("another fingerprint")
    (tmp_path / ".steps" / "train.partial").mkdir()
    (tmp_path / ".steps" / "train.partial" / "last.pt").write_text("stale")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "best.pt").write_text("earlier run")
    started = []
    train = next(s for s in steps.STEPS if s.name == "train")
    with mock.patch("convforge.builder.training.trainer.train", side_effect=KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            Run(TINY, tmp_path, log=started.append).run(train)
    assert not (tmp_path / ".steps" / "train.partial" / "last.pt").exists()
    assert os.listdir(tmp_path / "train") == ["best.pt"]
    assert (tmp_path / "train" / "best.pt").read_text() == "earlier run"
    assert not any("resuming" in line for line in started)


@pytest.mark.slow
def test_transfer_recipe_pretrains_then_fine_tunes(tmp_path):
    from convforge.builder.finetune import FinetuneOptions
    from convforge.builder.transfer import STRATEGIES

    recipe = dataclasses.replace(
        TINY,
        pretrain=dataclasses.replace(
            TINY.train, dataset="synthetic:classes=4,size=16,per_class=40", epochs=1
        ),
        finetune=FinetuneOptions(pretrained="", strategy="auto"),
        train=dataclasses.replace(TINY.train, epochs=1),
    )
    run = Run(recipe, tmp_path, log=lambda *a: None, progress=False)
    for step in steps.STEPS:
        if step.name in ("pretrain", "train"):
            run.run(step)
    assert (tmp_path / "pretrain" / "best.pt").exists() and (
        tmp_path / "train" / "best.pt"
    ).exists()
    transfer = run.results["train"]["transfer"]
    assert transfer["strategy"] in STRATEGIES and transfer["reason"].startswith("auto: ")
    assert [s.name for s in steps.STEPS if s.wanted(recipe)][2:4] == ["pretrain", "train"]
    # The fine-tuned model is the pretrained one adapted: 10 digit classes, 1 channel.
    from convforge.builder.checkpoint import load_checkpoint

    ck = load_checkpoint(tmp_path / "train" / "best.pt")
    assert ck.model_config.num_classes == 10 and ck.model_config.in_channels == 1


def _tree(folder) -> dict:
    """Every path under ``folder`` (hidden ones included) -> its bytes (None: a folder)."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


def _boom(*args, **kwargs):
    raise OSError(28, "No space left on device")


def test_a_step_that_fails_leaves_no_new_file_and_every_old_one(tmp_path, monkeypatch):
    """The data step writes data.png, then cannot write sample.png: the run folder is as
    it was, its earlier data.png included, and the step has no stamp (only the bookkeeping
    folder .steps is new)."""
    data = next(s for s in steps.STEPS if s.name == "data")
    run = Run(TINY, tmp_path, log=lambda *a: None)
    (tmp_path / "data.png").write_bytes(b"an earlier grid")
    before = _tree(tmp_path)
    monkeypatch.setattr(Run, "val_images", _boom)
    with pytest.raises(OSError):
        run.run(data)
    assert _tree(tmp_path) == {**before, ".steps": None}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder holding a tiny model trained one epoch on 16 px digits in train/."""
    from convforge.builder.training.config import TrainConfig, recipe_model
    from convforge.builder.training.trainer import train

    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(input_size=16, epochs=1, out=str(out / "train"))
    train(recipe_model("plain", 16, options={"depth": 1, "width": 4}), cfg, progress=False)
    return out


def test_the_export_step_is_all_or_nothing(trained, tmp_path, monkeypatch):
    """export.txt cannot be written: neither the model files nor the reports of this run
    appear, and an earlier model.onnx stays."""
    import shutil

    shutil.copytree(trained / "train", tmp_path / "train")
    (tmp_path / "model.onnx").write_bytes(b"an earlier export")
    before = _tree(tmp_path)
    export = next(s for s in steps.STEPS if s.name == "export")
    run = Run(TINY, tmp_path, log=lambda *a: None)
    run.results["train"] = {"checkpoint": "train/best.pt"}
    monkeypatch.setattr("convforge.export.exporter.ExportReport.format", _boom)
    with pytest.raises(OSError):
        run.run(export)
    assert _tree(tmp_path) == {**before, ".steps": None}
    monkeypatch.undo()
    run.run(export)
    assert {"model.onnx", "model.pt2", "export.json", "export.txt"} <= set(os.listdir(tmp_path))
    assert (tmp_path / ".steps" / "export.json").exists()
