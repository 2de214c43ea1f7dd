"""The local Unix socket admits root, the supervisor's own uid or its group, by SO_PEERCRED, not by file mode.

The socket is made world-writable for the test (and its directory traversable), so file permissions let
``nobody`` connect: what refuses it is the peer-credential check in supervisor/front.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PY, ROOT, agent

CLIENT = r"""
import json, socket, sys
import grpc
from baton.pb import daemon_pb2, daemon_pb2_grpc

path = sys.argv[1]
raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
raw.settimeout(5)
raw.connect(path)                      # file permissions allow it
try:                                   # the supervisor hangs up on a refused peer at once
    raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    closed = raw.recv(64) == b""
except OSError:                        # EPIPE or ECONNRESET: it hung up even sooner
    closed = True
out = {"connected": True, "closed_at_once": closed}
with grpc.insecure_channel("unix:" + path) as ch:
    stub = daemon_pb2_grpc.DaemonServiceStub(ch)
    for name, call in (("status", lambda: stub.GetStatus(daemon_pb2.GetStatusRequest(), timeout=5).node_id),
                       ("stop", lambda: stub.StopAgent(daemon_pb2.AgentRef(name="web"), timeout=5).name)):
        try:
            out[name] = call()
        except grpc.RpcError as e:
            out[name] = e.code().name
print(json.dumps(out))
"""


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory others may traverse (tmp_path is 0700), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="baton-peer-", dir="/tmp"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_client(socket_path: Path, *as_user: str) -> dict[str, object]:
    res = subprocess.run([*as_user, PY, "-c", CLIENT, str(socket_path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


@pytest.mark.skipif(os.geteuid() != 0, reason="running a client as another user needs root")
def test_a_peer_with_another_uid_is_refused_and_our_own_uid_is_served(make_supervisor, open_dir):
    sock = open_dir / "supervisor.sock"
    sup = make_supervisor([agent("web", "ready_agent.py", notify=True)], extra={"grpc": {"unix_socket": str(sock)}})
    sup.socket = sock
    sup.start()
    web = sup.wait_agent("web", "running")
    assert sock.stat().st_mode & 0o777 == 0o600
    sock.chmod(0o666)  # past the file permissions: only SO_PEERCRED stands in the way now

    nobody = run_client(sock, "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
    assert nobody["connected"] and nobody["closed_at_once"]
    assert nobody["status"] == "UNAVAILABLE" and nobody["stop"] == "UNAVAILABLE"
    assert sup.agent("web").pid == web.pid
    assert "refused local connection" in sup.output() and "uid 65534" in sup.output()

    ours = run_client(sock)
    assert ours["status"] == "node-1" and ours["stop"] == "web"
