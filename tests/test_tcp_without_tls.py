"""TCP without TLS is refused unless opted into on loopback, and then it is read-only; downgrade and force
are operator powers.

The attacks run as ``nobody`` on the system interpreter with the standard library only (the test's
virtualenv may live where ``nobody`` cannot read it): a hand-written HTTP/2 client makes real gRPC calls
with request bytes the test serialised beforehand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from baton.pb import daemon_pb2, daemon_pb2_grpc
from tests.conftest import PY, ROOT, Release, SupervisorProc, agent, install_version, wait_for

# One gRPC call over a fresh HTTP/2 connection: preface, SETTINGS, HEADERS (HPACK literals, no Huffman), DATA.
# Prints whether the server answered the stream (trailers or a reset), its grpc-status and the raw headers.
CLIENT = r"""
import json, socket, sys

target, path, body_hex = sys.argv[1], sys.argv[2], sys.argv[3]
if target.startswith("unix:"):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(target[5:])
else:
    host, port = target.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=20)

def frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload

def literal(name, value):
    name, value = name.encode(), value.encode()
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

headers = b"".join(literal(k, v) for k, v in ((":method", "POST"), (":scheme", "http"), (":path", path),
                   (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")))
body = bytes.fromhex(body_hex)
s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0) + frame(1, 4, 1, headers)
          + frame(0, 1, 1, b"\x00" + len(body).to_bytes(4, "big") + body))

def read(n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out

answered, seen = False, b""
try:
    while not answered:
        head = read(9)
        length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        stream = int.from_bytes(head[5:], "big") & 0x7FFFFFFF
        payload = read(length)
        if kind == 4 and not flags & 1:
            s.sendall(frame(4, 1, 0))
        elif kind == 1 and stream == 1:
            seen += payload
            answered = bool(flags & 1)
        elif kind == 3 and stream == 1:
            answered = True
        elif kind == 7:
            break
except (EOFError, OSError):
    pass
at = seen.find(b"grpc-status")  # gRPC sends it as a plain literal: name, a length byte, the digits
status = int(seen[at + 12:at + 12 + seen[at + 11]]) if at >= 0 else None
print(json.dumps({"answered": answered, "status": status, "headers": seen.decode("latin-1")}))
"""
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else PY
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
APP = {"name": "app", "packaged": True, "command": "bin/agent", "notify": True, "restart": "always",
       "backoff_initial_s": 0.2, "stop_timeout_s": 5.0}
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another user needs root")


def raw_call(target: str, method: str, request: Any, *as_user: str) -> dict[str, Any]:
    res = subprocess.run([*as_user, SYSTEM_PYTHON, "-I", "-c", CLIENT, target, method,
                          request.SerializeToString().hex()], capture_output=True, text=True, cwd="/", timeout=60)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "supervisor", "check-config", str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def updates_in_journal(sup: SupervisorProc) -> list[str]:
    d = sup.state_dir / "updates"
    return sorted(p.name for p in d.iterdir() if p.is_dir() and p.name != "locks") if d.exists() else []


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory others may traverse (tmp_path is 0700), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="baton-tcp-", dir="/tmp"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def app_host(make_supervisor: Any, release: Release, socket: Path | None = None, **kw: Any) -> SupervisorProc:
    sup = make_supervisor([dict(APP)], **kw)
    if socket is not None:
        sup.cfg["grpc"]["unix_socket"] = str(socket)
        sup.socket = socket
    sup.cfg["update"].update({"trusted_keys": [str(release.public_key)], "free_space_reserve_bytes": 0})
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start()
    sup.wait_agent("app", "running")
    return sup


@pytest.mark.e2e
@needs_root
def test_nobody_on_the_insecure_loopback_listener_cannot_stop_an_agent_or_push_a_downgrade(
        make_supervisor, release):
    sup = app_host(make_supervisor, release, tcp=True)
    address = sup.cfg["grpc"]["listen"][0]
    before = sup.agent("app")
    old = release.build("0.9.0")  # signed by the trusted key: a rollback through the front door

    stop = raw_call(address, "/baton.v1.DaemonService/StopAgent", daemon_pb2.AgentRef(name="app"), *AS_NOBODY)
    push = raw_call(address, "/baton.v1.DaemonService/PushUpdate",
                    old.request(allow_downgrade=True, force=True), *AS_NOBODY)
    status = raw_call(address, "/baton.v1.DaemonService/GetStatus", daemon_pb2.GetStatusRequest(), *AS_NOBODY)

    assert (stop["status"], push["status"], status["status"]) == (7, 7, 0)  # PERMISSION_DENIED, .., OK
    assert "read-only" in stop["headers"] and "read-only" in push["headers"]
    after = sup.agent("app")
    assert (after.pid, after.version, after.state, after.restarts) == \
        (before.pid, before.version, before.state, before.restarts)
    assert updates_in_journal(sup) == []


@pytest.mark.e2e
def test_insecure_listener_serves_read_only_methods_and_refuses_mutating_ones(make_supervisor):
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)], tcp=True).start()
    web = sup.wait_agent("web", "running")
    with grpc.insecure_channel(sup.cfg["grpc"]["listen"][0]) as ch:
        stub = daemon_pb2_grpc.DaemonServiceStub(ch)
        assert stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=5).node_id == "node-1"
        for call in (stub.StopAgent, stub.RestartAgent, stub.StartAgent):
            with pytest.raises(grpc.RpcError) as e:
                call(daemon_pb2.AgentRef(name="web"), timeout=5)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "read-only" in (e.value.details() or "")
        with pytest.raises(grpc.RpcError) as e:
            stub.PushUpdate(daemon_pb2.UpdateRequest(component="web", version="2.0.0"), timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert sup.agent("web").pid == web.pid
    assert "grpc.insecure_tcp" in sup.output() and "read-only" in sup.output()


@pytest.mark.e2e
@needs_root
def test_a_local_group_member_who_is_not_an_operator_cannot_push_with_force(make_supervisor, release, open_dir):
    sock = open_dir / "supervisor.sock"
    sup = app_host(make_supervisor, release, socket=sock, extra={"grpc": {"unix_socket_group": "nogroup"}})
    before = sup.agent("app")
    old = release.build("0.9.0")

    push = raw_call(f"unix:{sock}", "/baton.v1.DaemonService/PushUpdate",
                    old.request(allow_downgrade=True, force=True), *AS_NOBODY[:-1], "--groups=nogroup")
    assert push["status"] == 7 and "grpc.allow_downgrade_uids" in push["headers"]
    assert updates_in_journal(sup) == []
    after = sup.agent("app")
    assert (after.pid, after.version) == (before.pid, before.version)
    # The group member is a local peer all the same: a plain restart is within its rights.
    restart = raw_call(f"unix:{sock}", "/baton.v1.DaemonService/RestartAgent", daemon_pb2.AgentRef(name="app"),
                       *AS_NOBODY[:-1], "--groups=nogroup")
    assert restart["status"] == 0
    wait_for(lambda: sup.agent("app").pid not in (0, before.pid), 20, what="app to restart")


@pytest.mark.e2e
def test_root_on_the_unix_socket_is_an_operator_and_may_push_a_downgrade(make_supervisor, release):
    sup = app_host(make_supervisor, release)
    old = release.build("0.9.0")
    accepted = sup.stub.PushUpdate(old.request(allow_downgrade=True, force=True), timeout=10)
    assert accepted.update_id in updates_in_journal(sup)


BASE = """
[node]
id = "n1"
state_dir = "{d}/state"
install_root = "{d}/install"
[grpc]
unix_socket = "{d}/s.sock"
"""


@pytest.mark.parametrize(("grpc_lines", "key", "problem"), [
    ('listen = ["127.0.0.1:7443"]', "grpc.listen[0]", "without TLS"),
    ('listen = ["0.0.0.0:7443"]\ninsecure_tcp = true', "grpc.listen[0]", "not a loopback address"),
    ('listen = ["[::1]:7443", "192.0.2.1:7443"]\ninsecure_tcp = true', "grpc.listen[1]", "not a loopback"),
    ('allowed_clients = ["CN=manager-1"]', "grpc.allowed_clients", "needs grpc.tls_cert"),
    ('allow_downgrade_clients = ["CN=operator"]', "grpc.allow_downgrade_clients", "needs grpc.tls_cert"),
])
@pytest.mark.e2e
def test_check_config_refuses_tcp_without_tls_in_one_line_naming_the_key(tmp_path, grpc_lines, key, problem):
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE.format(d=tmp_path) + grpc_lines + "\n")
    res = check_config(cfg)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert key in lines[0] and problem in lines[0]


@pytest.mark.e2e
def test_check_config_accepts_the_insecure_opt_in_on_loopback(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE.format(d=tmp_path) + 'listen = ["127.0.0.1:7443", "[::1]:7443", "localhost:7444"]\n'
                   "insecure_tcp = true\n")
    res = check_config(cfg)
    assert res.returncode == 0, res.stderr


@pytest.mark.e2e
def test_run_refuses_tcp_without_tls_and_starts_nothing(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE.format(d=tmp_path) + 'listen = ["127.0.0.1:7443"]\n')
    res = subprocess.run([PY, "-m", "supervisor", "run", "--config", str(cfg)], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert res.returncode == 2
    assert [ln for ln in res.stderr.splitlines() if ln.strip()] == [
        ln for ln in res.stderr.splitlines() if "grpc.listen[0]" in ln]
    assert not (tmp_path / "state").exists()


@pytest.mark.e2e
def test_the_shipped_example_config_passes_check_config_and_has_no_plain_tcp(tmp_path):
    example = (ROOT / "packaging" / "supervisor.example.toml").read_text()
    body = example.replace('"/var/lib/baton"', f'"{tmp_path}/state"').replace('"/opt/baton"', f'"{tmp_path}/opt"')
    body = body.replace('"/usr/bin/python3"', f'"{PY}"')
    cfg = tmp_path / "example.toml"
    cfg.write_text(body)
    res = check_config(cfg)
    assert res.returncode == 0, res.stderr


def test_operator_powers_need_an_operator_identity_or_uid():
    from baton.identity import PeerIdentity
    from supervisor.authz import Channel, Policy

    push = "/baton.v1.DaemonService/PushUpdate"
    manager = PeerIdentity(common_name="manager-1", tls=True)
    operator = PeerIdentity(common_name="operator", tls=True)
    policy = Policy(["CN=manager-1"], ["CN=operator"])
    plain = daemon_pb2.UpdateRequest(component="app", version="2.0.0")
    for flags in ({"allow_downgrade": True}, {"force": True}):
        risky = daemon_pb2.UpdateRequest(component="app", version="0.9.0", **flags)
        assert "grpc.allow_downgrade_clients" in (policy.denial(push, manager, Channel.TLS, risky) or "")
        assert policy.denial(push, operator, Channel.TLS, risky) is None
        assert "grpc.allow_downgrade_uids" in (policy.denial(push, PeerIdentity(), Channel.LOCAL, risky) or "")
        assert policy.denial(push, PeerIdentity(), Channel.OPERATOR, risky) is None
        assert "read-only" in (policy.denial(push, PeerIdentity(), Channel.INSECURE_TCP, risky) or "")
    assert policy.denial(push, manager, Channel.TLS, plain) is None
    assert policy.denial(push, PeerIdentity(), Channel.LOCAL, plain) is None
    assert policy.denial(push, PeerIdentity(), Channel.UNKNOWN, plain), "an unlabelled peer is read-only"
    cancel = "/baton.v1.DaemonService/CancelUpdate"
    assert "read-only" in (policy.denial(cancel, PeerIdentity(), Channel.INSECURE_TCP) or ""), "cancel mutates"
