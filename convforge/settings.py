"""Settings dataclasses: fields that carry their own help line and accepted values, and the
one engine that turns what a user gave into such a class, so each is said once.

    @dataclass
    class TrainConfig:
        epochs: int = setting(15, "full passes over the training split", minimum=1)

    cfg = parse(TrainConfig, {"epochs": "3"}, "train.")   # UserError: one line, the key, why

The command line is generated from such fields (:mod:`convforge.cli.arguments`):
the option's type comes from the annotation, its default from the field and
its help from here, so a new field is a new option with nothing else to
write. ``flag`` renames the option (``--model`` for ``arch``); ``cli=False``
keeps a field off the command line. ``choices``, ``minimum`` and ``maximum``
state what a value may be; :func:`check_ranges` checks them, and a settings
class's ``check()`` calls it (adding only checks that involve several fields).

:func:`parse` is how every source becomes settings: the command line, a
recipe's YAML section, a plan's JSON, a backend's options (``--set``). Values
are converted from their annotation (:func:`coerce`): ``bool``, ``int``,
``float``, ``str``, ``X | None``, ``tuple[int, ...]`` from ``"1,8,32"`` or a
list, ``list``, ``dict`` and nested settings classes; then every choice and
range is checked.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import re
import types
import typing
from typing import Any

from convforge.errors import UserError, check_choice

TRUE = ("true", "1", "yes", "on")  # spellings of a bool, as a command line or file gives it
FALSE = ("false", "0", "no", "off")


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",  # noqa: A002 (argparse's own word for it)
    *,
    flag: str | None = None,
    factory: Any = dataclasses.MISSING,
    cli: bool = True,
    choices: tuple[str, ...] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """A dataclass field with a help line (and optionally a CLI flag name, accepted values:
    ``choices``, or a number from ``minimum`` to ``maximum``, inclusive; for a
    ``tuple[int, ...]`` field they apply to each entry)."""
    meta = {"help": help, "flag": flag, "cli": cli, "choices": choices, "minimum": minimum,
            "maximum": maximum}  # fmt: skip
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag(f: dataclasses.Field) -> str:
    """The command-line option of field ``f``: its ``flag``, else ``--field-name``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def parse(cls: type, data: dict | None, where: str = "", *, skip=(), fixed: dict | None = None):
    """An instance of settings dataclass ``cls`` from ``data`` (raw values: text from a
    command line, YAML or JSON values, Python values), or a one-line UserError.

    Each key must be a field of ``cls`` not in ``skip`` (an unknown one lists the
    accepted ones); each value is converted by :func:`coerce`; a field without a
    default must be given; ``fixed`` values (the caller's) are added last and win.
    Then :func:`check_ranges`. Messages name a key as ``where`` + its name
    (``"train."`` -> ``train.epochs``; ``"ort-cpu option "`` -> ``ort-cpu option
    threads``); with ``where`` empty, by its command-line flag (``--epochs``).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            f"{where.rstrip('.: ') or cls.__name__} must be a mapping of keys to values, "
            f"got {type(data).__name__} {data!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    names = [name for name in fields if name not in skip]
    unknown = [_key(str(key), where) for key in data if key not in names]
    if unknown:
        keys = "keys" if len(unknown) > 1 else "key"
        raise UserError(
            f"unknown {keys} {', '.join(unknown)}; accepted: {', '.join(names) or 'none'}"
        )
    hints = _hints(cls)
    values = {
        key: coerce(hints[key], value, _name(fields[key], where))
        for key, value in {**data, **(fixed or {})}.items()
    }
    for f in fields.values():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in values:
            raise UserError(f"{_name(f, where)} is missing")
    return check_ranges(cls(**values), where)


def coerce(annotation, value, name: str):
    """``value`` as type ``annotation``, or a UserError ``"<name> takes <what>, got <value>"``.

    ``X | None``: None, or an X. ``bool``: a bool, or true/false, yes/no, on/off,
    1/0 in any case. ``int``: an int (not a bool) or its digits. ``float``: a
    number or its text. ``str``: text, a path or a number. ``tuple[X, ...]``: a
    non-empty list, or text of comma-separated X. ``list[X]``: a list. ``dict``:
    a mapping. A settings dataclass: an instance, or a mapping (:func:`parse`).
    """
    kind, optional = unwrap(annotation)
    if value is None and optional:
        return None
    origin = typing.get_origin(kind) or kind
    if kind is bool:
        ok = isinstance(value, bool) or str(value).strip().lower() in (*TRUE, *FALSE)
        if ok:
            return value if isinstance(value, bool) else str(value).strip().lower() in TRUE
    elif kind is int:
        if not isinstance(value, bool) and hasattr(value, "__index__"):
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
            return int(value)
    elif kind is float:
        if not isinstance(value, bool) and isinstance(value, (str, numbers.Real)):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin in (tuple, list):
        entry = (typing.get_args(kind) or (Any,))[0]
        items = value
        if isinstance(value, str) and origin is tuple:  # "1, 8,32" (a trailing comma is fine)
            items = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(items, (list, tuple)) and (items or origin is list):
            return origin(coerce(entry, v, f"{name} entry") for v in items)
    elif origin is dict:
        if isinstance(value, dict):
            return value
    elif dataclasses.is_dataclass(kind):
        if isinstance(value, kind):
            return value
        if isinstance(value, dict):
            return parse(kind, value, f"{name}.")
    elif not isinstance(kind, type) or isinstance(value, kind):
        return value  # an annotation this engine does not check (Any, a union)
    raise UserError(f"{name} takes {_kind_words(kind)}, got {value!r}")


def check_ranges(settings: Any, where: str = "") -> Any:
    """``settings`` (a dataclass instance) if every field declared with ``choices`` holds one
    of them and every field declared with ``minimum`` or ``maximum`` holds a number in that
    range (an ``int`` field an integer; each entry of a tuple field; ``None`` passes where
    the field is optional or defaults to ``None``); else a UserError naming the option
    (as :func:`parse` does) and what it accepts."""
    hints = _hints(type(settings))
    for f in dataclasses.fields(settings):
        check_value(f, hints.get(f.name, Any), getattr(settings, f.name), _name(f, where))
    return settings


def check_value(f: dataclasses.Field, annotation, value, name: str) -> None:
    """UserError naming ``name`` unless ``value`` is within field ``f``'s choices and range
    (``annotation``: the field's type; see :func:`check_ranges`)."""
    choices, low, high = (f.metadata.get(k) for k in ("choices", "minimum", "maximum"))
    kind, optional = unwrap(annotation)
    if (not choices and low is None and high is None) or (
        value is None and (optional or f.default is None)
    ):
        return
    if typing.get_origin(kind) is tuple:
        entry = typing.get_args(kind)[0]
        if not isinstance(value, (tuple, list)) or not value:
            raise UserError(
                f"{name} must be a non-empty list of {accepted(entry, f, plural=True)}, "
                f"got {value!r}"
            )
        for v in value:
            _check_one(entry, f, v, f"{name} entry")
    else:
        _check_one(kind, f, value, name)


def accepted(kind, f: dataclasses.Field, plural: bool = False) -> str:
    """What field ``f`` takes, in words: ``a positive integer``, ``a number from 0 to 1``
    (``plural``: ``positive integers``...)."""
    low, high = f.metadata.get("minimum"), f.metadata.get("maximum")
    if kind is int and low == 1 and high is None:
        return "positive integers" if plural else "a positive integer"
    nouns = ("an integer", "integers") if kind is int else ("a number", "numbers")
    noun = nouns[plural]
    if low is not None and high is not None:
        return f"{noun} from {_number(low)} to {_number(high)}"
    if low is not None:
        return f"{noun} >= {_number(low)}"
    if high is not None:
        return f"{noun} <= {_number(high)}"
    return noun


def unwrap(annotation) -> tuple[Any, bool]:
    """``int | None`` -> ``(int, True)``; ``int`` -> ``(int, False)``; a union of several
    types other than None stays as it is."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], len(rest) < len(args)
    return annotation, False


def _check_one(kind, f: dataclasses.Field, value, name: str) -> None:
    if f.metadata.get("choices"):
        check_choice(name, value, f.metadata["choices"])
    low, high = f.metadata.get("minimum"), f.metadata.get("maximum")
    if low is None and high is None:
        return
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = number and value == value  # NaN compares unequal to itself
    if ok and kind is int:
        ok = math.isfinite(value) and value == int(value)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        raise UserError(f"{name} must be {accepted(kind, f)}, got {value!r}")


def _name(f: dataclasses.Field, where: str) -> str:
    return where + f.name if where else flag(f)


def _key(key: str, where: str) -> str:
    return where + key if where else "--" + key.replace("_", "-")


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def _kind_words(kind) -> str:
    words = {bool: "true or false (also yes/no, on/off, 1/0)", int: "an integer",
             float: "a number", str: "a string", dict: "a mapping", list: "a list"}  # fmt: skip
    origin = typing.get_origin(kind) or kind
    if origin is tuple:
        entry = (typing.get_args(kind) or (Any,))[0]
        plural = {int: "integers", float: "numbers", str: "strings"}.get(entry, "values")
        example = " (e.g. 1,8,32 or [1, 8, 32])" if entry is int else ""
        return f"a non-empty list of {plural}{example}"
    if dataclasses.is_dataclass(kind):
        return "a mapping of keys to values"
    return words.get(origin, getattr(kind, "__name__", str(kind)))


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
