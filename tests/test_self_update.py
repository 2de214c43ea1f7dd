"""The helper replaces the supervisor itself; agents are not disturbed; a bad version is rolled back."""

from __future__ import annotations

import socket
import threading
import time

import psutil

from baton.pb import common_pb2
from tests.conftest import wait_for

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
