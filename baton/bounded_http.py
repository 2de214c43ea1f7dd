"""The threaded HTTP server behind every Baton endpoint, with bounds on connections, time and rate.

http.server's ``ThreadingHTTPServer`` starts a thread for each connection and waits on it for ever: a client
that connects and sends nothing, sends half a request, or asks for a package and never reads pins a thread
(and a package server's download slot) for as long as it stays. Every Baton HTTP endpoint (the Manager's
package server, fleet page and ``/metrics``, the supervisor's ``/metrics``, the one-file server of
``supervisor update --package``) is a :class:`BoundedHTTPServer` with a :class:`BoundedRequestHandler`:

- at most ``max_connections`` connections have a thread. When all are taken, a new connection evicts the one
  that has waited longest for its request head (an idle keep-alive, a half-sent request, an unfinished TLS
  handshake); only when every thread is answering a request is the newcomer turned away (503, closed);
- a request head must arrive whole within ``head_timeout_s`` (from the connection's start, or from the end of
  the previous response on a keep-alive connection);
- a response write that makes no progress for ``idle_timeout_s`` ends the connection; a body sent with
  ``send_range`` must have bytes acknowledged by the client at least every ``idle_timeout_s`` and average
  ``min_rate_bytes_per_s`` over each ``rate_window_s``, or its connection is reset.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import math
import socket
import ssl
import struct
import sys
import termios
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from baton.config import HTTP_HEAD_TIMEOUT_S, HTTP_IDLE_TIMEOUT_S, UpdateConfig
from baton.log import logger

PROGRESS_POLL_S = 1.0  # how often a blocked body write looks at what the client acknowledged
EVICT_WAIT_S = 1.0  # how long a new connection waits for the thread of the one it evicted to let go
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
                 b"Connection: close\r\n\r\n")


@dataclass(frozen=True)
class HttpLimits:
    """What one server allows each connection; the defaults are every Baton endpoint's."""

    max_connections: int = 32  # connections with a thread at once
    head_timeout_s: float = HTTP_HEAD_TIMEOUT_S  # to send a whole request head (and finish a TLS handshake)
    idle_timeout_s: float = HTTP_IDLE_TIMEOUT_S  # a write that moves no byte this long ends the connection
    # a body's floor, averaged over each window: the helper's own defaults (update.min_rate_*), below which it
    # gives up on the download itself
    min_rate_bytes_per_s: int = UpdateConfig.min_rate_bytes_per_s
    rate_window_s: float = UpdateConfig.min_rate_window_s

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {self.max_connections}")
        if self.min_rate_bytes_per_s < 0:
            raise ValueError(f"min_rate_bytes_per_s must not be negative, not {self.min_rate_bytes_per_s}")
        for name in ("head_timeout_s", "idle_timeout_s", "rate_window_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, not {value}")


class ClientTooSlow(TimeoutError):
    """A client took a body more slowly than ``min_rate_bytes_per_s`` over a window."""


class BoundedHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer with ``limits`` (given, or set on the class or the instance before ``__init__``)."""

    daemon_threads = True
    limits = HttpLimits()

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 bind_and_activate: bool = True, *, limits: HttpLimits | None = None) -> None:
        if limits is not None:
            self.limits = limits
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._threads_free = threading.BoundedSemaphore(self.limits.max_connections)
        self._waiting: dict[socket.socket, None] = {}  # connections waiting for a request head, oldest first
        self._waiting_lock = threading.Lock()
        super().__init__(address, handler, bind_and_activate)

    def waiting(self, conn: socket.socket, waits: bool) -> None:
        """Mark a connection as waiting for its request head (evictable) or not."""
        with self._waiting_lock:
            if waits:
                self._waiting[conn] = None
            else:
                self._waiting.pop(conn, None)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._take_thread():
            self._turn_away(request)
            return
        request.settimeout(self.limits.head_timeout_s)
        self.waiting(request, True)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.waiting(request, False)
            self._threads_free.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._threads_free.release()

    def shutdown_request(self, request: Any) -> None:
        self.waiting(request, False)  # before the close: an evictor never shuts down a reused descriptor
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line, not a traceback on stderr: a client that timed out or went away is not our error."""
        logger.debug("http {}: {}", client_address, sys.exc_info()[1])

    def _take_thread(self) -> bool:
        if self._threads_free.acquire(blocking=False):
            return True
        with self._waiting_lock:
            oldest = next(iter(self._waiting), None)
            if oldest is None:
                return False
            del self._waiting[oldest]
            # the socket module's own shutdown: an SSLSocket's would drop its TLS state under its thread
            with contextlib.suppress(OSError):
                socket.socket.shutdown(oldest, socket.SHUT_RDWR)
        logger.debug("http: every thread taken; closed the connection waiting longest for its request")
        return self._threads_free.acquire(timeout=EVICT_WAIT_S)

    def _turn_away(self, request: Any) -> None:
        if not isinstance(request, ssl.SSLSocket):  # nothing can be said before a TLS handshake
            with contextlib.suppress(OSError):
                request.send(BUSY_RESPONSE, socket.MSG_DONTWAIT)
        self.shutdown_request(request)


class _HeadReader(io.RawIOBase):
    """The socket's reading side, with a deadline for the request head."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.deadline: float | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request head did not arrive in time")
            self.sock.settimeout(left)
        return self.sock.recv_into(buf)


class BoundedRequestHandler(BaseHTTPRequestHandler):
    """Reads each request head under the server's deadline; after it, reads and writes under its idle timeout."""

    server: BoundedHTTPServer

    def setup(self) -> None:
        super().setup()
        self._head = _HeadReader(self.connection)
        self._head.deadline = time.monotonic() + self.server.limits.head_timeout_s
        self.rfile = io.BufferedReader(self._head)

    def handle_one_request(self) -> None:
        if self._head.deadline is None:  # a keep-alive connection waits for its next request
            self._head.deadline = time.monotonic() + self.server.limits.head_timeout_s
            self.server.waiting(self.connection, True)
        super().handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()  # reads the header lines
        self.server.waiting(self.connection, False)
        self._head.deadline = None
        self.connection.settimeout(self.server.limits.idle_timeout_s)
        return ok

    def send_range(self, f: io.BufferedIOBase, length: int, chunk: int) -> int:
        """Send ``length`` bytes of ``f`` from its position as the body; returns the bytes sent.

        Progress is what the client's TCP acknowledged, not what the kernel took into our send buffer (which
        holds megabytes on a fast path, and wakes a writer only once a third of it is free). Fewer bytes than
        ``length`` when the client went away or stalled: nothing acknowledged for ``idle_timeout_s``, or fewer
        than ``min_rate_bytes_per_s`` over a window; a stalled connection is then reset, dropping what is
        queued for it.
        """
        limits, conn = self.server.limits, self.connection
        buf = memoryview(bytearray(chunk))
        done = 0  # handed to the kernel
        now = time.monotonic()
        acked, acked_at = 0, now  # acknowledged by the client, and when that last grew
        since, base = now, 0  # the rate window's start
        conn.settimeout(PROGRESS_POLL_S)
        try:
            while done < length:
                n = f.readinto(buf[: min(chunk, length - done)])
                if not n:
                    break
                off = 0
                while off < n:
                    with contextlib.suppress(TimeoutError):  # no room yet: look at what the client took
                        sent = conn.send(buf[off:n])
                        off += sent
                        done += sent
                    now, delivered = time.monotonic(), done - _unacknowledged(conn)
                    if delivered > acked:
                        acked, acked_at = delivered, now
                    elif now - acked_at >= limits.idle_timeout_s:
                        raise TimeoutError(f"the client took no byte for {limits.idle_timeout_s:g} s")
                    if now - since >= limits.rate_window_s:
                        rate = (delivered - base) / (now - since)
                        if rate < limits.min_rate_bytes_per_s:
                            raise ClientTooSlow(f"{rate:.0f} bytes/s over {now - since:.0f} s, under the "
                                                f"{limits.min_rate_bytes_per_s} bytes/s floor")
                        since, base = now, delivered
        except TimeoutError as e:
            logger.info("http: cut the body to {} after {} of {} bytes: {}", self.address_string(), acked, length, e)
            with contextlib.suppress(OSError):  # close with a reset: the queued bytes go nowhere
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError as e:
            logger.info("http: lost {} after {} of {} bytes: {}", self.address_string(), done, length, e)
        finally:
            with contextlib.suppress(OSError):
                conn.settimeout(limits.idle_timeout_s)
        if done < length:  # the response is cut short: its connection carries nothing more
            self.close_connection = True
        return done


def _unacknowledged(conn: socket.socket) -> int:
    """Bytes written to a TCP socket that its peer has not acknowledged yet (SIOCOUTQ)."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:
        return 0
