"""The supervisor keeps real agent processes running, by policy, observable over gRPC."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import psutil
import pytest

from baton.pb import common_pb2, daemon_pb2, daemon_pb2_grpc
from supervisor.adoption import parent_pid, process_start_time
from tests.conftest import agent, agent_processes, wait_for

RUNNING = common_pb2.AGENT_STATE_RUNNING


@pytest.mark.e2e
def test_status_lists_every_configured_agent_running(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True), agent("worker", "crash_agent.py")]).start()
    web = sup.wait_agent("web", "running")
    worker = sup.wait_agent("worker", "running")
    st = sup.status()
    assert st.node_id == "node-1"
    assert st.supervisor_version
    assert st.pid == sup.proc.pid
    assert {a.name for a in st.agents} == {"web", "worker"}
    listed = sup.stub.ListAgents(daemon_pb2.ListAgentsRequest()).agents
    assert {a.name: a.pid for a in listed} == {"web": web.pid, "worker": worker.pid}
    assert psutil.Process(web.pid).ppid() == sup.proc.pid


@pytest.mark.e2e
def test_notify_agent_is_starting_until_it_sends_ready(make_supervisor, tmp_path):
    go = tmp_path / "ready"
    sup = make_supervisor([agent("slow", "ready_agent.py", notify=True, env={"READY_WHEN_FILE": str(go)})]).start()
    time.sleep(0.5)  # long past its spawn: still starting, however long that took
    assert sup.agent("slow").state == common_pb2.AGENT_STATE_STARTING
    go.touch()
    sup.wait_agent("slow", "running", timeout=10)


@pytest.mark.e2e
def test_stop_start_and_restart_over_grpc(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    first = sup.wait_agent("web", "running")
    stopped = sup.stub.StopAgent(daemon_pb2.AgentRef(name="web"))
    assert stopped.state == common_pb2.AGENT_STATE_STOPPED
    assert not psutil.pid_exists(first.pid) or psutil.Process(first.pid).status() == psutil.STATUS_ZOMBIE
    sup.stub.StartAgent(daemon_pb2.AgentRef(name="web"))
    second = sup.wait_agent("web", "running")
    assert second.pid != first.pid
    sup.stub.RestartAgent(daemon_pb2.AgentRef(name="web"))
    third = sup.wait_agent("web", "running")
    assert third.pid not in (first.pid, second.pid)


@pytest.mark.e2e
def test_unknown_agent_is_not_found(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    with pytest.raises(grpc.RpcError) as e:
        sup.stub.StopAgent(daemon_pb2.AgentRef(name="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nope" in e.value.details()


@pytest.mark.e2e
def test_a_running_agent_killed_is_restarted_at_once(make_supervisor):
    sup = make_supervisor([agent("w", "crash_agent.py", start_seconds=0.2, backoff_initial_s=30.0)]).start()
    first = sup.wait_agent("w", "running")
    os.kill(first.pid, signal.SIGKILL)
    second = sup.wait_agent("w", "running", pred=lambda a: a.pid != first.pid, timeout=10)  # not 30 s
    assert second.restarts == 1
    assert second.last_exit_status == -signal.SIGKILL


@pytest.mark.e2e
def test_crash_loop_reaches_fatal(make_supervisor):
    sup = make_supervisor([agent("loop", "crash_agent.py", env={"CRASH_AFTER": "0"}, start_seconds=1.0,
                                 start_retries=2, backoff_initial_s=0.05)]).start()
    fatal = sup.wait_agent("loop", "fatal", timeout=15)
    assert fatal.restarts == 2
    assert fatal.last_exit_status == 3
    assert "gave up" in fatal.last_error
    time.sleep(0.5)
    assert sup.agent("loop").state == common_pb2.AGENT_STATE_FATAL


@pytest.mark.e2e
def test_agent_ignoring_sigterm_is_killed_after_stop_timeout(make_supervisor):
    sup = make_supervisor([agent("stub", "stubborn_agent.py", stop_timeout_s=1.5, start_seconds=0.2)]).start()
    a = sup.wait_agent("stub", "running")
    time.sleep(0.3)
    t0 = time.monotonic()
    res = sup.stub.StopAgent(daemon_pb2.AgentRef(name="stub"), timeout=20)
    took = time.monotonic() - t0
    assert res.state == common_pb2.AGENT_STATE_STOPPED
    assert res.last_exit_status == -signal.SIGKILL
    assert took >= 1.4
    assert not psutil.pid_exists(a.pid)


@pytest.mark.e2e
def test_chatty_agent_keeps_running_and_its_log_rotates(make_supervisor, tmp_path):
    count = tmp_path / "count"
    sup = make_supervisor([agent("chatty", "chatty_agent.py", start_seconds=0.2, log_max_bytes=256 * 1024,
                                 log_backups=2, env={"CHATTY_COUNT_FILE": str(count)})]).start()
    a = sup.wait_agent("chatty", "running")
    log = sup.log_of("chatty")
    wait_for(lambda: log.with_name("chatty.log.2").exists(), 30, what="two rotations")
    n1 = int(wait_for(lambda: count.read_text(), what="count"))
    time.sleep(1.0)
    n2 = int(count.read_text())
    assert n2 > n1, "the chatty agent is blocked"
    assert sup.agent("chatty").pid == a.pid
    assert sup.terminate() == 0  # no rotation under way while the files are read (chatty.log.1 is renamed away in one)
    assert log.stat().st_size <= 256 * 1024 + 4096
    assert not log.with_name("chatty.log.3").exists()
    assert log.with_name("chatty.log.1").read_bytes().endswith(b"\n")


@pytest.mark.e2e
def test_sigterm_to_supervisor_stops_every_agent_and_leaves_no_process(make_supervisor):
    sup = make_supervisor([
        agent("web", "ready_agent.py", notify=True),
        agent("stub", "stubborn_agent.py", stop_timeout_s=1.0, start_seconds=0.2),
        agent("chatty", "chatty_agent.py", start_seconds=0.2),
    ]).start()
    for n in ("web", "stub", "chatty"):
        sup.wait_agent(n, "running")
    tree = sup.tree()
    assert len(tree) >= 3
    assert sup.terminate() == 0
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == [], f"left behind: {alive}"


@pytest.mark.e2e
def test_an_orphaned_grandchild_is_reaped_by_the_supervisor_not_left_a_zombie(make_supervisor):
    # The agent's subshell backgrounds a `sleep 3` and exits: the sleep is re-parented to the supervisor (a child
    # subreaper), which must reap it when it exits although it watches only its agents.
    sup = make_supervisor([{"name": "forker", "command": "/bin/sh", "args": ["-c", "(sleep 3 &); exec sleep 1000"],
                            "start_seconds": 0.2}]).start()
    sup.wait_agent("forker", "running")

    def orphan() -> psutil.Process | None:
        kids = psutil.Process(sup.proc.pid).children()
        return next((c for c in kids if c.cmdline() == ["sleep", "3"]), None)

    grandchild = wait_for(orphan, timeout=5, interval=0.02, what="the orphaned sleep to become the supervisor's child")

    def reaped() -> bool:
        try:
            return grandchild.status() != psutil.STATUS_ZOMBIE and not grandchild.is_running()
        except psutil.NoSuchProcess:
            return True

    wait_for(reaped, timeout=10, what="the orphan to be reaped")
    assert sup.agent("forker").state == RUNNING


@pytest.mark.e2e
def test_agent_output_reaches_its_log_file(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    a = sup.wait_agent("web", "running")
    wait_for(lambda: f"pid {a.pid} starting" in sup.log_of("web").read_text(), what="agent output in log")
    wait_for(lambda: "tick 3" in sup.log_of("web").read_text(), what="ticks in log")


@pytest.mark.e2e
def test_unix_socket_is_private(make_supervisor):
    sup = make_supervisor([]).start()
    assert oct(sup.socket.stat().st_mode & 0o777) == oct(0o600)


@pytest.mark.e2e
def test_tcp_listener_serves_daemon_service(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)], tcp=True).start()
    addr = sup.cfg["grpc"]["listen"][0]
    with grpc.insecure_channel(addr) as ch:
        st = daemon_pb2_grpc.DaemonServiceStub(ch).GetStatus(daemon_pb2.GetStatusRequest(), timeout=5)
    assert st.node_id == "node-1"


@pytest.mark.e2e
def test_health_service_reports_serving(make_supervisor):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    sup = make_supervisor([]).start()
    with grpc.insecure_channel(f"unix:{sup.socket}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "baton.v1.DaemonService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.e2e
def test_readiness_is_sent_to_systemd_notify_socket(make_supervisor, tmp_path):
    path = tmp_path / "systemd-notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    sup = make_supervisor([]).start(wait=False, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
    messages = []
    while not any("READY=1" in m for m in messages):
        messages.append(sock.recv(4096).decode())
    assert any("WATCHDOG=1" in m for m in messages) or "WATCHDOG=1" in sock.recv(4096).decode()
    ready = next(m for m in messages if "READY=1" in m)
    assert f"MAINPID={sup.proc.pid}" in ready
    assert "STATUS=" in ready
    sock.close()


@pytest.mark.e2e
def test_second_supervisor_on_same_state_dir_refuses_to_start(make_supervisor):
    sup = make_supervisor([]).start()
    other = make_supervisor([], name="sup")
    other.socket = Path(str(sup.socket) + "2")
    other.cfg["grpc"]["unix_socket"] = str(other.socket)
    other.start(wait=False)
    assert other.proc.wait(20) == 1
    assert "supervisor.lock" in other.output()


@pytest.mark.e2e
def test_supervisor_killed_right_after_an_agent_restarted_adopts_the_new_process(make_supervisor):
    """The table is written once per event-loop turn: a new pid must still be on disk before anyone sees it."""
    sup = make_supervisor([agent("w", "crash_agent.py", start_seconds=0.2, backoff_initial_s=0.05)]).start()
    first = sup.wait_agent("w", "running").pid
    os.kill(first, signal.SIGKILL)
    new = wait_for(lambda: sup.agent("w").pid not in (0, first) and sup.agent("w").pid, timeout=10,
                   interval=0.001, what="the restarted agent's pid in the status")
    sup.kill()
    sup.start()
    a = sup.wait_agent("w", "running")
    assert a.pid == new and a.adopted
    assert agent_processes(sup.state_dir, "w") == [new]


@pytest.mark.e2e
def test_supervisor_killed_right_after_a_notify_agent_said_ready_adopts_it_as_running(make_supervisor):
    """READY=1 is sent once and only the supervisor saw it: it is on disk before the status shows RUNNING."""
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True, backoff_initial_s=0.05,
                                 env={"READY_DELAY": "0.5"})]).start()
    first = sup.wait_agent("web", "running").pid
    os.kill(first, signal.SIGKILL)
    running = common_pb2.AGENT_STATE_RUNNING
    pid = wait_for(lambda: (a := sup.agent("web")).state == running and a.pid != first and a.pid, 15,
                   interval=0.005, what="the restarted web to say READY")  # the kill comes well within LAZY_WRITE_S
    sup.kill()
    sup.start()
    a = sup.wait_agent("web", "running", timeout=10)
    assert a.pid == pid and a.adopted


@pytest.mark.e2e
def test_agents_survive_a_killed_supervisor_and_are_adopted_by_the_next_one(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True),
                           agent("w", "crash_agent.py", start_seconds=0.2)]).start()
    pids = {n: sup.wait_agent(n, "running").pid for n in ("web", "w")}
    sup.kill()
    for pid in pids.values():
        assert psutil.pid_exists(pid)
    sup.start()
    for n, pid in pids.items():
        a = sup.wait_agent(n, "running")
        assert a.pid == pid and a.adopted and a.restarts == 0
    os.kill(pids["w"], signal.SIGKILL)
    again = sup.wait_agent("w", "running", pred=lambda a: a.pid != pids["w"])
    assert again.restarts == 1
    log = sup.log_of("web")
    before = log.read_text().count("tick")
    wait_for(lambda: log.read_text().count("tick") > before + 2, what="output of the adopted agent")


@pytest.mark.e2e
def test_an_agents_start_time_and_parent_are_the_ones_psutil_reports():
    """The agent table's start_time is compared by other supervisor versions (after a handover or a restart),
    which computed it with psutil: read from /proc, it must be the very same number."""
    child = subprocess.Popen(["/bin/sleep", "30"])
    try:
        assert process_start_time(child.pid) == psutil.Process(child.pid).create_time()
        assert parent_pid(child.pid) == os.getpid() == psutil.Process(child.pid).ppid()
    finally:
        child.kill()
        child.wait()
    assert process_start_time(child.pid) is None and parent_pid(child.pid) is None


def test_a_recorded_start_time_a_btime_second_off_is_still_the_same_process_and_two_seconds_off_is_not():
    """btime in /proc/stat is whole seconds and two readers may see it one apart: the recorded start time of an
    agent read by another supervisor process can differ by that second (not by two)."""
    from supervisor.adoption import same_process

    me = os.getpid()
    start = process_start_time(me)
    assert start is not None
    assert same_process(me, start) and same_process(me, start - 1.0) and same_process(me, start + 1.0)
    assert not same_process(me, start + 2.0) and not same_process(me, start - 2.0)


@pytest.mark.e2e
def test_a_running_supervisor_has_not_loaded_what_it_needs_only_now_and_then(make_supervisor):
    """Extension modules map into the process for good (issue 13, memory): psutil (adoption, an update's helper),
    uuid and hashlib (update admission), cryptography (signatures) wait until they are needed, and OpenSSL through
    Python's ssl is never needed, the daemon's TLS being gRPC's own (supervisor/entry.py); tempfile (random)
    nowhere (baton/durable.py makes its own temporary names), even after a GetStatus (the release builder's module
    is not where it finds its dependencies). loguru, the daemon's log (issue 26), brings decimal and shutil's
    bz2 and lzma at start: their cost is in the README's dependency table."""
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    sup.wait_agent("web", "running")
    sup.status()
    maps = Path(f"/proc/{sup.proc.pid}/maps").read_text()
    for lib in ("_psutil_linux", "_hashlib", "_uuid", "cryptography", "/_ssl.", "libssl.so", "/_random."):
        assert lib not in maps, f"{lib} is loaded"


def test_an_exit_signal_wakes_every_waiter_and_one_that_gives_up_cancels_only_itself():
    import asyncio

    from supervisor.agent_stop import ExitSignal

    async def body() -> None:
        exited = ExitSignal()
        patient = [asyncio.create_task(exited.wait()) for _ in range(2)]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(exited.wait(), 0.01)  # gives up: the others keep waiting
        await asyncio.sleep(0)
        assert not any(t.done() for t in patient)
        exited.set()
        await asyncio.wait_for(asyncio.gather(*patient), 5)
        await asyncio.wait_for(exited.wait(), 5)  # set: returns at once
        exited.clear()  # the next process was spawned: waiting again waits for its exit
        later = asyncio.create_task(exited.wait())
        await asyncio.sleep(0.01)
        assert not later.done()
        exited.set()
        await asyncio.wait_for(later, 5)

    asyncio.run(body())
