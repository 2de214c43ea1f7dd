"""An agent's output: the FIFO(s) it writes to, drained into its rotating log file(s) and to `tail -f` readers.

The agent holds its FIFO open read-write, so it never gets EPIPE while no supervisor runs; the supervisor of
the moment drains it (a handover passes the open FIFO on). With ``stderr = "separate"`` stderr has a FIFO and a
log of its own; with ``log_timestamps`` each line is stamped as it is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import stat
from collections.abc import Callable
from pathlib import Path

from baton.config import AgentConfig, Config
from baton.log_stamps import LineStamper
from baton.rotating_log import RotatingLog
from supervisor.agent_errors import AgentError

F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20
FOLLOW_QUEUE_CHUNKS = 256  # a `tail -f` client this far behind is cut off rather than slowing the agent


class AgentOutput:
    __slots__ = ("_err_fd", "_fifo_fd", "_followers", "_loop", "_stampers", "dir", "err_log", "log", "name")

    def __init__(self, cfg: AgentConfig, config: Config, agent_dir: Path) -> None:
        self.name = cfg.name
        self.dir = agent_dir
        self.log = RotatingLog(config.log_dir / f"{cfg.name}.log", cfg.log_max_bytes, cfg.log_backups)
        self.err_log = (RotatingLog(config.log_dir / f"{cfg.name}.stderr.log", cfg.log_max_bytes, cfg.log_backups)
                        if cfg.stderr == "separate" else None)
        self._fifo_fd = -1
        self._err_fd = -1
        self._followers: dict[bool, set[asyncio.Queue[bytes | None]]] = {}  # by stderr; filled by follow()
        self._loop = asyncio.get_running_loop()
        # One per stream (by stderr), with log_timestamps: whether the next byte read starts a line.
        self._stampers: dict[bool, LineStamper] | None = ({False: LineStamper(), True: LineStamper()}
                                                          if cfg.log_timestamps else None)

    @property
    def fifo_path(self) -> Path:
        return self.dir / "output.fifo"

    @property
    def err_fifo_path(self) -> Path:
        return self.dir / "stderr.fifo"

    @property
    def stderr_path(self) -> Path | None:
        """Where a process started now writes stderr: its own FIFO, or None (into the output FIFO)."""
        return self.err_fifo_path if self.err_log is not None else None

    def open(self, fifo_fd: int | None, err_fd: int | None) -> None:
        """Open the FIFO(s) (or take them over from a handover) and start draining them."""
        self._fifo_fd = self._open_fifo(self.fifo_path, fifo_fd, self.drain)
        if self.err_log is not None or err_fd is not None or self.err_fifo_path.exists():
            # With stderr merged by the config now, a running agent started with it separate may still write
            # to stderr.fifo: keep draining it (into the output log) so that the agent never blocks on it.
            self._err_fd = self._open_fifo(self.err_fifo_path, err_fd, self._drain_err)

    def _open_fifo(self, path: Path, fd: int | None, drain: Callable[[], None]) -> int:
        if fd is None:
            try:
                st = os.lstat(path)
                if not stat.S_ISFIFO(st.st_mode):
                    os.unlink(path)
                    os.mkfifo(path, 0o600)
            except FileNotFoundError:
                os.mkfifo(path, 0o600)
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_BYTES)
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, drain)
        return fd

    def detach(self) -> tuple[int, int]:
        """Stop draining and give the FIFOs' descriptors away without closing them (-1: none); close the logs."""
        fd, err_fd = self._fifo_fd, self._err_fd
        if fd >= 0:
            self.drain()
            self._loop.remove_reader(fd)
            self._fifo_fd = -1
        if err_fd >= 0:
            self._drain_err()
            self._loop.remove_reader(err_fd)
            self._err_fd = -1
        self.log.close()
        if self.err_log is not None:
            self.err_log.close()
        return fd, err_fd

    def close(self) -> None:
        for f in self.detach():
            if f >= 0:
                os.close(f)
        self._end_followers()

    def drain(self) -> None:
        self._drain_fd(self._fifo_fd, self.log, False)

    def _drain_err(self) -> None:
        self._drain_fd(self._err_fd, self.err_log or self.log, self.err_log is not None)

    def flush(self) -> None:
        """Drain what the agent wrote so far into its log files (before reading them)."""
        self.drain()
        self._drain_err()

    def _drain_fd(self, fd: int, log: RotatingLog, stderr: bool) -> None:
        if fd < 0:
            return
        for _ in range(64):
            try:
                data = os.read(fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                return
            if self._stampers is not None:
                data = self._stampers[stderr].stamp(data)
            log.write(data)
            followers = self._followers.get(stderr)
            if not followers:
                continue
            for q in list(followers):
                try:
                    q.put_nowait(data)
                except asyncio.QueueFull:
                    followers.discard(q)
                    with contextlib.suppress(asyncio.QueueEmpty):
                        q.get_nowait()
                    q.put_nowait(None)

    def log_for(self, stderr: bool) -> RotatingLog:
        if not stderr:
            return self.log
        if self.err_log is None:
            raise AgentError(f"agent {self.name} writes stderr into its output log (set stderr = \"separate\")")
        return self.err_log

    def follow(self, stderr: bool) -> asyncio.Queue[bytes | None]:
        """A queue of every new chunk of output; None ends it (the agent was removed or the reader fell behind)."""
        self.log_for(stderr)
        q: asyncio.Queue[bytes | None] = asyncio.Queue(FOLLOW_QUEUE_CHUNKS)
        self._followers.setdefault(stderr, set()).add(q)
        return q

    def unfollow(self, q: asyncio.Queue[bytes | None]) -> None:
        for qs in self._followers.values():
            qs.discard(q)

    def _end_followers(self) -> None:
        for qs in self._followers.values():
            for q in qs:
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(None)
            qs.clear()
