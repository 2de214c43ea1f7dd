"""Timestamps on agent log lines (``log_timestamps = true``) and ``supervisor tail --since`` (issue 25)."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest

from baton.log_stamps import LineStamper, SinceFilter, line_time, stamp_of
from tests.conftest import PY, ROOT, wait_for

# Prints "early", then "late" three seconds later, then stays.
EARLY_LATE = "import time; print('early', flush=True); time.sleep(3); print('late', flush=True); time.sleep(600)"


def inline(name: str, code: str, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name, "command": PY, "args": ["-u", "-c", code]}
    d.update(kw)
    return d


def tail(sup, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "supervisor", "tail", *args, "--socket", str(sup.socket)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


@pytest.mark.e2e
def test_each_output_line_starts_with_the_utc_time_it_was_read(make_supervisor):
    before = time.time()
    sup = make_supervisor([inline("stamped", "print('one'); print(); print('three', flush=True); "
                                  "import time; time.sleep(600)", log_timestamps=True)]).start()
    text = wait_for(lambda: (t := sup.log_of("stamped").read_bytes()).count(b"\n") >= 3 and t, what="three lines")
    lines = text.splitlines()
    assert [ln[25:] for ln in lines] == [b"one", b"", b"three"]
    for ln in lines:
        t = line_time(ln)
        assert t is not None and before - 1 <= t <= time.time(), ln


@pytest.mark.e2e
def test_tail_since_shows_only_the_lines_stamped_after_it(make_supervisor):
    sup = make_supervisor([inline("timed", EARLY_LATE, log_timestamps=True)]).start()
    wait_for(lambda: b"late" in sup.log_of("timed").read_bytes(), what="the late line")
    res = tail(sup, "--since", "2s", "timed")
    assert res.returncode == 0, res.stderr
    assert [ln[25:] for ln in res.stdout.splitlines()] == ["late"]
    everything = tail(sup, "--since", "1h", "timed")
    assert [ln[25:] for ln in everything.stdout.splitlines()] == ["early", "late"]


@pytest.mark.e2e
def test_tail_since_on_an_agent_without_timestamps_says_so_in_one_line(make_supervisor):
    sup = make_supervisor([inline("plain", EARLY_LATE)]).start()
    wait_for(lambda: b"early" in sup.log_of("plain").read_bytes(), what="its output")
    res = tail(sup, "--since", "10m", "plain")
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == ("supervisor tail: agent plain's log has no timestamps to filter by "
                          "(set log_timestamps = true in its section)\n")


@pytest.mark.e2e
def test_tail_since_with_a_bad_value_is_a_usage_error(make_supervisor):
    sup = make_supervisor([inline("plain", EARLY_LATE)]).start()
    res = tail(sup, "--since", "yesterday", "plain")
    assert res.returncode == 2 and res.stdout == ""
    assert "--since: 'yesterday' is neither a duration" in res.stderr and len(res.stderr.splitlines()) == 1


def test_a_line_split_across_reads_gets_one_stamp_and_an_empty_line_gets_its_own():
    s = LineStamper()
    out = s.stamp(b"par", 1.0) + s.stamp(b"t\n\nnext\n", 2.0)
    assert out == stamp_of(1.0) + b"part\n" + stamp_of(2.0) + b"\n" + stamp_of(2.0) + b"next\n"


def test_since_filter_waits_for_a_whole_line_before_judging_it():
    f = SinceFilter(15.0)
    old, new = stamp_of(10.0) + b"old\n", stamp_of(20.0) + b"new\n"
    assert f.feed(old + new[:10]) == b""
    assert f.feed(new[10:] + b"tail") == new + b"tail"
    assert f.feed(b" more\n") == b" more\n" and f.stamped
