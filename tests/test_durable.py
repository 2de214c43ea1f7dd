"""baton/durable.py: every state file is replaced whole or not at all, with nothing left beside it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from baton import durable


def test_write_bytes_replaces_the_file_with_its_mode_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    durable.write_bytes(target, b"new", mode=0o640)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_write_that_fails_keeps_the_old_file_and_removes_its_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        durable.write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_symlink_at_the_path_is_replaced_not_written_through(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    target = tmp_path / "state.json"
    target.symlink_to(elsewhere)
    durable.write_bytes(target, b"new")
    assert not target.is_symlink() and target.read_bytes() == b"new"
    assert elsewhere.read_bytes() == b"untouched"


def test_temporary_files_are_private_and_never_reuse_a_name(tmp_path: Path) -> None:
    """What tempfile.mkstemp promised: created 0600 with O_EXCL, so a planted file or link is never opened."""
    target = tmp_path / "state.json"
    fds = [durable._create_temp(target) for _ in range(50)]
    try:
        names = {tmp for _, tmp in fds}
        assert len(names) == 50
        for _, tmp in fds:
            assert tmp.parent == tmp_path and tmp.name.startswith(".state.json.") and tmp.name.endswith(".tmp")
            assert stat.S_IMODE(tmp.lstat().st_mode) == 0o600
    finally:
        for fd, _ in fds:
            os.close(fd)


def test_remove_tree_deletes_a_directory_and_ignores_one_already_gone(tmp_path: Path) -> None:
    tree = tmp_path / "trash"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "f").write_bytes(b"x")
    durable.remove_tree(tree)
    assert not tree.exists()
    durable.remove_tree(tree)
