"""The supervisor's standby helper: one helper started and loaded ahead of time, handed the next update.

The channel and its messages are in ``baton/standby.py``. This side binds ``<run_dir>/standby.sock``, starts
one standby through the same launcher as ``UpdateManager._spawn`` starts a helper (same command with
``--standby`` in place of ``--update-id``, own session, a transient unit under systemd), and keeps the
connection of the first one to say HELLO. :meth:`Standby.take` hands it an update id: ``None`` whenever no
standby is ready or the one there loaded code that is no longer on disk, and the caller then starts a helper
as before, so no update ever waits for a standby. A new standby is started only once no helper runs
(:meth:`Standby.refill`): its start would otherwise take CPU from the update under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path

from baton.front import bind_unix, peer_credentials
from baton.log import logger
from baton.standby import LOG_NAME, MAX_LINE_BYTES, Hello, Job, StandbyError, Taken, code_stamp, socket_path
from baton.strict_modes import log_opener
from supervisor.ports import Clock, HelperLauncher, ProcessDriver, ProcessWatch, Timer

TAKE_TIMEOUT_S = 1.0  # the standby answers a job at once; one that does not is not waited for
HELLO_TIMEOUT_S = 60.0  # a standby that has not said HELLO by then is given up on (another is started)
RESTART_DELAY_S = 1.0  # before starting another after one died while waiting
MAX_FAILED_STARTS = 3  # standbys in a row that died or never said HELLO: then none until the next start


class Standby:
    """:class:`supervisor.ports.StandbyHelpers`: standbys launched by ``launcher`` as a job's helper is (same
    transient unit under systemd), watched through ``processes``, timed by ``clock``."""

    def __init__(self, run_dir: Path, argv: Callable[[], list[str]], *, launcher: HelperLauncher,
                 processes: ProcessDriver, clock: Clock) -> None:
        """``argv()`` is the helper's command line with ``--standby`` (built when one is started)."""
        self.run_dir = run_dir
        self._argv = argv
        self._launcher = launcher
        self._processes = processes
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._children: dict[int, ProcessWatch] = {}  # launched, not handed out: ours to watch
        self._ready: tuple[socket.socket, Hello] | None = None
        self._starting: tuple[int, bool, Timer] | None = None  # pid launched, in a transient unit, HELLO deadline
        self._units = 0
        self._failed = 0
        self._closed = False

    @property
    def path(self) -> Path:
        return socket_path(self.run_dir)

    @property
    def ready_pid(self) -> int | None:
        return self._ready[1].pid if self._ready is not None else None

    def child_pids(self) -> list[int]:
        return list(self._children)

    def start(self) -> None:
        sock = bind_unix(self.path)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        sock.setblocking(False)
        self._listener = sock
        with open(self.run_dir / LOG_NAME, "ab", opener=log_opener):
            pass  # there from the start, as the socket is: the run directory does not change a second later
        self._loop.add_reader(sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop: a waiting standby sees the channel close and exits; the socket is removed if still ours."""
        self._closed = True
        self._retire()
        if self._starting is not None:
            self._starting[2].cancel()
        if self._listener is not None:
            self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:  # ours, not the next process's
                    os.unlink(self.path)
        for watch in self._children.values():
            watch.release()  # a waiting one exits on the closed channel; the stray reaper is stopping too
        self._children.clear()

    # ---- handing out a job -----------------------------------------------------------------------------

    def take(self, update_id: str) -> int | None:
        """Give ``update_id`` to the ready standby: its pid; None if there is none or it did not take it."""
        if self._ready is None:
            return None
        conn, hello = self._ready
        self._ready = None
        self._loop.remove_reader(conn.fileno())
        with conn:
            if hello.code != code_stamp():
                logger.info("standby helper pid {} runs code that has changed on disk since it started; retired",
                            hello.pid)
                return None
            try:
                conn.setblocking(True)
                conn.settimeout(TAKE_TIMEOUT_S)
                conn.sendall(Job(update_id).encode())
                taken = Taken.decode(_read_line(conn))
            except (OSError, StandbyError) as e:
                logger.warning("standby helper pid {} did not take update {}: {}", hello.pid, update_id, e)
                return None
        watch = self._children.pop(hello.pid, None)
        if watch is not None:  # our own child: the caller watches and reaps it from here on
            watch.release()
        return taken.pid

    def refill(self) -> None:
        if self._closed or self._ready is not None or self._starting is not None:
            return
        if self._failed >= MAX_FAILED_STARTS:
            return
        self._units += 1
        try:
            launched = self._launcher.launch(self._argv(), f"baton-helper-standby-{os.getpid()}-{self._units}",
                                             self.run_dir / LOG_NAME)
        except OSError as e:
            logger.warning("cannot start a standby helper: {}", e)
            self._failed += 1
            return
        pid = launched.pid
        watch = self._processes.watch(pid, lambda status: self._child_exited(pid, status))
        if watch is not None:
            self._children[pid] = watch
        self._starting = (pid, launched.transient_unit, self._clock.call_later(HELLO_TIMEOUT_S, self._no_hello))
        if watch is None:  # gone before it could be watched: as if it died at once
            self._loop.call_soon(self._child_exited, pid, None)
        logger.debug("standby helper: started pid {}", pid)

    # ---- events ------------------------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(True)
        conn.settimeout(TAKE_TIMEOUT_S)
        try:
            pid, uid, _gid = peer_credentials(conn)
            if uid not in (0, os.geteuid()):
                raise StandbyError(f"uid {uid} is neither root nor the supervisor's")
            hello = Hello.decode(_read_line(conn))
            if hello.pid != pid:
                raise StandbyError(f"HELLO names pid {hello.pid}, the peer is pid {pid}")
        except (OSError, StandbyError) as e:
            logger.warning("standby channel: refused a connection: {}", e)
            conn.close()
            return
        if self._ready is not None or self._closed:  # one is enough: this one exits when we hang up
            conn.close()
            return
        if self._starting is not None:
            self._starting[2].cancel()
            self._starting = None
        self._failed = 0
        self._ready = (conn, hello)
        self._loop.add_reader(conn.fileno(), self._hung_up)
        logger.info("standby helper pid {} is ready", hello.pid)

    def _hung_up(self) -> None:
        """The ready standby's channel became readable: it sends nothing unasked, so it has gone."""
        assert self._ready is not None
        logger.warning("standby helper pid {} went away while waiting; starting another in {:.0f} s",
                       self._ready[1].pid, RESTART_DELAY_S)
        self._retire()
        self._clock.call_later(RESTART_DELAY_S, self.refill)

    def _child_exited(self, pid: int, status: int | None) -> None:
        self._children.pop(pid, None)
        if self._closed or self._starting is None or self._starting[0] != pid:
            return  # a ready standby's exit is seen on its channel (_hung_up)
        _, transient_unit, deadline = self._starting
        if transient_unit and status == 0:
            return  # systemd-run's client: the unit runs; the standby's HELLO or its deadline tells the rest
        deadline.cancel()
        self._starting = None
        self._failed += 1
        logger.warning("standby helper pid {} exited (status {}) before it was ready", pid, status)
        self._clock.call_later(RESTART_DELAY_S, self.refill)

    def _no_hello(self) -> None:
        self._starting = None
        self._failed += 1
        logger.warning("standby helper: none said HELLO within {:.0f} s", HELLO_TIMEOUT_S)
        self.refill()

    def _retire(self) -> None:
        if self._ready is None:
            return
        conn, _ = self._ready
        self._ready = None
        self._loop.remove_reader(conn.fileno())
        conn.close()


def _read_line(conn: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(MAX_LINE_BYTES)
        if not chunk:
            raise StandbyError("the channel closed before a whole line")
        buf += chunk
        if len(buf) > MAX_LINE_BYTES:
            raise StandbyError("a line longer than 4 KiB")
    return buf

