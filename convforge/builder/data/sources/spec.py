"""A ``--dataset`` spec: parsed (:func:`parse_spec`) and loaded (:func:`load_dataset`)."""

from __future__ import annotations

from pathlib import Path

from convforge.builder.data.sources import builtin, cifar, imagefolder, mnist
from convforge.builder.data.sources.bundle import DataBundle
from convforge.errors import UserError, check_choice

DATASETS = ("digits", "synthetic", "imagefolder", "cifar10", "cifar100", "mnist", "fashion-mnist")
_NEEDS_PATH = ("imagefolder", "cifar10", "cifar100", "mnist", "fashion-mnist")
_NO_ARG = ("digits",)  # (synthetic's ARG is optional: key=value options, not a path)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"cifar10:/data/c"`` -> ``("cifar10", "/data/c")``, ``"digits"`` -> ``("digits", None)``.

    The kind is everything before the first ``:`` (so a PATH may contain
    colons). UserError for an unknown kind, a missing PATH, or an ARG where
    the kind takes none.
    """
    kind, sep, arg = spec.strip().partition(":")
    kind, arg = kind.strip(), arg.strip()
    check_choice("dataset", kind, DATASETS)
    if kind in _NEEDS_PATH and not arg:
        raise UserError(f"dataset {kind!r} needs a folder: use {kind}:PATH")
    if kind in _NO_ARG and sep:
        raise UserError(f"dataset {kind!r} takes no path or options, got {spec!r}; use {kind}")
    return kind, (arg or None)


def load_dataset(
    spec: str, *, val_fraction: float = 0.1, seed: int = 0, channels: int | None = None
) -> DataBundle:
    """Load the dataset ``spec`` names (see the package docstring) from local files.

    ``val_fraction`` and ``seed`` shape the stratified split of datasets
    without a test part. ``channels`` (1 or 3) is the channel count of the
    images delivered: None keeps the dataset's own (ImageFolder: 3), 1 turns
    colour into gray (PIL's "L" weights), 3 repeats gray into RGB.
    """
    kind, arg = parse_spec(spec)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if channels is not None and channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels!r}")
    if kind == "digits":
        return builtin.load_digits(val_fraction, seed, channels)
    if kind == "synthetic":
        return builtin.load_synthetic(arg, val_fraction, seed, channels)
    path = Path(arg).expanduser()
    if kind == "imagefolder":
        return imagefolder.load(path, val_fraction, seed, channels or 3)
    if kind in ("cifar10", "cifar100"):
        return cifar.load(kind, path, channels)
    return mnist.load(kind, path, channels)
