"""A real HTTP/1.1 package server on 127.0.0.1 for tests, with misbehaviours on demand.

Serves the files of one directory (GET and HEAD, single ``Range: bytes=a-b`` requests
answered 206 with ``Content-Range``), records every request it sees, and can be
told per path to misbehave like a broken or hostile mirror::

    with PackageServer(tmp_path) as server:
        server.on("pkg.tar.gz").truncate_at(1000)
        download(server.url("pkg.tar.gz"), ...)      # sees a short body
        server.on("pkg.tar.gz").reset()
        assert server.requests_for("pkg.tar.gz")[-1].range == "bytes=0-"

Misbehaviours combine (``no_range().truncate_at(n)``) and take effect from the
next request. ``stop()`` wakes every stalled or rate-limited response, shuts open
connections and joins every thread, so a test never leaves one behind.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, unquote, urlsplit

HOST = "127.0.0.1"
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_RATE_SLICES_PER_S = 20


@dataclass(frozen=True)
class SeenRequest:
    """One request as the server received it."""

    method: str
    path: str  # file name relative to the served directory, unquoted
    headers: dict[str, str]

    @property
    def range(self) -> str | None:
        """The ``Range`` header, or None."""
        for k, v in self.headers.items():
            if k.lower() == "range":
                return v
        return None


@dataclass(frozen=True)
class _Misbehaviour:
    status: int | None = None
    honour_range: bool = True
    truncate_at: int | None = None
    oversize_extra: int | None = None
    oversize_content_length: int | None = None
    stall_after: int | None = None
    stall_s: float = 0.0
    rate_bytes_per_s: int | None = None
    busy_left: int = 0  # answer this many more requests 503
    retry_after: str = ""  # the 503's Retry-After header, "" for none


class Behaviour:
    """How the server treats one path. Methods return self so they chain."""

    def __init__(self, server: PackageServer, name: str) -> None:
        self._server = server
        self._name = name

    def _set(self, **changes: object) -> Behaviour:
        self._server._update(self._name, **changes)
        return self

    def status(self, code: int) -> Behaviour:
        """Answer every request with HTTP ``code`` and a short body."""
        return self._set(status=code)

    def busy(self, times: int, retry_after: str = "") -> Behaviour:
        """Answer the next ``times`` requests 503 (with ``Retry-After: retry_after`` unless ""), then serve."""
        return self._set(busy_left=times, retry_after=retry_after)

    def no_range(self) -> Behaviour:
        """Ignore ``Range`` and answer 200 with the whole file, like a server without range support."""
        return self._set(honour_range=False)

    def truncate_at(self, n: int) -> Behaviour:
        """Send the full ``Content-Length`` but close the connection after ``n`` body bytes."""
        return self._set(truncate_at=n)

    def oversize(self, extra_bytes: int, content_length: int | None = None) -> Behaviour:
        """Send ``extra_bytes`` beyond the file's end.

        With ``content_length`` None there is no Content-Length header and the
        body ends when the connection closes; otherwise that (lying) value is sent.
        """
        return self._set(oversize_extra=extra_bytes, oversize_content_length=content_length)

    def stall_after(self, n: int, seconds: float) -> Behaviour:
        """Send ``n`` body bytes, then nothing for ``seconds`` (woken early by ``stop()``), then the rest."""
        return self._set(stall_after=n, stall_s=seconds)

    def rate_limit(self, bytes_per_s: int) -> Behaviour:
        """Send the body at about ``bytes_per_s``, in 1/20 s slices."""
        return self._set(rate_bytes_per_s=bytes_per_s)

    def reset(self) -> Behaviour:
        """Serve this path normally again."""
        self._server._reset(self._name)
        return self


class PackageServer:
    """Serves ``root`` over HTTP/1.1 on 127.0.0.1 at an ephemeral port.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._behaviours: dict[str, _Misbehaviour] = {}
        self._requests: list[SeenRequest] = []
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> PackageServer:
        if self._httpd is not None:
            raise RuntimeError("PackageServer already started")
        self._httpd = _HTTPServer(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="pkgserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake stalled responses, close connections and join every thread."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.stopping.set()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        httpd.join_handlers(timeout_s=5)

    def __enter__(self) -> PackageServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------- addresses

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("PackageServer not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def url(self, name: str) -> str:
        """The URL of ``name``, a path relative to the served directory."""
        return f"{self.base_url}/{quote(name)}"

    # ---------------------------------------------------------------- behaviour and log

    def on(self, name: str) -> Behaviour:
        """The behaviour of path ``name``, to make it misbehave."""
        return Behaviour(self, name)

    def reset_all(self) -> None:
        """Serve every path normally and forget the request log."""
        with self._lock:
            self._behaviours.clear()
            self._requests.clear()

    @property
    def requests(self) -> list[SeenRequest]:
        """Every request seen so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def requests_for(self, name: str) -> list[SeenRequest]:
        return [r for r in self.requests if r.path == name]

    # ---------------------------------------------------------------- internals

    def _update(self, name: str, **changes: object) -> None:
        with self._lock:
            self._behaviours[name] = replace(self._behaviours.get(name, _Misbehaviour()), **changes)  # type: ignore[arg-type]

    def _reset(self, name: str) -> None:
        with self._lock:
            self._behaviours.pop(name, None)

    def _record(self, request: SeenRequest) -> _Misbehaviour:
        with self._lock:
            self._requests.append(request)
            b = self._behaviours.get(request.path, _Misbehaviour())
            if b.busy_left:
                self._behaviours[request.path] = replace(b, busy_left=b.busy_left - 1)
            return b


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: PackageServer) -> None:
        self.owner = owner
        self.stopping = threading.Event()
        self._conn_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        super().__init__((HOST, 0), _Handler)

    def track(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._connections.add(conn)
            self._handlers.add(threading.current_thread())

    def untrack(self, conn: socket.socket) -> None:
        with self._conn_lock:
            self._connections.discard(conn)

    def close_connections(self) -> None:
        with self._conn_lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def join_handlers(self, timeout_s: float) -> None:
        with self._conn_lock:
            threads = list(self._handlers)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=timeout_s)


@dataclass
class _Plan:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    close_after: int | None = None  # body bytes to send before closing
    close: bool = False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    timeout = 10  # an idle keep-alive connection does not hold a thread forever

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests read ``PackageServer.requests`` instead."""

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _serve(self, send_body: bool) -> None:
        name = unquote(urlsplit(self.path).path).lstrip("/")
        behaviour = self.server.owner._record(SeenRequest(self.command, name, dict(self.headers.items())))
        plan = self._plan(name, behaviour)
        self.send_response(plan.status)
        for k, v in plan.headers.items():
            self.send_header(k, v)
        if plan.close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if send_body:
            self._send_body(plan, behaviour)

    def _plan(self, name: str, b: _Misbehaviour) -> _Plan:
        if b.busy_left:
            body = b"busy\n"
            busy_headers = {"Content-Length": str(len(body))}
            if b.retry_after:
                busy_headers["Retry-After"] = b.retry_after
            return _Plan(503, busy_headers, body)
        if b.status is not None:
            body = f"status {b.status} on request\n".encode()
            return _Plan(b.status, {"Content-Length": str(len(body))}, body)
        data = self._read(name)
        if data is None:
            body = b"not found\n"
            return _Plan(404, {"Content-Length": str(len(body))}, body)
        size = len(data)
        status, start, end = 200, 0, size - 1
        headers: dict[str, str] = {"Accept-Ranges": "bytes" if b.honour_range else "none"}
        m = _RANGE.match(self.headers.get("Range", "")) if b.honour_range else None
        if m is not None:
            start = int(m[1])
            end = min(int(m[2]), size - 1) if m[2] else size - 1
            if start >= size or end < start:
                headers["Content-Range"] = f"bytes */{size}"
                headers["Content-Length"] = "0"
                return _Plan(416, headers)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        body = data[start : end + 1]
        plan = _Plan(status, headers, body)
        headers["Content-Length"] = str(len(body))
        if b.oversize_extra is not None:
            plan.body = body + b"X" * b.oversize_extra
            plan.close = True
            if b.oversize_content_length is None:
                del headers["Content-Length"]
            else:
                headers["Content-Length"] = str(b.oversize_content_length)
        if b.truncate_at is not None:
            plan.close_after = b.truncate_at
            plan.close = True
        return plan

    def _read(self, name: str) -> bytes | None:
        root = self.server.owner.root.resolve()
        path = (root / name).resolve()
        if not name or not path.is_relative_to(root) or not path.is_file():
            return None
        return path.read_bytes()

    def _send_body(self, plan: _Plan, b: _Misbehaviour) -> None:
        body = plan.body if plan.close_after is None else plan.body[: plan.close_after]
        stopping = self.server.stopping
        try:
            if b.stall_after is not None:
                self._write(body[: b.stall_after], b)
                body = body[b.stall_after :]
                if stopping.wait(b.stall_s):
                    self.close_connection = True
                    return
            self._write(body, b)
        except OSError:  # the client went away: normal for the misbehaviours under test
            self.close_connection = True

    def _write(self, data: bytes, b: _Misbehaviour) -> None:
        if b.rate_bytes_per_s is None:
            self.wfile.write(data)
            self.wfile.flush()
            return
        step = max(1, b.rate_bytes_per_s // _RATE_SLICES_PER_S)
        for i in range(0, len(data), step):
            self.wfile.write(data[i : i + step])
            self.wfile.flush()
            if self.server.stopping.wait(1 / _RATE_SLICES_PER_S):
                raise ConnectionAbortedError("server stopping")


class RawServer:
    """A TCP server on 127.0.0.1 that answers every request with the same raw bytes, HTTP or not.

    The hostile mirror that breaks HTTP itself: a head dripped one byte per
    ``drip_s``, conflicting headers, a malformed status line, a huge head.
    ``stop()`` wakes a dripping answer, closes every connection and joins every thread.
    """

    def __init__(self, response: bytes, drip_s: float = 0.0) -> None:
        self.response = response
        self.drip_s = drip_s
        self.connections = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None

    def __enter__(self) -> RawServer:
        self._listener = socket.create_server((HOST, 0))
        self._listener.settimeout(0.05)
        self._spawn(self._accept_loop)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping.set()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    def url(self, name: str) -> str:
        assert self._listener is not None
        return f"http://{HOST}:{self._listener.getsockname()[1]}/{quote(name)}"

    def _spawn(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name="rawserver", daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
                self.connections += 1
            self._spawn(self._answer, conn)

    def _answer(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            if not self.drip_s:
                conn.sendall(self.response)
                return
            for i in range(len(self.response)):
                conn.sendall(self.response[i : i + 1])
                if self._stopping.wait(self.drip_s):
                    return
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
