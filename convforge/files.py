"""Atomic file writes: a reader sees the old file or the whole new one, never half.

Every file convforge writes (checkpoints, ONNX models, reports, plots) goes
through :func:`atomic_write`: the data lands in a temporary file in the target
folder, is flushed to disk, then renamed over the target. An interrupted run
leaves the previous file intact and no partial file behind.

A command that writes several files (an export and its variants, a pipeline
stage) stages them all with :func:`together` and publishes them at the end:
if anything fails first, none of its files appear and every file it would
have replaced is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
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
    tmp = _temp_file(Path(path))
    try:
        yield tmp
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


class Staging:
    """Files and folders written under temporary names beside their targets, then published
    together (see :func:`together`).

    :meth:`file` and :meth:`folder` hand out the temporary paths to write to,
    :meth:`adopt` takes one written elsewhere; :meth:`publish` moves each onto
    its target, in the order they were staged; :meth:`discard` removes them.
    """

    def __init__(self):
        self._staged: list[tuple[Path, Path]] = []  # (temporary path, target)
        self._adopted: set[Path] = set()  # staged paths the caller keeps on discard

    def file(self, target: str | os.PathLike) -> Path:
        """A fresh empty file beside ``target`` (same suffix) that will replace it; inside a
        staged folder when ``target`` lies in one (that folder is published whole).

        UserError when the folder is missing or not writable, or a folder is in the way.
        """
        target = Path(target)
        inside = self._in_staged_folder(target.parent)
        if inside is not None:
            inside.mkdir(parents=True, exist_ok=True)
            return inside / target.name
        if target.is_dir() and not target.is_symlink():
            raise UserError(f"cannot write {target}: a folder is in the way")
        tmp = _temp_file(target)
        self._staged.append((tmp, target))
        return tmp

    def folder(self, target: str | os.PathLike) -> Path:
        """A fresh empty folder that will replace ``target`` whole, missing parents included.

        What is staged is the highest missing ancestor of ``target``, so a
        failure leaves no new empty folders either. UserError when a file is
        in the way or the folder that would hold it is not writable.
        """
        target = Path(target).absolute()
        top = target
        while not top.parent.exists():
            top = top.parent
        for path in (top.parent, target):
            if os.path.lexists(path) and (path.is_symlink() or not path.is_dir()):
                raise UserError(f"cannot create folder {target}: a file is in the way")
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{top.name}.", suffix=".tmp", dir=top.parent))
        except PermissionError:
            raise UserError(f"cannot write into {top.parent}: permission denied") from None
        self._staged.append((tmp, top))
        inner = tmp / target.relative_to(top)
        inner.mkdir(parents=True, exist_ok=True)
        return inner

    def adopt(self, path: str | os.PathLike, target: str | os.PathLike) -> None:
        """Stage the finished file or folder ``path`` (on ``target``'s filesystem) for
        ``target``; :meth:`discard` leaves it where it is, for its owner."""
        path = Path(path)
        self._staged.append((path, Path(target)))
        self._adopted.add(path)

    def temporary(self, target: str | os.PathLike) -> Path:
        """The staged path that will become ``target`` (KeyError if none will)."""
        target = Path(target).absolute()
        return {t.absolute(): tmp for tmp, t in self._staged}[target]

    def final(self, path: str | os.PathLike) -> Path:
        """The path that ``path`` (a staged path or one inside a staged folder) will have once
        published; ``path`` itself when it is not staged."""
        path = Path(path).absolute()
        for tmp, target in self._staged:
            tmp = tmp.absolute()
            if path == tmp or tmp in path.parents:
                return target / path.relative_to(tmp)
        return path

    def _in_staged_folder(self, folder: Path) -> Path | None:
        """Where ``folder`` is being assembled, when it lies in a staged folder; else None."""
        folder = folder.absolute()
        for tmp, target in self._staged:
            target = target.absolute()
            if tmp.is_dir() and (folder == target or target in folder.parents):
                return tmp / folder.relative_to(target)
        return None

    def publish(self) -> None:
        """Move every staged file and folder onto its target.

        Files are flushed to disk, then each is renamed over its target (a
        reader sees the old file or the new one); a folder replaces an old one
        whole. If a move fails, every target gets its old contents back (or
        is removed when it was new), the staged paths are discarded, and the
        error is raised.
        """
        for tmp, _ in self._staged:
            for path in (tmp, *tmp.rglob("*")) if tmp.is_dir() else (tmp,):
                if path.is_file() and not path.is_symlink():
                    with open(path, "rb+") as f:
                        os.fsync(f.fileno())
        done: list[tuple[Path, Path, Path | None]] = []  # (staged, target, old version)
        try:
            for tmp, target in self._staged:
                done.append((tmp, target, _replace(tmp, target)))
        except BaseException:
            for tmp, target, old in reversed(done):
                os.replace(target, tmp)  # back where it was staged, for discard
                if old is not None:
                    _put_back(old, target)
            self.discard()
            raise
        for _, _, old in done:
            if old is not None:
                _remove(old)
        self._staged.clear()

    def discard(self) -> None:
        """Remove every staged file and folder that is still there, except adopted ones."""
        for tmp, _ in self._staged:
            if tmp not in self._adopted:
                _remove(tmp)
        self._staged.clear()


@contextlib.contextmanager
def together(within: Staging | None = None) -> Iterator[Staging]:
    """A :class:`Staging` that is published on a clean exit from the block and discarded on
    an exception.

    Write every file of one command to the paths it hands out, check them
    inside the block, and leave it: they appear together, or (on any failure,
    a failed check included) none of them does and every target is left as it
    was. ``within``: a caller's Staging, yielded as it is (its owner publishes
    it), so a function can write alone or as part of a larger whole.
    """
    if within is not None:
        yield within
        return
    staging = Staging()
    try:
        yield staging
    except BaseException:
        staging.discard()
        raise
    staging.publish()


def _replace(path: Path, target: Path) -> Path | None:
    """Move ``path`` onto ``target``, replacing what is there whole; return the old version,
    set aside (None if there was none). If the move fails, ``target`` is left as it was."""
    old = _set_aside(target)
    try:
        os.replace(path, target)
    except BaseException:
        if old is not None:
            _put_back(old, target)
        raise
    return old


def _temp_file(path: Path) -> Path:
    """A new empty file beside ``path``, hidden, with the same suffix (PNG, ONNX, ... writers
    that go by the suffix still work)."""
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=folder)
    except PermissionError:
        raise UserError(f"cannot write {path}: folder {folder} is not writable") from None
    os.close(fd)
    return Path(tmp)


def _set_aside(target: Path) -> Path | None:
    """Keep ``target``'s current version under a hidden name; None when there is none.

    A file stays in place (a hard link keeps the old contents reachable, so
    readers never miss it); a folder is moved aside, since a rename cannot
    replace a folder that has files in it.
    """
    if not os.path.lexists(target):
        return None
    aside = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    if target.is_dir() and not target.is_symlink():
        os.rename(target, aside)
        return aside
    try:
        os.link(target, aside, follow_symlinks=False)
    except OSError:  # a filesystem without hard links
        shutil.copy2(target, aside, follow_symlinks=False)
    return aside


def _put_back(old: Path, target: Path) -> None:
    if old.is_dir() and not old.is_symlink():
        _remove(target)
        os.rename(old, target)
    else:
        os.replace(old, target)


def _remove(path: Path) -> None:
    """Delete ``path`` (a file, a link or a folder) if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
