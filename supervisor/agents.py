"""The process manager: keeps each configured Agent running by its policy.

Every agent runs in its own session and process group, watched through the process driver
(``supervisor/ports.py``; the real one, ``supervisor/processes.py``, watches a pidfd, so the same code watches a
child and an agent adopted from an earlier supervisor process, whose exit status is unknown and which the
restart policy treats as a failure). An :class:`Agent` holds the state and wires its parts, each in a module
named for its job: output (``agent_output.py``), what it starts with (``agent_spawn.py``), when it starts again
(``restart_policy.py``), how a running one is recognised (``adoption.py``) and how it stops (``agent_stop.py``).

State changes are guarded by :data:`baton.states.AGENT_TRANSITIONS` in
:meth:`Agent._set_state`, the only writer (``Agent.state`` is read-only); every
change is persisted to the agent table (one write per event-loop turn) so a
later supervisor process can adopt the agents instead of starting second
instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path

from baton.agent_table import AgentRecord, AgentTable
from baton.config import AgentConfig, BrokenAgent, Config, signal_number
from baton.env_file import EnvFileError
from baton.layout import ComponentLayout
from baton.log import logger
from baton.rotating_log import RotatingLog
from baton.start_order import OrderError, start_order
from baton.states import AGENT_KEPT_STATES, AGENT_TRANSITIONS, AgentState, IllegalTransition, check_move
from baton.strict_modes import make_dirs
from supervisor import adoption, agent_spawn
from supervisor.agent_errors import AgentError, BadSignal, NotRunnable, UnknownAgent
from supervisor.agent_notify import AgentNotify, notify_path
from supervisor.agent_output import AgentOutput
from supervisor.agent_stop import ExitSignal, stop_group
from supervisor.cgroups import AgentCgroup, CgroupError
from supervisor.ports import Clock, ProcessDriver, ProcessWatch, Timer
from supervisor.restart_policy import STABLE_RUN_S, Action, RestartPolicy


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


def parse_signal(name: str) -> int:
    """``HUP``, ``SIGHUP`` or ``1`` -> 1, as kill(1) and supervisorctl accept them."""
    text = name.strip()
    try:
        num = int(text) if text.isdigit() else signal_number(text)
        return int(signal.Signals(num))
    except (KeyError, ValueError):
        raise BadSignal(f"unknown signal {name!r} (e.g. HUP, SIGUSR1, TERM)") from None


class Agent:
    """One configured agent: its state (guarded by AGENT_TRANSITIONS) and the wiring of its parts.

    Its output is :class:`~supervisor.agent_output.AgentOutput`'s, what it starts with ``agent_spawn``'s, when
    it starts again :class:`~supervisor.restart_policy.RestartPolicy`'s, how it stops ``agent_stop``'s and how a
    running one is recognised ``adoption``'s; processes and time come from ``processes`` and ``clock``.
    """

    # Slots, not a __dict__: past 30 attributes an instance dict no longer shares its keys (1.5 KiB each).
    __slots__ = ("_adopting", "_cgroup", "_clock", "_config", "_exited", "_lock", "_loop", "_notify", "_on_change",
                 "_processes", "_stable_timer", "_state", "_timer", "_watch",
                 "adopted", "cfg", "consecutive_failures", "dir", "kept", "last_error", "last_exit_status",
                 "layout", "name", "output", "pid", "policy", "restarts", "retiring", "start_time", "status_text",
                 "version")

    def __init__(self, cfg: AgentConfig, config: Config, on_change: Callable[[Agent], None],
                 processes: ProcessDriver, clock: Clock) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._config = config
        self._on_change = on_change
        self._processes = processes
        self._clock = clock
        self.dir = config.node.state_dir / "agents" / cfg.name
        self.layout = ComponentLayout(config.node.install_root, cfg.name)
        self.output = AgentOutput(cfg, config, self.dir)
        self.policy = RestartPolicy.of(cfg)
        self.kept = False
        self.retiring = False  # leaving the config: being stopped for good, never started again
        self._adopting = False
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
        self._watch: ProcessWatch | None = None
        self._timer: Timer | None = None
        self._stable_timer: Timer | None = None
        self._exited = ExitSignal()
        self._notify: AgentNotify | None = None
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._cgroup: AgentCgroup | None = None

    # ---- plumbing that lives as long as the supervisor -------------------------------------------

    @property
    def log(self) -> RotatingLog:
        return self.output.log

    @property
    def err_log(self) -> RotatingLog | None:
        return self.output.err_log

    @property
    def notify_path(self) -> Path:
        return notify_path(self._config, self.name)

    def configure(self, config: Config) -> None:
        """The config after a reload that left this agent unchanged."""
        self._config = config
        if self._notify is not None:
            self._notify.configure(config)

    def open_channels(self, fifo_fd: int | None = None, notify_sock: object | None = None,
                      err_fd: int | None = None) -> None:
        """Open the output FIFO(s) and the notify socket (or take them over from a handover)."""
        make_dirs(self.dir.parent, 0o700)
        make_dirs(self.dir, 0o700)
        self.output.open(fifo_fd, err_fd)
        if self.cfg.notify:
            self._notify = AgentNotify(self.cfg, self._config, self.dir, self._on_notify, self._may_notify)
            self._notify.open(notify_sock if isinstance(notify_sock, socket.socket) else None)

    def close_channels(self, unlink: bool = True) -> None:
        if self._notify is not None:
            self._notify.close(unlink)
            self._notify = None
        self.output.close()

    def detach_channels(self) -> tuple[int, socket.socket | None, int]:
        """Give the output FIFO(s) and notify socket away without closing them (a handover passes them on)."""
        sock = self._notify.detach() if self._notify is not None else None
        self._notify = None
        fd, err_fd = self.output.detach()
        return fd, sock, err_fd

    # ---- tail and clear ------------------------------------------------------------------------------

    def flush_output(self) -> None:
        """Drain what the agent wrote so far into its log files (before reading them)."""
        self.output.flush()

    def log_for(self, stderr: bool) -> RotatingLog:
        return self.output.log_for(stderr)

    def follow(self, stderr: bool) -> asyncio.Queue[bytes | None]:
        """A queue of every new chunk of output; None ends it (the agent was removed or the reader fell behind)."""
        return self.output.follow(stderr)

    def unfollow(self, q: asyncio.Queue[bytes | None]) -> None:
        self.output.unfollow(q)

    def _may_notify(self, pid: int) -> bool:
        """The kernel-reported sender is this agent's process (or, with notify_access = "group", of its group)."""
        if not self.pid or not self.state.has_process:
            return False
        if pid == self.pid:
            return True
        if self.cfg.notify_access != "group":
            return False
        try:
            return self._processes.group_of(pid) == self.pid  # the agent leads its own session and group
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

    def waiting_for_install(self) -> bool:
        """A packaged agent with no version installed: nothing to start until an update installs one."""
        return agent_spawn.waiting_for_install(self.cfg, self.layout)

    def _spawn(self) -> None:
        self._cancel_timers()
        if self.waiting_for_install():
            self.last_error = (f"no version installed yet; install its first with "
                               f"`supervisor update {self.name} --package FILE`")
            self._set_state(AgentState.NOT_INSTALLED)
            return
        try:
            cmd, cwd, version = agent_spawn.resolve(self.cfg, self.layout)
            if self._notify is not None:
                self._notify.before_spawn()
            spec, cgroup = agent_spawn.spawn_spec(self.cfg, self._key, cmd, cwd, version, self.output.fifo_path,
                                                  self.output.stderr_path, self.notify_path)
            if spec.limits.any:
                self._cgroup = cgroup
            pid = self._processes.spawn(spec)
        except (OSError, AgentError, CgroupError, EnvFileError) as e:
            self.last_error = f"cannot start: {e}"
            logger.error("agent {}: {}", self.name, self.last_error)
            self._set_state(AgentState.STARTING)
            self._after_exit(None, spawn_failed=True)
            return
        self.pid = pid
        self.start_time = self._processes.start_time(pid) or self._clock.time()
        self.version = version
        self.adopted = False
        self.last_error = ""
        self.status_text = ""
        if self._notify is not None:
            self._notify.spawned()
        self._watching(self._processes.watch(pid, self._process_exited))
        self._set_state(AgentState.STARTING)
        logger.info("agent {} started pid {} version {}", self.name, self.pid, version or "-")
        if not self.cfg.notify:
            self._timer = self._clock.call_later(self.cfg.start_seconds, self._start_seconds_passed, self.pid)

    @property
    def _key(self) -> str:
        """This agent's section in the config (``agents[2]``), for errors naming a key."""
        i = next((i for i, a in enumerate(self._config.agents) if a.name == self.name), None)
        return f"agents[{i}]" if i is not None else f"agent {self.name}"

    def _watching(self, watch: ProcessWatch | None) -> None:
        self._watch = watch
        self._exited.clear()
        if watch is None:  # gone between its spawn and the watch: its exit status is lost with it
            self._loop.call_soon(self._process_exited, None)

    def _start_seconds_passed(self, pid: int) -> None:
        if self.state is AgentState.STARTING and self.pid == pid:
            self._became_running()

    def _became_running(self) -> None:
        self._cancel_timers()
        self._set_state(AgentState.RUNNING)
        self._stable_timer = self._clock.call_later(STABLE_RUN_S, self._stable)

    def _stable(self) -> None:
        if self.state is AgentState.RUNNING:
            self.consecutive_failures = 0

    def _process_exited(self, status: int | None) -> None:
        self._watch = None
        pgid = self.pid
        self.pid = 0
        self.start_time = 0.0
        self.output.drain()
        self._processes.kill_group(pgid, signal.SIGKILL)
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
        if status is None and not spawn_failed:
            self.last_error = "exited (status unknown: adopted process)"
        elif not spawn_failed and self.policy.is_failure(status, was_starting, spawn_failed):
            self.last_error = f"exited with status {status}" + (" before it was ready" if was_starting else "")
        if reason:
            self.last_error = f"{self.last_error}: {reason}" if self.last_error else reason
        decision = self.policy.after_exit(self.consecutive_failures, status, was_starting, spawn_failed)
        if decision.action is Action.EXIT:
            self._set_state(AgentState.EXITED)
            return
        self.consecutive_failures = decision.failures
        if decision.action is Action.FATAL:
            self.last_error = f"{self.last_error}; gave up after {self.consecutive_failures} failures in a row"
            logger.error("agent {} is FATAL: {}", self.name, self.last_error)
            self._set_state(AgentState.FATAL)
            return
        if decision.action is Action.RESTART_NOW:
            self._set_state(AgentState.BACKOFF)
            self.restarts += 1
            killed_by = self.last_error
            self._spawn()
            if reason and self.state is AgentState.STARTING:  # a kill by a limit stays in sight after the restart
                self.last_error = f"restarted after: {killed_by}"
            logger.info("agent {} restarted at once (it had been running)", self.name)
            return
        # The timer first: the delay counts from here, not from after the log lines and listeners below (it fires
        # in a later loop turn, when the state is BACKOFF).
        self._timer = self._clock.call_later(decision.delay_s, self._restart_after_backoff)
        self._set_state(AgentState.BACKOFF)
        logger.info("agent {} restarts in {:.2f}s (failure {} in a row)", self.name, decision.delay_s,
                    self.consecutive_failures)

    def _restart_after_backoff(self) -> None:
        if self.state is AgentState.BACKOFF:
            self.restarts += 1
            self._spawn()

    # ---- adoption ------------------------------------------------------------------------------------

    def adopt(self, rec: AgentRecord) -> bool:
        """Take over a running agent left by an earlier supervisor process; False if it is gone."""
        watch = adoption.recognise(self._processes, rec, self._process_exited)
        if watch is None:
            return False
        self.pid = rec.pid
        self.start_time = rec.start_time
        self.version = rec.version
        self.restarts = rec.restarts
        self.consecutive_failures = rec.consecutive_failures
        self.adopted = True
        if self.cfg.limits(self._key).asked():  # it stays in the cgroup it was started in
            self._cgroup = agent_spawn.cgroup_host().group(self.name)
            self._cgroup.baseline()
        self._watching(watch)
        self._adopting = True
        try:
            self._set_state(AgentState.STARTING)
            if rec.state == AgentState.RUNNING.value:
                self._became_running()
            elif not self.cfg.notify:
                remaining = max(0.0, self.cfg.start_seconds - (self._clock.time() - rec.start_time))
                self._timer = self._clock.call_later(remaining, self._start_seconds_passed, self.pid)
        finally:
            self._adopting = False
        logger.info("agent {} adopted pid {} ({}), {}", self.name, self.pid,
                    "child" if watch.is_child else "non-child", self.state.value)
        return True

    def release(self) -> None:
        """Stop watching without touching the process (a handover passes it on)."""
        self._cancel_timers()
        if self._watch is not None:
            self._watch.release()
            self._watch = None

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
        if self.state is not AgentState.STOPPING:
            self._set_state(AgentState.STOPPING)

        def ignored() -> None:
            self.last_error = f"did not stop within {self.cfg.stop_timeout_s}s; killed"

        await stop_group(self._processes, self._clock, self._exited, self.pid, f"agent {self.name}",
                         self.cfg.stop_signum, self.cfg.stop_signal, self.cfg.stop_timeout_s, ignored)

    def send_signal(self, signum: int) -> None:
        """Signal the agent's process group (``supervisor signal HUP web``); an agent without a process refuses."""
        if not self.state.has_process or not self.pid:
            raise AgentError(f"agent {self.name} is {self.state.value}: no process to signal")
        logger.info("agent {}: sending {} to pid {}", self.name, signal.Signals(signum).name, self.pid)
        try:
            self._processes.signal_group(self.pid, signum)
        except ProcessLookupError:
            raise AgentError(f"agent {self.name}: its process is gone") from None

    def remove_cgroup(self) -> None:
        """The agent left the config: its cgroup goes too (whatever is still in it is killed). Whatever its
        config says now: one retired while no supervisor ran is known only by its record, without its limits."""
        agent_spawn.cgroup_host().group(self.name).remove()
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

    def __init__(self, config: Config, on_change: Callable[[AgentSnapshot], None] | None = None, *,
                 processes: ProcessDriver, clock: Clock) -> None:
        self.config = config
        self.processes = processes
        self.clock = clock
        self.table = AgentTable(config.node.state_dir / "agents.json")
        self._listeners: list[Callable[[AgentSnapshot], None]] = [on_change] if on_change else []
        self.agents: dict[str, Agent] = {}
        self._retiring: dict[str, asyncio.Task[None]] = {}
        self._waiting: dict[str, asyncio.Task[None]] = {}  # agents whose start waits on their `after`
        self._reload_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._flush: asyncio.Handle | Timer | None = None
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
                       else self.clock.call_later(LAZY_WRITE_S, self.persist))

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
            if name in self.agents or not rec.pid or not self._still_runs(rec):
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

    def _still_runs(self, rec: AgentRecord) -> bool:
        return adoption.same_start(rec.start_time, self.processes.start_time(rec.pid))

    def _add(self, cfg: AgentConfig, channels: tuple[int | None, object | None, int | None] | None) -> Agent:
        agent = Agent(cfg, self.config, self._changed, self.processes, self.clock)
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
                old[name].configure(config)
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


def _close_channel_fds(ch: tuple[int | None, object | None, int | None]) -> None:
    for fd in (ch[0], ch[2]):
        if fd is not None:
            os.close(fd)
    if isinstance(ch[1], socket.socket):
        ch[1].close()
