"""The real collaborators of the supervisor's drivers (the interfaces are in ``supervisor/ports.py``).

- :class:`PosixProcesses`: agents are spawned by ``subprocess.Popen`` in a session of their own and watched
  through a pidfd, so the same code watches a child (exit status known) and a process adopted from an earlier
  supervisor (not ours to reap: status unknown).
- :class:`LoopClock`: the event loop's timers, ``time.time`` and ``time.monotonic``.
- :class:`SubprocessHelpers`: an update's helper, in a systemd transient unit under systemd.
- :class:`AioFilesReader`: journal records and progress files read off the event loop.

The daemon builds them once (``supervisor/daemon.py``); nothing else does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from baton.standby import FLAG as STANDBY_FLAG
from supervisor.adoption import parent_pid, process_start_time
from supervisor.agent_errors import AgentError
from supervisor.ports import LaunchedHelper, SpawnSpec

# An agent with limits starts as this shell, which waits on a pipe until the supervisor has put it in its cgroup
# and set its RLIMIT_NOFILE, then execs the command in the same process: the command never runs unlimited.
# (Popen's preexec_fn would run Python in a forked child of a threaded process; a pipe needs no code there.)
GATE_SHELL = "/bin/sh"
GATE_SCRIPT = 'read _ || exit 126; exec </dev/null; exec "$@"'  # the gate is its stdin (dash: fds 0-9 only)
GATE_EXIT = 126  # the supervisor went away before opening the gate: the command never ran


def reap(pidfd: int) -> int | None:
    """Reap the child behind ``pidfd``: its exit code, or minus the signal that ended it.

    None when there is no status to read: not our child (adopted across an exec), or already reaped.
    """
    try:
        res = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        return None
    if res is None:
        return None
    return res.si_status if res.si_code == os.CLD_EXITED else -res.si_status


def kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class PidfdWatch:
    """One process watched through its pidfd; ``popen`` (ours) gets its return code so Popen never reaps it."""

    __slots__ = ("_loop", "_on_exit", "_pidfd", "_popen", "is_child")

    def __init__(self, loop: asyncio.AbstractEventLoop, pidfd: int, popen: subprocess.Popen[bytes] | None,
                 is_child: bool, on_exit: Callable[[int | None], None]) -> None:
        self._loop = loop
        self._pidfd = pidfd
        self._popen = popen
        self.is_child = is_child
        self._on_exit = on_exit
        loop.add_reader(pidfd, self._exited)

    def _exited(self) -> None:
        self._loop.remove_reader(self._pidfd)
        status = reap(self._pidfd) if self.is_child else None
        os.close(self._pidfd)
        self._pidfd = -1
        if self._popen is not None:
            self._popen.returncode = status if status is not None else -1
            self._popen = None
        self._on_exit(status)

    def release(self) -> None:
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._popen is not None:
            self._popen.returncode = 0
            self._popen = None


class PosixProcesses:
    """:class:`supervisor.ports.ProcessDriver` on Linux (pidfds, process groups)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # spawned, not yet watched

    def track(self, popen: subprocess.Popen[bytes]) -> None:
        """A child started elsewhere (a helper): its watch settles its Popen."""
        self._children[popen.pid] = popen

    def spawn(self, spec: SpawnSpec) -> int:
        argv = list(spec.argv)
        if spec.limits.any:
            argv = [GATE_SHELL, "-c", GATE_SCRIPT, "baton-gate", *argv]
        ident = spec.identity
        out = os.open(spec.stdout, os.O_RDWR | os.O_CLOEXEC)
        err = os.open(spec.stderr, os.O_RDWR | os.O_CLOEXEC) if spec.stderr is not None else out
        gate_r, gate_w = os.pipe2(os.O_CLOEXEC) if spec.limits.any else (-1, -1)
        try:
            popen = subprocess.Popen(
                argv,
                stdin=gate_r if gate_r >= 0 else subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                cwd=str(spec.cwd),
                env=dict(spec.env),
                start_new_session=True,
                close_fds=True,
                user=ident.user,
                group=ident.group,
                extra_groups=ident.extra_groups,
                umask=ident.umask,
            )
        except BaseException:
            if gate_w >= 0:
                os.close(gate_w)
            raise
        finally:
            os.close(out)
            if err != out:
                os.close(err)
            if gate_r >= 0:
                os.close(gate_r)
        if gate_w >= 0:
            self._open_gate(popen, gate_w, spec)
        self._children[popen.pid] = popen
        return popen.pid

    @staticmethod
    def _open_gate(popen: subprocess.Popen[bytes], gate_w: int, spec: SpawnSpec) -> None:
        """Put the held child in its cgroup, give it its open-files limit, then let it exec its command; on a
        failure the child is killed (closing the pipe alone would let it exit with GATE_EXIT)."""
        try:
            if spec.cgroup is not None:
                spec.cgroup.enter(popen.pid)
            if n := spec.limits.open_files:
                resource.prlimit(popen.pid, resource.RLIMIT_NOFILE, (n, n))
            os.write(gate_w, b"\n")
        except OSError as e:
            kill_group(popen.pid, signal.SIGKILL)
            popen.wait()
            raise AgentError(f"cannot apply its limits: {e}") from None
        finally:
            os.close(gate_w)

    def watch(self, pid: int, on_exit: Callable[[int | None], None]) -> PidfdWatch | None:
        popen = self._children.pop(pid, None)
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        if popen is not None:
            return PidfdWatch(self._loop, pidfd, popen, True, on_exit)
        ppid = parent_pid(pid)  # adopted: ours to reap only if it is our child (we exec'd into its parent)
        if ppid is None:
            os.close(pidfd)
            return None
        return PidfdWatch(self._loop, pidfd, None, ppid == os.getpid(), on_exit)

    def start_time(self, pid: int) -> float | None:
        return process_start_time(pid)

    def kill_group(self, pgid: int, sig: int) -> None:
        kill_group(pgid, sig)

    def signal_group(self, pgid: int, sig: int) -> None:
        os.killpg(pgid, sig)

    def group_of(self, pid: int) -> int:
        return os.getpgid(pid)


class LoopClock:
    """:class:`supervisor.ports.Clock` on the running event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def call_later(self, delay_s: float, fn: Callable[..., object], *args: object) -> asyncio.TimerHandle:
        return self._loop.call_later(delay_s, fn, *args)

    async def sleep(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)


class SubprocessHelpers:
    """:class:`supervisor.ports.HelperLauncher`: helpers started by Popen (their watch is ``processes``')."""

    def __init__(self, processes: PosixProcesses) -> None:
        self._processes = processes

    def launch(self, argv: list[str], unit_name: str, log_path: Path) -> LaunchedHelper:
        from baton.strict_modes import log_opener
        from supervisor import systemd

        if systemd.under_systemd() and _which("systemd-run"):
            argv = systemd.transient_unit_argv(unit_name, log_path, argv)
        with open(log_path, "ab", opener=log_opener) as log:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, close_fds=True)
        self._processes.track(popen)
        return LaunchedHelper(popen.pid, argv[0] == "systemd-run")

    def is_running(self, pid: int, update_id: str, *, journaled_at: float) -> bool:
        import psutil  # only for a journaled helper pid: not resident in a supervisor that never updates

        try:
            proc = psutil.Process(pid)
            return proc.status() != psutil.STATUS_ZOMBIE and is_helper_of(proc.cmdline(), proc.create_time(),
                                                                         update_id, journaled_at=journaled_at)
        except psutil.Error:
            return False

    def signal(self, pid: int, update_id: str, sig: int, *, journaled_at: float) -> None:
        # a cancel only, so psutil is imported there (is_running): not resident in a supervisor that never updates
        if self.is_running(pid, update_id, journaled_at=journaled_at):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def is_helper_of(cmdline: list[str], started_at: float, update_id: str, *, journaled_at: float) -> bool:
    """Whether a live process (``cmdline``, started at ``started_at``) is the helper of ``update_id`` whose pid
    a record written at ``journaled_at`` names; a pid alone may have been reused.

    A helper launched for the update has its id in its command line; a standby that took it has ``--standby``
    there instead, and started before its pid was journaled (a second's slack: /proc's boot time is whole
    seconds).
    """
    if update_id in cmdline:
        return True
    return STANDBY_FLAG in cmdline and "apply" in cmdline and started_at <= journaled_at + 1.0


class AioFilesReader:
    """:class:`supervisor.ports.RecordReader`: a small file's bytes, read off the event loop by aiofiles."""

    async def read(self, path: Path) -> bytes:
        import aiofiles  # imported at the first read, not at start

        async with aiofiles.open(path, "rb") as f:
            return await f.read()


def _which(name: str) -> str | None:
    import shutil  # with bz2 and lzma, about 0.3 MiB: only when a helper is started under systemd

    return shutil.which(name)
