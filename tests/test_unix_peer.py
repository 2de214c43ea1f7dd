"""The local Unix socket admits root, the supervisor's own uid or its group, by SO_PEERCRED, not by file mode.

The socket is made world-writable for the test (and its directory traversable), so file permissions let
``nobody`` connect: what refuses it is the peer-credential check in baton/front.py.
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

from tests.conftest import PY, agent

pytestmark = pytest.mark.e2e  # every test here starts a process

# Standard library only, run by the system interpreter: the test's virtualenv may live where `nobody`
# cannot read it. It speaks the first bytes of HTTP/2: a served peer gets the server's SETTINGS frame back,
# a refused one is hung up on at once.
CLIENT = r"""
import json, socket, sys

path = sys.argv[1]
raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
raw.settimeout(10)
raw.connect(path)                      # file permissions allow it
try:
    raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    head = raw.recv(9)
except OSError:                        # EPIPE or ECONNRESET: hung up even sooner
    head = b""
print(json.dumps({"connected": True, "closed_at_once": head == b"",
                  "server_settings": len(head) == 9 and head[3] == 4}))
"""
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else PY


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory others may traverse (tmp_path is 0700), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="baton-peer-", dir="/tmp"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run_client(socket_path: Path, *as_user: str) -> dict[str, object]:
    res = subprocess.run([*as_user, SYSTEM_PYTHON, "-I", "-c", CLIENT, str(socket_path)], capture_output=True,
                         text=True, cwd="/", timeout=60)
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
    assert nobody["connected"] and nobody["closed_at_once"] and not nobody["server_settings"]
    assert sup.agent("web").pid == web.pid
    assert "refused local connection" in sup.output() and "uid 65534" in sup.output()

    ours = run_client(sock)
    assert ours["server_settings"] and not ours["closed_at_once"]
    assert sup.status().node_id == "node-1"  # and a full gRPC call with our uid is served
