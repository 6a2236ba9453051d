import os

import pytest

from convforge.errors import UserError
from convforge.files import atomic_write, ensure_dir, write_text


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "old")
    write_text(target, "new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_failure_inside_the_block_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_write(target, "w") as f:
        f.write("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        write_text(tmp_path / "missing" / "a.txt", "x")


def test_unwritable_folder_is_a_user_error(tmp_path, monkeypatch):
    # Root (CI runs as root) may write into read-only folders, so simulate the OS's refusal.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("convforge.files.tempfile.mkstemp", refuse)
    with pytest.raises(UserError, match="is not writable"):
        write_text(tmp_path / "a.txt", "x")


def test_ensure_dir(tmp_path):
    assert ensure_dir(tmp_path / "x" / "y").is_dir()
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="a file is in the way"):
        ensure_dir(tmp_path / "f" / "sub")


def _tree(folder) -> dict[str, bytes | None]:
    """Every path under ``folder`` (hidden ones included) -> its bytes (None: a folder)."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


def test_together_publishes_every_file_or_none(tmp_path):
    from convforge.files import together

    (tmp_path / "a.txt").write_text("old a")
    before = _tree(tmp_path)
    with pytest.raises(RuntimeError), together() as staging:
        staging.file(tmp_path / "a.txt").write_text("new a")
        staging.file(tmp_path / "b.txt").write_text("new b")
        staging.folder(tmp_path / "repo" / "m").joinpath("x").write_text("x")
        raise RuntimeError("the last check failed")
    assert _tree(tmp_path) == before
    with together() as staging:
        staging.file(tmp_path / "a.txt").write_text("new a")
        staging.file(tmp_path / "b.txt").write_text("new b")
        staging.folder(tmp_path / "repo" / "m")
        staging.file(tmp_path / "repo" / "m" / "x").write_text("x")  # inside the new folder
    assert _tree(tmp_path) == {
        "a.txt": b"new a", "b.txt": b"new b", "repo": None, "repo/m": None, "repo/m/x": b"x"
    }  # fmt: skip


def test_a_failed_rename_puts_back_what_was_replaced(tmp_path, monkeypatch):
    """All or nothing even while publishing: b.txt cannot be renamed into place, so a.txt
    (already replaced) gets its old contents back and the new folder goes again."""
    from convforge.files import together

    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "old").write_text("old m")
    before = _tree(tmp_path)
    real = os.replace

    def refuse_b(src, dst):
        if str(dst).endswith("b.txt"):
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr("convforge.files.os.replace", refuse_b)
    with pytest.raises(OSError, match="No space left"), together() as staging:
        staging.file(tmp_path / "a.txt").write_text("new a")
        staging.folder(tmp_path / "m").joinpath("new").write_text("new m")
        staging.folder(tmp_path / "n")
        staging.file(tmp_path / "b.txt").write_text("new b")
    assert _tree(tmp_path) == before


def test_an_adopted_folder_is_kept_when_the_rest_fails(tmp_path):
    from convforge.files import together

    done = tmp_path / ".work"
    done.mkdir()
    (done / "best.pt").write_text("weights")
    with pytest.raises(RuntimeError), together() as staging:
        staging.adopt(done, tmp_path / "train")
        raise RuntimeError
    assert _tree(tmp_path) == {".work": None, ".work/best.pt": b"weights"}
    with together() as staging:
        staging.adopt(done, tmp_path / "train")
    assert _tree(tmp_path) == {"train": None, "train/best.pt": b"weights"}


def test_a_file_in_the_way_of_a_staged_folder_is_a_user_error(tmp_path):
    from convforge.files import together

    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="a file is in the way"), together() as staging:
        staging.folder(tmp_path / "f" / "sub")
    assert _tree(tmp_path) == {"f": b"x"}
