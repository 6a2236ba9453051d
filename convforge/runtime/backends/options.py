"""Backend options, declared once per backend as a dataclass of typed ``setting`` fields.

    class OrtCpu(Backend):
        @dataclass(frozen=True)
        class Options:
            threads: int | None = setting(None, "intra-op threads", minimum=1)

:func:`parse_options` turns what a user gave (Python values from the API,
strings or JSON scalars from ``--set ort-cpu.threads=2``) into that dataclass
or a one-line UserError: an unknown key lists the accepted ones; a value of
the wrong type, outside ``choices`` or below ``minimum`` names the option and
what it takes. Booleans accept true/false, yes/no, on/off and 1/0.
:class:`BatchProfile` is the TensorRT optimisation profile both TensorRT
backends share, with one default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass

from convforge.errors import UserError, check_choice
from convforge.settings import setting

TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")
DEFAULT_OPT_BATCH = 8  # the batch TensorRT tunes for unless told (capped at max_batch)


@dataclass(frozen=True)
class NoOptions:
    """For a backend without options."""


def parse_options(cls: type, given: dict, backend: str):
    """An instance of options dataclass ``cls`` from ``given``; UserError naming what is wrong."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        accepted = ", ".join(fields) or "none"
        raise UserError(
            f"backend {backend!r} has no option {', '.join(map(repr, unknown))}; "
            f"accepted: {accepted}"
        )
    hints = typing.get_type_hints(cls)
    values = {
        name: _coerce(f"{backend} option {name}", value, hints[name], fields[name].metadata)
        for name, value in given.items()
    }
    return cls(**values)


def option_rows(cls: type) -> list[dict]:
    """One dict per option of ``cls``: name, type, default, help (for `convforge backends`)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        kind, optional = _unwrap(hints[f.name])
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


def _unwrap(annotation) -> tuple[type, bool]:
    """``int | None`` -> (int, True); ``int`` -> (int, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _coerce(what: str, value, annotation, meta):
    kind, optional = _unwrap(annotation)
    if value is None:
        if optional:
            return None
        raise UserError(f"{what} needs a value")
    if kind is bool:
        out = _boolean(what, value)
    elif kind is int:
        out = _integer(what, value)
    elif kind is float:
        out = _number(what, value)
    else:  # str (a path given as a Path is a string too)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UserError(f"{what} takes a string, got {value!r}")
        out = str(value)
    if meta.get("choices"):
        check_choice(what, out, meta["choices"])
    if meta.get("minimum") is not None and out < meta["minimum"]:
        raise UserError(f"{what} must be >= {meta['minimum']}, got {out!r}")
    return out


def _boolean(what: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise UserError(f"{what} takes true or false (also yes/no, on/off, 1/0), got {value!r}")


def _integer(what: str, value) -> int:
    if isinstance(value, bool):
        raise UserError(f"{what} takes an integer, got {value!r}")
    if hasattr(value, "__index__"):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    raise UserError(f"{what} takes an integer, got {value!r}")


def _number(what: str, value) -> float:
    if isinstance(value, bool):
        raise UserError(f"{what} takes a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} takes a number, got {value!r}") from None


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
