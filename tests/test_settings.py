"""settings.parse: one engine turns text, YAML and JSON values into settings, or one line."""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from convforge.errors import UserError
from convforge.settings import check_ranges, coerce, parse, setting


@dataclass(frozen=True)
class Inner:
    level: int = setting(1, "a level", minimum=0, maximum=3)


@dataclass
class Example:
    name: str = setting(help="required: no default")
    count: int = setting(3, "how many", minimum=1)
    ratio: float | None = setting(None, "a fraction", minimum=0, maximum=1)
    fast: bool = setting(True, "go fast")
    sizes: tuple[int, ...] = setting((1, 8), "batch sizes", minimum=1)
    mode: str = setting("a", "a or b", choices=("a", "b"))
    tags: list[str] = setting(factory=list, help="labels")
    extra: dict = setting(factory=dict, help="anything")
    inner: Inner = setting(factory=Inner, help="nested")
    offset: int = setting(0, "may be negative")


def test_text_becomes_the_annotated_types():
    got = parse(Example, {"name": "x", "count": "5", "ratio": "0.25", "fast": "No",
                          "sizes": "1, 4,16,", "offset": "-2"}, "ex.")  # fmt: skip
    assert got == Example("x", 5, 0.25, False, (1, 4, 16), offset=-2)
    assert type(got.ratio) is float and type(got.count) is int


def test_json_and_yaml_values_become_the_annotated_types():
    got = parse(Example, {"name": Path("/m.onnx"), "count": np.int64(2), "ratio": 1, "fast": 0,
                          "sizes": [8, 1], "tags": ["a"], "extra": {"k": 1},
                          "inner": {"level": 3}, "mode": "b"}, "ex.")  # fmt: skip
    assert got == Example("/m.onnx", 2, 1.0, False, (8, 1), "b", ["a"], {"k": 1}, Inner(3))
    assert type(got.ratio) is float and type(got.count) is int


def test_defaults_fill_what_is_not_given_and_fixed_values_win():
    got = parse(Example, {"name": "x", "count": 9}, "ex.", fixed={"count": 2, "mode": "b"})
    assert got == Example("x", 2, mode="b")
    assert parse(Example, None, "ex.", fixed={"name": "y"}) == Example("y")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"count": "3"}, "ex.name is missing"),
        ({"name": "x", "cnt": 1}, "unknown key ex.cnt; accepted: name, count, ratio, fast,"),
        ({"name": "x", "a": 1, "b": 2}, "unknown keys ex.a, ex.b; accepted:"),
        ({"name": "x", "count": "three"}, "ex.count takes an integer, got 'three'"),
        ({"name": "x", "count": "3.0"}, "ex.count takes an integer, got '3.0'"),
        ({"name": "x", "count": 2.0}, "ex.count takes an integer, got 2.0"),
        ({"name": "x", "count": True}, "ex.count takes an integer, got True"),
        ({"name": "x", "count": None}, "ex.count takes an integer, got None"),
        ({"name": "x", "ratio": "half"}, "ex.ratio takes a number, got 'half'"),
        ({"name": "x", "ratio": False}, "ex.ratio takes a number, got False"),
        ({"name": "x", "fast": "maybe"}, "ex.fast takes true or false (also yes/no, on/off, 1/0)"),
        ({"name": "x", "fast": 2}, "ex.fast takes true or false"),
        ({"name": True}, "ex.name takes a string, got True"),
        ({"name": "x", "sizes": "1,x"}, "ex.sizes entry takes an integer, got 'x'"),
        ({"name": "x", "sizes": ""}, "ex.sizes takes a non-empty list of integers"),
        ({"name": "x", "sizes": []}, "ex.sizes takes a non-empty list of integers"),
        ({"name": "x", "sizes": 8}, "ex.sizes takes a non-empty list of integers"),
        ({"name": "x", "tags": "a"}, "ex.tags takes a list, got 'a'"),
        ({"name": "x", "tags": [1.5, None]}, "ex.tags entry takes a string, got None"),
        ({"name": "x", "extra": [1]}, "ex.extra takes a mapping, got [1]"),
        ({"name": "x", "inner": 2}, "ex.inner takes a mapping of keys to values, got 2"),
        ({"name": "x", "inner": {"depth": 1}}, "unknown key ex.inner.depth; accepted: level"),
        ({"name": "x", "inner": {"level": 4}}, "ex.inner.level must be an integer from 0 to 3"),
        ({"name": "x", "count": 0}, "ex.count must be a positive integer, got 0"),
        ({"name": "x", "ratio": "1.5"}, "ex.ratio must be a number from 0 to 1, got 1.5"),
        ({"name": "x", "ratio": "nan"}, "ex.ratio must be a number from 0 to 1, got nan"),
        ({"name": "x", "sizes": "8,0"}, "ex.sizes entry must be a positive integer, got 0"),
        ({"name": "x", "mode": "c"}, "unknown ex.mode 'c'; choose one of: a, b"),
    ],
)
def test_each_mistake_is_one_line_naming_the_key(data, message):
    with pytest.raises(UserError) as e:
        parse(Example, data, "ex.")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_without_where_keys_are_named_by_their_flag():
    with pytest.raises(UserError, match="^--count must be a positive integer, got 0$"):
        parse(Example, {"name": "x", "count": 0})
    with pytest.raises(UserError, match="^unknown key --bogus-key; accepted: name,"):
        parse(Example, {"name": "x", "bogus_key": 0})


def test_skip_refuses_a_field_and_leaves_its_default():
    with pytest.raises(UserError) as e:
        parse(Example, {"name": "x", "offset": 1}, "ex.", skip=("offset",))
    assert str(e.value).startswith("unknown key ex.offset; accepted: name, count,")
    assert "offset" not in str(e.value).split("accepted:")[1]
    assert parse(Example, {"name": "x"}, "ex.", skip=("offset",)).offset == 0


def test_not_a_mapping():
    with pytest.raises(UserError, match="^ex must be a mapping of keys to values, got list"):
        parse(Example, [1], "ex.")


def test_check_ranges_checks_instances_made_in_python():
    ok = Example("x", ratio=None)
    assert check_ranges(ok) is ok  # None passes where the field is optional
    bad = [
        (dataclasses.replace(ok, count=2.5), "--count must be a positive integer, got 2.5"),
        (dataclasses.replace(ok, count=float("inf")), "--count must be a positive integer"),
        (dataclasses.replace(ok, count="3"), "--count must be a positive integer, got '3'"),
        (dataclasses.replace(ok, sizes=()), "--sizes must be a non-empty list of positive"),
        (dataclasses.replace(ok, sizes=(1, 0)), "--sizes entry must be a positive integer"),
        (dataclasses.replace(ok, mode="c"), "unknown --mode 'c'; choose one of: a, b"),
    ]
    for settings, message in bad:
        with pytest.raises(UserError) as e:
            check_ranges(settings)
        assert message in str(e.value)


def test_coerce_alone():
    assert coerce(int | None, None, "n") is None
    assert coerce(bool, " ON ", "b") is True and coerce(bool, "0", "b") is False
    assert coerce(tuple[int, ...], "+1, 2", "t") == (1, 2)
    assert coerce(str, 8, "s") == "8"
    with pytest.raises(UserError, match="^n takes an integer, got '1e3'$"):
        coerce(int, "1e3", "n")


def _settings_classes():
    from convforge.builder.data.augment import AugmentConfig
    from convforge.builder.finetune import FinetuneOptions
    from convforge.builder.registry import ModelConfig
    from convforge.builder.training.config import TrainConfig
    from convforge.export.exporter import ExportOptions
    from convforge.pipeline.recipe import ReportOptions
    from convforge.runtime.bench import BenchConfig
    from convforge.runtime.serve.batcher import BatchingConfig
    from convforge.runtime.serve.server import ServeConfig
    from convforge.runtime.tune import TuneConfig

    return {
        AugmentConfig: {}, FinetuneOptions: {"pretrained": "x.pt"}, ModelConfig: {"arch": "vgg"},
        TrainConfig: {}, ExportOptions: {}, ReportOptions: {}, BenchConfig: {},
        BatchingConfig: {}, ServeConfig: {}, TuneConfig: {},
    }  # fmt: skip


def test_every_settings_class_reads_its_own_values_back():
    """Each class's defaults are within what it declares, and parse takes every field's
    type: its values as a file holds them (JSON-like) come back equal."""
    for cls, required in _settings_classes().items():
        default = cls(**required)
        assert check_ranges(default) is default
        as_file = dataclasses.asdict(default)
        as_file = {k: list(v) if isinstance(v, tuple) else v for k, v in as_file.items()}
        assert parse(cls, as_file, f"{cls.__name__}.") == default, cls
