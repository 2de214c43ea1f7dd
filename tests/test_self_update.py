"""The helper replaces the supervisor itself; agents are not disturbed; a bad version is rolled back."""

from __future__ import annotations

import os
import socket
import threading
import time

import grpc
import psutil
import pytest

from baton.pb import common_pb2, daemon_pb2, daemon_pb2_grpc
from tests.conftest import agent_processes, wait_for

pytestmark = pytest.mark.e2e  # every test here starts a process

COMMITTED = common_pb2.UPDATE_STATE_COMMITTED
ROLLED_BACK = common_pb2.UPDATE_STATE_ROLLED_BACK


def agents_of(host) -> dict[str, tuple[int, int]]:
    return {a.name: (a.pid, a.restarts) for a in host.sup.status().agents}


class ConnectPoller(threading.Thread):
    """Opens a fresh TCP connection to the supervisor every few milliseconds and records refusals."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        host, port = address.rsplit(":", 1)
        self.addr = (host, int(port))
        self.refused = 0
        self.ok = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with socket.create_connection(self.addr, timeout=5):
                    self.ok += 1
            except ConnectionRefusedError:
                self.refused += 1
            except OSError:
                pass
            time.sleep(0.005)


@pytest.mark.standby_helper  # the production default: its supervisor keeps a standby helper
def test_self_update_keeps_agents_and_the_listening_socket(make_self_host):
    host = make_self_host()
    before = agents_of(host)
    old_pid = host.sup.status().pid
    poller = ConnectPoller(host.sup.cfg["grpc"]["listen"][0])
    poller.start()
    try:
        uid = host.push(host.supervisor_package("1.1.0"))
        st = host.wait_final(uid, timeout=90)
    finally:
        poller.stop.set()
        poller.join()
    assert st.state == COMMITTED, st.error
    status = host.sup.status()
    assert status.supervisor_version == "1.1.0"
    assert status.pid == old_pid
    assert agents_of(host) == before
    assert host.sup_layout.current_version() == "1.1.0"
    assert poller.refused == 0 and poller.ok > 0
    for a in status.agents:
        assert psutil.Process(a.pid).ppid() == old_pid


class StatusPoller(threading.Thread):
    """GetStatus on the public Unix socket every few milliseconds (a fresh connection each, waiting for ready);
    at the first answer from the helper (``started_at`` 0: helper/bridge.py) it also asks for a change."""

    # A connection of its own each time (not gRPC's shared one), reconnecting within 100 ms.
    OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.initial_reconnect_backoff_ms", 10),
               ("grpc.min_reconnect_backoff_ms", 10), ("grpc.max_reconnect_backoff_ms", 100)]

    def __init__(self, path) -> None:
        super().__init__(daemon=True)
        self.target = f"unix:{path}"
        self.answers: list[tuple[str, float, int]] = []  # (supervisor_version, started_at, agents)
        self.failed: list[str] = []
        self.change: grpc.StatusCode | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            with grpc.insecure_channel(self.target, options=self.OPTIONS) as ch:
                stub = daemon_pb2_grpc.DaemonServiceStub(ch)
                try:
                    st = stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=30, wait_for_ready=True)
                except grpc.RpcError as e:
                    self.failed.append(e.code().name)
                    continue
                self.answers.append((st.supervisor_version, st.started_at, len(st.agents)))
                if st.started_at == 0 and self.change is None:
                    try:
                        stub.StartAgent(daemon_pb2.AgentRef(name="no-such-agent"), timeout=10)
                    except grpc.RpcError as e:
                        self.change = e.code()
            time.sleep(0.005)


def test_during_a_self_update_the_helper_answers_status_and_changes_wait_for_the_new_supervisor(make_self_host):
    host = make_self_host(tcp=False)
    before = agents_of(host)
    poller = StatusPoller(host.sup.socket)
    poller.start()
    try:
        st = host.wait_final(host.push(host.supervisor_package("1.1.0", "slow_start")), timeout=90)
    finally:
        poller.stop.set()
        poller.join(60)
    assert st.state == COMMITTED, st.error
    assert poller.failed == [], "no status call fails across the switch"
    from_helper = [a for a in poller.answers if a[1] == 0]
    assert from_helper, "the helper answered while no supervisor process did"
    assert all(version == "1.0.0" and agents == len(before) for version, _, agents in from_helper)
    assert poller.change == grpc.StatusCode.UNAVAILABLE, "a change is refused as retryable, not done"
    assert poller.answers[-1][0] == "1.1.0"
    assert agents_of(host) == before


class CallProbe(threading.Thread):
    """GetStatus over and over on a supervisor's public address, counting answers and failures by code.

    ``fresh``: a new channel (a new connection) for each call, as a CLI does; otherwise one channel kept for
    every call, as a long-lived client does (its connection is the old process's until it is told GOAWAY).
    """

    def __init__(self, target: str, fresh: bool) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.fresh = fresh
        self.answered = 0
        self.failed: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        kept = grpc.insecure_channel(self.target, options=StatusPoller.OPTIONS)
        try:
            while not self.stop.is_set():
                ch = grpc.insecure_channel(self.target, options=StatusPoller.OPTIONS) if self.fresh else kept
                try:
                    daemon_pb2_grpc.DaemonServiceStub(ch).GetStatus(daemon_pb2.GetStatusRequest(), timeout=30,
                                                                    wait_for_ready=True)
                    self.answered += 1
                except grpc.RpcError as e:
                    self.failed.append(f"{e.code().name}: {e.details()}")
                finally:
                    if self.fresh:
                        ch.close()
        finally:
            kept.close()


def test_no_status_call_fails_across_self_updates(make_self_host):
    """Calls on connections the old process (or the helper) accepted are answered before its server stops."""
    host = make_self_host()
    targets = [host.sup.cfg["grpc"]["listen"][0], f"unix:{host.sup.socket}"]
    probes = [CallProbe(t, fresh) for t in targets for fresh in (True, True, False)]
    for p in probes:
        p.start()
    try:
        for v in ("1.1.0", "1.2.0"):
            st = host.wait_final(host.push(host.supervisor_package(v)), timeout=90)
            assert st.state == COMMITTED, st.error
    finally:
        for p in probes:
            p.stop.set()
        for p in probes:
            p.join(60)
    assert [f for p in probes for f in p.failed] == []
    assert all(p.answered > 0 for p in probes)


def test_a_watch_open_at_a_self_update_ends_at_the_handover_unavailable_saying_why(make_self_host):
    """The old process ends its watches when it hands over (a retryable code, not a cut at its exec)."""
    host = make_self_host(tcp=False)
    name = next(iter(agents_of(host)))
    with grpc.insecure_channel(f"unix:{host.sup.socket}") as ch:
        watch = daemon_pb2_grpc.DaemonServiceStub(ch).WatchAgent(daemon_pb2.AgentRef(name=name), timeout=90)
        assert next(watch).name == name
        uid = host.push(host.supervisor_package("1.1.0"))
        with pytest.raises(grpc.RpcError) as ended:
            for _ in watch:
                pass
        st = host.wait_final(uid, timeout=90)
    assert st.state == COMMITTED, st.error
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "self-update" in (ended.value.details() or "")


def test_two_self_updates_in_a_row(make_self_host):
    host = make_self_host(tcp=False)
    before = agents_of(host)
    for v in ("1.1.0", "1.2.0"):
        st = host.wait_final(host.push(host.supervisor_package(v)), timeout=90)
        assert st.state == COMMITTED, st.error
        assert host.sup.status().supervisor_version == v
    assert agents_of(host) == before
    assert host.sup_layout.installed_versions() == ["1.2.0", "1.1.0", "1.0.0"]


def test_agent_output_is_not_lost_across_a_self_update(make_self_host):
    host = make_self_host(tcp=False)
    log = host.sup.log_of("web")
    wait_for(lambda: "tick 2" in log.read_text(), what="ticks before")
    st = host.wait_final(host.push(host.supervisor_package("1.1.0")), timeout=90)
    assert st.success, st.error
    last = int(log.read_text().strip().splitlines()[-1].split()[-1])
    wait_for(lambda: f"tick {last + 5}\n" in log.read_text(), what="ticks after")
    ticks = [int(ln.split()[1]) for ln in log.read_text().splitlines() if ln.startswith("tick ")]
    assert ticks == list(range(1, len(ticks) + 1)), "a line was lost or duplicated"


def _assert_rolled_back(host, st, before, reason_part: str) -> None:
    assert st.state == ROLLED_BACK, (st.state, st.error)
    assert st.rolled_back and not st.success
    assert reason_part in st.error, st.error
    status = host.sup.status()
    assert status.supervisor_version == "1.0.0"
    assert host.sup_layout.current_version() == "1.0.0"
    assert host.sup_layout.installed_versions() == ["1.0.0"]
    now = {a.name: a.pid for a in status.agents}
    assert now == {n: pid for n, (pid, _) in before.items()}
    for a in status.agents:
        assert a.state == common_pb2.AGENT_STATE_RUNNING


def test_new_version_that_exits_at_start_is_rolled_back(make_self_host):
    host = make_self_host(tcp=False)
    before = agents_of(host)
    st = host.wait_final(host.push(host.supervisor_package("1.1.0", "exit_at_start")), timeout=90)
    _assert_rolled_back(host, st, before, "exited before its handshake")


def test_new_version_that_hangs_before_the_handshake_is_rolled_back(make_self_host):
    host = make_self_host(tcp=False, update={"handshake_timeout_s": 4.0})
    before = agents_of(host)
    st = host.wait_final(host.push(host.supervisor_package("1.1.0", "hang")), timeout=90)
    _assert_rolled_back(host, st, before, "HandshakeTimeout")


def test_new_version_speaking_an_old_protocol_is_rolled_back(make_self_host):
    host = make_self_host(tcp=False)
    before = agents_of(host)
    st = host.wait_final(host.push(host.supervisor_package("1.1.0", "old_protocol")), timeout=90)
    _assert_rolled_back(host, st, before, "protocol 0")


def test_new_version_reporting_unhealthy_is_rolled_back(make_self_host):
    host = make_self_host(tcp=False)
    before = agents_of(host)
    st = host.wait_final(host.push(host.supervisor_package("1.1.0", "unhealthy")), timeout=90)
    _assert_rolled_back(host, st, before, "reports itself unhealthy")
    assert "1.1.0" in st.last_log, "the failed version's last log lines come with the result"


def test_failed_supervisor_version_is_not_retried_on_its_own(make_self_host):
    import grpc
    import pytest

    host = make_self_host(tcp=False)
    st = host.wait_final(host.push(host.supervisor_package("1.1.0", "exit_at_start")), timeout=90)
    assert st.rolled_back
    with pytest.raises(grpc.RpcError) as e:
        host.push(host.supervisor_package("1.1.0"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "failed before" in e.value.details()


def test_adopted_agent_that_exits_after_the_handover_is_restarted(make_self_host):
    import signal

    host = make_self_host(tcp=False)
    assert host.wait_final(host.push(host.supervisor_package("1.1.0")), timeout=90).success
    worker = host.sup.agent("worker")
    os.kill(worker.pid, signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: host.sup.agent("worker").state != common_pb2.AGENT_STATE_RUNNING
             or host.sup.agent("worker").pid != worker.pid, 5, interval=0.02, what="the exit to be noticed")
    assert time.monotonic() - t0 < 2.0  # pidfd: noticed at once; the bound only absorbs a loaded machine
    again = host.sup.wait_agent("worker", "running", pred=lambda a: a.pid != worker.pid)
    assert again.restarts == worker.restarts + 1
    assert agent_processes(host.sup.state_dir, "worker") == [again.pid]


def test_agent_that_exits_during_the_handover_is_restarted_afterwards(make_self_host, tmp_path):
    crash_file = tmp_path / "crash"
    host = make_self_host(tcp=False)
    before = host.sup.agent("worker")
    pkg = host.supervisor_package("1.1.0")
    # the worker crashes as soon as the file exists: create it while the old supervisor is handing over
    uid = host.push(pkg)
    wait_for(lambda: host.journal(uid).state.value in ("restarting", "watching", "committed"), 30, interval=0.01)
    import signal

    os.kill(before.pid, signal.SIGKILL)
    st = host.wait_final(uid, timeout=90)
    assert st.success, st.error
    after = host.sup.wait_agent("worker", "running", pred=lambda a: a.pid != before.pid)
    assert after.restarts >= before.restarts + 1
    assert crash_file.exists() is False


def test_stopped_agent_stays_stopped_across_a_self_update(make_self_host):
    from baton.pb import daemon_pb2

    host = make_self_host(tcp=False)
    host.sup.stub.StopAgent(daemon_pb2.AgentRef(name="chatty"), timeout=20)
    assert host.wait_final(host.push(host.supervisor_package("1.1.0")), timeout=90).success
    assert host.sup.agent("chatty").state == common_pb2.AGENT_STATE_STOPPED
    assert host.sup.agent("web").state == common_pb2.AGENT_STATE_RUNNING


# ---- crash safety: SIGKILL of the helper, the old supervisor or the new one at each step ----------------------------

# Representative helper kills with real processes (before the old supervisor is asked, after it execs, after the
# new one reports healthy): one supervisor serving, each agent running once, one result to the Manager. A kill
# after every durable write and at every handover step is in-process: tests/test_update_matrix.py.
HELPER_STEPS = ["switching", "handover-exec-sent", "handover-healthy"]
SUPERVISOR_STEPS = ["handover-quiesced", "handover-state-sent", "handover-hello-sent", "handover-adopted",
                    "handover-healthy-sent"]


def _consistent_after_crash(host, uid, mgr, agent_names=("web", "worker", "chatty")):
    st = host.wait_final(uid, timeout=120)
    assert st.state in (COMMITTED, ROLLED_BACK), st.error
    wait_for(lambda: host.journal(uid).settled, 60, what="the update to settle")
    want = "1.1.0" if st.state == COMMITTED else "1.0.0"
    assert host.sup_layout.current_version() == want
    status = wait_for(lambda: (s := host.sup.status(timeout=2)).supervisor_version == want and s, 60,
                      what=f"supervisor {want} to answer")
    for name in agent_names:
        a = host.sup.wait_agent(name, "running", timeout=30)
        assert agent_processes(host.sup.state_dir, name) == [a.pid], f"agent {name} must run exactly once"
    assert not (host.sup.base / "run" / "handover.json").exists()
    wait_for(lambda: len([r for r in mgr.results if r.update_id == uid]) == 1, 30, what="one result")
    time.sleep(1.0)
    assert len([r for r in mgr.results if r.update_id == uid]) == 1
    return status, st


def _crash_host(make_self_host, tmp_path, env_var: str, step: str):
    from tests.conftest import RecordingManager, free_port, serve_manager

    crash = tmp_path / "crash-at"
    crash.write_text(step)
    port = free_port()
    mgr = RecordingManager()
    server = serve_manager(port, mgr)
    host = make_self_host(tcp=False, env={env_var: str(crash)},
                          update={"handshake_timeout_s": 15.0})
    host.sup.cfg["manager"] = {"address": f"127.0.0.1:{port}", "retry_initial_s": 0.1, "retry_max_s": 0.5}
    return host, mgr, server, crash


@pytest.mark.parametrize("step", HELPER_STEPS)
def test_helper_killed_during_a_self_update_ends_consistent(make_self_host, tmp_path, step):
    host, mgr, server, crash = _crash_host(make_self_host, tmp_path, "BATON_HELPER_CRASH_FILE", step)
    try:
        host.sup.terminate()
        host.sup.start(launcher=host.launcher, env={"BATON_HELPER_CRASH_FILE": str(crash)})
        uid = host.push(host.supervisor_package("1.1.0"))
        _consistent_after_crash(host, uid, mgr)
        assert not crash.exists(), "the crash point was not reached"
    finally:
        server.stop(0)


@pytest.mark.parametrize("step", SUPERVISOR_STEPS)
def test_supervisor_killed_during_a_self_update_ends_consistent(make_self_host, tmp_path, step):
    host, mgr, server, crash = _crash_host(make_self_host, tmp_path, "BATON_SUPERVISOR_CRASH_FILE", step)
    try:
        host.sup.terminate()
        host.sup.start(launcher=host.launcher, env={"BATON_SUPERVISOR_CRASH_FILE": str(crash)})
        uid = host.push(host.supervisor_package("1.1.0"))
        _consistent_after_crash(host, uid, mgr)
        assert not crash.exists(), "the crash point was not reached"
    finally:
        server.stop(0)


def test_helper_rollback_restores_the_previous_supervisor_when_it_is_down(make_self_host):
    import subprocess
    import sys

    host = make_self_host(tcp=False)
    before = agents_of(host)
    assert host.wait_final(host.push(host.supervisor_package("1.1.0")), timeout=90).success
    host.sup.kill()  # dead, not stopped: the agents keep running
    res = subprocess.run([sys.executable, "-m", "helper", "--config", str(host.sup.config_path), "--rollback"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "BATON_PYTHON": sys.executable})
    assert res.returncode == 0, res.stderr + res.stdout
    assert "1.1.0 -> 1.0.0" in res.stdout
    status = wait_for(lambda: host.sup.status(timeout=2), 30, what="the rolled-back supervisor")
    assert status.supervisor_version == "1.0.0"
    assert host.sup_layout.current_version() == "1.0.0"
    assert {a.name: a.pid for a in status.agents} == {n: pid for n, (pid, _) in before.items()}


def test_helper_rollback_replaces_a_running_supervisor_through_the_handover(make_self_host):
    import subprocess
    import sys

    host = make_self_host(tcp=False)
    before = agents_of(host)
    assert host.wait_final(host.push(host.supervisor_package("1.1.0")), timeout=90).success
    pid = host.sup.status().pid
    res = subprocess.run([sys.executable, "-m", "helper", "--config", str(host.sup.config_path), "--rollback",
                          "supervisor"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr + res.stdout
    status = host.sup.status()
    assert status.supervisor_version == "1.0.0"
    assert status.pid == pid
    assert agents_of(host) == before


def test_helper_status_lists_supervisor_versions(make_self_host):
    import subprocess
    import sys

    host = make_self_host(tcp=False)
    assert host.wait_final(host.push(host.supervisor_package("1.1.0")), timeout=90).success
    res = subprocess.run([sys.executable, "-m", "helper", "--config", str(host.sup.config_path), "--status"],
                         capture_output=True, text=True, timeout=60)
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("supervisor"))
    assert "1.1.0" in line and "1.0.0" in line
