"""Options generated from settings dataclasses, and one-line usage errors."""

from dataclasses import dataclass

import pytest

from convforge.cli.options import Parser, add_settings, backend_options, settings_from
from convforge.errors import UserError
from convforge.settings import setting


@dataclass
class Example:
    name: str = setting(help="a name", flag="--model")
    count: int = setting(3, "how many")
    ratio: float | None = setting(None, "a ratio; default: computed")
    fast: bool = setting(True, "go fast")
    sizes: tuple[int, ...] = setting((1, 8), "batch sizes")
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
        ["--model", "vgg", "--count", "5", "--ratio", "0.5", "--no-fast", "--sizes", "2,4"]
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
        (["--sizes", "1,x"], "argument --sizes: takes comma-separated positive integers"),
        (["--sizes", "0"], "argument --sizes: takes comma-separated positive integers"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_mistakes_are_one_line_user_errors_with_a_help_hint(argv, message):
    with pytest.raises(UserError) as e:
        _parser().parse_args(argv)
    assert message in str(e.value) and str(e.value).endswith("(see 'convforge example --help')")
    assert "\n" not in str(e.value)


def test_backend_options():
    got = backend_options(["torch.device=cuda", "ort-cpu.threads=2", "torch.compile=true"],
                          ("torch", "ort-cpu"))  # fmt: skip
    assert got == {"torch": {"device": "cuda", "compile": True}, "ort-cpu": {"threads": 2}}
    with pytest.raises(UserError, match="--set takes BACKEND.KEY=VALUE"):
        backend_options(["threads=2"], ("ort-cpu",))
    with pytest.raises(UserError, match="unknown backend 'ort'; choose one of: ort-cpu"):
        backend_options(["ort.threads=2"], ("ort-cpu",))
