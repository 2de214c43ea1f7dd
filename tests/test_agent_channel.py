"""The agent channel (baton/agent_channel.py, supervisor/agent_socket.py): how a helper restarts and watches an
agent without gRPC; refused to anyone but root and the supervisor's uid, audited, and replaced by gRPC when a
supervisor has none."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from baton.agent_channel import (
    BAD_REQUEST,
    MAX_LINE_BYTES,
    PERMISSION_DENIED,
    UNAVAILABLE,
    AgentView,
    ChannelError,
    Reply,
    Request,
    socket_path,
)
from baton.audit import AuditLog, AuditRecord
from baton.states import AgentState
from helper.control import SupervisorControl, SupervisorUnavailable
from tests.conftest import agent, wait_for
from tests.test_unix_peer import SYSTEM_PYTHON, open_dir  # noqa: F401  (open_dir is a fixture)


def records(state_dir: Path, call: str) -> list[AuditRecord]:
    return [r for r in AuditLog(state_dir).read() if r.call == call]


def control_of(sup) -> SupervisorControl:  # type: ignore[no-untyped-def]
    return SupervisorControl(sup.state_dir / "run" / "control.sock")


def raw_exchange(path: Path, payload: bytes) -> Reply:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(payload)
        with s.makefile("rb") as lines:
            return Reply.decode(lines.readline())


# ---- the messages ---------------------------------------------------------------------------------------------


def test_an_agent_view_survives_its_encoding():
    view = AgentView(name="web", state=AgentState.BACKOFF, pid=0, version="1.2.0", restarts=3, exit_status=-9,
                     error="killed", adopted=True)
    assert Reply.decode(Reply(agent=view).encode()).agent == view
    refusal = Reply.decode(Reply(code="not_found", error="no agent 'x'").encode())
    assert (refusal.ok, refusal.code, refusal.error) == (False, "not_found", "no agent 'x'")


@pytest.mark.parametrize("line, why", [
    (b'{"v": 2, "op": "get", "agent": "web"}\n', "protocol version 2"),
    (b'{"v": 1, "op": "kill", "agent": "web"}\n', "unknown op 'kill'"),
    (b'{"v": 1, "op": "get", "agent": ""}\n', "agent: a non-empty string"),
    (b'{"v": 1, "op": "get", "agent": "web"}', "not a line"),
    (b"[1]\n", "an object, not list"),
    (b"\xff\n", "not JSON"),
    (b'{"v": 1, "op": "get", "agent": "' + b"a" * MAX_LINE_BYTES + b'"}\n', "not a line of at most"),
])
def test_a_request_that_is_not_one_of_this_version_is_refused_with_why(line: bytes, why: str):
    with pytest.raises(ChannelError, match=why):
        Request.decode(line)


def test_a_reply_with_a_state_no_agent_has_is_refused():
    with pytest.raises(ChannelError, match="agent:"):
        Reply.decode(b'{"v": 1, "ok": true, "agent": {"name": "web", "state": "dancing", "pid": 1, "version": "",'
                     b' "restarts": 0, "error": ""}}\n')


# ---- a real supervisor ------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_restart_over_the_channel_replaces_the_process_and_is_audited_as_restart_agent(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    web = sup.wait_agent("web", "running")
    path = socket_path(sup.state_dir / "run")
    assert path.stat().st_mode & 0o777 == 0o600

    control = control_of(sup)
    try:
        after = control.restart("web")
        assert after.pid and after.pid != web.pid and after.state in (AgentState.STARTING, AgentState.RUNNING)
        assert control.agent("web").pid == after.pid
        assert control._grpc is None, "no gRPC client was needed"
    finally:
        control.close()
    [rec] = records(sup.state_dir, "RestartAgent")
    assert (rec.outcome, rec.code, rec.args) == ("ok", "OK", {"name": "web", "via": "agents.sock"})
    assert (rec.caller.kind, rec.caller.uid, rec.caller.pid) == ("local", os.getuid(), os.getpid())


@pytest.mark.e2e
def test_an_unknown_agent_is_named_in_the_error_and_its_refused_stop_audited(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    control = control_of(sup)
    try:
        with pytest.raises(SupervisorUnavailable, match="does not know agent 'nope'"):
            control.stop("nope")
    finally:
        control.close()
    [rec] = records(sup.state_dir, "StopAgent")
    assert (rec.outcome, rec.code) == ("failed", "NOT_FOUND") and "nope" in rec.message


@pytest.mark.e2e
def test_a_malformed_request_is_answered_bad_request_and_changes_nothing(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    web = sup.wait_agent("web", "running")
    path = socket_path(sup.state_dir / "run")
    for payload in (b"restart web\n", b'{"v": 9, "op": "restart", "agent": "web"}\n'):
        reply = raw_exchange(path, payload)
        assert reply.code == BAD_REQUEST and reply.error
    assert sup.agent("web").pid == web.pid
    assert records(sup.state_dir, "RestartAgent") == []


@pytest.mark.e2e
def test_without_the_channel_the_helper_asks_over_grpc_as_before(make_supervisor):
    """A supervisor older than the channel has no agents.sock: the same calls go to its gRPC control socket."""
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    web = sup.wait_agent("web", "running")
    socket_path(sup.state_dir / "run").unlink()
    control = control_of(sup)
    try:
        after = control.restart("web")
        assert after.pid != web.pid and control._grpc is not None
        ready = control.wait_healthy("web", web.version, 10.0, 0.0)
        assert (ready.pid, ready.state) == (after.pid, AgentState.RUNNING)
    finally:
        control.close()
    [rec] = records(sup.state_dir, "RestartAgent")
    assert rec.args == {"name": "web"}  # the gRPC call's own record


@pytest.mark.e2e
def test_a_stopped_supervisor_leaves_no_agent_socket_behind(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    path = socket_path(sup.state_dir / "run")
    assert path.exists()
    assert sup.terminate() == 0
    assert not path.exists()


CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(b'{"v": 1, "op": "restart", "agent": "web"}\n')
print(s.makefile("rb").readline().decode())
"""


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another user needs root")
def test_a_peer_that_is_neither_root_nor_the_supervisor_is_refused_and_audited(make_supervisor, open_dir):  # noqa: F811
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    web = sup.wait_agent("web", "running")
    reachable = open_dir / "agents.sock"
    os.link(socket_path(sup.state_dir / "run"), reachable)  # the same socket, where nobody can get to it
    reachable.chmod(0o666)  # past the file permissions: only SO_PEERCRED stands in the way now

    res = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", SYSTEM_PYTHON, "-I",
                          "-c", CLIENT, str(reachable)], capture_output=True, text=True, cwd="/", timeout=60)
    assert res.returncode == 0, res.stderr
    reply = json.loads(res.stdout)
    assert (reply["ok"], reply["code"]) == (False, PERMISSION_DENIED)
    assert sup.agent("web").pid == web.pid
    rec = wait_for(lambda: records(sup.state_dir, "connect"), 10, what="the refusal record")[0]
    assert (rec.outcome, rec.caller.uid) == ("refused", 65534) and "agent channel" in rec.message
    assert records(sup.state_dir, "RestartAgent") == []


def serve_unavailable(path: Path) -> tuple[socket.socket, threading.Thread]:
    """Answers every request on ``path`` as a supervisor does from its quiesce on: unavailable."""
    path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as lines:
                Request.decode(lines.readline())
                conn.sendall(Reply(code=UNAVAILABLE, error="the supervisor is being replaced or stopping").encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.e2e
def test_a_request_met_by_a_handover_is_asked_again_over_grpc_and_carried_out(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)]).start()
    web = sup.wait_agent("web", "running")
    listener, thread = serve_unavailable(socket_path(sup.state_dir / "run"))
    control, watcher = control_of(sup), control_of(sup)
    try:
        after = control.restart("web")
        assert after.pid != web.pid and control._grpc is not None
        reports = watcher.watch("web", 30.0)
        assert next(reports).name == "web" and watcher._grpc is not None  # the watch, too, went to gRPC
        reports.close()
    finally:
        control.close()
        watcher.close()
        listener.close()
    thread.join(10)
    assert [r.args for r in records(sup.state_dir, "RestartAgent")] == [{"name": "web"}]  # once, over gRPC
