"""convforge compress on real data (scikit-learn's digits): rounds, the gate, resume, options."""

import dataclasses

import pytest
import torch

from convforge.builder.checkpoint import load_checkpoint
from convforge.builder.compress import job
from convforge.builder.compress.job import CompressOptions, compress
from convforge.builder.compress.pruning import macs_and_params
from convforge.builder.registry import build_model
from convforge.builder.training import trainer
from convforge.builder.training.config import TrainConfig, recipe_model
from convforge.builder.training.distill import Distillation
from convforge.cli import main
from convforge.errors import UserError


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Pruning and these tiny models run many small ops; on a shared 2-core machine a second
    thread makes them slower, not faster (tests/builder/test_pruning.py measured it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An 8-wide ResNet-18 trained 3 epochs on 16 px digits (about 97% top-1)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    model = dataclasses.replace(
        recipe_model("resnet18", 16, options={"base_width": 8}), num_classes=10, in_channels=1
    )
    cfg = TrainConfig(dataset="digits", input_size=16, epochs=3, device="cpu", out=str(out))
    trainer.train(model, cfg, progress=False)
    return out / "best.pt"


def _opts(trained, tmp_path, **kw) -> CompressOptions:
    # round_to 1: this 8-wide model's widths are all multiples of 8, so 16 would leave
    # its first stage as it is (test_round_to_* below)
    base = dict(checkpoint=str(trained), out=str(tmp_path / "small.pt"), speedup=2.0, rounds=2,
                epochs=1, max_drop=100.0, round_to=1)  # fmt: skip
    return CompressOptions(**{**base, **kw})


def _quiet(*_):
    pass


def test_compress_reaches_the_target_and_writes_an_ordinary_checkpoint(trained, tmp_path):
    result = compress(_opts(trained, tmp_path), log=_quiet, progress=False)
    record = result.record
    assert result.out == tmp_path / "small.pt" and result.out.exists()
    assert not (tmp_path / "small.pt.rounds").exists()  # the work folder goes at the end
    assert [r["round"] for r in record["rounds"]] == [1, 2] and record["kept"] == 2
    assert record["macs"] <= record["original"]["macs"] / 2
    assert record["speedup"] >= 2.0 and record["params"] < record["original"]["params"]
    # Round 1 aims at the geometric midpoint: sqrt(2) fewer MACs.
    assert record["rounds"][0]["target_macs"] == int(record["original"]["macs"] / 2**0.5)
    ck = load_checkpoint(result.out)
    assert ck.model_config.widths and ck.compress == record
    model = ck.build_model().eval()  # rebuilt from the config alone, strictly loaded
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    assert record["top1"] == pytest.approx(record["rounds"][1]["top1"])
    assert result.peak_memory_mb > 0


def test_no_round_within_the_budget_writes_nothing(trained, tmp_path):
    opts = _opts(trained, tmp_path, speedup=16.0, rounds=1, epochs=0, max_drop=0.0)
    with pytest.raises(UserError, match=r"no pruning stayed within --max-drop 0: the smallest "
                       r"\(\d+\.\d+x fewer MACs\) lost .* points .*nothing written"):  # fmt: skip
        compress(opts, log=_quiet, progress=False)
    assert list(tmp_path.iterdir()) == []  # no output, no work folder


def test_the_last_round_within_the_budget_is_kept(trained, tmp_path, monkeypatch):
    # The gate's decision, with the measured accuracies replaced by a known sequence:
    # original 0.90, round 1 0.899 (within 0.5 points), round 2 0.88 (2 points lost).
    scores = iter([0.90, 0.899, 0.88])
    monkeypatch.setattr(job._Job, "top1", lambda self, model: next(scores))
    lines = []
    result = compress(_opts(trained, tmp_path, epochs=0, max_drop=0.5, rounds=3),
                      log=lines.append, progress=False)  # fmt: skip
    record = result.record
    assert record["kept"] == 1 and len(record["rounds"]) == 2  # round 3 never ran
    assert [r["passed"] for r in record["rounds"]] == [True, False]
    assert record["top1"] == 0.899
    assert any(line.startswith("kept round 1 (") and "more than --max-drop 0.5" in line
               for line in lines)  # fmt: skip
    ck = load_checkpoint(result.out)
    assert ck.model_config.widths  # round 1's model, pruned


def test_an_interrupted_compress_resumes_to_the_same_weights(trained, tmp_path, monkeypatch):
    straight = compress(_opts(trained, tmp_path / "a", epochs=2), log=_quiet, progress=False)

    real_epoch, calls = trainer._Run._epoch, {"n": 0}

    def ctrl_c_in_round_two(self, epoch):
        calls["n"] += 1
        if calls["n"] == 4:  # round 1: calls 1-2; round 2: its epoch 1 saved, then Ctrl-C
            raise KeyboardInterrupt
        return real_epoch(self, epoch)

    b = tmp_path / "b"
    monkeypatch.setattr(trainer._Run, "_epoch", ctrl_c_in_round_two)
    with pytest.raises(KeyboardInterrupt):
        compress(_opts(trained, b, epochs=2), log=_quiet, progress=False)
    work = b / "small.pt.rounds"
    assert (work / "round1" / "result.json").exists() and not (b / "small.pt").exists()
    assert load_checkpoint(work / "round2" / "last.pt").epoch == 1
    monkeypatch.setattr(trainer._Run, "_epoch", real_epoch)

    lines = []
    resumed = compress(_opts(trained, b, epochs=2), log=lines.append, progress=False)
    assert any(line.startswith("round 1:") and "done before" in line for line in lines)
    a = load_checkpoint(straight.out).model_state
    c = load_checkpoint(resumed.out).model_state
    assert a.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], c[k]), k

    def untimed(rounds):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]

    assert untimed(resumed.record["rounds"]) == untimed(straight.record["rounds"])


def test_a_latency_target_the_original_meets_is_refused_and_writes_nothing(trained, tmp_path):
    opts = _opts(trained, tmp_path, speedup=None, latency_ms=2.0)
    with pytest.raises(UserError, match=r"already runs in 1.50 ms, within --latency-ms 2"):
        compress(opts, latency=lambda model: 1.5, log=_quiet, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_round_to_keeps_widths_multiples_and_is_recorded(trained, tmp_path):
    result = compress(_opts(trained, tmp_path, round_to=8, rounds=1, epochs=0), log=_quiet,
                      progress=False)  # fmt: skip
    small = load_checkpoint(result.out)
    assert result.record["round_to"] == 8 and result.record["speedup"] >= 2.0
    convs = [m for m in small.build_model().modules() if isinstance(m, torch.nn.Conv2d)]
    assert small.model_config.widths and all(m.out_channels % 8 == 0 for m in convs)


def test_a_target_out_of_reach_of_round_to_says_so_and_writes_nothing(trained, tmp_path):
    # Widths 8/16/32/64 in multiples of 16: the first stage cannot shrink, the second only
    # to 16: a 4x cut is out of reach
    opts = _opts(trained, tmp_path, speedup=4.0, rounds=1, epochs=0, round_to=16)
    with pytest.raises(
        UserError,
        match=r"multiples of 16, this model gets no smaller than .*"
        r"short of the round's target 4.00x.*a smaller --round-to",
    ):
        compress(opts, log=_quiet, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_target_no_pruning_reaches_says_so_and_writes_nothing(trained, tmp_path):
    opts = _opts(trained, tmp_path, speedup=1000.0, rounds=1, epochs=0)
    with pytest.raises(UserError, match=r"^this model gets no smaller than .* target "
                                        r"1000.\d+x; ask for less$"):  # fmt: skip
        compress(opts, log=_quiet, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_latency_round_out_of_reach_keeps_the_round_before(trained, tmp_path):
    # A probe whose latency falls half as fast as the MACs: 2.0 ms for the original. 1.3 ms
    # asks for 1.54x; round 1 reaches it (16s: at most 1.63x on this model), measures about
    # 1.65 ms and the extra round aims at about 2x, which multiples of 16 cannot reach.
    example = torch.zeros(1, 1, 16, 16)
    original = macs_and_params(load_checkpoint(trained).build_model(), example)[0]

    def probe(model):
        return 1.0 + macs_and_params(model, example)[0] / original

    lines = []
    opts = _opts(trained, tmp_path, speedup=None, latency_ms=1.3, rounds=1, epochs=0,
                 round_to=16)  # fmt: skip
    result = compress(opts, latency=probe, log=lines.append, progress=False)
    assert result.record["kept"] == 1 and len(result.record["rounds"]) == 1
    assert any(
        line.startswith("round 2: pruned to widths that are multiples of 16") for line in lines
    )
    assert lines[-1].startswith("latency target missed")


def test_round_to_gives_way_to_a_multi_group_norm():
    lines = []
    grouped = build_model(dataclasses.replace(
        recipe_model("resnet18", 16, norm="group", num_groups=4, options={"base_width": 8}),
        num_classes=10, in_channels=1))  # fmt: skip
    assert job._round_to(16, grouped, lines.append) is None
    assert lines == ["widths stay multiples of the group norm's 4 groups, not of --round-to 16"]
    plain = build_model(dataclasses.replace(recipe_model("resnet18", 16), num_classes=10))
    assert job._round_to(16, plain, lines.append) == 16 and job._round_to(1, plain, print) is None


def test_a_work_folder_of_another_run_is_not_reused(trained, tmp_path):
    work = tmp_path / "small.pt.rounds"
    work.mkdir()
    (work / "options.json").write_text('{"importance": "l1"}')
    with pytest.raises(UserError, match="holds rounds of another compress run"):
        compress(_opts(trained, tmp_path), log=_quiet, progress=False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--speedup", "1"], "--speedup must be > 1 (2.0 halves the MACs), got 1"),
        (["--speedup", "2", "--max-drop", "-0.5"], "--max-drop"),
        (["--speedup", "2", "--latency-ms", "3"], "give one target"),
        ([], "give one target"),
        (["--speedup", "2", "--importance", "random"], "--importance"),
        (["--speedup", "2", "--rounds", "0"], "--rounds"),
        (["--speedup", "2", "--distill-weight", "1.5"], "--distill-weight"),
        (["--latency-ms", "-1"], "--latency-ms must be > 0"),
        (["--speedup", "2", "--round-to", "0"], "--round-to"),
    ],
)
def test_bad_options_are_one_line_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "small.pt"
    assert main(["compress", str(tmp_path / "missing.pt"), "-o", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("convforge: error:") and message in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_not_written_by_the_trainer_is_refused(tmp_path, capsys):
    from convforge.builder.checkpoint import save_checkpoint

    path = tmp_path / "bare.pt"
    save_checkpoint(path, {"model_state": {}, "model_config": {"arch": "resnet18"},
                           "data_config": {}, "epoch": 0})  # fmt: skip
    assert main(["compress", str(path), "-o", str(tmp_path / "s.pt"), "--speedup", "2"]) == 2
    assert "has no train_config" in capsys.readouterr().err


def test_distillation_blends_the_label_loss_with_the_teachers_soft_targets():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    x, student = torch.randn(5, 4), torch.randn(5, 3)
    hard = torch.tensor(1.25)
    t = 2.0
    d = Distillation(teacher, weight=0.25, temperature=t)
    p = torch.softmax(teacher(x) / t, 1)
    kl = (p * (p.log() - torch.log_softmax(student / t, 1))).sum() / 5
    expected = 0.75 * hard + 0.25 * t * t * kl
    assert torch.allclose(d.loss(hard, student, x), expected, atol=1e-6)
    assert d.loss(hard, student, x).item() != hard.item()
    assert Distillation(teacher, weight=0.0).loss(hard, student, x) is hard
    assert not any(p.requires_grad for p in teacher.parameters())  # frozen
    with pytest.raises(UserError, match=r"weight must be in \[0, 1\]"):
        Distillation(teacher, weight=1.5)
