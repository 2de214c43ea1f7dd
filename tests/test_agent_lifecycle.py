"""The process manager's states and failures, driven in-process: fake processes (tests/fakes/processes.py) and a
clock moved by hand (tests/fakes/supervisor_clock.py), so each case takes milliseconds.

The same behaviours keep one test each with real processes (tests/test_supervisor.py, test_start_order.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from baton.agent_table import AgentRecord
from baton.config import AgentConfig, BrokenAgent, Config, NodeConfig
from baton.states import AgentState
from supervisor.adoption import START_TIME_TOLERANCE_S
from supervisor.agent_errors import AgentError, NotRunnable
from supervisor.agent_stop import KILL_WAIT_S
from supervisor.agents import Agent, AgentSnapshot, ProcessManager
from supervisor.restart_policy import STABLE_RUN_S
from tests.fakes.processes import FakeProcesses
from tests.fakes.supervisor_clock import FakeClock

S = AgentState
BACKOFF = "_restart_after_backoff"  # the timers an agent sets, by what they call
START_SECONDS = "_start_seconds_passed"


@dataclass
class World:
    pm: ProcessManager
    procs: FakeProcesses
    clock: FakeClock
    seen: list[AgentSnapshot] = field(default_factory=list)

    def agent(self, name: str) -> Agent:
        return self.pm.agents[name]

    def states(self, name: str) -> list[AgentState]:
        return [s.state for s in self.seen if s.name == name]

    def spawned(self) -> list[str]:
        """The agents started so far, in order (each fake spawn's BATON_AGENT_NAME)."""
        return [spec.env["BATON_AGENT_NAME"] for spec in self.procs.spawned]


def run(tmp_path: Path, agents: list[AgentConfig], body: Callable[[World], Awaitable[None]],
        records: list[AgentRecord] | None = None, procs: Callable[[FakeProcesses], None] | None = None,
        broken: tuple[BrokenAgent, ...] = ()) -> None:
    """Start a ProcessManager on fakes (with ``records`` in its agent table), then run ``body``."""
    cfg = Config(node=NodeConfig(id="n1", state_dir=tmp_path / "state", install_root=tmp_path / "install"),
                 agents=tuple(agents), broken_agents=broken)
    cfg.node.state_dir.mkdir(mode=0o700)

    async def main() -> None:
        clock = FakeClock()
        fakes = FakeProcesses(clock)
        world = World(ProcessManager(cfg, processes=fakes, clock=clock), fakes, clock)
        world.pm.add_listener(world.seen.append)
        if procs is not None:
            procs(fakes)
        if records is not None:
            world.pm.table.save(records)
        await world.pm.start()
        await clock.settle()
        try:
            await body(world)
        finally:
            for a in world.pm.agents.values():
                a.release()
                a.close_channels()

    asyncio.run(main())


def simple(name: str = "w", **kw: object) -> AgentConfig:
    defaults: dict[str, object] = {"command": "/bin/true", "start_seconds": 1.0, "restart": "always",
                                   "backoff_initial_s": 1.0, "backoff_max_s": 30.0, "start_retries": 3}
    return AgentConfig(name=name, **{**defaults, **kw})  # type: ignore[arg-type]


async def running(w: World, name: str = "w") -> int:
    """Let the agent pass start_seconds; its pid."""
    await w.clock.advance(w.agent(name).cfg.start_seconds)
    assert w.agent(name).state is S.RUNNING
    return w.agent(name).pid


# ---- restart policy ------------------------------------------------------------------------------------------


def test_a_crash_loop_backs_off_doubling_up_to_backoff_max_s_then_is_fatal_after_start_retries(tmp_path):
    async def body(w: World) -> None:
        delays = []
        for _ in range(3):
            assert w.agent("w").state is S.STARTING
            w.procs.exit(w.agent("w").pid, 3)  # before start_seconds: a failure
            await w.clock.settle()
            assert w.agent("w").state is S.BACKOFF
            delays.append(w.clock.pending(BACKOFF)[0])
            await w.clock.advance(delays[-1])
        assert delays == [1.0, 2.0, 2.5]  # doubling from backoff_initial_s, capped at backoff_max_s
        w.procs.exit(w.agent("w").pid, 3)
        await w.clock.settle()
        a = w.agent("w")
        assert a.state is S.FATAL and a.restarts == 3 and a.last_exit_status == 3
        assert a.last_error == "exited with status 3 before it was ready; gave up after 4 failures in a row"
        await w.clock.advance(3600)
        assert len(w.procs.spawned) == 4 and w.agent("w").state is S.FATAL

    run(tmp_path, [simple(backoff_max_s=2.5)], body)


def test_a_running_agent_that_dies_is_restarted_at_once_and_a_second_death_soon_after_backs_off(tmp_path):
    async def body(w: World) -> None:
        first = await running(w)
        w.procs.exit(first, -signal.SIGKILL)
        await w.clock.settle()
        a = w.agent("w")
        assert a.state is S.STARTING and a.pid != first and a.restarts == 1  # at once: no timer waited for
        second = await running(w)
        w.procs.exit(second, -signal.SIGKILL)  # within STABLE_RUN_S of running: the second failure in a row
        await w.clock.settle()
        assert a.state is S.BACKOFF and a.last_exit_status == -signal.SIGKILL
        assert w.clock.pending(BACKOFF) == [2.0]  # backoff_initial_s * 2 for the second failure
        await w.clock.advance(1.99)
        assert a.state is S.BACKOFF
        await w.clock.advance(0.01)
        assert a.state is S.STARTING and a.restarts == 2

    run(tmp_path, [simple(backoff_initial_s=1.0)], body)


def test_a_run_of_stable_run_s_clears_the_failures_in_a_row(tmp_path):
    async def body(w: World) -> None:
        w.procs.exit(w.agent("w").pid, 1)
        await w.clock.advance(1.0)  # the backoff
        assert w.agent("w").consecutive_failures == 1
        pid = await running(w)
        await w.clock.advance(STABLE_RUN_S)
        assert w.agent("w").consecutive_failures == 0
        w.procs.exit(pid, 1)
        await w.clock.settle()
        assert w.agent("w").state is S.STARTING  # the first failure in a row again: restarted at once

    run(tmp_path, [simple()], body)


def test_on_failure_leaves_a_clean_exit_alone_and_restarts_a_failed_one(tmp_path):
    async def body(w: World) -> None:
        clean = await running(w, "clean")
        failed = await running(w, "failed")
        w.procs.exit(clean, 0)
        w.procs.exit(failed, 2)
        await w.clock.settle()
        assert w.agent("clean").state is S.EXITED and w.agent("clean").restarts == 0
        assert w.agent("clean").last_exit_status == 0 and w.agent("clean").last_error == ""
        assert w.agent("failed").state is S.STARTING and w.agent("failed").restarts == 1

    run(tmp_path, [simple("clean", restart="on-failure"), simple("failed", restart="on-failure")], body)


def test_never_leaves_a_failure_exited(tmp_path):
    async def body(w: World) -> None:
        w.procs.exit(w.agent("w").pid, 9)
        await w.clock.advance(60)
        assert w.agent("w").state is S.EXITED and len(w.procs.spawned) == 1
        assert w.agent("w").last_error == "exited with status 9 before it was ready"

    run(tmp_path, [simple(restart="never")], body)


def test_an_exit_0_before_start_seconds_is_a_failure_even_under_on_failure(tmp_path):
    async def body(w: World) -> None:
        w.procs.exit(w.agent("w").pid, 0)
        await w.clock.settle()
        assert w.agent("w").state is S.BACKOFF
        assert w.agent("w").last_error == "exited with status 0 before it was ready"

    run(tmp_path, [simple(restart="on-failure")], body)


def test_a_spawn_that_fails_backs_off_says_why_and_is_fatal_after_start_retries(tmp_path):
    def refuse(procs: FakeProcesses) -> None:
        procs.spawn_error = PermissionError(13, "Permission denied")

    async def body(w: World) -> None:
        a = w.agent("w")
        assert a.state is S.BACKOFF and a.pid == 0
        assert a.last_error == "cannot start: [Errno 13] Permission denied"
        await w.clock.advance(1.0 + 2.0)
        assert a.state is S.FATAL and a.restarts == 2
        assert a.last_error.endswith("gave up after 3 failures in a row")

    run(tmp_path, [simple(start_retries=2)], body, procs=refuse)


# ---- stop ------------------------------------------------------------------------------------------------------


def test_stop_sends_the_stop_signal_and_an_agent_that_honours_it_is_stopped_without_a_kill(tmp_path):
    async def body(w: World) -> None:
        pid = await running(w)
        await w.agent("w").stop()
        a = w.agent("w")
        assert a.state is S.STOPPED and a.last_exit_status == -signal.SIGINT and a.last_error == ""
        assert w.procs.procs[pid].signals == [signal.SIGINT]
        assert w.states("w")[-2:] == [S.STOPPING, S.STOPPED]

    run(tmp_path, [simple(stop_signal="INT")], body)


def test_an_agent_that_ignores_sigterm_is_killed_after_stop_timeout_s(tmp_path):
    def stubborn(procs: FakeProcesses) -> None:
        procs.ignore_next = {signal.SIGTERM}

    async def body(w: World) -> None:
        pid = await running(w)
        stop = asyncio.ensure_future(w.agent("w").stop())
        await w.clock.advance(1.49)
        assert w.agent("w").state is S.STOPPING and not stop.done()
        await w.clock.advance(0.01)
        await stop
        a = w.agent("w")
        assert a.state is S.STOPPED and a.last_exit_status == -signal.SIGKILL
        assert a.last_error == "did not stop within 1.5s; killed"
        assert w.procs.procs[pid].signals == [signal.SIGTERM, signal.SIGKILL]

    run(tmp_path, [simple(stop_timeout_s=1.5)], body, procs=stubborn)


def test_a_stop_waits_kill_wait_s_at_most_for_a_process_that_outlives_sigkill(tmp_path):
    async def body(w: World) -> None:
        pid = await running(w)
        w.procs.procs[pid].ignores = {signal.SIGTERM}
        w.procs.procs[pid].alive = False  # in D state: SIGKILL reaches nothing we can see go yet
        stop = asyncio.ensure_future(w.agent("w").stop())
        await w.clock.advance(1.0 + KILL_WAIT_S - 0.01)
        assert not stop.done()
        await w.clock.advance(0.01)
        await stop
        assert w.agent("w").state is S.STOPPING  # its exit is still to come: the pidfd tells when

    run(tmp_path, [simple(stop_timeout_s=1.0)], body)


def test_stopping_an_agent_in_backoff_sends_nothing_and_it_is_never_restarted(tmp_path):
    async def body(w: World) -> None:
        w.procs.exit(w.agent("w").pid, 1)
        await w.clock.settle()
        assert w.agent("w").state is S.BACKOFF
        await w.agent("w").stop()
        await w.clock.advance(3600)
        assert w.agent("w").state is S.STOPPED and len(w.procs.spawned) == 1 and w.procs.sent == []

    run(tmp_path, [simple()], body)


# ---- adoption --------------------------------------------------------------------------------------------------


def record(name: str, pid: int, start_time: float, state: S = S.RUNNING, restarts: int = 4) -> AgentRecord:
    return AgentRecord(name=name, pid=pid, start_time=start_time, version="", restarts=restarts,
                       consecutive_failures=1, state=state.value, stop_signal="TERM", stop_timeout_s=10.0)


T0 = 1_600_000_000.0


def left_running(tmp_path: Path, start_time: float, body: Callable[[World, int], Awaitable[None]],
                 state: S = S.RUNNING, agents: list[AgentConfig] | None = None, now: float = T0 + 60) -> None:
    """An agent "w" recorded with pid 4001 and start time T0; the process with pid 4001 started at ``start_time``,
    not our child (a killed supervisor's); the wall clock reads ``now``."""
    def earlier(procs: FakeProcesses) -> None:
        procs.clock.wall = now
        procs.add(start_time=start_time, is_child=False)

    async def with_pid(w: World) -> None:
        await body(w, 4001)

    run(tmp_path, agents if agents is not None else [simple()], with_pid, records=[record("w", 4001, T0, state)],
        procs=earlier)


def test_a_recorded_agent_with_the_same_pid_and_start_time_is_adopted_not_started_again(tmp_path):
    async def body(w: World, pid: int) -> None:
        a = w.agent("w")
        assert (a.pid, a.state, a.adopted, a.restarts, a.consecutive_failures) == (pid, S.RUNNING, True, 4, 1)
        assert w.procs.spawned == []

    left_running(tmp_path, T0, body)


def test_a_reused_pid_with_another_start_time_is_not_adopted_and_the_agent_starts_afresh(tmp_path):
    async def body(w: World, pid: int) -> None:
        a = w.agent("w")
        assert a.pid != pid and not a.adopted and a.state is S.STARTING and len(w.procs.spawned) == 1
        assert w.procs.procs[pid].signals == []  # the stranger is left alone

    left_running(tmp_path, T0 + 5.0, body)


@pytest.mark.parametrize("off", [1.0, -1.0, START_TIME_TOLERANCE_S - 0.01])
def test_a_record_within_start_time_tolerance_names_the_same_process(tmp_path, off):
    async def body(w: World, pid: int) -> None:
        assert w.agent("w").pid == pid and w.agent("w").adopted and w.procs.spawned == []

    left_running(tmp_path, T0 + off, body)


def test_a_record_further_off_than_start_time_tolerance_names_another_process(tmp_path):
    async def body(w: World, pid: int) -> None:
        assert w.agent("w").pid != pid and len(w.procs.spawned) == 1

    left_running(tmp_path, T0 + START_TIME_TOLERANCE_S + 0.01, body)


def test_an_adopted_agent_that_exits_has_an_unknown_status_and_is_restarted(tmp_path):
    async def body(w: World, pid: int) -> None:
        w.procs.exit(pid, 0)
        await w.clock.settle()
        a = w.agent("w")
        assert a.last_exit_status is None and a.last_error == "exited (status unknown: adopted process)"
        assert a.state is S.BACKOFF  # its second failure in a row (the record had one)

    left_running(tmp_path, T0, body)


def test_an_adopted_agent_recorded_starting_is_running_after_the_rest_of_start_seconds(tmp_path):
    async def body(w: World, pid: int) -> None:
        assert w.agent("w").state is S.STARTING
        assert w.clock.pending(START_SECONDS) == [pytest.approx(3.0)]  # 10 s, of which 7 passed before the handover
        await w.clock.advance(3.0)
        assert w.agent("w").state is S.RUNNING and w.agent("w").pid == pid

    left_running(tmp_path, T0, body, S.STARTING, [simple(start_seconds=10.0)], now=T0 + 7.0)


def test_a_recorded_agent_no_longer_configured_is_adopted_stopped_and_forgotten(tmp_path):
    async def body(w: World, pid: int) -> None:
        await w.pm.wait_retired()
        assert "w" not in w.pm.agents and w.procs.procs[pid].signals == [signal.SIGTERM]
        assert [r.name for r in w.pm.table.load()] == ["other"]

    left_running(tmp_path, T0, body, agents=[simple("other")])


# ---- start and stop order --------------------------------------------------------------------------------------


def test_agents_start_by_priority_and_one_with_after_once_its_dependency_has_left_starting(tmp_path):
    async def body(w: World) -> None:
        assert w.spawned() == ["db", "web"]  # priority 1 before 2; "api" waits for "db"
        assert w.agent("api").state is S.STOPPED
        await w.clock.advance(1.0)  # db passes start_seconds
        assert w.spawned() == ["db", "web", "api"]

    run(tmp_path, [simple("web", priority=2), simple("api", after=("db",)), simple("db", priority=1)], body)


def test_an_agent_after_one_that_gives_up_starts_anyway(tmp_path):
    async def body(w: World) -> None:
        w.procs.exit(w.agent("db").pid, 1)
        await w.clock.settle()
        assert w.agent("db").state is S.FATAL
        assert w.spawned() == ["db", "api"]

    run(tmp_path, [simple("api", after=("db",)), simple("db", start_retries=0)], body)


def test_stop_all_stops_in_the_reverse_of_the_start_order_each_once_the_later_ones_have_exited(tmp_path):
    def stubborn(procs: FakeProcesses) -> None:
        procs.ignore_next = {signal.SIGTERM}  # each takes its stop_timeout_s: the order shows in time too

    async def body(w: World) -> None:
        await w.clock.advance(1.0)
        names = {a.pid: n for n, a in w.pm.agents.items()}
        stop = asyncio.ensure_future(w.pm.stop_all())
        await w.clock.advance(3.0)
        await stop
        assert [(what, names[pid]) for what, pid in w.procs.events] == [
            ("SIGTERM", "api"), ("SIGKILL", "api"), ("exit", "api"),
            ("SIGTERM", "web"), ("SIGKILL", "web"), ("exit", "web"),
            ("SIGTERM", "db"), ("SIGKILL", "db"), ("exit", "db")]

    run(tmp_path, [simple("db", priority=1, stop_timeout_s=1.0), simple("web", priority=2, stop_timeout_s=1.0),
                   simple("api", priority=2, after=("web",), stop_timeout_s=1.0)], body, procs=stubborn)


# ---- what a helper's update asks of an agent in each state (the agent channel: restart, stop) --------------------


def test_a_restart_while_starting_stops_that_process_and_starts_another(tmp_path):
    async def body(w: World) -> None:
        first = w.agent("w").pid
        await w.agent("w").restart()
        assert w.procs.procs[first].signals == [signal.SIGTERM]
        assert w.agent("w").state is S.STARTING and w.agent("w").pid not in (0, first)

    run(tmp_path, [simple()], body)


def test_a_restart_while_stopping_waits_for_the_stop_then_starts(tmp_path):
    def stubborn(procs: FakeProcesses) -> None:
        procs.ignore_next = {signal.SIGTERM}

    async def body(w: World) -> None:
        first = await running(w)
        stop = asyncio.ensure_future(w.agent("w").stop())
        await w.clock.settle()
        restart = asyncio.ensure_future(w.agent("w").restart())
        await w.clock.settle()
        assert w.agent("w").state is S.STOPPING and not restart.done()
        w.procs.exit(first, 0)  # it stopped after all
        await stop
        await restart
        assert w.agent("w").state is S.STARTING and w.agent("w").pid != first

    run(tmp_path, [simple()], body, procs=stubborn)


def test_a_restart_of_a_fatal_agent_starts_it_with_its_failures_cleared(tmp_path):
    async def body(w: World) -> None:
        w.procs.exit(w.agent("w").pid, 1)
        await w.clock.settle()
        assert w.agent("w").state is S.FATAL
        await w.agent("w").restart()
        assert w.agent("w").state is S.STARTING and w.agent("w").consecutive_failures == 0

    run(tmp_path, [simple(start_retries=0)], body)


def test_an_agent_with_an_invalid_config_section_cannot_be_restarted_and_says_why(tmp_path):
    async def body(w: World) -> None:
        with pytest.raises(NotRunnable, match=r"agent 'bad' is not run: its config section is invalid"):
            w.pm.get("bad")
        assert w.pm.snapshot("bad").state is S.CONFIG_ERROR
        assert w.spawned() == ["w"]  # the others run

    run(tmp_path, [simple()], body, broken=(BrokenAgent("bad", "agents[1].command", "must not be empty"),))


def test_an_agent_leaving_the_config_refuses_a_restart_while_it_stops(tmp_path):
    def stubborn(procs: FakeProcesses) -> None:
        procs.ignore_next = {signal.SIGTERM}

    async def body(w: World) -> None:
        a = w.agent("w")
        reload = asyncio.ensure_future(w.pm.reload(dataclasses.replace(w.pm.config, agents=())))
        await w.clock.settle()
        assert a.state is S.STOPPING
        restart = asyncio.ensure_future(a.restart())  # waits for the stop under way, then refuses
        await w.clock.advance(10.0)  # its stop_timeout_s: killed
        with pytest.raises(AgentError, match="left the config and is being stopped for good"):
            await restart
        assert (await reload).stopped == ("w",)
        assert "w" not in w.pm.agents

    run(tmp_path, [simple()], body, procs=stubborn)


def test_a_signal_to_an_agent_without_a_process_is_refused(tmp_path):
    async def body(w: World) -> None:
        w.procs.exit(w.agent("w").pid, 1)
        await w.clock.settle()
        with pytest.raises(AgentError, match="agent w is exited: no process to signal"):
            w.agent("w").send_signal(signal.SIGHUP)

    run(tmp_path, [simple(restart="never")], body)


def test_a_stop_while_starting_stops_it_and_nothing_starts_it_again(tmp_path):
    async def body(w: World) -> None:
        pid = w.agent("w").pid
        await w.agent("w").stop()
        await w.clock.advance(3600)
        assert w.agent("w").state is S.STOPPED and w.procs.procs[pid].signals == [signal.SIGTERM]
        assert len(w.procs.spawned) == 1

    run(tmp_path, [simple()], body)


def test_a_stop_of_a_fatal_agent_moves_it_to_stopped_without_a_signal(tmp_path):
    async def body(w: World) -> None:
        w.procs.exit(w.agent("w").pid, 1)
        await w.clock.settle()
        assert w.agent("w").state is S.FATAL
        await w.agent("w").stop()
        assert w.agent("w").state is S.STOPPED and w.procs.sent == []

    run(tmp_path, [simple(start_retries=0)], body)


def test_a_signal_reaches_the_agents_process_group(tmp_path):
    def handles_hup(procs: FakeProcesses) -> None:
        procs.ignore_next = {signal.SIGHUP}

    async def body(w: World) -> None:
        pid = await running(w)
        w.agent("w").send_signal(signal.SIGHUP)
        await w.clock.settle()
        assert w.procs.sent == [(pid, signal.SIGHUP)] and w.agent("w").state is S.RUNNING

    run(tmp_path, [simple()], body, procs=handles_hup)
