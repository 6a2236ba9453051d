"""Settings dataclass fields that carry their own help line, so each is said once.

    @dataclass
    class TrainConfig:
        epochs: int = setting(15, "full passes over the training split")

The command line is generated from such fields (:mod:`convforge.cli.options`):
the option's type comes from the annotation, its default from the field and
its help from here, so a new field is a new option with nothing else to
write. ``flag`` renames the option (``--model`` for ``arch``); ``cli=False``
keeps a field off the command line. ``choices``, ``minimum`` and ``maximum`` state what
a value may be, for parsers that check them (a backend's options,
:func:`convforge.runtime.backends.options.parse_options`) and for
:func:`check_ranges`, which a settings class's ``check()`` calls before any work starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any


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
    """A dataclass field with a help line (and optionally a CLI flag name, accepted values)."""
    meta = {"help": help, "flag": flag, "cli": cli, "choices": choices, "minimum": minimum,
            "maximum": maximum}  # fmt: skip
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_ranges(settings: Any) -> Any:
    """``settings`` (a dataclass instance) if every field declared with ``minimum`` or
    ``maximum`` holds a number in that range (an ``int`` field an integer; ``None`` passes
    where the default is ``None``); else a UserError naming the option and the range."""
    from convforge.errors import UserError  # errors imports nothing: no cycle

    for f in dataclasses.fields(settings):
        low, high = f.metadata.get("minimum"), f.metadata.get("maximum")
        value = getattr(settings, f.name)
        if (low is None and high is None) or (value is None and f.default is None):
            continue
        name = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        whole = isinstance(f.default, int) and not isinstance(f.default, bool)
        accepted = ("an integer" if whole else "a number") + _range_words(low, high)
        number = not isinstance(value, bool) and isinstance(value, (int, float))
        if not number or (whole and value != int(value)) or value != value:  # NaN
            raise UserError(f"{name} must be {accepted}, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise UserError(f"{name} must be {accepted}, got {value!r}")
    return settings


def _range_words(low, high) -> str:
    if low is not None and high is not None:
        return f" from {low:g} to {high:g}"
    return f" >= {low:g}" if low is not None else f" <= {high:g}"
