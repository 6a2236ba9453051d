"""Options generated from settings dataclasses, and one-line usage errors."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from convforge.cli import main
from convforge.cli.arguments import Parser, add_settings, backend_options, settings_from
from convforge.errors import UserError
from convforge.settings import setting

MODEL = str(Path(__file__).parents[1] / "fixtures" / "digits.onnx")


@dataclass
class Example:
    name: str = setting(help="a name", flag="--model")
    count: int = setting(3, "how many", minimum=1)
    ratio: float | None = setting(None, "a ratio; default: computed", maximum=1)
    fast: bool = setting(True, "go fast")
    sizes: tuple[int, ...] = setting((1, 8), "batch sizes", minimum=1)
    mode: str = setting("a", "a or b", choices=("a", "b"))
    hidden: dict = setting(factory=dict, help="not on the command line", cli=False)
    plain: int = 7  # no setting(): not on the command line either


def _parser(**kwargs) -> Parser:
    p = Parser(prog="convforge example")
    add_settings(p, Example, "example", **kwargs)
    return p


def test_each_field_becomes_a_typed_option_with_its_default():
    args = _parser(defaults={"name": "resnet18"}).parse_args([])
    assert settings_from(Example, args) == Example("resnet18", 3, None, True, (1, 8))
    args = _parser().parse_args(
        ["--model", "vgg", "--count", "5", "--ratio", "0.5", "--no-fast", "--sizes", "2, 4,"]
    )
    assert settings_from(Example, args, count=6) == Example("vgg", 6, 0.5, False, (2, 4))
    assert not hasattr(args, "hidden") and not hasattr(args, "plain")


def test_help_comes_from_the_field():
    text = _parser().format_help()
    assert "how many (default: 3)" in text and "go fast (default: on)" in text
    assert "batch sizes (default: 1,8)" in text and "--no-fast" in text
    assert "--hidden" not in text and "--plain" not in text


def test_only_and_skip_choose_fields():
    assert "--count" not in _parser(skip=("count",)).format_help()
    text = _parser(only=("fast",)).format_help()
    assert "--fast" in text and "--count" not in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--count", "abc"], "argument --count: invalid int value: 'abc'"),
        (["--ratio", "half"], "argument --ratio: invalid float value: 'half'"),
        (["--sizes", "1,x"], "argument --sizes: takes comma-separated positive integers"),
        (["--sizes", "0"], "argument --sizes: takes comma-separated positive integers, got '0'"),
        (["--sizes", ","], "argument --sizes: takes comma-separated positive integers"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_mistakes_are_one_line_user_errors_with_a_help_hint(argv, message):
    with pytest.raises(UserError) as e:
        _parser().parse_args(argv)
    assert message in str(e.value) and str(e.value).endswith("(see 'convforge example --help')")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--count", "0"], "--count must be a positive integer, got 0"),
        (["--ratio", "1.5"], "--ratio must be a number <= 1, got 1.5"),
        (["--ratio", "nan"], "--ratio must be a number <= 1, got nan"),
        (["--mode", "c"], "unknown --mode 'c'; choose one of: a, b"),
    ],
)
def test_settings_from_checks_choices_and_ranges(argv, message):
    """A value of the right type outside what the field declares is refused when the
    settings are made, naming the option, before a command does any work."""
    args = _parser(defaults={"name": "x"}).parse_args(argv)
    with pytest.raises(UserError) as e:
        settings_from(Example, args)
    assert str(e.value) == message


def test_a_required_setting_not_given_is_named():
    with pytest.raises(UserError, match="^--model is missing$"):
        settings_from(Example, _parser().parse_args([]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--iters", "0"], "--iters must be a positive integer, got 0"),
        (["--warmup-seconds", "-1"], "--warmup-seconds must be a number >= 0, got -1.0"),
        (["--warmup-iters", "-3"], "--warmup-iters must be an integer >= 0, got -3"),
        (["--seconds", "inf", "--seed", "-1"], "--seed must be an integer >= 0, got -1"),
        (["--batch-sizes", "1,0"], "--batch-sizes: takes comma-separated positive integers"),
    ],
)
def test_bench_settings_are_range_checked_before_anything_runs(argv, message, capsys,
                                                               monkeypatch):  # fmt: skip
    from convforge.runtime import bench

    def never(*args, **kwargs):
        raise AssertionError("bench ran")

    monkeypatch.setattr(bench, "bench_matrix", never)
    assert main(["bench", MODEL, "--backends", "ort-cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("convforge: error: ") and err.count("\n") == 1
    assert message in err


def test_backend_options():
    got = backend_options(["torch.device=cuda", "ort-cpu.threads=2", "torch.compile=true"],
                          ("torch", "ort-cpu"))  # fmt: skip
    assert got == {"torch": {"device": "cuda", "compile": True}, "ort-cpu": {"threads": 2}}
    with pytest.raises(UserError, match="--set takes BACKEND.KEY=VALUE"):
        backend_options(["threads=2"], ("ort-cpu",))
    with pytest.raises(UserError, match="unknown backend 'ort'; choose one of: ort-cpu"):
        backend_options(["ort.threads=2"], ("ort-cpu",))
