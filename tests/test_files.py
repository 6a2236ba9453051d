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
