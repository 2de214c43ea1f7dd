"""The process manager: keeps each configured Agent running by its policy.

Every agent runs in its own session and process group. The supervisor watches
it through a pidfd, so the same code watches a child (exit status known) and an
agent adopted from an earlier supervisor process (exit status unknown, which the
restart policy treats as a failure). Output goes to a per-agent FIFO that the
agent holds open read-write: it never gets EPIPE while no supervisor runs, and
the supervisor of the moment drains it into a rotating log file.

State changes are guarded by :data:`baton.states.AGENT_TRANSITIONS` in
:meth:`Agent._set_state`, the only writer (``Agent.state`` is read-only); every
change is persisted to the agent table (one write per event-loop turn) so a
later supervisor process can adopt the agents instead of starting second
instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import grp
import os
import pwd
import resource
import signal
import socket
import stat
import subprocess
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path

from baton.agent_table import AgentRecord, AgentTable
from baton.config import AgentConfig, BrokenAgent, Config, signal_number
from baton.env_file import EnvFileError, read_env_file
from baton.errors import BatonError
from baton.layout import ComponentLayout, version_of_dir
from baton.limits import Limits
from baton.log import logger
from baton.log_stamps import LineStamper
from baton.rotating_log import RotatingLog
from baton.start_order import OrderError, start_order
from baton.states import AGENT_KEPT_STATES, AGENT_TRANSITIONS, AgentState, IllegalTransition, check_move
from baton.strict_modes import UnsafePath, check_dir, make_dirs
from supervisor.cgroups import AgentCgroup, CgroupError, CgroupHost
from supervisor.notify_socket import NotifySocket

F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20
KILL_WAIT_S = 5.0
STABLE_RUN_S = 30.0
FOLLOW_QUEUE_CHUNKS = 256  # a `tail -f` client this far behind is cut off rather than slowing the agent


class AgentError(BatonError):
    pass


class BadSignal(AgentError):
    pass


class UnknownAgent(AgentError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown agent {name!r}")
        self.name = name


class NotRunnable(UnknownAgent):
    """An agent whose config section is invalid: there is nothing to start, stop or signal until it is fixed."""

    def __init__(self, broken: BrokenAgent) -> None:
        AgentError.__init__(self, f"agent {broken.name!r} is not run: its config section is invalid: {broken.error}")
        self.name = broken.name


@dataclass(frozen=True)
class AgentSnapshot:
    name: str
    state: AgentState
    pid: int
    start_time: float
    restarts: int
    last_exit_status: int | None
    version: str
    last_error: str
    adopted: bool
    status_text: str
    kept: bool = False
    log_path: str = ""

    @property
    def last_exit_signal(self) -> str:
        """``SIGKILL`` for an exit by signal 9 (statuses are stored as -signal), else ""."""
        st = self.last_exit_status
        if st is None or st >= 0:
            return ""
        try:
            return signal.Signals(-st).name
        except ValueError:
            return f"signal {-st}"


def _proc_stat(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, ...); None if there is no such process.

    Read here rather than through psutil, which every spawn would otherwise import: it would stay resident in
    every supervisor (about 0.7 MiB) for two numbers.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:  # gone (ENOENT, ESRCH), or hidden from us
        return None
    return data[data.rfind(b")") + 2:].split()


def process_start_time(pid: int) -> float | None:
    """Seconds since the epoch, computed as psutil's ``create_time()`` is (the value is kept in the agent table
    and compared by other supervisor versions): starttime in clock ticks since boot, plus ``btime``."""
    fields = _proc_stat(pid)
    if fields is None:
        return None
    with open("/proc/stat", "rb") as f:
        btime = next(float(line.split()[1]) for line in f if line.startswith(b"btime"))
    return float(fields[19]) / os.sysconf("SC_CLK_TCK") + btime


def parent_pid(pid: int) -> int | None:
    """psutil's ``ppid()``: whether an adopted agent is our child (we reap it) or not (we only watch it)."""
    fields = _proc_stat(pid)
    return int(fields[1]) if fields is not None else None


START_TIME_TOLERANCE_S = 1.05  # /proc/stat's btime is whole seconds and moves by one as the clock is slewed


def same_process(pid: int, start_time: float) -> bool:
    """A pid names the same process only with the same kernel start time (pids are reused).

    The start time is ticks since boot plus ``btime``, and btime, whole seconds derived from the wall clock, can read
    one second apart in two processes (psutil's create_time() shows the same): with a tighter tolerance a supervisor
    taking over after a handover once saw none of its agents as the processes recorded and started every one again
    beside them. A pid reused within that second would need the whole pid space to wrap in it.
    """
    t = process_start_time(pid)
    return t is not None and abs(t - start_time) < START_TIME_TOLERANCE_S


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


def parse_signal(name: str) -> int:
    """``HUP``, ``SIGHUP`` or ``1`` -> 1, as kill(1) and supervisorctl accept them."""
    text = name.strip()
    try:
        num = int(text) if text.isdigit() else signal_number(text)
        return int(signal.Signals(num))
    except (KeyError, ValueError):
        raise BadSignal(f"unknown signal {name!r} (e.g. HUP, SIGUSR1, TERM)") from None


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class ExitSignal:
    """Set when an agent's process has exited, cleared when the next one is spawned.

    asyncio.Event's set, clear and wait, without its deque of waiters (0.8 KiB an agent, for a wait that is
    rare): one future, made by the first waiter, shielded so that a waiter that gives up cancels only itself.
    """

    __slots__ = ("_is_set", "_waiter")

    def __init__(self) -> None:
        self._is_set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._is_set = True
        if self._waiter is not None:
            if not self._waiter.done():
                self._waiter.set_result(None)
            self._waiter = None

    def clear(self) -> None:
        self._is_set = False

    async def wait(self) -> None:
        if self._is_set:
            return
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._waiter)


@dataclass
class Identity:
    """Popen's privilege-dropping arguments (None/-1: unchanged), and the account of ``user`` if one is set."""

    user: int | None = None
    group: int | None = None
    extra_groups: list[int] | None = None
    umask: int = -1
    account: pwd.struct_passwd | None = None

    @property
    def other_user(self) -> bool:
        """The agent runs as a user other than the supervisor's: it gets no part of our environment."""
        return self.account is not None and self.account.pw_uid != os.geteuid()


# What an agent run as another user finds in its environment besides its `env` (systemd's defaults).
AGENT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_LANG = "C.UTF-8"
INHERITED_ENV_DROPPED = ("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_", "INVOCATION_ID")  # systemd's, meant for us
# An agent with limits starts as this shell, which waits on a pipe until the supervisor has put it in its cgroup
# and set its RLIMIT_NOFILE, then execs the command in the same process: the command never runs unlimited.
# (Popen's preexec_fn would run Python in a forked child of a threaded process; a pipe needs no code there.)
GATE_SHELL = "/bin/sh"
GATE_SCRIPT = 'read _ || exit 126; exec </dev/null; exec "$@"'  # the gate is its stdin (dash: fds 0-9 only)
GATE_EXIT = 126  # the supervisor went away before opening the gate: the command never ran


@functools.cache
def cgroup_host() -> CgroupHost:
    """The controllers this supervisor process can use (found once: they change only with a restart)."""
    return CgroupHost.detect()


class Agent:
    # Slots, not a __dict__: past 30 attributes an instance dict no longer shares its keys (1.5 KiB each).
    __slots__ = ("_adopting", "_cgroup", "_config", "_err_fd", "_exited", "_fifo_fd", "_followers", "_is_child",
                 "_lock", "_loop", "_notify", "_on_change", "_pidfd", "_popen", "_stable_timer", "_stampers",
                 "_state", "_timer",
                 "adopted", "cfg", "consecutive_failures", "dir", "err_log", "kept", "last_error",
                 "last_exit_status", "layout", "log", "name", "pid", "restarts", "retiring", "start_time",
                 "status_text", "version")

    def __init__(self, cfg: AgentConfig, config: Config, on_change: Callable[[Agent], None]) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._config = config
        self._on_change = on_change
        self.dir = config.node.state_dir / "agents" / cfg.name
        self.layout = ComponentLayout(config.node.install_root, cfg.name)
        self.log = RotatingLog(config.log_dir / f"{cfg.name}.log", cfg.log_max_bytes, cfg.log_backups)
        self.err_log = (RotatingLog(config.log_dir / f"{cfg.name}.stderr.log", cfg.log_max_bytes, cfg.log_backups)
                        if cfg.stderr == "separate" else None)
        self.kept = False
        self.retiring = False  # leaving the config: being stopped for good, never started again
        self._adopting = False
        self._err_fd = -1
        self._followers: dict[bool, set[asyncio.Queue[bytes | None]]] = {}  # by stderr; filled by follow()
        self._state = AgentState.STOPPED
        self.pid = 0
        self.start_time = 0.0
        self.version = ""
        self.restarts = 0
        self.consecutive_failures = 0
        self.last_exit_status: int | None = None
        self.last_error = ""
        self.adopted = False
        self.status_text = ""
        self._popen: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._is_child = False
        self._timer: asyncio.TimerHandle | None = None
        self._stable_timer: asyncio.TimerHandle | None = None
        self._exited = ExitSignal()
        self._fifo_fd = -1
        self._notify: NotifySocket | None = None
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._cgroup: AgentCgroup | None = None
        # One per stream (by stderr), with log_timestamps: whether the next byte read starts a line.
        self._stampers: dict[bool, LineStamper] | None = ({False: LineStamper(), True: LineStamper()}
                                                          if cfg.log_timestamps else None)

    # ---- plumbing that lives as long as the supervisor -------------------------------------------

    @property
    def fifo_path(self) -> Path:
        return self.dir / "output.fifo"

    @property
    def notify_path(self) -> Path:
        """Where a process started now is told to notify: a directory of its own under ``Config.notify_dir``."""
        return self._config.notify_dir / self.name / "notify.sock"

    @property
    def legacy_notify_path(self) -> Path:
        """Where versions before round 3 bound it, in the state directory: an agent they started still uses it."""
        return self.dir / "notify.sock"

    @property
    def err_fifo_path(self) -> Path:
        return self.dir / "stderr.fifo"

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

    def open_channels(self, fifo_fd: int | None = None, notify_sock: object | None = None,
                      err_fd: int | None = None) -> None:
        """Open the output FIFO(s) and the notify socket (or take them over from a handover)."""
        make_dirs(self.dir.parent, 0o700)
        make_dirs(self.dir, 0o700)
        self._fifo_fd = self._open_fifo(self.fifo_path, fifo_fd, self._drain)
        if self.err_log is not None or err_fd is not None or self.err_fifo_path.exists():
            # With stderr merged by the config now, a running agent started with it separate may still write
            # to stderr.fifo: keep draining it (into the output log) so that the agent never blocks on it.
            self._err_fd = self._open_fifo(self.err_fifo_path, err_fd, self._drain_err)
        if self.cfg.notify:
            self._open_notify(notify_sock if isinstance(notify_sock, socket.socket) else None)

    def _open_notify(self, inherited: socket.socket | None) -> None:
        """Read the notify socket handed over (bound wherever its version bound it), else bind one.

        A socket left at the legacy path (a supervisor of an earlier version was killed, its agent lives on)
        is bound again there, so that the adopted process still reaches us; the next spawn moves to
        :attr:`notify_path` (:meth:`_spawn`).
        """
        legacy = inherited is None and stat.S_ISSOCK(_lstat_mode(self.legacy_notify_path))
        path = self.legacy_notify_path if legacy else self.notify_path
        owner = self._notify_owner()
        if inherited is None and not legacy:
            self._prepare_notify_dir(owner)
        self._notify = NotifySocket(path, self._on_notify, self._may_notify, f"agent {self.name}")
        self._notify.open(self._loop, inherited)
        if inherited is None and owner is not None:  # connect() needs write permission on the socket
            os.chown(path, *owner, follow_symlinks=False)

    def _notify_owner(self) -> tuple[int, int] | None:
        """(uid, gid) the agent runs as when it is not the supervisor's user, else None."""
        if not self.cfg.user:
            return None
        try:
            pw = pwd.getpwnam(self.cfg.user)
            gid = grp.getgrnam(self.cfg.group).gr_gid if self.cfg.group else pw.pw_gid
        except KeyError:
            return None  # the spawn fails with the name; the socket stays root's meanwhile
        return None if pw.pw_uid == os.geteuid() else (pw.pw_uid, gid)

    def _prepare_notify_dir(self, owner: tuple[int, int] | None) -> None:
        """``<notify_dir>/<name>/``: ours, reachable by the agent's group only (0710), or by us only (0700).

        Its parent is root's and 0711, so nobody but us can put anything in it and only its path is reachable:
        the state directory stays 0700. Opened without following a link and changed through the descriptor.
        """
        root = self._config.notify_dir
        make_dirs(root, 0o711)
        try:
            check_dir(root)
        except UnsafePath as e:
            raise AgentError(f"agent {self.name}: notify sockets' directory: {e}") from None
        d = root / self.name
        with contextlib.suppress(FileExistsError):
            os.mkdir(d, 0o700)
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                raise AgentError(f"agent {self.name}: {d} is not owned by the supervisor's user")
            os.fchown(fd, os.geteuid(), owner[1] if owner else os.getegid())
            os.fchmod(fd, 0o710 if owner else 0o700)
        finally:
            os.close(fd)

    def close_channels(self, unlink: bool = True) -> None:
        path = self._notify.path if self._notify is not None else None
        fd, sock, err_fd = self.detach_channels()
        for f in (fd, err_fd):
            if f >= 0:
                os.close(f)
        if sock is not None:
            sock.close()
            if unlink and path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                with contextlib.suppress(OSError):  # its own directory, if it is one (not the legacy one)
                    if path.parent == self.notify_path.parent:
                        os.rmdir(path.parent)
        self._end_followers()

    def detach_channels(self) -> tuple[int, socket.socket | None, int]:
        """Give the output FIFO(s) and notify socket away without closing them (a handover passes them on)."""
        fd, err_fd = self._fifo_fd, self._err_fd
        if fd >= 0:
            self._drain()
            self._loop.remove_reader(fd)
            self._fifo_fd = -1
        if err_fd >= 0:
            self._drain_err()
            self._loop.remove_reader(err_fd)
            self._err_fd = -1
        sock = self._notify.detach(self._loop) if self._notify is not None else None
        self._notify = None
        self.log.close()
        if self.err_log is not None:
            self.err_log.close()
        return fd, sock, err_fd

    def _drain(self) -> None:
        self._drain_fd(self._fifo_fd, self.log, False)

    def _drain_err(self) -> None:
        self._drain_fd(self._err_fd, self.err_log or self.log, self.err_log is not None)

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

    # ---- tail and clear ------------------------------------------------------------------------------

    def flush_output(self) -> None:
        """Drain what the agent wrote so far into its log files (before reading them)."""
        self._drain()
        self._drain_err()

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

    def _may_notify(self, pid: int) -> bool:
        """The kernel-reported sender is this agent's process (or, with notify_access = "group", of its group)."""
        if not self.pid or not self.state.has_process:
            return False
        if pid == self.pid:
            return True
        if self.cfg.notify_access != "group":
            return False
        try:
            return os.getpgid(pid) == self.pid  # the agent leads its own session and group (start_new_session)
        except OSError:  # gone already
            return False

    def _on_notify(self, fields: dict[str, str]) -> None:
        if "STATUS" in fields:
            self.status_text = fields["STATUS"]
        if fields.get("READY") == "1" and self.state is AgentState.STARTING:
            self._became_running()

    # ---- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> AgentState:
        """Read-only: every change goes through :meth:`_set_state` (or :meth:`restore_state`)."""
        return self._state

    def _set_state(self, new: AgentState) -> None:
        """Move to ``new`` (staying is a no-op); IllegalTransition if AGENT_TRANSITIONS has no such edge."""
        if new is self._state:
            return
        check_move(AGENT_TRANSITIONS, self._state, new, f"agent {self.name}")
        if not self._adopting:  # taking over a running process is one line (adopt), not a fake start
            logger.info("agent {} {} -> {}", self.name, self._state.value, new.value)
        self._state = new
        self._on_change(self)

    def restore_state(self, kept: AgentState) -> None:
        """Keep the state an earlier supervisor process left for an agent without a process (stopped stays
        stopped). Only a fresh agent (STOPPED, no process) restores, and only to AGENT_KEPT_STATES; not
        persisted here (the caller persists the whole table once every agent is set up)."""
        if self._state is not AgentState.STOPPED or self.pid or kept not in AGENT_KEPT_STATES:
            raise IllegalTransition(f"agent {self.name}: cannot restore {kept.value} in state "
                                    f"{self._state.value} (pid {self.pid})")
        if kept is not self._state:
            logger.info("agent {} {} -> {} (kept from the agent table)", self.name, self._state.value, kept.value)
        self._state = kept

    def snapshot(self) -> AgentSnapshot:
        return AgentSnapshot(
            name=self.name,
            state=self.state,
            pid=self.pid,
            start_time=self.start_time,
            restarts=self.restarts,
            last_exit_status=self.last_exit_status,
            version=self.version,
            last_error=self.last_error,
            adopted=self.adopted,
            status_text=self.status_text,
            kept=self.kept,
            log_path=str(self.log.path),
        )

    def record(self) -> AgentRecord:
        """What a successor needs: the process to adopt (pid 0: none), counters, and a state to keep."""
        return AgentRecord(
            name=self.name,
            pid=self.pid,
            start_time=self.start_time,
            version=self.version,
            restarts=self.restarts,
            consecutive_failures=self.consecutive_failures,
            state=self.state.value,
            stop_signal=self.cfg.stop_signal,
            stop_timeout_s=self.cfg.stop_timeout_s,
        )

    def _cancel_timers(self) -> None:
        for t in (self._timer, self._stable_timer):
            if t is not None:
                t.cancel()
        self._timer = self._stable_timer = None

    # ---- spawning and watching ---------------------------------------------------------------------

    def _resolve(self) -> tuple[Path, Path, str]:
        """The command, working directory and version to start now."""
        if not self.cfg.packaged:
            cwd = self.cfg.working_dir or Path("/")
            return Path(self.cfg.command), cwd, ""
        vdir = self.layout.current_dir()
        if vdir is None:
            raise AgentError(f"agent {self.name}: no version installed at {self.layout.current_link}")
        cmd = Path(self.cfg.command)
        if not cmd.is_absolute():
            cmd = vdir / cmd
        return cmd, self.cfg.working_dir or vdir, version_of_dir(vdir.name)

    def waiting_for_install(self) -> bool:
        """A packaged agent with no version installed: nothing to start until an update installs one."""
        return self.cfg.packaged and self.layout.current_dir() is None

    def _spawn(self) -> None:
        self._cancel_timers()
        if self.waiting_for_install():
            self.last_error = (f"no version installed yet; install its first with "
                               f"`supervisor update {self.name} --package FILE`")
            self._set_state(AgentState.NOT_INSTALLED)
            return
        try:
            cmd, cwd, version = self._resolve()
            if self._notify is not None and self._notify.path != self.notify_path:
                self._notify.close(self._loop)  # the legacy socket: the process that used it is gone
                self._open_notify(None)
            ident = self._identity()
            env = self._environment(ident, version)
            limits = self.cfg.limits(self._key)
            argv = [str(cmd), *self.cfg.args]
            if limits.any:
                if not os.access(cmd, os.X_OK):
                    raise AgentError(f"{cmd} is not an executable file")
                argv = [GATE_SHELL, "-c", GATE_SCRIPT, "baton-gate", *argv]
                self._cgroup = cgroup_host().prepare(self.name, limits, self._key) if limits.asked() else None
            out = os.open(self.fifo_path, os.O_RDWR | os.O_CLOEXEC)
            err = os.open(self.err_fifo_path, os.O_RDWR | os.O_CLOEXEC) if self.err_log is not None else out
            gate_r, gate_w = os.pipe2(os.O_CLOEXEC) if limits.any else (-1, -1)
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=gate_r if gate_r >= 0 else subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=str(cwd),
                    env=env,
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
                self._open_gate(popen, gate_w, limits)
        except (OSError, AgentError, CgroupError, EnvFileError) as e:
            self.last_error = f"cannot start: {e}"
            logger.error("agent {}: {}", self.name, self.last_error)
            self._set_state(AgentState.STARTING)
            self._after_exit(None, spawn_failed=True)
            return
        self._popen = popen
        self.pid = popen.pid
        self.start_time = process_start_time(popen.pid) or time.time()
        self.version = version
        self.adopted = False
        self.last_error = ""
        self.status_text = ""
        self._is_child = True
        if self._notify is not None:
            self._notify.forget_refused()
        self._watch(os.pidfd_open(popen.pid))
        self._set_state(AgentState.STARTING)
        logger.info("agent {} started pid {} version {}", self.name, self.pid, version or "-")
        if not self.cfg.notify:
            self._timer = self._loop.call_later(self.cfg.start_seconds, self._start_seconds_passed, self.pid)

    @property
    def _key(self) -> str:
        """This agent's section in the config (``agents[2]``), for errors naming a key."""
        i = next((i for i, a in enumerate(self._config.agents) if a.name == self.name), None)
        return f"agents[{i}]" if i is not None else f"agent {self.name}"

    def _open_gate(self, popen: subprocess.Popen[bytes], gate_w: int, limits: Limits) -> None:
        """Put the held child in its cgroup, give it its open-files limit, then let it exec its command; on a
        failure the child is killed (closing the pipe alone would let it exit with GATE_EXIT)."""
        try:
            if self._cgroup is not None:
                self._cgroup.enter(popen.pid)
            if limits.open_files:
                resource.prlimit(popen.pid, resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
            os.write(gate_w, b"\n")
        except OSError as e:
            _kill_group(popen.pid, signal.SIGKILL)
            popen.wait()
            raise AgentError(f"cannot apply its limits: {e}") from None
        finally:
            os.close(gate_w)

    def _environment(self, ident: Identity, version: str) -> dict[str, str]:
        """The agent's environment: ours (less systemd's own variables) for an agent of our user, only a minimal
        login-like set for one run as another user (a secret in root's environment is not theirs to read), then
        its configured ``env``, then Baton's variables."""
        pw = ident.account
        if pw is not None and ident.other_user:
            env = {"PATH": AGENT_PATH, "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
                   "SHELL": pw.pw_shell or "/bin/sh", "LANG": os.environ.get("LANG") or DEFAULT_LANG}
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED_ENV_DROPPED)}
            if pw is not None:
                env.update(USER=pw.pw_name, LOGNAME=pw.pw_name, HOME=pw.pw_dir)
        env.update(self.cfg.env)
        if self.cfg.env_file is not None:
            self._check_env_file()
            env.update(read_env_file(self.cfg.env_file, f"{self._key}.env_file"))
        env["BATON_AGENT_NAME"] = self.name
        env["BATON_AGENT_VERSION"] = version
        if self.cfg.notify:
            env["NOTIFY_SOCKET"] = str(self.notify_path)
        return env

    def _check_env_file(self) -> None:
        """The round-3 rule at every start, not only at check-config: the file may have been swapped since."""
        from baton.strict_modes import Kind, Trusted, check_trusted

        assert self.cfg.env_file is not None
        try:
            check_trusted(Trusted(f"{self._key}.env_file", self.cfg.env_file, Kind.FILE))
        except UnsafePath as e:
            raise AgentError(str(e)) from None

    def _identity(self) -> Identity:
        """Popen arguments that drop to ``user``/``group`` and set ``umask`` in the child before the exec.

        The output FIFOs are opened by us and inherited, so they need no permission; the notify socket is
        reached by path, so it is given to the agent's uid in a directory of its own (:meth:`_open_notify`).
        """
        umask = self.cfg.umask_value
        out = Identity(umask=-1 if umask is None else umask)
        if not self.cfg.user and not self.cfg.group:
            return out
        uid, gid = -1, -1
        try:
            pwd.getpwnam(self.cfg.user or "root")
            grp.getgrnam(self.cfg.group or "root")
        except KeyError as e:
            raise AgentError(f"no such user or group: {e}") from None
        if self.cfg.user:
            pw = pwd.getpwnam(self.cfg.user)
            uid, gid = pw.pw_uid, pw.pw_gid
            out.user = uid
            out.extra_groups = [g for g in os.getgrouplist(pw.pw_name, pw.pw_gid) if g != pw.pw_gid]
            out.account = pw
        if self.cfg.group:
            gid = grp.getgrnam(self.cfg.group).gr_gid
        out.group = gid
        return out

    def _watch(self, pidfd: int) -> None:
        self._pidfd = pidfd
        self._exited.clear()
        self._loop.add_reader(pidfd, self._process_exited)

    def _start_seconds_passed(self, pid: int) -> None:
        if self.state is AgentState.STARTING and self.pid == pid:
            self._became_running()

    def _became_running(self) -> None:
        self._cancel_timers()
        self._set_state(AgentState.RUNNING)
        self._stable_timer = self._loop.call_later(STABLE_RUN_S, self._stable)

    def _stable(self) -> None:
        if self.state is AgentState.RUNNING:
            self.consecutive_failures = 0

    def _process_exited(self) -> None:
        self._loop.remove_reader(self._pidfd)
        status = reap(self._pidfd) if self._is_child else None
        os.close(self._pidfd)
        self._pidfd = -1
        if self._popen is not None:
            self._popen.returncode = status if status is not None else -1
            self._popen = None
        pgid = self.pid
        self.pid = 0
        self.start_time = 0.0
        self._drain()
        _kill_group(pgid, signal.SIGKILL)
        self.last_exit_status = status
        self._exited.set()
        reason = self._cgroup.exit_reason(self.cfg.limits(self._key)) if self._cgroup is not None else ""
        logger.info("agent {} pid {} exited with {}{}", self.name, pgid,
                    "unknown status" if status is None else status, f" ({reason})" if reason else "")
        if self.state is AgentState.STOPPING:
            self._set_state(AgentState.STOPPED)
            return
        self._after_exit(status, reason=reason)

    def _after_exit(self, status: int | None, spawn_failed: bool = False, reason: str = "") -> None:
        was_starting = self.state is AgentState.STARTING
        self._cancel_timers()
        failure = spawn_failed or was_starting or status != 0
        if status is None and not spawn_failed:
            self.last_error = "exited (status unknown: adopted process)"
        elif not spawn_failed and failure:
            self.last_error = f"exited with status {status}" + (" before it was ready" if was_starting else "")
        if reason:
            self.last_error = f"{self.last_error}: {reason}" if self.last_error else reason
        policy = self.cfg.restart
        if policy == "never" or (policy == "on-failure" and not failure):
            self._set_state(AgentState.EXITED)
            return
        self.consecutive_failures += 1
        if self.consecutive_failures > self.cfg.start_retries:
            self.last_error = f"{self.last_error}; gave up after {self.consecutive_failures} failures in a row"
            logger.error("agent {} is FATAL: {}", self.name, self.last_error)
            self._set_state(AgentState.FATAL)
            return
        if self.consecutive_failures == 1 and not was_starting and not spawn_failed:
            # It had been running (and, if it failed before, then ran STABLE_RUN_S since): no reason to wait, as
            # supervisord restarts a running program at once. A second exit before STABLE_RUN_S backs off.
            self._set_state(AgentState.BACKOFF)
            self.restarts += 1
            killed_by = self.last_error
            self._spawn()
            if reason and self.state is AgentState.STARTING:  # a kill by a limit stays in sight after the restart
                self.last_error = f"restarted after: {killed_by}"
            logger.info("agent {} restarted at once (it had been running)", self.name)
            return
        delay = min(self.cfg.backoff_initial_s * 2 ** (self.consecutive_failures - 1), self.cfg.backoff_max_s)
        # The timer first: the delay counts from here, not from after the log lines and listeners below (it fires
        # in a later loop turn, when the state is BACKOFF).
        self._timer = self._loop.call_later(delay, self._restart_after_backoff)
        self._set_state(AgentState.BACKOFF)
        logger.info("agent {} restarts in {:.2f}s (failure {} in a row)", self.name, delay, self.consecutive_failures)

    def _restart_after_backoff(self) -> None:
        if self.state is AgentState.BACKOFF:
            self.restarts += 1
            self._spawn()

    # ---- adoption ------------------------------------------------------------------------------------

    def adopt(self, rec: AgentRecord) -> bool:
        """Take over a running agent left by an earlier supervisor process; False if it is gone."""
        if not same_process(rec.pid, rec.start_time):
            return False
        try:
            pidfd = os.pidfd_open(rec.pid)
        except ProcessLookupError:
            return False
        ppid = parent_pid(rec.pid)
        if ppid is None:
            os.close(pidfd)
            return False
        self._is_child = ppid == os.getpid()
        self.pid = rec.pid
        self.start_time = rec.start_time
        self.version = rec.version
        self.restarts = rec.restarts
        self.consecutive_failures = rec.consecutive_failures
        self.adopted = True
        if self.cfg.limits(self._key).asked():  # it stays in the cgroup it was started in
            self._cgroup = cgroup_host().group(self.name)
            self._cgroup.baseline()
        self._watch(pidfd)
        self._adopting = True
        try:
            self._set_state(AgentState.STARTING)
            if rec.state == AgentState.RUNNING.value:
                self._became_running()
            elif not self.cfg.notify:
                remaining = max(0.0, self.cfg.start_seconds - (time.time() - rec.start_time))
                self._timer = self._loop.call_later(remaining, self._start_seconds_passed, self.pid)
        finally:
            self._adopting = False
        logger.info("agent {} adopted pid {} ({}), {}", self.name, self.pid,
                    "child" if self._is_child else "non-child", self.state.value)
        return True

    def release(self) -> None:
        """Stop watching without touching the process (a handover passes it on)."""
        self._cancel_timers()
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        if self._popen is not None:
            self._popen.returncode = 0
            self._popen = None

    # ---- commands --------------------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._lock:
            self._refuse_if_retiring()
            if self.state in (AgentState.STARTING, AgentState.RUNNING):
                return
            if self.state is AgentState.STOPPING:
                await self._exited.wait()
            self.consecutive_failures = 0
            self._spawn()

    async def stop(self) -> None:
        async with self._lock:
            await self._stop()

    async def _stop(self) -> None:
        self._cancel_timers()
        if not self.state.has_process:
            if self.state is not AgentState.STOPPED:
                self._set_state(AgentState.STOPPED)
            return
        pgid = self.pid
        if self.state is not AgentState.STOPPING:
            self._set_state(AgentState.STOPPING)
        logger.info("agent {}: stopping pid {} with SIG{}", self.name, pgid, self.cfg.stop_signal)
        _kill_group(pgid, self.cfg.stop_signum)
        try:
            await asyncio.wait_for(self._exited.wait(), self.cfg.stop_timeout_s)
        except TimeoutError:
            logger.warning("agent {}: pid {} ignored SIG{} for {}s; killing its group", self.name, pgid,
                           self.cfg.stop_signal, self.cfg.stop_timeout_s)
            self.last_error = f"did not stop within {self.cfg.stop_timeout_s}s; killed"
            _kill_group(pgid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), KILL_WAIT_S)
        _kill_group(pgid, signal.SIGKILL)

    def send_signal(self, signum: int) -> None:
        """Signal the agent's process group (``supervisor signal HUP web``); an agent without a process refuses."""
        if not self.state.has_process or not self.pid:
            raise AgentError(f"agent {self.name} is {self.state.value}: no process to signal")
        logger.info("agent {}: sending {} to pid {}", self.name, signal.Signals(signum).name, self.pid)
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            raise AgentError(f"agent {self.name}: its process is gone") from None

    def remove_cgroup(self) -> None:
        """The agent left the config: its cgroup goes too (whatever is still in it is killed). Whatever its
        config says now: one retired while no supervisor ran is known only by its record, without its limits."""
        cgroup_host().group(self.name).remove()
        self._cgroup = None

    def _refuse_if_retiring(self) -> None:
        if self.retiring:
            raise AgentError(f"agent {self.name} left the config and is being stopped for good")

    async def restart(self) -> None:
        async with self._lock:
            self._refuse_if_retiring()
            await self._stop()
            self.consecutive_failures = 0
            self._spawn()

    async def wait_exit(self) -> None:
        await self._exited.wait()


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did, by agent name."""

    started: tuple[str, ...] = ()
    stopped: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()


def config_error_snapshot(broken: BrokenAgent) -> AgentSnapshot:
    """How an agent whose own config section is invalid is shown: no process, the one-line error as its note."""
    return AgentSnapshot(name=broken.name, state=AgentState.CONFIG_ERROR, pid=0, start_time=0.0, restarts=0,
                         last_exit_status=None, version="", last_error=broken.error, adopted=False, status_text="")


def retired_config(rec: AgentRecord) -> AgentConfig:
    """Enough of a config to stop an agent that the config no longer names: its recorded stop signal and timeout."""
    return AgentConfig(name=rec.name, command="", stop_signal=rec.stop_signal, stop_timeout_s=rec.stop_timeout_s,
                       autostart=False, restart="never")


LAZY_WRITE_S = 0.2  # how long a change that a crash may lose waits to share one table write with others


class ProcessManager:
    """All agents of this host, and the agent table that lets a successor adopt them.

    An agent that leaves the config (at start, or at a reload) is *retired*: it stays in ``agents`` (so
    ``status`` shows it stopping and the table keeps its pid across a crash) until its stop signal, and
    SIGKILL after its ``stop_timeout_s``, have ended it; only then is it forgotten.
    """

    def __init__(self, config: Config, on_change: Callable[[AgentSnapshot], None] | None = None) -> None:
        self.config = config
        self.table = AgentTable(config.node.state_dir / "agents.json")
        self._listeners: list[Callable[[AgentSnapshot], None]] = [on_change] if on_change else []
        self.agents: dict[str, Agent] = {}
        self._retiring: dict[str, asyncio.Task[None]] = {}
        self._waiting: dict[str, asyncio.Task[None]] = {}  # agents whose start waits on their `after`
        self._reload_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._flush: asyncio.Handle | None = None
        self._flush_urgent = False
        self._written_pids: dict[str, int] = {}
        self._written_ready: dict[str, int] = {}  # agent -> the pid last written as running

    def add_listener(self, fn: Callable[[AgentSnapshot], None]) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[AgentSnapshot], None]) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    def _changed(self, agent: Agent) -> None:
        self._persist_soon(agent)
        snap = agent.snapshot()
        for fn in self._listeners:
            fn(snap)

    def _persist_soon(self, agent: Agent) -> None:
        """Coalesce table writes; write soon what a crash must not lose (see baton/agent_table.py).

        A new pid, a state kept without a process, or a notify agent's READY (the kernel cannot tell a
        successor that it came, and the agent sends it once) is written at the start of the next event-loop turn,
        before any callback woken by the change (an awaited stop, a gRPC answer in a later turn): whoever
        learns of it learns of it after it is on disk. Anything else (running, backoff, stopping, counters)
        waits up to LAZY_WRITE_S and rides along, so the fsync is never between an agent's exit and its
        respawn, and 100 agents restarted together cost one write, not 100."""
        urgent = (agent.state in AGENT_KEPT_STATES or (agent.pid and agent.pid != self._written_pids.get(agent.name))
                  or (agent.state is AgentState.RUNNING and agent.cfg.notify
                      and self._written_ready.get(agent.name) != agent.pid))
        if self._flush is not None and (not urgent or self._flush_urgent):
            return
        if self._flush is not None:
            self._flush.cancel()
        self._flush_urgent = bool(urgent)
        self._flush = (self._loop.call_soon(self.persist) if urgent
                       else self._loop.call_later(LAZY_WRITE_S, self.persist))

    def persist(self) -> None:
        """Write the table now (durably, if it changed)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self.table.save([a.record() for a in self.agents.values()])
        self._written_pids = {a.name: a.pid for a in self.agents.values()}
        self._written_ready = {a.name: a.pid for a in self.agents.values() if a.state is AgentState.RUNNING}

    def get(self, name: str) -> Agent:
        try:
            return self.agents[name]
        except KeyError:
            broken = next((b for b in self.config.broken_agents if b.name == name), None)
            raise UnknownAgent(name) if broken is None else NotRunnable(broken) from None

    def snapshots(self) -> list[AgentSnapshot]:
        """Every agent, then each one whose config section is invalid (CONFIG_ERROR, never run)."""
        self._durable_before_shown()
        return [a.snapshot() for a in self.agents.values()] + [
            config_error_snapshot(b) for b in self.config.broken_agents if b.name not in self.agents]

    def snapshot(self, name: str) -> AgentSnapshot:
        """One agent as :meth:`snapshots` shows it; UnknownAgent if it is not (or no longer) here."""
        broken = next((b for b in self.config.broken_agents if b.name == name), None)
        if broken is not None and name not in self.agents:
            return config_error_snapshot(broken)
        agent = self.get(name)
        self._durable_before_shown()
        return agent.snapshot()

    async def watch(self, name: str, heartbeat_s: float) -> AsyncGenerator[AgentSnapshot, None]:
        """The agent now, then on each change (in the event-loop turn it happens), and at least every
        ``heartbeat_s``, which bounds any wait on a missed event; UnknownAgent if it is not (or no longer) here.

        Close it with ``contextlib.aclosing``: the change listener goes with it.
        """
        changed = asyncio.Event()

        def listener(snap: AgentSnapshot) -> None:
            if snap.name == name:
                changed.set()

        self.add_listener(listener)
        try:
            while True:
                changed.clear()  # before the snapshot: a change after it wakes the next wait
                yield self.snapshot(name)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), heartbeat_s)
        finally:
            self.remove_listener(listener)

    def _durable_before_shown(self) -> None:
        if self._flush is not None and self._flush_urgent:  # a pid shown is durable (adopted after a crash)
            self.persist()

    def states(self) -> list[AgentState]:
        """Every agent's state, without the write that :meth:`snapshots` may do first (no pid is shown)."""
        return [a.state for a in self.agents.values()]

    def configured(self) -> list[Agent]:
        """The agents of the config (not those being retired)."""
        return [a for n, a in self.agents.items() if n not in self._retiring]

    async def start(self, channels: dict[str, tuple[int | None, object | None, int | None]] | None = None,
                    records: list[AgentRecord] | None = None) -> None:
        """Adopt agents left running by an earlier process, then start the others that autostart.

        ``records`` and ``channels`` come from a handover (their agents are *kept*: shown as such, not as
        restarted); otherwise the persisted table is read and the channels are opened by path. Agents in the
        records but not in the config are adopted and retired.
        """
        handed_over = records is not None
        channels = channels or {}
        by_name = {r.name: r for r in (records if records is not None else self.table.load())}
        for cfg in self.config.agents:
            self._add(cfg, channels.get(cfg.name))
        for name, rec in by_name.items():
            if name in self.agents or not rec.pid or not same_process(rec.pid, rec.start_time):
                ch = channels.get(name)
                if name not in self.agents and ch is not None:
                    _close_channel_fds(ch)
                continue
            logger.warning("agent {} (pid {}) is no longer configured; stopping it", name, rec.pid)
            old = self._add(retired_config(rec), channels.get(name))
            if old.adopt(rec):
                old.kept = handed_over
                self._retire(old)
            else:
                old.close_channels()
                del self.agents[name]
        self._sort_agents()
        for name in list(self.agents):
            agent = self.agents[name]
            if name in self._retiring:
                continue
            prev = by_name.get(name)
            if prev is not None and prev.pid and agent.adopt(prev):
                agent.kept = handed_over
                continue
            if prev is not None:
                agent.restarts = prev.restarts
                if not prev.pid and prev.state in {s.value for s in AGENT_KEPT_STATES}:
                    agent.restore_state(AgentState(prev.state))
                    agent.consecutive_failures = prev.consecutive_failures
                    continue
            if agent.cfg.autostart:
                if prev is not None and not agent.waiting_for_install():
                    agent.restarts += 1
                self._spawn_in_order(agent)
        self.persist()

    # ---- start order ---------------------------------------------------------------------------------
    # Agents start in baton/start_order.py's order: by priority at once, and one with `after` only once each
    # agent it names has left "starting" (running, or given up); they stop in the reverse order.

    def _in_start_order(self) -> list[str]:
        """Every agent here, configured ones in start order, then the retired (their order no longer matters)."""
        order = [n for n in _start_order(self.config) if n in self.agents]
        return order + [n for n in self.agents if n not in order]

    def _sort_agents(self) -> None:
        """Keep ``agents`` in start order: status lists them so, and `supervisor stop all` stops them in reverse."""
        order = self._in_start_order()
        agents = dict(self.agents)
        self.agents.clear()
        self.agents.update((n, agents[n]) for n in order)

    def _spawn_in_order(self, agent: Agent) -> None:
        if not any(d in self.agents for d in agent.cfg.after):
            agent._spawn()
            return
        task = self._loop.create_task(self._spawn_after(agent))
        self._waiting[agent.name] = task
        task.add_done_callback(lambda t: self._waiting.pop(agent.name, None) if self._waiting.get(agent.name) is t
                               else None)

    async def _spawn_after(self, agent: Agent) -> None:
        deps = set(agent.cfg.after)
        changed = asyncio.Event()

        def listener(snap: AgentSnapshot) -> None:
            if snap.name in deps:
                changed.set()

        def starting() -> list[str]:
            return [d for d in deps if d in self._waiting
                    or (d in self.agents and self.agents[d].state in (AgentState.STARTING, AgentState.BACKOFF))]

        self.add_listener(listener)
        try:
            while pending := starting():
                logger.debug("agent {} waits for {} to start", agent.name, ", ".join(sorted(pending)))
                changed.clear()
                waits = [self._waiting[d] for d in pending if d in self._waiting]
                await (asyncio.wait(waits) if waits else changed.wait())
        finally:
            self.remove_listener(listener)
        if self.agents.get(agent.name) is agent and not agent.retiring and agent.state is AgentState.STOPPED:
            agent._spawn()  # not started meanwhile by a `supervisor start`

    def _add(self, cfg: AgentConfig, channels: tuple[int | None, object | None, int | None] | None) -> Agent:
        agent = Agent(cfg, self.config, self._changed)
        self.agents[cfg.name] = agent
        fifo_fd, notify_sock, err_fd = channels or (None, None, None)
        agent.open_channels(fifo_fd, notify_sock, err_fd)
        return agent

    def _retire(self, agent: Agent) -> asyncio.Task[None]:
        agent.retiring = True
        task = self._loop.create_task(self._stop_and_forget(agent))
        self._retiring[agent.name] = task
        return task

    async def _stop_and_forget(self, agent: Agent) -> None:
        try:
            await agent.stop()
            while agent.state.has_process:  # SIGKILLed but not yet reaped (a process in D state): keep waiting
                await agent.wait_exit()
            agent.close_channels()
            agent.remove_cgroup()
            if self.agents.get(agent.name) is agent:
                del self.agents[agent.name]
            logger.info("agent {} stopped and removed", agent.name)
        finally:
            if self._retiring.get(agent.name) is asyncio.current_task():
                del self._retiring[agent.name]
            self.persist()

    async def wait_retired(self) -> None:
        """Until every agent that left the config is gone (tests, shutdown)."""
        while self._retiring:
            await asyncio.gather(*list(self._retiring.values()), return_exceptions=True)

    async def reload(self, config: Config) -> ReloadResult:
        """Apply a new list of agents: start the new, retire the removed, restart the changed, leave the rest.

        ``config`` must differ from the current one only in ``agents`` (the daemon keeps the other sections
        until its next start). Returns once removed and changed agents have stopped and new ones were started.
        """
        async with self._reload_lock:
            old = {a.name: a for a in self.configured()}
            new = {c.name: c for c in config.agents}
            self.config = config
            removed = [n for n in old if n not in new]
            changed = [n for n in old if n in new and old[n].cfg != new[n]]
            added = [n for n in new if n not in old]
            unchanged = [n for n in old if n in new and old[n].cfg == new[n]]
            for name in removed + changed:
                logger.info("reload: {} agent {}", "stopping removed" if name in removed else "restarting changed",
                            name)
                self._retire(old[name])
            waits = [self._retiring[n] for n in removed + changed]
            waits += [t for n, t in self._retiring.items() if n in added]  # a name coming back
            await asyncio.gather(*waits, return_exceptions=True)
            for name in [n for n in _start_order(config) if n in changed + added]:
                agent = self._add(new[name], None)
                if name in changed:
                    agent.restarts = old[name].restarts
                if agent.cfg.autostart:
                    self._spawn_in_order(agent)
            for name in unchanged:
                old[name]._config = config
            self._sort_agents()
            self.persist()
            logger.info("reload: started {}, stopped {}, restarted {}, unchanged {}", added or "-",
                        removed or "-", changed or "-", len(unchanged))
            return ReloadResult(tuple(added), tuple(removed), tuple(changed), tuple(unchanged))

    async def stop_all(self) -> None:
        """Stop every agent, in the reverse of the start order: one stops once every agent that started after
        it (a higher priority number, or naming it in `after`) has stopped; the others at the same time."""
        for t in list(self._waiting.values()):
            t.cancel()
        stops: dict[str, asyncio.Task[None]] = {}
        cfgs = {a.name: a.cfg for a in self.agents.values()}
        for name in reversed(self._in_start_order()):
            later = [t for n, t in stops.items() if name in cfgs[n].after or cfgs[n].priority > cfgs[name].priority]
            stops[name] = self._loop.create_task(self._stop_after(self.agents[name], later))
        await asyncio.gather(*stops.values())
        await self.wait_retired()
        self.persist()
        for a in list(self.agents.values()):
            a.close_channels()

    @staticmethod
    async def _stop_after(agent: Agent, later: list[asyncio.Task[None]]) -> None:
        if later:
            await asyncio.wait(later)
        await agent.stop()

    def release_all(self) -> None:
        for t in list(self._waiting.values()):  # not started yet: the successor starts it in its turn
            t.cancel()
        for a in self.agents.values():
            a.release()
        for t in self._retiring.values():
            t.cancel()  # the next supervisor adopts and retires them again (their records are kept)
        self._retiring.clear()


def _start_order(config: Config) -> list[str]:
    """The agents' names in start order; the file's order if it has none (checked at load, so never expected:
    a start order must not be what keeps every agent from starting)."""
    try:
        return start_order(config.ordered_agents())
    except OrderError as e:
        logger.error("start order: {}; starting in the order of the file", e)
        return [a.name for a in config.agents]


def _lstat_mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


def _close_channel_fds(ch: tuple[int | None, object | None, int | None]) -> None:
    for fd in (ch[0], ch[2]):
        if fd is not None:
            os.close(fd)
    if isinstance(ch[1], socket.socket):
        ch[1].close()
