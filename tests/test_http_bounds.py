"""Bounds on Baton's HTTP endpoints (``baton/bounded_http.py``), attacked over raw sockets: clients that ask
for a package and never read, that send half a request, or that connect and say nothing, against a real
``baton-manager serve`` (package server, fleet page, /metrics), a real supervisor's /metrics and the one-file
server of ``supervisor update --package``.

The servers here take short bounds (``LIMITS``, given to ``baton-manager serve`` as its ``--http-*`` flags and to
``serve_file``, and to a supervisor's /metrics as its ``[metrics] http_*`` keys), so that the attacks are waited
out in seconds rather than the defaults' minutes."""

from __future__ import annotations

import argparse
import http.client
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from baton.bounded_http import HttpLimits
from manager.cli import UsageError, http_limits, parser
from manager.packages import DEFAULT_MAX_DOWNLOADS
from manager.publish import publish
from supervisor.file_server import serve_file
from tests.conftest import free_port, wait_for
from tests.manager_fixtures import (
    ManagerProc,
    make_manager_fixture,  # noqa: F401  (the make_manager fixture)
    port_open,
)

# the defaults' connection count (the attacks' sizes), short times and a floor a 4 KiB-a-second reader is under
LIMITS = HttpLimits(head_timeout_s=4.0, idle_timeout_s=4.0, min_rate_bytes_per_s=16 * 1024, rate_window_s=6.0)
LIMIT_ARGS = ("--http-head-timeout", str(LIMITS.head_timeout_s), "--http-idle-timeout", str(LIMITS.idle_timeout_s),
              "--http-min-rate", str(LIMITS.min_rate_bytes_per_s), "--http-rate-window", str(LIMITS.rate_window_s))
TRICKLE_S = 1.0  # the slow reader's pause between 4 KiB reads: well inside the idle timeout
# a stalled connection is let go after its timeout; the genuine client retries each second (Retry-After)
GENEROUS_S = LIMITS.head_timeout_s + LIMITS.idle_timeout_s + 15


def connect(port: int, rcvbuf: int = 0) -> socket.socket:
    s = socket.socket()
    if rcvbuf:  # set before connecting, so that the window stays small and the server's writes stall at once
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(10)
    s.connect(("127.0.0.1", port))
    return s


@contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    try:
        yield made
    finally:
        for s in made:
            s.close()


def closed_by_server(s: socket.socket, within_s: float) -> bool:
    """Whether the server ends the connection within ``within_s`` (what it had sent is read and dropped)."""
    deadline = time.monotonic() + within_s
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            if not s.recv(1 << 20):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
    return False


def download(port: int, path: str, within_s: float) -> tuple[int, bytes, int]:
    """GET ``path`` as the helper does (waiting out each 503's Retry-After); (status, body, 503s seen)."""
    deadline = time.monotonic() + within_s
    busy = 0
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status != 503 or time.monotonic() > deadline:
            return resp.status, body, busy
        busy += 1
        time.sleep(float(resp.getheader("Retry-After", "1")))


def published(manager: ManagerProc, tmp_path: Path, size: int) -> tuple[str, bytes]:
    data = bytes(range(256)) * (size // 256)
    pkg = tmp_path / "big-1.0.0.tar.gz"
    pkg.write_bytes(data)
    pkg.with_name(pkg.name + ".minisig").write_text("untrusted comment: not checked by the server\n")
    base = f"http://127.0.0.1:{manager.http_port}"
    ref = publish(pkg, "big", "1.0.0", packages_dir=manager.packages, base_url=base)
    return ref.url.removeprefix(base), data


@pytest.mark.e2e
def test_clients_that_take_every_download_slot_and_never_read_are_cut_and_a_genuine_download_succeeds(
        make_manager: Callable[..., ManagerProc], tmp_path: Path) -> None:
    manager = make_manager(args=LIMIT_ARGS)  # the default --max-downloads
    path, data = published(manager, tmp_path, 8 * 1024 * 1024)  # far more than the socket buffers hold
    with sockets() as hogs, sockets() as halves:
        for _ in range(DEFAULT_MAX_DOWNLOADS):
            s = connect(manager.http_port, rcvbuf=4096)
            hogs.append(s)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(12) == b"HTTP/1.1 200", "each takes a slot: the head arrives, the body stalls"
        for _ in range(LIMITS.max_connections + 10):  # more half-sent requests than the threads left
            s = connect(manager.http_port)
            halves.append(s)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode())  # the head never ends

        started = time.monotonic()
        status, body, busy = download(manager.http_port, path, GENEROUS_S)
        assert (status, body == data) == (200, True), f"a genuine download, after {busy} 503s"
        assert time.monotonic() - started < GENEROUS_S
        assert all(closed_by_server(s, LIMITS.idle_timeout_s + 5) for s in hogs), "every stalled body is cut"
        assert all(closed_by_server(s, LIMITS.head_timeout_s + 5) for s in halves), "every half request is closed"
    assert manager.proc is not None and manager.proc.poll() is None


@pytest.mark.e2e
def test_a_client_that_reads_a_package_under_the_rate_floor_is_cut_and_frees_its_slot(
        make_manager: Callable[..., ManagerProc], tmp_path: Path) -> None:
    manager = make_manager(args=("--max-downloads", "1", *LIMIT_ARGS))
    path, data = published(manager, tmp_path, 8 * 1024 * 1024)
    with sockets() as trickle:
        s = connect(manager.http_port, rcvbuf=4096)
        trickle.append(s)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        got, started, cut = 0, time.monotonic(), False
        while time.monotonic() - started < LIMITS.rate_window_s + LIMITS.idle_timeout_s + 10:
            try:  # 4 KiB every TRICKLE_S: never idle for the server, always under its floor
                chunk = s.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                cut = True
                break
            got += len(chunk)
            time.sleep(TRICKLE_S)
        assert cut and got < len(data) // 10, f"the trickle took {got} bytes in {time.monotonic() - started:.0f} s"
        assert time.monotonic() - started >= LIMITS.rate_window_s, "not before a whole window"
        status, body, _ = download(manager.http_port, path, 5)
        assert (status, body == data) == (200, True), "its slot is free again"


def test_a_client_that_never_reads_the_local_package_file_gives_way_to_the_helper(tmp_path: Path) -> None:
    pkg = tmp_path / "app-1.1.0.tar.gz"
    pkg.write_bytes(bytes(range(256)) * 32 * 1024)  # 8 MiB
    with serve_file(pkg, LIMITS) as url, sockets() as attackers:
        port, path = int(url.split(":")[2].split("/")[0]), "/" + url.split("/", 3)[3]
        for _ in range(LIMITS.max_connections):
            s = connect(port, rcvbuf=4096)
            attackers.append(s)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(12).endswith(b" 200")
        for _ in range(10):  # and then connections that say nothing
            attackers.append(connect(port))

        status, body, _ = download(port, path, GENEROUS_S)
        assert (status, body == pkg.read_bytes()) == (200, True)
        assert all(closed_by_server(s, LIMITS.idle_timeout_s + 5) for s in attackers)


def idle_connections_do_not_stop_a_request(port: int, path: str) -> None:
    """More idle connections than the server has threads: a genuine request is answered at once, and every
    idle one is closed after the head timeout."""
    with sockets() as idle:
        for _ in range(LIMITS.max_connections + 10):
            idle.append(connect(port))
        half = connect(port)
        idle.append(half)
        half.sendall(b"GET / HTTP/1.1\r\n")
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", path, headers={"Host": f"127.0.0.1:{port}"})
            resp = conn.getresponse()
            assert (resp.status, bool(resp.read())) == (200, True)
        finally:
            conn.close()
        waited = time.monotonic() - started
        assert waited < min(5, LIMITS.head_timeout_s), "answered without waiting for an idle connection's timeout"
        assert all(closed_by_server(s, LIMITS.head_timeout_s + 5) for s in idle)


@pytest.mark.e2e
def test_idle_connections_beyond_the_bound_do_not_stop_a_scrape_of_the_managers_metrics(
        make_manager: Callable[..., ManagerProc]) -> None:
    port = free_port()
    manager = make_manager(args=("--metrics", f"127.0.0.1:{port}", *LIMIT_ARGS))
    wait_for(lambda: port_open(port), 20, what="the metrics endpoint")
    idle_connections_do_not_stop_a_request(port, "/metrics")
    assert manager.proc is not None and manager.proc.poll() is None


@pytest.mark.e2e
def test_idle_connections_beyond_the_bound_do_not_stop_a_read_of_the_web_page(
        make_manager: Callable[..., ManagerProc]) -> None:
    port = free_port()
    manager = make_manager(args=("--web", f"127.0.0.1:{port}", *LIMIT_ARGS))
    wait_for(lambda: port_open(port), 20, what="the web page")
    idle_connections_do_not_stop_a_request(port, "/")
    assert manager.proc is not None and manager.proc.poll() is None


@pytest.mark.e2e
def test_idle_connections_beyond_the_bound_do_not_stop_a_scrape_of_the_supervisors_metrics(make_supervisor) -> None:
    port = free_port()
    sup = make_supervisor([], extra={"metrics": {"listen": f"127.0.0.1:{port}",
                                                 "http_head_timeout_s": LIMITS.head_timeout_s,
                                                 "http_idle_timeout_s": LIMITS.idle_timeout_s}})
    sup.start()
    wait_for(lambda: port_open(port), 20, what="the metrics endpoint")
    idle_connections_do_not_stop_a_request(port, "/metrics")
    assert sup.proc is not None and sup.proc.poll() is None


def serve_args(*flags: str) -> argparse.Namespace:
    return parser().parse_args(["serve", "--listen", "127.0.0.1:1", "--insecure-loopback", *flags])


def test_serve_without_http_flags_keeps_every_endpoints_default_bounds() -> None:
    assert http_limits(serve_args()) == HttpLimits()


def test_serve_passes_its_http_flags_to_the_bounds() -> None:
    assert http_limits(serve_args(*LIMIT_ARGS)) == LIMITS


@pytest.mark.parametrize(("flag", "value"), [("--http-head-timeout", "nan"), ("--http-idle-timeout", "0"),
                                             ("--http-rate-window", "inf"), ("--http-min-rate", "-1")])
def test_a_bad_http_bound_is_refused_in_one_line_naming_its_flag(flag: str, value: str) -> None:
    with pytest.raises(UsageError) as e:
        http_limits(serve_args(flag, value))
    assert str(e.value).startswith(f"{flag}: ") and "\n" not in str(e.value)
