"""Baton's log (baton/log.py): the line format, JSON lines, tracebacks, file rotation, threads."""

from __future__ import annotations

import io
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton.log import Log

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR) +\[(helper )?\d+\] ")


@pytest.fixture
def log() -> Iterator[Log]:
    log = Log()
    yield log
    log.configure()  # closes a file sink


def test_a_line_is_time_level_pid_and_the_message_formatted_like_str_format(log: Log) -> None:
    out = io.StringIO()
    log.configure(stream=out, tag="helper")
    log.info("agent {} took {:.0f} ms, {!r}", "web", 12.7, "x")
    log.info("no arguments: {} stays")
    first, second = out.getvalue().splitlines()
    assert re.match(r"^\S+ \S+ INFO    \[helper \d+\] agent web took 13 ms, 'x'$", first) and LINE.match(first)
    assert second.endswith("] no arguments: {} stays")


def test_lines_below_the_level_are_not_written(log: Log) -> None:
    out = io.StringIO()
    log.configure(stream=out, level="warning")
    log.info("quiet")
    log.warning("loud")
    assert [line.split("] ")[1] for line in out.getvalue().splitlines()] == ["loud"]


def test_an_unknown_level_is_refused_and_the_log_left_as_it_was(log: Log) -> None:
    out = io.StringIO()
    log.configure(stream=out)
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        log.configure(stream=io.StringIO(), level="LOUD")
    log.info("still here")
    assert out.getvalue().endswith("] still here\n")


def test_a_json_line_has_the_text_and_the_record_fields_scripts_read(log: Log) -> None:
    out = io.StringIO()
    log.configure(stream=out, json=True)
    log.warning("agent {} exited", "web")
    (line,) = out.getvalue().splitlines()
    doc = json.loads(line)
    assert LINE.match(doc["text"]) and doc["text"].endswith("agent web exited\n")
    rec = doc["record"]
    assert rec["message"] == "agent web exited" and rec["level"] == {"name": "WARNING", "no": 30}
    assert rec["time"]["timestamp"] > 0 and rec["time"]["repr"].startswith(doc["text"][:23])
    assert rec["process"]["id"] > 0 and rec["name"] == __name__ and rec["exception"] is None


def test_exception_writes_the_traceback_of_the_exception_being_handled(log: Log) -> None:
    out = io.StringIO()
    log.configure(stream=out, json=True)
    try:
        {}["missing"]
    except KeyError:
        log.exception("lookup {}", "failed")
    doc = json.loads(out.getvalue())
    assert doc["record"]["exception"] == {"type": "KeyError", "value": "'missing'"}
    assert "Traceback (most recent call last):" in doc["text"] and 'in test_exception_writes' in doc["text"]
    assert doc["text"].rstrip().endswith("KeyError: 'missing'")


def test_a_log_file_is_rotated_by_size_keeping_the_given_number_of_old_files(log: Log, tmp_path: Path) -> None:
    path = tmp_path / "supervisor.log"
    log.configure(stream=io.StringIO(), file=path, file_max_bytes=200, file_backups=2)
    for i in range(20):
        log.info("event {:02d}", i)  # about 50 bytes a line: 3 or 4 lines a file
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["supervisor.log", "supervisor.log.1", "supervisor.log.2"]
    kept = [tmp_path / "supervisor.log.2", tmp_path / "supervisor.log.1", path]
    assert all(0 < p.stat().st_size <= 200 for p in kept)
    lines = [x for p in kept for x in p.read_text().splitlines()]
    assert all(LINE.match(x) for x in lines)
    numbers = [int(x.rsplit(" ", 1)[1]) for x in lines]
    assert numbers == list(range(20 - len(numbers), 20)) and len(numbers) >= 9  # the newest, in order, whole


def test_lines_written_from_threads_at_once_are_each_whole(log: Log, tmp_path: Path) -> None:
    path = tmp_path / "threads.log"
    log.configure(stream=io.StringIO(), file=path)

    def write(n: int) -> None:
        for i in range(300):
            log.info("thread {} line {} {}", n, i, "x" * 200)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 8 * 300
    assert all(LINE.match(x) and x.endswith("x" * 200) for x in lines)


def test_exception_given_an_exception_object_writes_its_traceback(log: Log) -> None:
    """The event loop's handler of unhandled errors is handed the exception, outside any ``except``."""
    out = io.StringIO()
    log.configure(stream=out)
    try:
        raise OSError(5, "input/output error")
    except OSError as e:
        caught = e
    log.exception("event loop: {}", "Task exception was never retrieved", exc=caught)
    text = out.getvalue()
    assert "ERROR   [" in text and "event loop: Task exception was never retrieved\nTraceback" in text
    assert text.rstrip().endswith("OSError: [Errno 5] input/output error")
