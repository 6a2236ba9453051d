"""Atomic file writes: a reader sees the old file or the whole new one, never half.

Every file convforge writes (checkpoints, ONNX models, reports, plots) goes
through :func:`atomic_write`: the data lands in a temporary file in the target
folder, is flushed to disk, then renamed over the target. An interrupted run
leaves the previous file intact and no partial file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from convforge.errors import UserError


@contextlib.contextmanager
def staged(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` (same suffix), renamed onto ``path`` on clean exit.

    For files that are written, then checked, then published: write to the
    yielded path, check it, and leave the block; the rename makes the checked
    bytes appear at ``path`` in one step. On an exception (a failed check
    included) the temporary file is removed and ``path`` is left as it was.
    Raises UserError when the folder is missing or not writable.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=folder)
    except PermissionError:
        raise UserError(f"cannot write {path}: folder {folder} is not writable") from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file beside ``path``; on clean exit rename it onto ``path``.

    The data is flushed to disk before the rename. Raises UserError when the
    folder is missing or not writable. On an exception inside the block the
    temporary file is removed and ``path`` is left as it was.
    """
    with staged(path) as tmp, open(tmp, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as f:
        f.write(text)


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) if needed; raise UserError if that is impossible."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot create folder {path}: a file is in the way") from None
    except PermissionError:
        raise UserError(f"cannot create folder {path}: permission denied") from None
    return path
