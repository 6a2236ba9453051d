"""The `convforge` entry point: dispatch, one-line errors, missing extras, torch-free runtime."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from convforge import extras
from convforge.cli import COMMANDS, main

FIXTURES = Path(__file__).parents[1] / "fixtures"
MODEL = str(FIXTURES / "digits.onnx")
IMAGES = sorted(str(p) for p in FIXTURES.glob("digit-*.png"))
CPU_HINT = "pip install 'convforge[cpu]' (or 'convforge[gpu]' on a CUDA machine)"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("convforge: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "usage:" not in err
    return err.strip().removeprefix("convforge: error: ")


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS) and "usage: convforge" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "a command is needed; choose one of: models, diagnose"),
        (["nope"], "unknown command 'nope'; choose one of: models"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--lr", "abc"], "argument --lr: invalid float value: 'abc' (see 'convforge "),
        (["export", "x.pt"], "the following arguments are required: -o/--output"),
        (["bench", MODEL, "--iters", "many"], "argument --iters: invalid int value: 'many'"),
        (["predict", MODEL], "the following arguments are required: images"),
        (
            ["bench", MODEL, "--backends", "tensorrt", "--set", "tensorrt.max_batch=abc"],
            "tensorrt option max_batch takes an integer, got 'abc'",
        ),
        (["serve", f"a={MODEL}", f"a={MODEL}"], "two models are named 'a'"),
        (["serve", "bad name=x.onnx"], "model name 'bad name' must be letters"),
        (["serve", "/no/such.onnx", "--port", "0", "--grpc-port", "-1"], "does not exist"),
        (["serve", MODEL, "--max-batch-size", "0"], "--max-batch-size must be an integer from 1"),
        (
            ["predict", MODEL, IMAGES[0], "--backend", "ort-cpu", "--set", "ort-cpu.thread=2"],
            "backend 'ort-cpu' has no option 'thread'; accepted: threads, graph_optimization",
        ),
    ],
)
def test_usage_mistakes_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert message in _one_line_error(capsys)


# command line, modules missing, the one line it must print
MISSING = [
    (["train"], ["torch"], "convforge train needs PyTorch: pip install 'convforge[train]'"),
    (["finetune"], ["torch"], "convforge finetune needs PyTorch: pip install 'convforge[train]'"),
    (["models"], ["torch"], "convforge models needs PyTorch: pip install 'convforge[train]'"),
    (["diagnose", "init"], ["torch"], "convforge diagnose needs PyTorch"),
    (["augment-preview"], ["torch"], "convforge augment-preview needs PyTorch"),
    (["train"], ["sklearn"], "convforge train needs scikit-learn: pip install 'convforge[train]'"),
    (["demo"], ["torch"], "convforge demo needs PyTorch: pip install 'convforge[train]'"),
    (["pipeline", "r.yaml"], ["yaml"], "convforge pipeline needs PyYAML (pipeline recipes)"),
    (["export", "a.pt", "-o", "a.onnx"], ["torch"], "convforge export needs PyTorch"),
    (["export", "a.pt", "-o", "a.onnx"], ["onnxruntime"], f"export needs ONNX Runtime: {CPU_HINT}"),
    (["export", "a.pt", "-o", "a.onnx"], ["onnxscript"], "export needs onnxscript"),
    (
        ["export", "a.pt", "-o", "a.onnx", "--fp16"],
        ["onnxconverter_common"],
        "convforge export --fp16 needs onnxconverter-common (fp16 conversion)",
    ),
    (["predict", MODEL, *IMAGES], list(extras.ENGINES), "predict needs an inference engine"),
    (["bench", MODEL], list(extras.ENGINES), "convforge bench needs an inference engine"),
    (
        ["predict", MODEL, *IMAGES, "--backend", "ort-cpu"],
        ["onnxruntime"],
        f"backend 'ort-cpu' is not available: onnxruntime is not installed: {CPU_HINT}",
    ),
    (
        ["predict", MODEL, *IMAGES, "--backend", "torch"],
        ["torch"],
        "backend 'torch' is not available: torch is not installed: pip install 'convforge[train]'",
    ),
    (
        ["predict", MODEL, *IMAGES, "--backend", "openvino"],
        ["openvino"],
        "openvino is not installed: pip install 'convforge[openvino]'",
    ),
    (["bench", MODEL, "--plot", "p.png"], ["matplotlib"], "bench --plot needs matplotlib"),
    (["bench", MODEL, "--accuracy", "digits"], ["torch"], "bench --accuracy needs PyTorch"),
    (
        ["serve", MODEL],
        ["kserve"],
        "convforge serve needs the kserve SDK: pip install 'convforge[serve]'",
    ),
]


@pytest.mark.parametrize("argv, blocked, message", MISSING)
def test_a_missing_extra_is_named_in_one_line(argv, blocked, message, monkeypatch, capsys):
    for module in blocked:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    assert main(argv) == 2
    assert message in _one_line_error(capsys)


def test_an_unlisted_missing_library_is_still_one_line(monkeypatch, capsys):
    def describe(path):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr("convforge.runtime.onnx_info.describe", describe)
    assert main(["inspect", MODEL]) == 2
    assert _one_line_error(capsys) == (
        "convforge inspect needs matplotlib: pip install 'convforge[train]'"
    )


def test_backend_booleans_from_the_command_line_mean_what_they_say():
    from convforge.cli.arguments import backend_options
    from convforge.runtime.backends import BACKENDS, backend_class

    given = backend_options(["torch.compile=no", "torch.channels_last=yes"], BACKENDS)["torch"]
    options = backend_class("torch")(MODEL, **given).options
    assert options.compile is False and options.channels_last is True  # bool("no") is True


def test_backends_lists_options_and_availability(capsys):
    assert main(["backends", "--json"]) == 0
    records = {r["backend"]: r for r in json.loads(capsys.readouterr().out)["backends"]}
    assert list(records) == ["tensorrt", "ort-trt", "ort-cuda", "openvino", "ort-cpu", "torch"]
    assert records["ort-cpu"]["available"] and records["ort-cpu"]["why"] == ""
    assert [o["name"] for o in records["tensorrt"]["options"]][:3] == [
        "min_batch", "opt_batch", "max_batch"
    ]  # fmt: skip
    if not records["tensorrt"]["available"]:
        assert "pip install 'convforge[tensorrt]'" in records["tensorrt"]["why"]
    assert main(["backends"]) == 0
    assert (
        "graph_optimization (all|extended|basic|disabled, default all)" in capsys.readouterr().out
    )


def test_two_onnxruntime_builds_warn_once_for_auto(monkeypatch, capsys):
    monkeypatch.setattr(extras, "onnxruntime_builds", lambda: ["onnxruntime", "onnxruntime-gpu"])
    extras.check_onnxruntime_builds.cache_clear()
    try:
        assert main(["predict", MODEL, IMAGES[0], "--backend", "ort-cpu"]) == 0
        assert "warning" not in capsys.readouterr().err  # a CPU backend named: no check
        assert main(["predict", MODEL, IMAGES[0], "--backend", "auto"]) == 0
        assert main(["predict", MODEL, IMAGES[0], "--backend", "auto"]) == 0
    finally:
        extras.check_onnxruntime_builds.cache_clear()
    err = capsys.readouterr().err
    assert err.count("convforge: warning: onnxruntime and onnxruntime-gpu are installed") == 1
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in err


BLOCK_TORCH = (
    "import sys; sys.modules['torch'] = None; from convforge.cli import main; "
    "sys.exit(main(sys.argv[1:]))"
)


def _without_torch(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_runtime_commands_run_without_torch(tmp_path):
    proc = _without_torch("predict", MODEL, *IMAGES, "--backend", "ort-cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    predictions = json.loads(proc.stdout)["predictions"]
    labels = [Path(p["image"]).stem.split("-")[-1] for p in predictions]
    assert [p["top"][0]["label"] for p in predictions] == labels  # the fixture's digits
    proc = _without_torch("inspect", MODEL, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["metadata"]["arch"] == "resnet18"
    proc = _without_torch("bench", MODEL, "--backends", "ort-cpu", "--batch-sizes", "1",
                          "--iters", "3", "--seconds", "0", "--warmup-seconds", "0",
                          "--json-out", str(tmp_path / "b.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "b.json").read_text())["records"][0]["backend"] == "ort-cpu"
    proc = _without_torch("train")
    assert proc.returncode == 2
    assert proc.stderr == (
        "convforge: error: convforge train needs PyTorch: pip install 'convforge[train]'\n"
    )


def test_a_reader_that_leaves_early_gets_no_traceback():
    # `convforge inspect m.onnx | head -1`: the pipe closes before convforge writes.
    proc = subprocess.Popen(
        [sys.executable, "-m", "convforge", "inspect", MODEL],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in stderr, stderr
