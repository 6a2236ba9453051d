"""Settings dataclass fields that carry their own help line, so each is said once.

    @dataclass
    class TrainConfig:
        epochs: int = setting(15, "full passes over the training split")

The command line is generated from such fields (:mod:`convforge.cli.options`):
the option's type comes from the annotation, its default from the field and
its help from here, so a new field is a new option with nothing else to
write. ``flag`` renames the option (``--model`` for ``arch``); ``cli=False``
keeps a field off the command line. ``choices`` and ``minimum`` state what a
value may be, for parsers that check them (a backend's options,
:func:`convforge.runtime.backends.options.parse_options`).
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
    minimum: int | None = None,
) -> Any:
    """A dataclass field with a help line (and optionally a CLI flag name, accepted values)."""
    meta = {"help": help, "flag": flag, "cli": cli, "choices": choices, "minimum": minimum}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
