"""The supervisor's Manager client keeps retrying while the Manager is down and catches up when it returns."""

from __future__ import annotations

import time

import pytest

from baton.pb import common_pb2, daemon_pb2
from tests.conftest import RecordingManager, agent, free_port, serve_manager, wait_for

pytestmark = pytest.mark.e2e  # every test here starts a process


def test_manager_client_retries_while_manager_is_down_and_syncs_once_it_is_up(make_supervisor):
    port = free_port()
    sup = make_supervisor(
        [agent("web", "ready_agent.py", notify=True)],
        extra={"manager": {"address": f"127.0.0.1:{port}", "retry_initial_s": 0.1, "retry_max_s": 0.5,
                           "heartbeat_interval_s": 0.2, "sync_interval_s": 0.5}},
    ).start()
    sup.wait_agent("web", "running")
    time.sleep(1.5)
    assert not sup.status().manager_connected
    assert sup.agent("web").state == common_pb2.AGENT_STATE_RUNNING

    mgr = RecordingManager()
    server = serve_manager(port, mgr)
    try:
        wait_for(lambda: mgr.registers, 10, what="registration")
        reg = mgr.registers[0]
        assert reg.node_id == "node-1"
        assert [a.name for a in reg.agents] == ["web"]
        wait_for(lambda: len(mgr.heartbeats) >= 2, 10, what="heartbeats")
        wait_for(lambda: sup.status().manager_connected, 10, what="status to show the Manager connected")

        sup.stub.RestartAgent(__import__("baton.pb.daemon_pb2", fromlist=["x"]).AgentRef(name="web"))
        new_pid = sup.wait_agent("web", "running").pid
        wait_for(lambda: any(a.pid == new_pid and a.state == common_pb2.AGENT_STATE_RUNNING
                             for s in list(mgr.syncs) for a in s.agents), 10, what="state sync of the restart")
    finally:
        server.stop(0)


def test_manager_that_restarts_gets_a_new_registration(make_supervisor):
    port = free_port()
    sup = make_supervisor([], extra={"manager": {"address": f"127.0.0.1:{port}", "retry_initial_s": 0.1,
                                                 "retry_max_s": 0.3, "heartbeat_interval_s": 0.2}}).start()
    mgr = RecordingManager()
    server = serve_manager(port, mgr)
    wait_for(lambda: mgr.registers, 10, what="first registration")
    server.stop(0).wait()
    time.sleep(1.0)
    mgr2 = RecordingManager()
    server2 = serve_manager(port, mgr2)
    try:
        wait_for(lambda: mgr2.registers, 10, what="registration with the restarted Manager")
    finally:
        server2.stop(0)
    assert sup.proc.poll() is None


def test_an_agent_restart_reaches_the_manager_in_one_state_sync_not_one_per_change(make_supervisor):
    port = free_port()
    mgr = RecordingManager()
    server = serve_manager(port, mgr)
    try:
        sup = make_supervisor(
            [agent("web", "ready_agent.py", notify=True)],
            extra={"manager": {"address": f"127.0.0.1:{port}", "heartbeat_interval_s": 60, "sync_interval_s": 60}},
        ).start()
        old_pid = sup.wait_agent("web", "running").pid
        # in a sync, or already in the registration when a loaded machine made the supervisor register late
        wait_for(lambda: any(a.pid == old_pid and a.state == common_pb2.AGENT_STATE_RUNNING
                             for s in [*mgr.registers, *mgr.syncs] for a in s.agents), 10,
                 what="the first agent's state")
        before = len(mgr.syncs)

        sup.stub.RestartAgent(daemon_pb2.AgentRef(name="web"))
        new_pid = sup.wait_agent("web", "running").pid
        wait_for(lambda: any(a.pid == new_pid and a.state == common_pb2.AGENT_STATE_RUNNING
                             for s in list(mgr.syncs) for a in s.agents), 10, what="state sync of the restart")
        time.sleep(1.0)  # any later sync of the same restart would have come by now
        # Four changes (stopping, exited, starting, running) made four calls before. One when the new agent is
        # ready within SYNC_COALESCE_S; a second if a loaded machine made it slower than that.
        assert len(mgr.syncs) - before <= 2, [[(a.pid, a.state) for a in s.agents] for s in mgr.syncs[before:]]
    finally:
        server.stop(0)
