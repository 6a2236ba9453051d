import json
import os
import subprocess
import sys

import pytest

from convforge.cli import main


def test_models_json_lists_every_model(capsys):
    assert main(["models", "--json", "--input-size", "32", "--stem", "small"]) == 0
    records = json.loads(capsys.readouterr().out)
    by_name = {r["model"]: r for r in records}
    assert len(by_name) == 14
    assert by_name["resnet18"]["params"] == 11_681_832  # 1000 classes, 3x3 stem instead of 7x7
    assert {"params", "gmacs", "gflops", "input_size", "norm"} <= set(by_name["vgg16"])


def test_models_table(capsys):
    assert (
        main(
            [
                "models",
                "--num-classes",
                "10",
                "--in-channels",
                "1",
                "--stem",
                "small",
                "--input-size",
                "16",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "resnet152" in out and "params (M)" in out and "16x16 input" in out


def test_diagnose_init_writes_plot_and_json(tmp_path, capsys):
    code = main(
        [
            "diagnose",
            "init",
            "--activation",
            "tanh",
            "--init",
            "small,xavier",
            "--depth",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "xavier std" in out and "std of last layer / first layer" in out
    png, js = tmp_path / "init-plain-tanh-none.png", tmp_path / "init-plain-tanh-none.json"
    assert png.stat().st_size > 1000
    record = json.loads(js.read_text())
    assert [r["init"] for r in record["runs"]] == ["small", "xavier"]
    assert len(record["runs"][0]["layers"]) == 4


def test_diagnose_init_json_on_stdout(tmp_path, capsys):
    assert (
        main(
            [
                "diagnose",
                "init",
                "--model",
                "vgg11",
                "--init",
                "kaiming",
                "--seeds",
                "1",
                "--json",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert record["config"]["arch"] == "vgg11" and len(record["runs"][0]["layers"]) == 8
    assert "depth_ratio_spread" not in record  # --seeds 1: the table's seed only


def test_diagnose_init_reports_the_spread_over_seeds(tmp_path, capsys):
    argv = ["diagnose", "init", "--depth", "4", "--seeds", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "depth ratio over 3 seeds, median (min-max): small " in out
    assert main([*argv, "--json"]) == 0
    spread = json.loads(capsys.readouterr().out)["depth_ratio_spread"]
    assert set(spread) == {"small", "xavier", "kaiming"} and spread["kaiming"]["seeds"] == 3
    assert main([*argv[:-4], "--seeds", "0"]) == 2
    assert "--seeds must be a positive integer, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["diagnose", "init", "--model", "resnet19"], "unknown model 'resnet19'; choose one of:"),
        (["diagnose", "init", "--activation", "swish"], "unknown --activation 'swish'"),
        (["diagnose", "init", "--init", "he"], "unknown --init 'he'; choose one of: kaiming"),
        (
            ["diagnose", "init", "--norm", "group", "--num-groups", "5"],
            "num_groups=5 does not divide a layer of 64 channels",
        ),
        (
            ["diagnose", "init", "--model", "resnet18", "--depth", "3"],
            "model 'resnet18' has no option depth",
        ),
        (["models", "--stem", "cifar"], "unknown --stem 'cifar'"),
        (["models", "--input-size", "0"], "input size (px) must be a positive integer"),
        (["models", "--input-size", "16"], "cannot take 16 px input"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(argv, message, capsys, tmp_path):
    if argv[0] == "diagnose":
        argv = argv + ["--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("convforge: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_out_path_blocked_by_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["diagnose", "init", "--out", str(blocker / "sub")]) == 2
    assert "cannot create folder" in capsys.readouterr().err


def test_console_command_runs_as_a_module_without_traceback():
    """The real entry path: a separate process, a user mistake, a clean one-line error."""
    proc = subprocess.run(
        [sys.executable, "-m", "convforge", "diagnose", "init", "--model", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("convforge: error: unknown model 'nope'")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "argv", [["models", "--help"], ["diagnose", "init", "--help"], ["train", "--help"]]
)
def test_help_explains_itself(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "usage: convforge" in capsys.readouterr().out


def test_diagnose_init_writes_both_files_or_neither(tmp_path, capsys, monkeypatch):
    """The spread over seeds fails after the plot is made: no new folder, no plot, and an
    earlier run's files in an existing folder stay as they were."""
    from convforge.builder import diagnose_init
    from convforge.errors import UserError

    def broken(*args, **kwargs):
        raise UserError("the spread cannot be measured")

    monkeypatch.setattr(diagnose_init, "ratio_spread", broken)
    argv = ["diagnose", "init", "--depth", "2", "--seeds", "2", "--out"]
    assert main([*argv, str(tmp_path / "new")]) == 2
    assert "the spread cannot be measured" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "init-plain-relu-none.png").write_bytes(b"an earlier plot")
    assert main([*argv, str(tmp_path / "old")]) == 2
    assert os.listdir(tmp_path / "old") == ["init-plain-relu-none.png"]
    assert (tmp_path / "old" / "init-plain-relu-none.png").read_bytes() == b"an earlier plot"


def test_augment_preview_leaves_no_new_folder_on_failure(tmp_path, capsys, monkeypatch):
    from convforge.builder.data import preview

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(preview, "preview_grid", broken)
    with pytest.raises(OSError):
        main(["augment-preview", "--out", str(tmp_path / "new" / "grid.png")])
    assert os.listdir(tmp_path) == []
