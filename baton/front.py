"""The public listening sockets, kept by us rather than by gRPC.

gRPC binds its own internal Unix socket in the private run directory; the
supervisor owns the public TCP and Unix listening sockets and splices each
accepted connection through. Owning the sockets is what lets a self-update hand
them to the next supervisor process (SCM_RIGHTS) so that clients queue in the
backlog instead of being refused, and what lets the Unix socket check its
peer's uid with SO_PEERCRED before a byte reaches gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from baton.errors import BatonError
from baton.log import logger
from baton.peer_label import Channel, peer_label
from baton.strict_modes import UnsafePath, check_dir, make_dirs

BACKLOG = 512
SPLICE_CHUNK = 64 * 1024  # one buffer per direction of a spliced connection
LINGER_S = 1.0  # how long a client may take to close after the backend's side ended
# A connection a Front accepted stays with the gRPC server behind it until the client closes it, and a call
# that reaches a gRPC server after its stop() began is CANCELLED (not retried). So a server behind a Front
# tells each connection GOAWAY once it is idle IDLE_GOAWAY_S or MAX_AGE_S old (gRPC's graceful GOAWAY: a call
# that crosses it is still answered, the client sends later ones on a new connection; a call in progress,
# such as a watch, carries on), and is stopped only after drain(): by then every connection it still has
# was told GOAWAY and carries no new call.
IDLE_GOAWAY_S = 0.5
MAX_AGE_S = 1.0
DRAIN_S = 1.5  # the longest drain: longer than MAX_AGE_S, so the GOAWAYs have been sent by its end
SERVER_OPTIONS = [("grpc.max_connection_idle_ms", int(IDLE_GOAWAY_S * 1000)),
                  ("grpc.max_connection_age_ms", int(MAX_AGE_S * 1000))]  # the supervisor's gRPC server


class ListenError(BatonError):
    pass


def bind_tcp(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {address}: {e.strerror}") from None
    sock.listen(BACKLOG)
    return sock


def bind_unix(path: Path, group: str = "") -> socket.socket:
    """Listen at ``path``, 0600 (0660 for a named group), in a directory only root (or our user) may change.

    Nothing is done by a name another user could reach: the directory is judged first
    (``baton/strict_modes.py``; ListenError names it). Without a group the umask gives the socket its mode as
    it is bound; with one, the socket is bound, given its group and mode inside a private directory of its
    own, and renamed into place (a rename replaces whatever is at ``path``, a planted symbolic link
    included, without following it).
    """
    path = Path(path)
    try:
        check_dir(path.parent)
        make_dirs(path.parent, 0o755)
    except (UnsafePath, OSError) as e:
        raise ListenError(f"cannot listen on {path}: {e}") from None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if group:
            _bind_with_group(sock, path, grp.getgrnam(group).gr_gid)
        else:
            old = os.umask(0o177)
            try:
                sock.bind(str(path))
            finally:
                os.umask(old)
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {e.strerror or e}") from None
    sock.listen(BACKLOG)
    return sock


def _bind_with_group(sock: socket.socket, path: Path, gid: int) -> None:
    """Bind, chown and chmod in a 0700 directory of our own beside ``path``, then rename the socket onto it.

    The staged name is no longer than ``path`` when its name has 11 characters or more: sun_path holds 107, and a
    path that fits must not fail for being staged."""
    private = path.parent / f".{os.urandom(4).hex()}"  # not tempfile: it would keep shutil's bz2 and lzma
    os.mkdir(private, 0o700)                            # resident (test_supervisor's memory test)
    staged = private / "s"
    try:
        sock.bind(str(staged))
        os.chown(staged, -1, gid)
        os.chmod(staged, 0o660)
        os.rename(staged, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(staged)  # only if the rename did not happen
        with contextlib.suppress(OSError):
            os.rmdir(private)


def unix_path(key: str, sock: socket.socket) -> str:
    """Where a listening Unix socket is: its config address (``unix:PATH``) or the name it was bound to."""
    return key.removeprefix("unix:") if key.startswith("unix:") else str(sock.getsockname())


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of a Unix socket peer."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


class UnixPeerPolicy:
    """Root, our own uid, or members of a configured group may use the local socket; some uids are operators."""

    def __init__(self, group: str = "", operator_uids: Iterable[int] = (0,)) -> None:
        self.uids = {0, os.getuid()}
        self.gid = grp.getgrnam(group).gr_gid if group else None
        self.operator_uids = frozenset(operator_uids)

    def channel(self, uid: int) -> Channel:
        """How supervisor/authz.py sees this allowed peer: an operator (grpc.allow_downgrade_uids) or not."""
        return Channel.OPERATOR if uid in self.operator_uids else Channel.LOCAL

    def allows(self, uid: int, gid: int, pid: int) -> bool:
        if uid in self.uids:
            return True
        if self.gid is None:
            return False
        if gid == self.gid:
            return True
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        return str(self.gid) in line.split()[1:]
        except OSError:
            return False
        return False


class CallerRegistry(Protocol):
    """Who is behind each backend connection, by the abstract address it is bound to (``supervisor.audit.Callers``)."""

    def bound_socket(self, caller: Any, channel: Channel) -> tuple[socket.socket, str]: ...

    def release(self, name: str) -> None: ...


class ConnectionAudit(Protocol):
    """What the front records about a connection (``supervisor.audit.AuditTrail``): kept to this much here, so
    that the front, which the helper's bridge uses too, does not import the supervisor's audit."""

    @property
    def callers(self) -> CallerRegistry: ...

    def local_caller(self, uid: int, pid: int) -> Any: ...

    def remote_caller(self, peername: Any) -> Any: ...

    async def refused_connection(self, caller: Any, why: str) -> None: ...


class Front:
    """Splices TCP connections to ``backend`` and Unix ones to ``local_backend`` (default: the same).

    The two backends are gRPC's TLS and local ports (``supervisor/authz.py``): a local peer that passed the
    SO_PEERCRED check needs no certificate, a TCP peer always does when TLS is configured. Each spliced
    connection is labelled with how it arrived (:func:`baton.peer_label.peer_label`), which the gRPC
    interceptor reads as the call's peer address.
    """

    def __init__(self, backend: Path, unix_policy: UnixPeerPolicy, local_backend: Path | None = None,
                 audit: ConnectionAudit | None = None) -> None:
        self.backend = backend
        self.audit = audit
        self.local_backend = local_backend or backend
        self.policy = unix_policy
        self.sockets: dict[str, socket.socket] = {}
        self._accepting: list[socket.socket] = []
        self._conns: set[asyncio.Task[None]] = set()

    async def serve(self, sockets: Iterable[tuple[str, socket.socket]]) -> None:
        """Accept on each (config address, listening socket); the sockets may be inherited.

        Our own accept, not asyncio's server: a connection asyncio has accepted but not yet handed to its
        handler is dropped when the server is closed (its ``_attach`` fails; Python 3.11), and at a
        handover that is a client, connecting at the switch, whose connection closes at once (gRPC then
        backs off, 1 s by default, or fails the call). Here a connection is ours, served to the end, from the
        moment it is accepted; what is not accepted stays in the backlog for the next owner of the socket.
        """
        loop = asyncio.get_running_loop()
        for key, s in sockets:
            self.sockets[key] = s
            s.setblocking(False)
            loop.add_reader(s.fileno(), self._accept, s)
            self._accepting.append(s)

    def addresses(self) -> list[str]:
        return list(self.sockets)

    def _accept(self, listener: socket.socket) -> None:
        """Take what waits in the backlog (at most BACKLOG at a time, so other callbacks get their turn)."""
        loop = asyncio.get_running_loop()
        for _ in range(BACKLOG):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors, or a connection reset while it waited
                logger.warning("accept: {}", e)
                return
            if conn.family != socket.AF_UNIX:  # as asyncio's server would, but it misses a socket it did not make
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (proto 0): no Nagle delay on replies
            self._conns.add(loop.create_task(self._serve_accepted(conn)))

    async def _serve_accepted(self, conn: socket.socket) -> None:
        task = asyncio.current_task()  # in self._conns since _accept made it
        assert task is not None
        name = ""
        backend_sock: socket.socket | None = None
        try:
            conn.setblocking(False)
            backend, channel = self.backend, Channel.INSECURE_TCP
            creds: tuple[int, int, int] | None = None  # (pid, uid, gid) of a local peer
            if conn.family == socket.AF_UNIX:
                creds = pid, uid, gid = peer_credentials(conn)
                if not self.policy.allows(uid, gid, pid):
                    logger.warning("refused local connection from pid {} uid {}: not allowed", pid, uid)
                    # Who it was is read before the close: a refused client exits at once, and its /proc with it.
                    caller = self.audit.local_caller(uid, pid) if self.audit is not None else None
                    conn.close()
                    if self.audit is not None:
                        await self.audit.refused_connection(
                            caller,
                            f"uid {uid} may not use the local socket (only root, uid {os.getuid()} or the members "
                            "of grpc.unix_socket_group)")
                    return
                backend, channel = self.local_backend, self.policy.channel(uid)
            try:
                backend_sock, name = await self._open_backend(backend, channel, creds, conn)
            except OSError as e:
                logger.error("gRPC backend unavailable: {}", e)
                return
            await _splice(conn, backend_sock)
        except asyncio.CancelledError:
            pass  # shutting down: end quietly (a cancelled handler task is logged by asyncio)
        except OSError as e:  # the peer gone before its credentials were read
            logger.warning("accepted connection unusable: {}", e)
        finally:
            conn.close()
            if backend_sock is not None:
                backend_sock.close()
            if self.audit is not None and name:
                self.audit.callers.release(name)
            self._conns.discard(task)

    async def _open_backend(self, backend: Path, channel: Channel, creds: tuple[int, int, int] | None,
                            conn: socket.socket) -> tuple[socket.socket, str]:
        """Connect to gRPC from an abstract address labelled with ``channel`` (what authz reads) and, with an
        audit trail, registered for the caller (supervisor/audit.py)."""
        if self.audit is None:
            return await _open_labelled(backend, channel), ""
        if creds is not None:
            caller = self.audit.local_caller(uid=creds[1], pid=creds[0])
        else:
            caller = self.audit.remote_caller(conn.getpeername())
        sock, name = self.audit.callers.bound_socket(caller, channel)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, str(backend))
        except BaseException:
            sock.close()
            self.audit.callers.release(name)
            raise
        return sock, name

    async def stop_accepting(self) -> None:
        """Stop accepting; the listening sockets stay open (connections wait in the backlog)."""
        loop = asyncio.get_running_loop()
        for s in self._accepting:
            loop.remove_reader(s.fileno())
        self._accepting.clear()

    async def drop_connections(self) -> None:
        """End the spliced connections still open (after their backend has stopped answering)."""
        conns = list(self._conns)
        for t in conns:
            t.cancel()
        await asyncio.gather(*conns, return_exceptions=True)

    async def close(self) -> None:
        await self.stop_accepting()
        for t in list(self._conns):
            t.cancel()
        for key, s in self.sockets.items():
            if s.family == socket.AF_UNIX:  # a socket with a group was renamed into place (bind_unix)
                with contextlib.suppress(OSError, FileNotFoundError):
                    os.unlink(unix_path(key, s))
            s.close()
        self.sockets.clear()

    def detach(self) -> list[tuple[str, socket.socket]]:
        """Hand the listening sockets over: stop accepting first (see stop_accepting)."""
        out = list(self.sockets.items())
        self.sockets.clear()
        return out

    async def drain(self, timeout_s: float = DRAIN_S) -> int:
        """Wait until every accepted connection has been closed, at most ``timeout_s``; returns how many are left.

        Call it after :meth:`stop_accepting` and before stopping the gRPC server behind: a client whose
        connection was accepted here may still send a call on it, and a call that reaches a gRPC server after
        its ``stop()`` began is CANCELLED, which clients do not retry; while the server runs, that call is
        answered. Clients with a fresh channel per call close at once; a kept channel is told GOAWAY (idle or
        old, see ``SERVER_OPTIONS``) and closes. What is left at the end has a call open (a watch), on a
        connection told GOAWAY: the server's stop grace ends that call, and no new one can arrive.
        """
        if self._conns:
            await asyncio.wait(set(self._conns), timeout=timeout_s)
        return len(self._conns)


async def _open_labelled(backend: Path, channel: Channel) -> socket.socket:
    """Connect to a gRPC port from an abstract address that names ``channel`` (the peer gRPC reports)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.setblocking(False)
        s.bind(peer_label(channel, os.urandom(8).hex()))  # what secrets.token_hex reads, without hashlib's memory
        await asyncio.get_running_loop().sock_connect(s, str(backend))
    except BaseException:
        s.close()
        raise
    return s


async def _splice(client: socket.socket, backend: socket.socket) -> None:
    """Copy both ways until the backend's side ends, deliver all of it, then end the client's side.

    Plain non-blocking sockets rather than asyncio's streams: a stream transport that fails to write (the
    backend closed just as a client's PING was on its way to it) stops reading as well, and what the backend
    had sent before it closed, a call's last message and its status, never reached the client (which saw
    its watch end UNAVAILABLE, "Socket closed"). Here a failed write ends only its own direction.
    """
    upstream = asyncio.get_running_loop().create_task(_upstream(client, backend))
    try:
        backend_ended = await _copy(backend, client)
    finally:
        upstream.cancel()
        await asyncio.gather(upstream, return_exceptions=True)
    if backend_ended:  # the backend said all it will: the client reads it, then EOF
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)
        await _linger(client)


async def _upstream(client: socket.socket, backend: socket.socket) -> None:
    """Client to backend; a client that ended (EOF or reset) is passed on as EOF, so gRPC closes its side."""
    if await _copy(client, backend):
        with contextlib.suppress(OSError):
            backend.shutdown(socket.SHUT_WR)


async def _copy(src: socket.socket, dst: socket.socket) -> bool:
    """Copy until one side ends; True when ``src`` ended (EOF or reset), False when ``dst`` took no more."""
    loop = asyncio.get_running_loop()
    buf = bytearray(SPLICE_CHUNK)
    view = memoryview(buf)
    while True:
        try:
            n = await loop.sock_recv_into(src, buf)
        except OSError:  # a reset: what it sent before was read first
            return True
        if not n:
            return True
        try:
            await loop.sock_sendall(dst, view[:n])
        except OSError:
            return False


async def _linger(sock: socket.socket) -> None:
    """Read and drop what the client still sends until it closes, at most LINGER_S: a TCP socket closed with
    unread data sends a reset, and a reset can cost the client what it had not yet read."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(LINGER_S):
            while await loop.sock_recv(sock, 4096):
                pass
