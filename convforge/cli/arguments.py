"""What every command's parser shares: one-line usage errors, options generated from
settings dataclasses, ``--json``, ``--set``, comma-separated lists.

Nothing here imports torch; a command's own settings classes are imported by
that command's module when its parser is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from convforge import settings
from convforge.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is a UserError: one line and a ``--help`` hint,
    not a usage dump (the CLI prints it and exits 2, like every other user error)."""

    def error(self, message: str) -> typing.NoReturn:
        raise UserError(f"{message} (see '{self.prog} --help')")


def add_json(parser: argparse.ArgumentParser) -> None:
    """``--json``: print a machine-readable result on stdout instead of the table."""
    parser.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )


def csv(value: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [v.strip() for v in value.split(",") if v.strip()]


def add_settings(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    *,
    only: tuple[str, ...] | None = None,
    skip: tuple[str, ...] = (),
    defaults: dict | None = None,
) -> None:
    """One option per field of dataclass ``cls`` declared with :func:`convforge.settings.setting`.

    The option is ``--field-name`` (or the field's ``flag``), typed from the
    annotation by :func:`convforge.settings.coerce` (``bool`` fields get
    ``--x/--no-x``; ``tuple[int, ...]`` takes ``1,8,32``, each entry in the
    field's range), defaulting to the field's default or ``defaults[name]``, and
    stores into ``args.<field name>`` for :func:`settings_from`, which checks the
    ranges. ``only`` and ``skip`` choose fields by name.
    """
    defaults = defaults or {}
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", False) or f.name in skip or (only and f.name not in only):
            continue
        flag = settings.flag(f)
        default = defaults.get(f.name, _default(f))
        kind, _ = settings.unwrap(hints[f.name])
        kwargs = {"dest": f.name, "default": default, "help": _help(f, default)}
        if kind is bool:
            kwargs["action"] = _GivenBool
        elif typing.get_origin(kind) is tuple:
            kwargs.update(action=_Given, type=_list_type(f, kind), metavar="N,N,...")
        else:
            kwargs.update(action=_Given, type=_type(kind))
            kwargs["metavar"] = flag.lstrip("-").replace("-", "_").upper()
        group.add_argument(flag, **kwargs)


def _type(kind):
    """argparse type: text -> ``kind`` by :func:`convforge.settings.coerce`. Its ValueError
    makes argparse say ``argument --iters: invalid int value: 'many'``."""

    def convert(text: str):
        try:
            return settings.coerce(kind, text, "")
        except UserError:
            raise ValueError(text) from None

    convert.__name__ = getattr(kind, "__name__", "value")  # the word in argparse's message
    return convert


def _list_type(f: dataclasses.Field, kind):
    """argparse type: ``"1,8,32"`` -> ``(1, 8, 32)``, each entry in field ``f``'s range
    (a list's entries are checked with it: ``takes comma-separated positive integers``)."""

    def convert(text: str):
        try:
            values = settings.coerce(kind, text, "")
            settings.check_value(f, kind, values, "")
        except UserError:
            entry = typing.get_args(kind)[0]
            words = settings.accepted(entry, f, plural=True)
            raise argparse.ArgumentTypeError(
                f"takes comma-separated {words}, got {text!r}"
            ) from None
        return values

    return convert


def given(args: argparse.Namespace, name: str) -> bool:
    """Whether the setting ``name`` was on the command line (not its default), even when the
    value given equals the default."""
    return name in getattr(args, GIVEN, ())


GIVEN = "_settings_given"  # the Namespace attribute the actions below record names in


class _Given(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, GIVEN, {*getattr(namespace, GIVEN, ()), self.dest})


class _GivenBool(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, values, option_string)
        setattr(namespace, GIVEN, {*getattr(namespace, GIVEN, ()), self.dest})


def settings_values(cls: type, args: argparse.Namespace) -> dict:
    """The values of the options :func:`add_settings` declared for ``cls``, by field name."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def settings_from(cls: type, args: argparse.Namespace, **fixed):
    """An instance of ``cls`` from the options :func:`add_settings` declared (``fixed`` wins),
    every choice and range checked (:func:`convforge.settings.parse`): a value out of range
    is a one-line UserError naming its option, before any work starts."""
    hints = typing.get_type_hints(cls)
    given = {  # None: an option without a default that was not given (a required field)
        k: v for k, v in settings_values(cls, args).items() if v is not None or _optional(hints[k])
    }
    return settings.parse(cls, given, fixed=fixed)


def backend_options(items: list[str] | None, backends) -> dict[str, dict]:
    """``["torch.device=cuda", "ort-cpu.threads=2"]`` -> ``{"torch": {"device": "cuda"}, ...}``.

    Values are JSON when they parse (numbers, true/false), else strings.
    ``backends`` are the accepted backend names.
    """
    options: dict[str, dict] = {}
    for item in items or []:
        name, dot, rest = item.partition(".")
        key, eq, value = rest.partition("=")
        if not dot or not eq or not key:
            raise UserError(f"--set takes BACKEND.KEY=VALUE (e.g. torch.device=cuda), got {item!r}")
        if name not in backends:
            raise UserError(
                f"--set {item!r}: unknown backend {name!r}; choose one of: {', '.join(backends)}"
            )
        try:
            options.setdefault(name, {})[key] = json.loads(value)
        except json.JSONDecodeError:
            options.setdefault(name, {})[key] = value
    return options


def add_backend_options(parser: argparse.ArgumentParser, example: str) -> None:
    """``--set BACKEND.KEY=VALUE``, repeatable (parse with :func:`backend_options`)."""
    parser.add_argument(
        "--set",
        action="append",
        metavar="BACKEND.KEY=VALUE",
        help=f"a backend option, repeatable, e.g. {example}",
    )


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _optional(annotation) -> bool:
    return settings.unwrap(annotation)[1]


def _help(f: dataclasses.Field, default) -> str:
    text = f.metadata.get("help", "")
    if isinstance(default, bool):
        text += f" (default: {'on' if default else 'off'})"
    elif default is not None and default != ():
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text += f" (default: {shown})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def float_list(text: str) -> list[float]:
    """argparse type: ``"0.485,0.456,0.406"`` -> ``[0.485, 0.456, 0.406]``."""
    try:
        values = [float(v) for v in csv(text)]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"takes comma-separated numbers, got {text!r}")
    return values


OVERRIDES_TITLE = ("a model made elsewhere (override its metadata or the defaults; `convforge "
                   "annotate` writes them into the file)")  # fmt: skip
OVERRIDE = "override_"  # prefix of the Namespace attributes the override options store into


def add_model_overrides(
    parser: argparse.ArgumentParser,
    output_flags: tuple[str, ...] = ("--output", "--output-name"),
    title: str = OVERRIDES_TITLE,
) -> None:
    """One option per field of :class:`~convforge.overrides.ModelOverrides` (``--mean --std
    --resize --labels --layout``, and the ``output`` field as ``output_flags``: a command
    whose ``--output`` is taken gives ``("--output-name",)``); read them back with
    :func:`model_overrides`. ``--mean``/``--std`` take comma-separated numbers, ``--labels``
    a text file (read by :func:`model_overrides`), ``--layout`` one of its choices."""
    from convforge.overrides import ModelOverrides

    hints = typing.get_type_hints(ModelOverrides)
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(ModelOverrides):
        flags = output_flags if f.name == "output" else (settings.flag(f),)
        kind, _ = settings.unwrap(hints[f.name])
        kwargs = {"dest": OVERRIDE + f.name, "help": _help(f, None)}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        elif kind == tuple[float, ...]:
            kwargs["type"], kwargs["metavar"] = float_list, "N,N,..."
        else:  # the labels file (read by model_overrides), the output's name, the resize
            kwargs["type"] = _type(int) if kind is int else str
            kwargs["metavar"] = {"classes": "FILE", "output": "NAME"}.get(f.name, "N")
        group.add_argument(*flags, **kwargs)


def read_labels(path: str) -> list[str]:
    """The class names in a text file, one per line (blank lines skipped); UserError when it
    cannot be read or holds none."""
    from pathlib import Path

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read labels file {path}: {e}") from None
    labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not labels:
        raise UserError(f"labels file {path} holds no labels (one per line)")
    return labels


def model_overrides(args: argparse.Namespace):
    """The :class:`~convforge.overrides.ModelOverrides` the options of
    :func:`add_model_overrides` gave (``--labels``' file read), every value checked as its
    field declares: what the command passes to every reader of its model files."""
    from convforge.overrides import ModelOverrides

    values = {f.name: getattr(args, OVERRIDE + f.name) for f in dataclasses.fields(ModelOverrides)}
    if values["classes"] is not None:
        values["classes"] = read_labels(values["classes"])
    return settings.parse(ModelOverrides, values)
