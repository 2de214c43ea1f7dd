"""Baton's log (baton/log.py, loguru configured once): the line format, JSON lines, tracebacks, file rotation,
threads, failing sinks; and the same promises kept by real supervisor and helper processes."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton.log import FILE_BACKUPS, FILE_MAX_BYTES, configure, logger
from baton.strict_modes import UnsafePath
from tests.conftest import PY, ROOT, agent, wait_for

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR) +\[(helper )?\d+\] ")
SERIALIZED = {"text", "record"}
RECORD_FIELDS = {"message", "level", "time", "process", "name", "exception"}


@pytest.fixture(autouse=True)
def default_log() -> Iterator[None]:
    yield
    configure()  # closes a file sink; back to readable lines on stderr


def test_a_line_is_time_level_pid_and_the_message_formatted_like_str_format() -> None:
    out = io.StringIO()
    configure(stream=out, tag="helper")
    logger.info("agent {} took {:.0f} ms, {!r}", "web", 12.7, "x")
    logger.info("no arguments: {} stays")
    first, second = out.getvalue().splitlines()
    assert re.match(r"^\S+ \S+ INFO    \[helper \d+\] agent web took 13 ms, 'x'$", first) and LINE.match(first)
    assert second.endswith("] no arguments: {} stays")


def test_lines_below_the_level_are_not_written() -> None:
    out = io.StringIO()
    configure(stream=out, level="warning")
    logger.info("quiet")
    logger.warning("loud")
    assert [line.split("] ")[1] for line in out.getvalue().splitlines()] == ["loud"]


def test_an_unknown_level_is_refused_and_the_log_left_as_it_was() -> None:
    out = io.StringIO()
    configure(stream=out)
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        configure(stream=io.StringIO(), level="LOUD")
    logger.info("still here")
    assert out.getvalue().endswith("] still here\n")


def test_a_log_file_someone_else_owns_is_refused_and_the_log_left_as_it_was(tmp_path: Path) -> None:
    out = io.StringIO()
    configure(stream=out)
    theirs = tmp_path / "supervisor.log"
    theirs.write_text("")
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UnsafePath):
        configure(stream=io.StringIO(), file=theirs)
    logger.info("still here")
    assert out.getvalue().endswith("] still here\n") and theirs.read_text() == ""


def test_a_json_line_has_the_text_and_the_record_fields_scripts_read() -> None:
    out = io.StringIO()
    configure(stream=out, json=True)
    logger.warning("agent {} exited", "web")
    (line,) = out.getvalue().splitlines()
    doc = json.loads(line)
    assert LINE.match(doc["text"]) and doc["text"].endswith("agent web exited\n")
    rec = doc["record"]
    assert rec["message"] == "agent web exited"
    assert (rec["level"]["name"], rec["level"]["no"]) == ("WARNING", 30)
    assert rec["time"]["timestamp"] > 0 and rec["time"]["repr"].startswith(doc["text"][:23])
    assert rec["process"]["id"] == os.getpid() and rec["name"] == __name__ and rec["exception"] is None


def test_exception_writes_the_traceback_of_the_exception_being_handled() -> None:
    out = io.StringIO()
    configure(stream=out, json=True)
    try:
        {}["missing"]
    except KeyError:
        logger.exception("lookup {}", "failed")
    doc = json.loads(out.getvalue())
    assert (doc["record"]["exception"]["type"], doc["record"]["exception"]["value"]) == ("KeyError", "'missing'")
    assert "Traceback (most recent call last):" in doc["text"] and 'in test_exception_writes' in doc["text"]
    assert doc["text"].rstrip().endswith("KeyError: 'missing'")


def test_a_traceback_never_shows_the_values_of_local_variables() -> None:
    """loguru's ``diagnose`` would print each variable of each frame under the traceback: a key, a password."""
    out = io.StringIO()
    configure(stream=out)
    password = "hunter2-do-not-log"
    try:
        raise RuntimeError("failed to " + "connect")
    except RuntimeError:
        logger.exception("login as {}", "admin")
    assert password not in out.getvalue() and "RuntimeError: failed to connect" in out.getvalue()


def test_a_log_file_is_rotated_by_size_keeping_the_given_number_of_old_files(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.log"
    configure(stream=io.StringIO(), file=path, file_max_bytes=200, file_backups=2)
    for i in range(20):
        logger.info("event {:02d}", i)  # about 50 bytes a line: 3 or 4 lines a file
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["supervisor.log", "supervisor.log.1", "supervisor.log.2"]
    kept = [tmp_path / "supervisor.log.2", tmp_path / "supervisor.log.1", path]
    assert all(0 < p.stat().st_size <= 200 for p in kept)
    lines = [x for p in kept for x in p.read_text().splitlines()]
    assert all(LINE.match(x) for x in lines)
    numbers = [int(x.rsplit(" ", 1)[1]) for x in lines]
    assert numbers == list(range(20 - len(numbers), 20)) and len(numbers) >= 9  # the newest, in order, whole


def test_lines_written_from_threads_at_once_are_each_whole(tmp_path: Path) -> None:
    path = tmp_path / "threads.log"
    configure(stream=io.StringIO(), file=path)

    def write(n: int) -> None:
        for i in range(300):
            logger.info("thread {} line {} {}", n, i, "x" * 200)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 8 * 300
    assert all(LINE.match(x) and x.endswith("x" * 200) for x in lines)


def test_exception_given_an_exception_object_writes_its_traceback() -> None:
    """The event loop's handler of unhandled errors is handed the exception, outside any ``except``."""
    out = io.StringIO()
    configure(stream=out)
    try:
        raise OSError(5, "input/output error")
    except OSError as e:
        caught = e
    logger.opt(exception=caught).error("event loop: {}", "Task exception was never retrieved")
    text = out.getvalue()
    assert "ERROR   [" in text and "event loop: Task exception was never retrieved\nTraceback" in text
    assert text.rstrip().endswith("OSError: [Errno 5] input/output error")


class _Broken(io.StringIO):
    def write(self, s: str) -> int:
        raise OSError(28, "No space left on device")


def test_a_stream_that_fails_loses_the_line_and_the_file_still_gets_it(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.log"
    configure(stream=_Broken(), file=path)
    logger.info("first")
    logger.error("second")
    assert [x.split("] ")[1] for x in path.read_text().splitlines()] == ["first", "second"]


def test_a_log_file_that_cannot_be_reopened_after_rotation_is_said_on_the_stream_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RotatingLog's refusal is logged from inside the file's sink: it goes to the stream, and the file's lines
    are dropped from then on, never a loguru "Logging error" nor a deadlock."""
    import baton.rotating_log as rotating_log

    out = io.StringIO()
    path = tmp_path / "supervisor.log"
    configure(stream=out, file=path, file_max_bytes=120, file_backups=1)

    def refuse(p: Path) -> int:
        raise UnsafePath(f"{p}: a symbolic link")

    monkeypatch.setattr(rotating_log, "open_log", refuse)
    for i in range(6):
        logger.info("event {:02d} {}", i, "y" * 40)
    text = out.getvalue()
    assert "Logging error" not in text
    assert text.count("what goes to it is discarded until restart") == 1
    assert text.rstrip().endswith("event 05 " + "y" * 40)
    assert not path.exists() and (tmp_path / "supervisor.log.1").stat().st_size <= 120


# ---- real processes ---------------------------------------------------------------------------------------


def _run_json(sup, stderr: Path) -> subprocess.Popen[bytes]:
    sup.write_config()
    with open(stderr, "wb") as err:
        proc = subprocess.Popen([PY, "-m", "supervisor", "run", "--config", str(sup.config_path), "--json"],
                                stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    sup.reaper.track(proc.pid)
    sup.proc = proc
    return proc


def _assert_serialized(line: str, pid: int) -> dict:
    doc = json.loads(line)
    assert set(doc) == SERIALIZED and set(doc["record"]) >= RECORD_FIELDS, line
    rec = doc["record"]
    assert rec["process"]["id"] == pid and LINE.match(doc["text"]) and doc["text"].endswith(rec["message"] + "\n")
    assert rec["time"]["repr"].startswith(doc["text"][:23]) and rec["time"]["timestamp"] > 0
    assert rec["level"]["name"] in ("DEBUG", "INFO", "WARNING", "ERROR") and isinstance(rec["name"], str)
    return doc


@pytest.mark.e2e
def test_a_program_that_never_configures_the_log_writes_one_readable_line_per_event_to_stderr() -> None:
    """Only baton.log's sink: loguru's own (whose tracebacks show variables' values) is never added, and the
    switch that keeps it out is not left in the environment of the program's children."""
    code = ("from baton.log import logger; import os; logger.info('hello {}', 'world'); "
            "print(os.environ.get('LOGURU_AUTOINIT'))")
    res = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "LOGURU_AUTOINIT"})
    (line,) = res.stderr.splitlines()
    assert LINE.match(line) and line.endswith("] hello world") and res.stdout == "None\n"


@pytest.mark.e2e
def test_supervisor_run_json_writes_loguru_serialize_lines_to_stderr_and_its_file(make_supervisor, tmp_path):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)])
    proc = _run_json(sup, tmp_path / "stderr")
    sup.wait_agent("web", "running")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    err = (tmp_path / "stderr").read_text().splitlines()
    docs = [_assert_serialized(line, proc.pid) for line in err]
    started = [d for d in docs if "agent web" in d["record"]["message"]]
    assert started and started[0]["record"]["name"].startswith("supervisor.")
    in_file = (sup.state_dir / "logs" / "supervisor.log").read_text().splitlines()
    assert [json.loads(x)["record"]["message"] for x in in_file] == [d["record"]["message"] for d in docs]


@pytest.mark.e2e
def test_a_real_supervisor_rotates_its_full_log_to_dot_1_keeping_three(make_supervisor):
    """supervisor.log starts one line short of the limit: the supervisor's first lines rotate it, and the oldest
    of the three kept goes; no file of another name appears (loguru's own rotation would add dated names)."""
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)])
    logs = sup.state_dir / "logs"
    logs.mkdir(parents=True)
    line = b"2026-01-01 00:00:00.000 INFO    [1] seeded " + b"s" * 60 + b"\n"
    seeded = line * ((FILE_MAX_BYTES - 200) // len(line))
    (logs / "supervisor.log").write_bytes(seeded)
    for i in range(1, FILE_BACKUPS + 1):
        (logs / f"supervisor.log.{i}").write_text(f"backup {i}\n")
    sup.start()
    sup.wait_agent("web", "running")
    wait_for(lambda: (logs / "supervisor.log.2").read_text() == "backup 1\n", what="the seeded file rotated")
    assert sorted(p.name for p in logs.iterdir() if p.name.startswith("supervisor")) == [
        "supervisor.log", "supervisor.log.1", "supervisor.log.2", "supervisor.log.3"]
    rotated = (logs / "supervisor.log.1").read_bytes()
    assert rotated.startswith(seeded) and len(rotated) <= FILE_MAX_BYTES and rotated.endswith(b"\n")
    assert [(logs / f"supervisor.log.{i}").read_text() for i in (2, 3)] == ["backup 1\n", "backup 2\n"]
    fresh = (logs / "supervisor.log").read_text().splitlines()
    assert fresh and all(LINE.match(x) for x in fresh) and any("agent web" in x for x in fresh)


@pytest.mark.e2e
def test_a_supervisor_whose_stderr_fails_on_every_write_keeps_running_and_logging_to_its_file(
        make_supervisor, tmp_path):
    """stderr on /dev/full: every write fails with ENOSPC. The daemon runs its agents, answers, logs to
    supervisor.log and stops cleanly."""
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)])
    sup.write_config()
    with open("/dev/full", "wb") as full:
        proc = subprocess.Popen([PY, "-m", "supervisor", "run", "--config", str(sup.config_path)],
                                stdout=full, stderr=full, cwd=ROOT)
    sup.reaper.track(proc.pid)
    sup.proc = proc
    sup.wait_ready()
    sup.wait_agent("web", "running")
    assert sup.status().agents[0].name == "web"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    lines = (sup.state_dir / "logs" / "supervisor.log").read_text().splitlines()
    assert any("agent web" in x for x in lines) and all(LINE.match(x) for x in lines)
    assert not any("Logging error" in x for x in lines)


@pytest.mark.e2e
def test_a_helpers_lines_in_helper_log_are_tagged_with_its_own_pid(update_host):
    pkg = update_host.release.build("1.1.0")
    uid = update_host.push(pkg)
    assert update_host.wait_final(uid).success
    lines = (update_host.sup.state_dir / "updates" / uid / "helper.log").read_text().splitlines()
    ours = [x for x in lines if re.match(r"^\d{4}-", x)]  # the rest: the CLI's result line ("update X: committed")
    assert ours and all(LINE.match(x) for x in ours), lines
    pids = {int(re.search(r"\[helper (\d+)\]", x).group(1)) for x in ours}  # type: ignore[union-attr]
    assert pids == {update_host.journal(uid).helper_pid} and update_host.sup.proc.pid not in pids
    assert any("committed" in x for x in ours)
