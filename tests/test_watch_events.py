"""Changes are pushed, not polled: WatchAgent streams an agent's changes, WatchUpdate wakes on the journal's rename."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from baton import durable
from baton.pb import common_pb2, daemon_pb2
from baton.reasons import FailureReason
from baton.states import AgentState
from helper.control import HealthCheckFailed, SupervisorControl
from supervisor.authz import READ_ONLY_METHODS
from supervisor.daemon_service import WATCH_AGENT_HEARTBEAT_S
from supervisor.dirwatch import DirWatch
from tests.conftest import agent

RUNNING = common_pb2.AGENT_STATE_RUNNING
STARTING = common_pb2.AGENT_STATE_STARTING


@pytest.mark.e2e
def test_watch_agent_streams_the_agent_now_then_its_readiness_then_heartbeats(make_supervisor, tmp_path):
    go = tmp_path / "ready"
    sup = make_supervisor([agent("slow", "ready_agent.py", notify=True, env={"READY_WHEN_FILE": str(go)})]).start()
    seen: list[tuple[int, float]] = []
    stream = sup.stub.WatchAgent(daemon_pb2.AgentRef(name="slow"), timeout=20)
    try:
        for info in stream:
            assert info.name == "slow"
            seen.append((info.state, time.monotonic()))
            go.touch()  # the agent says READY=1 only after the stream has shown it as it is now
            if info.state == RUNNING and sum(1 for s, _ in seen if s == RUNNING) >= 3:
                break
    finally:
        stream.cancel()
    assert seen[0][0] == STARTING
    running = [t for s, t in seen if s == RUNNING]
    # while nothing changes the stream still reports, so a caller can check its own deadlines
    assert running[2] - running[1] < 10 * WATCH_AGENT_HEARTBEAT_S


@pytest.mark.e2e
def test_watch_agent_of_an_unknown_agent_is_not_found_and_the_method_is_read_only(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    with pytest.raises(grpc.RpcError) as e:
        next(iter(sup.stub.WatchAgent(daemon_pb2.AgentRef(name="nope"), timeout=5)))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "/baton.v1.DaemonService/WatchAgent" in READ_ONLY_METHODS


@pytest.mark.e2e
def test_helper_health_wait_sees_readiness_from_the_stream_and_a_crash_inside_the_window(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True),
                           agent("crashy", "crash_agent.py", env={"CRASH_AFTER": "0.5"}, restart="always",
                                 start_seconds=0.1)]).start()
    web = sup.wait_agent("web", "running")
    control = SupervisorControl(sup.state_dir / "run" / "control.sock")
    try:
        assert control.wait_healthy("web", web.version, 10.0, 0.3).pid == web.pid
        sup.wait_agent("crashy", "running")
        with pytest.raises(HealthCheckFailed) as e:
            control.wait_healthy("crashy", sup.agent("crashy").version, 10.0, 5.0)
        assert e.value.reason is FailureReason.NEW_VERSION_EXITED  # seen as it happens, not at the window's end
    finally:
        control.close()


@pytest.mark.e2e
def test_helper_watch_follows_the_agent_across_a_supervisor_restart(make_supervisor):
    """A stream broken by the supervisor going away (a self-update's exec) is opened again on the next one."""
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    web = sup.wait_agent("web", "running")
    control = SupervisorControl(sup.state_dir / "run" / "control.sock")
    try:
        reports = control.watch("web", 60.0)
        assert next(reports).pid == web.pid
        sup.kill()
        sup.start()
        after = next(r for r in reports if r.adopted)
        assert (after.pid, after.state) == (web.pid, AgentState.RUNNING)
        reports.close()
    finally:
        control.close()


def test_dir_watch_reports_a_file_renamed_into_its_directory(tmp_path: Path):
    watched, other = tmp_path / "u1", tmp_path / "u2"
    watched.mkdir()
    other.mkdir()
    watch = DirWatch(watched)
    try:
        assert watch.renamed_in() == set()
        durable.write_json(other / "journal.json", {"n": 1})
        assert watch.renamed_in() == set()
        durable.write_json(watched / "journal.json", {"n": 2})
        assert "journal.json" in watch.renamed_in()
        (watched / "progress.json").write_text("{}")  # written in place: not a rename
        assert watch.renamed_in() == set()
    finally:
        watch.close()
    assert watch.fd == -1
