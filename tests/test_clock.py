"""The supervisor's record of the wall clock against the time since boot (supervisor/clock.py)."""

from __future__ import annotations

import json

import pytest

from supervisor.clock import CLOCK_TOLERANCE_S, ClockReading, describe_jump, read_clock
from tests.conftest import agent, wait_for
from tests.test_doctor import faked_clock

BOOT = "9b312ebe-c504-4fdc-9293-a328e5e96d98"
YEAR = 365.25 * 86400


def test_a_wall_clock_that_moved_as_the_time_since_boot_did_has_not_jumped():
    earlier = ClockReading(wall=1_800_000_000.0, since_boot=100.0, boot_id=BOOT)
    assert ClockReading(1_800_000_000.0 + 86400, 100.0 + 86400 + 60, BOOT).jumped(earlier) is None  # slewed 60 s


def test_a_wall_clock_three_years_ahead_of_the_time_since_boot_jumped_ahead():
    earlier = ClockReading(wall=1_800_000_000.0, since_boot=100.0, boot_id=BOOT)
    jump = ClockReading(1_800_000_000.0 + 3 * YEAR + 5, 105.0, BOOT).jumped(earlier)
    assert jump is not None and describe_jump(jump) == "3.0 years ahead"


def test_a_wall_clock_set_back_past_the_tolerance_jumped_back():
    earlier = ClockReading(wall=1_800_000_000.0, since_boot=100.0, boot_id=BOOT)
    jump = ClockReading(1_800_000_000.0 - CLOCK_TOLERANCE_S - 60, 100.0, BOOT).jumped(earlier)
    assert jump is not None and describe_jump(jump) == "6 minutes back"


def test_across_a_reboot_nothing_relates_the_two_clocks():
    earlier = ClockReading(wall=1_800_000_000.0, since_boot=100_000.0, boot_id=BOOT)
    assert ClockReading(1_900_000_000.0, 5.0, "another-boot").jumped(earlier) is None


@pytest.mark.e2e
def test_the_time_since_boot_is_not_moved_by_a_faked_wall_clock():
    import os
    import subprocess

    from tests.conftest import PY, ROOT

    out = subprocess.run([PY, "-c", "import json; from supervisor.clock import read_clock; "
                                    "r = read_clock(); print(json.dumps([r.wall, r.since_boot]))"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**os.environ, **faked_clock("+3y")}, check=True)
    wall, since_boot = json.loads(out.stdout)
    here = read_clock()
    assert wall - here.wall > 2.9 * YEAR
    assert abs(since_boot - here.since_boot) < 30


@pytest.mark.e2e
def test_a_supervisor_started_with_its_clock_years_ahead_logs_the_jump_and_records_the_new_reading(
        make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)])
    sup.start()
    record = sup.state_dir / "clock.json"
    wait_for(record.exists, 10, what="the first record of the clock")
    first = json.loads(record.read_text())
    assert abs(first["wall"] - read_clock().wall) < 30 and first["boot_id"] == read_clock().boot_id
    sup.terminate()

    sup.start(env=faked_clock("+3y"))
    wait_for(lambda: "the wall clock jumped 3.0 years ahead" in sup.output(), 10, what="the jump in the log")
    second = wait_for(lambda: (d := json.loads(record.read_text()))["wall"] != first["wall"] and d, 10,
                      what="the new record")
    assert second["wall"] - first["wall"] > 2.9 * YEAR
    assert record.stat().st_mode & 0o777 == 0o644
