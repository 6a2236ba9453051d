"""Backend options, declared once per backend as a dataclass of typed ``setting`` fields.

    class OrtCpu(Backend):
        @dataclass(frozen=True)
        class Options:
            threads: int | None = setting(None, "intra-op threads", minimum=1)

:func:`parse_options` turns what a user gave (Python values from the API,
strings or JSON scalars from ``--set ort-cpu.threads=2``) into that dataclass
or a one-line UserError: an unknown key lists the accepted ones; a value of
the wrong type, outside ``choices`` or below ``minimum`` names the option and
what it takes (``ort-cpu option threads must be a positive integer, got 0``).
Booleans accept true/false, yes/no, on/off and 1/0.
:class:`BatchProfile` is the TensorRT optimisation profile both TensorRT
backends share, with one default.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass

from convforge.errors import UserError
from convforge.settings import parse, setting, unwrap

DEFAULT_OPT_BATCH = 8  # the batch TensorRT tunes for unless told (capped at max_batch)


@dataclass(frozen=True)
class NoOptions:
    """For a backend without options."""


def parse_options(cls: type, given: dict, backend: str):
    """An instance of options dataclass ``cls`` from ``given``
    (:func:`convforge.settings.parse`); UserError naming what is wrong."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(names))
    if unknown:  # said here: "has no option" is what a backend's users know
        raise UserError(
            f"backend {backend!r} has no option {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(names) or 'none'}"
        )
    return parse(cls, given, f"{backend} option ")


def option_rows(cls: type) -> list[dict]:
    """One dict per option of ``cls``: name, type, default, help (for `convforge backends`)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        kind, _ = unwrap(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        choices = f.metadata.get("choices")
        rows.append(
            {
                "name": f.name,
                "type": "|".join(choices) if choices else kind.__name__,
                "default": default,
                "help": f.metadata.get("help", ""),
            }
        )
    return rows


PROFILE_OPTIONS = ("min_batch", "opt_batch", "max_batch")  # BatchProfile's fields


@dataclass(frozen=True)
class BatchProfile:
    """The batch range a TensorRT engine is built for (one optimisation profile)."""

    min_batch: int = setting(1, "smallest batch the engine takes", minimum=1)
    opt_batch: int | None = setting(
        None, f"batch TensorRT tunes for; default: {DEFAULT_OPT_BATCH}, capped at max_batch",
        minimum=1,
    )  # fmt: skip
    max_batch: int = setting(32, "largest batch the engine takes", minimum=1)

    def profile(self, backend: str) -> tuple[int, int, int]:
        """(min, opt, max); UserError unless min <= opt <= max."""
        opt = self.opt_batch
        if opt is None:
            opt = min(max(DEFAULT_OPT_BATCH, self.min_batch), self.max_batch)
        if not self.min_batch <= opt <= self.max_batch:
            raise UserError(
                f"{backend} needs min_batch <= opt_batch <= max_batch, got "
                f"min_batch={self.min_batch}, opt_batch={opt}, max_batch={self.max_batch}"
            )
        return self.min_batch, opt, self.max_batch

    def for_file(self, backend: str, info, given) -> tuple[int, int, int]:
        """(min, opt, max) batch to build ``info``'s file for: :meth:`profile` for a file
        whose batch dimension is dynamic; (b, b, b) for one fixed at b (TensorRT requires
        min = opt = max = the network's size for a static dimension). A batch option in
        ``given`` (the option names the user set) that differs from b is a one-line
        UserError."""
        b = info.spec.batch
        if b is None:
            return self.profile(backend)
        conflicts = [
            f"{name}={getattr(self, name)}"
            for name in PROFILE_OPTIONS
            if name in given and getattr(self, name) not in (None, b)
        ]
        if conflicts:
            raise UserError(
                f"{os.path.basename(info.path)} has a fixed batch of {b}, so {backend} builds "
                f"for exactly {b}; drop {', '.join(conflicts)} or set "
                f"{'it' if len(conflicts) == 1 else 'them'} to {b}"
            )
        return b, b, b
