"""The restart policy as a table: after an exit (or a failed spawn), with so many failures in a row before it,
what the agent does next. A pure object: no agent, no process, no clock."""

from __future__ import annotations

import pytest

from supervisor.adoption import START_TIME_TOLERANCE_S, same_start
from supervisor.restart_policy import Action, Decision, RestartPolicy

ALWAYS = RestartPolicy("always", start_retries=3, backoff_initial_s=1.0, backoff_max_s=5.0)


@pytest.mark.parametrize("policy,failures,status,was_starting,spawn_failed,decision", [
    # a program that had been running is restarted at once the first time, as supervisord does
    (ALWAYS, 0, -9, False, False, Decision(Action.RESTART_NOW, 1)),
    (ALWAYS, 0, 0, False, False, Decision(Action.RESTART_NOW, 1)),
    # a second failure in a row backs off, doubling, up to backoff_max_s
    (ALWAYS, 1, -9, False, False, Decision(Action.BACKOFF, 2, 2.0)),
    (ALWAYS, 2, 1, False, False, Decision(Action.BACKOFF, 3, 4.0)),
    # an exit before it was ready, or a spawn that failed, backs off from the first
    (ALWAYS, 0, 1, True, False, Decision(Action.BACKOFF, 1, 1.0)),
    (ALWAYS, 0, None, True, True, Decision(Action.BACKOFF, 1, 1.0)),
    # more than start_retries in a row: FATAL
    (ALWAYS, 3, 1, True, False, Decision(Action.FATAL, 4)),
    (RestartPolicy("always", 0, 1.0, 5.0), 0, 1, True, False, Decision(Action.FATAL, 1)),
    # on-failure: a clean exit after it was ready is left alone, anything else restarts
    (RestartPolicy("on-failure", 3, 1.0, 5.0), 0, 0, False, False, Decision(Action.EXIT, 0)),
    (RestartPolicy("on-failure", 3, 1.0, 5.0), 0, 0, True, False, Decision(Action.BACKOFF, 1, 1.0)),
    (RestartPolicy("on-failure", 3, 1.0, 5.0), 0, None, False, False, Decision(Action.RESTART_NOW, 1)),
    # never: whatever happened
    (RestartPolicy("never", 3, 1.0, 5.0), 0, 1, True, True, Decision(Action.EXIT, 0)),
])
def test_what_follows_an_exit(policy, failures, status, was_starting, spawn_failed, decision):
    assert policy.after_exit(failures, status, was_starting, spawn_failed) == decision


def test_the_backoff_doubles_from_backoff_initial_s_and_stops_at_backoff_max_s():
    assert [ALWAYS.backoff_s(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_an_unknown_exit_status_of_an_adopted_process_is_a_failure():
    assert RestartPolicy.is_failure(None, was_starting=False, spawn_failed=False)
    assert not RestartPolicy.is_failure(0, was_starting=False, spawn_failed=False)


def test_start_times_within_the_tolerance_name_one_process_and_further_apart_two():
    t = 1_700_000_000.25
    assert same_start(t, t) and same_start(t, t + 1.0) and same_start(t, t - 1.0)
    assert not same_start(t, t + START_TIME_TOLERANCE_S + 0.01) and not same_start(t, t - 2.0)
    assert not same_start(t, None)  # no such process
