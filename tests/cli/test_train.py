"""The train, finetune and augment-preview commands, end to end on tiny settings."""

import json

import pytest
import torch

from convforge.builder.checkpoint import load_checkpoint
from convforge.cli import main

TINY = ["--model", "plain", "--depth", "2", "--width", "8", "--input-size", "8",
        "--batch-size", "32"]  # fmt: skip


def test_train_json(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--out", str(tmp_path / "r"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["epochs_run"] == 1 and 0.0 <= record["best_val_acc"] <= 1.0
    assert (tmp_path / "r" / "best.pt").exists()


def test_train_prints_epoch_lines_and_resumes(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "epoch   1/1" in text and "best val accuracy" in text
    assert main(["train", "--resume", str(out / "last.pt")]) == 0
    assert "all 1 epochs are already done" in capsys.readouterr().out


def test_finetune_a_convforge_checkpoint_with_auto_strategy(tmp_path, capsys):
    pre = tmp_path / "pre"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(pre), "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "ft"
    code = main(["finetune", "--pretrained", str(pre / "best.pt"), "--dataset",
                 "synthetic:classes=3,size=8,per_class=40", "--input-size", "8", "--batch-size",
                 "16", "--epochs", "2", "--out", str(out)])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "strategy auto chose:" in text and "images/class" in text
    ck = load_checkpoint(out / "last.pt")
    assert ck.transfer["strategy"] in ("feature-extract", "finetune")
    assert ck.extra["pretrained"].endswith("best.pt")
    assert ck.model_config.num_classes == 3 and ck.model_config.in_channels == 3


def test_finetune_feature_extract_keeps_the_backbone(tmp_path, capsys):
    pre = tmp_path / "pre"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(pre), "--json"]) == 0
    before = load_checkpoint(pre / "best.pt").model_state
    out = tmp_path / "ft"
    assert main(["finetune", "--pretrained", str(pre / "best.pt"), "--strategy",
                 "feature-extract", "--input-size", "8", "--batch-size", "32", "--epochs", "1",
                 "--out", str(out), "--json"]) == 0  # fmt: skip
    after = load_checkpoint(out / "last.pt").model_state
    for k, v in before.items():
        if k.startswith("features."):
            assert torch.equal(v, after[k]), k  # weights and BN running stats untouched


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["train", "--dataset", "imagefolder:/no/such/dir"], "/no/such/dir"),
        (["train", "--optimizer", "adam"], "unknown --optimizer 'adam'"),
        (["train", "--augment", "heavy"], "unknown"),
        (["train", "--model", "resnet19"], "unknown model 'resnet19'"),
        (["train", "--resume", "/no/last.pt"], "does not exist"),
        (["finetune"], "finetune needs --pretrained"),
        (["finetune", "--pretrained", "/no/file.pth"], "does not exist"),
        (["augment-preview", "--augment", "wild"], "unknown"),
    ],
)
def test_user_mistakes_are_one_line_errors(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convforge: error: ") and message in err
    assert err.count("\n") == 1


def test_augment_preview_writes_png(tmp_path, capsys):
    path = tmp_path / "sub" / "grid.png"
    assert main(["augment-preview", "--augment", "strong", "--samples", "3", "--variants", "3",
                 "--out", str(path)]) == 0  # fmt: skip
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert "augmented views" in capsys.readouterr().out
