"""The standby channel's messages and code stamp (baton/standby.py), and how the supervisor knows a standby
that took an update as that update's helper (supervisor/processes.py ``is_helper_of``); no process is started."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from baton import standby
from baton.standby import FLAG, Hello, Job, StandbyError, Taken
from supervisor.processes import is_helper_of


def test_each_message_reads_back_as_written():
    assert Hello.decode(Hello(pid=42, code="abc").encode()) == Hello(pid=42, code="abc")
    assert Job.decode(Job("0123abcd").encode()) == Job("0123abcd")
    assert Taken.decode(Taken(pid=7).encode()) == Taken(pid=7)


@pytest.mark.parametrize("line", [
    b'{"v": 2, "op": "apply", "update_id": "x"}\n',  # another version is refused, not guessed at
    b'{"v": 1, "op": "hello", "update_id": "x"}\n',  # another message
    b'{"v": 1, "op": "apply", "update_id": 5}\n',  # a field of the wrong type
    b'{"v": 1, "op": "apply", "update_id": "x"}',  # not a whole line
    b"not json\n",
    b'{"v": 1, "op": "apply", "update_id": "' + b"x" * 5000 + b'"}\n',  # longer than a line may be
])
def test_a_job_that_is_not_a_version_1_apply_is_refused(line):
    with pytest.raises(StandbyError):
        Job.decode(line)


def test_a_refusal_is_not_taken_for_a_taken_job():
    with pytest.raises(StandbyError, match="did not take"):
        Taken.decode(b'{"v": 1, "ok": false, "pid": 7}\n')


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package of its own on sys.path, stamped in place of Baton's."""
    root = tmp_path / "stamped_pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(standby, "CODE_PACKAGES", ("stamped_pkg",))
    yield root
    sys.modules.pop("stamped_pkg", None)


def test_the_code_stamp_is_the_same_while_nothing_changes(package):
    assert standby.code_stamp() == standby.code_stamp()


def test_the_code_stamp_changes_when_a_module_is_replaced(package):
    before = standby.code_stamp()
    mod = package / "sub" / "mod.py"
    st = mod.stat()
    os.utime(mod, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert standby.code_stamp() != before


def test_the_code_stamp_changes_when_a_module_is_added(package):
    before = standby.code_stamp()
    (package / "new.py").write_text("")
    assert standby.code_stamp() != before


def test_compiled_bytecode_is_not_part_of_the_code_stamp(package):
    before = standby.code_stamp()
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"")
    assert standby.code_stamp() == before


UID = "abcdef0123"


def test_a_helper_started_for_the_update_is_known_by_the_id_in_its_command_line():
    assert is_helper_of(["helper", "apply", "--update-id", UID], 0.0, UID, journaled_at=100.0)
    assert not is_helper_of(["helper", "apply", "--update-id", "other"], 0.0, UID, journaled_at=100.0)


def test_a_standby_that_took_the_update_is_known_if_it_started_before_its_pid_was_journaled():
    assert is_helper_of(["helper", "apply", FLAG], 90.0, UID, journaled_at=100.0)


def test_a_standby_started_after_the_pid_was_journaled_is_a_reused_pid_not_the_helper():
    assert not is_helper_of(["helper", "apply", FLAG], 200.0, UID, journaled_at=100.0)
