"""The process manager: keeps each configured Agent running by its policy.

Every agent runs in its own session and process group. The supervisor watches
it through a pidfd, so the same code watches a child (exit status known) and an
agent adopted from an earlier supervisor process (exit status unknown, which the
restart policy treats as a failure). Output goes to a per-agent FIFO that the
agent holds open read-write: it never gets EPIPE while no supervisor runs, and
the supervisor of the moment drains it into a rotating log file.

State changes are guarded by :data:`baton.states.AGENT_TRANSITIONS` in
:meth:`Agent._set_state`, the only writer (``Agent.state`` is read-only); every
change is persisted to the agent table so a later supervisor process can adopt
the agents instead of starting second instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
from loguru import logger

from baton.agent_table import AgentRecord, AgentTable
from baton.config import AgentConfig, Config
from baton.errors import BatonError
from baton.layout import ComponentLayout
from baton.states import AGENT_KEPT_STATES, AGENT_TRANSITIONS, AgentState, IllegalTransition, check_move
from supervisor.agent_log import RotatingLog
from supervisor.notify_socket import NotifySocket

F_SETPIPE_SZ = 1031
PIPE_BYTES = 1 << 20
KILL_WAIT_S = 5.0
STABLE_RUN_S = 30.0


class AgentError(BatonError):
    pass


class UnknownAgent(AgentError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown agent {name!r}")
        self.name = name


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


def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def same_process(pid: int, start_time: float) -> bool:
    """A pid names the same process only with the same kernel start time (pids are reused)."""
    t = process_start_time(pid)
    return t is not None and abs(t - start_time) < 0.05


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Agent:
    def __init__(self, cfg: AgentConfig, config: Config, on_change: Callable[[Agent], None]) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._config = config
        self._on_change = on_change
        self.dir = config.node.state_dir / "agents" / cfg.name
        self.layout = ComponentLayout(config.node.install_root, cfg.name)
        self.log = RotatingLog(config.log_dir / f"{cfg.name}.log", cfg.log_max_bytes, cfg.log_backups)
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
        self._exited = asyncio.Event()
        self._fifo_fd = -1
        self._notify: NotifySocket | None = None
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()

    # ---- plumbing that lives as long as the supervisor -------------------------------------------

    @property
    def fifo_path(self) -> Path:
        return self.dir / "output.fifo"

    @property
    def notify_path(self) -> Path:
        return self.dir / "notify.sock"

    def open_channels(self, fifo_fd: int | None = None, notify_sock: object | None = None) -> None:
        """Open the output FIFO and the notify socket (or take them over from a handover)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if fifo_fd is None:
            try:
                st = os.lstat(self.fifo_path)
                if not stat.S_ISFIFO(st.st_mode):
                    os.unlink(self.fifo_path)
                    os.mkfifo(self.fifo_path, 0o600)
            except FileNotFoundError:
                os.mkfifo(self.fifo_path, 0o600)
            fifo_fd = os.open(self.fifo_path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(fifo_fd, F_SETPIPE_SZ, PIPE_BYTES)
        os.set_blocking(fifo_fd, False)
        self._fifo_fd = fifo_fd
        self._loop.add_reader(fifo_fd, self._drain)
        if self.cfg.notify:
            self._notify = NotifySocket(self.notify_path, self._on_notify)
            self._notify.open(self._loop, notify_sock if isinstance(notify_sock, socket.socket) else None)

    def close_channels(self, unlink: bool = True) -> None:
        if self._fifo_fd >= 0:
            self._drain()
            self._loop.remove_reader(self._fifo_fd)
            os.close(self._fifo_fd)
            self._fifo_fd = -1
        if self._notify is not None:
            self._notify.close(self._loop, unlink=unlink)
            self._notify = None
        self.log.close()

    def detach_channels(self) -> tuple[int, socket.socket | None]:
        """Give the output FIFO and notify socket away without closing them (a handover passes them on)."""
        fd = self._fifo_fd
        if fd >= 0:
            self._drain()
            self._loop.remove_reader(fd)
            self._fifo_fd = -1
        sock = self._notify.detach(self._loop) if self._notify is not None else None
        self._notify = None
        self.log.close()
        return fd, sock

    def _drain(self) -> None:
        for _ in range(64):
            try:
                data = os.read(self._fifo_fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                return
            self.log.write(data)

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
        return cmd, self.cfg.working_dir or vdir, vdir.name

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
            env = dict(os.environ)
            for k in [k for k in env if k.startswith(("NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_", "INVOCATION_ID"))]:
                del env[k]
            env.update(self.cfg.env)
            env["BATON_AGENT_NAME"] = self.name
            env["BATON_AGENT_VERSION"] = version
            if self.cfg.notify:
                env["NOTIFY_SOCKET"] = str(self.notify_path)
            out = os.open(self.fifo_path, os.O_RDWR | os.O_CLOEXEC)
            try:
                popen = subprocess.Popen(
                    [str(cmd), *self.cfg.args],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    cwd=str(cwd),
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            finally:
                os.close(out)
        except (OSError, AgentError) as e:
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
        self._watch(os.pidfd_open(popen.pid))
        self._set_state(AgentState.STARTING)
        logger.info("agent {} started pid {} version {}", self.name, self.pid, version or "-")
        if not self.cfg.notify:
            self._timer = self._loop.call_later(self.cfg.start_seconds, self._start_seconds_passed, self.pid)

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
        status: int | None = None
        if self._is_child:
            try:
                res = os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                res = None
            if res is not None:
                status = res.si_status if res.si_code == os.CLD_EXITED else -res.si_status
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
        logger.info("agent {} pid {} exited with {}", self.name, pgid, "unknown status" if status is None else status)
        if self.state is AgentState.STOPPING:
            self._set_state(AgentState.STOPPED)
            return
        self._after_exit(status)

    def _after_exit(self, status: int | None, spawn_failed: bool = False) -> None:
        was_starting = self.state is AgentState.STARTING
        self._cancel_timers()
        failure = spawn_failed or was_starting or status != 0
        if status is None and not spawn_failed:
            self.last_error = "exited (status unknown: adopted process)"
        elif not spawn_failed and failure:
            self.last_error = f"exited with status {status}" + (" before it was ready" if was_starting else "")
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
        delay = min(self.cfg.backoff_initial_s * 2 ** (self.consecutive_failures - 1), self.cfg.backoff_max_s)
        self._set_state(AgentState.BACKOFF)
        logger.info("agent {} restarts in {:.2f}s (failure {} in a row)", self.name, delay, self.consecutive_failures)
        self._timer = self._loop.call_later(delay, self._restart_after_backoff)

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
        try:
            self._is_child = psutil.Process(rec.pid).ppid() == os.getpid()
        except psutil.NoSuchProcess:
            os.close(pidfd)
            return False
        self.pid = rec.pid
        self.start_time = rec.start_time
        self.version = rec.version
        self.restarts = rec.restarts
        self.consecutive_failures = rec.consecutive_failures
        self.adopted = True
        self._watch(pidfd)
        self._set_state(AgentState.STARTING)
        if rec.state == AgentState.RUNNING.value:
            self._became_running()
        elif not self.cfg.notify:
            remaining = max(0.0, self.cfg.start_seconds - (time.time() - rec.start_time))
            self._timer = self._loop.call_later(remaining, self._start_seconds_passed, self.pid)
        logger.info("agent {} adopted pid {} ({})", self.name, self.pid, "child" if self._is_child else "non-child")
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

    async def restart(self) -> None:
        async with self._lock:
            await self._stop()
            self.consecutive_failures = 0
            self._spawn()

    async def wait_exit(self) -> None:
        await self._exited.wait()


class ProcessManager:
    """All agents of this host, and the agent table that lets a successor adopt them."""

    def __init__(self, config: Config, on_change: Callable[[AgentSnapshot], None] | None = None) -> None:
        self.config = config
        self.table = AgentTable(config.node.state_dir / "agents.json")
        self._listeners: list[Callable[[AgentSnapshot], None]] = [on_change] if on_change else []
        self.agents: dict[str, Agent] = {}
        self._loop = asyncio.get_running_loop()

    def add_listener(self, fn: Callable[[AgentSnapshot], None]) -> None:
        self._listeners.append(fn)

    def _changed(self, agent: Agent) -> None:
        self.persist()
        snap = agent.snapshot()
        for fn in self._listeners:
            fn(snap)

    def persist(self) -> None:
        self.table.save([a.record() for a in self.agents.values()])

    def get(self, name: str) -> Agent:
        try:
            return self.agents[name]
        except KeyError:
            raise UnknownAgent(name) from None

    def snapshots(self) -> list[AgentSnapshot]:
        return [a.snapshot() for a in self.agents.values()]

    async def start(self, channels: dict[str, tuple[int | None, object | None]] | None = None,
                    records: list[AgentRecord] | None = None) -> None:
        """Adopt agents left running by an earlier process, then start the others that autostart.

        ``records`` and ``channels`` come from a handover; otherwise the persisted table is read and the
        channels are opened by path.
        """
        channels = channels or {}
        by_name = {r.name: r for r in (records if records is not None else self.table.load())}
        for cfg in self.config.agents:
            agent = Agent(cfg, self.config, self._changed)
            self.agents[cfg.name] = agent
            fifo_fd, notify_sock = channels.get(cfg.name, (None, None))
            agent.open_channels(fifo_fd, notify_sock)
        for name, rec in by_name.items():
            if name not in self.agents and rec.pid and same_process(rec.pid, rec.start_time):
                logger.warning("agent {} (pid {}) is no longer configured; stopping it", name, rec.pid)
                _kill_group(rec.pid, signal.SIGTERM)
        for name, agent in self.agents.items():
            prev = by_name.get(name)
            if prev is not None and prev.pid and agent.adopt(prev):
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
                agent._spawn()
        self.persist()

    async def stop_all(self) -> None:
        await asyncio.gather(*(a.stop() for a in self.agents.values()))
        self.persist()
        for a in self.agents.values():
            a.close_channels()

    def release_all(self) -> None:
        for a in self.agents.values():
            a.release()
