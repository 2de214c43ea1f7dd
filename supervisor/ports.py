"""The supervisor drivers' collaborators, as small interfaces: what the process manager and the update manager
ask of the operating system and of time.

:class:`~supervisor.agents.ProcessManager` (and each :class:`~supervisor.agents.Agent`) and
:class:`~supervisor.updates.UpdateManager` take these as constructor arguments. The real ones
(:mod:`supervisor.processes`) are wired in one place, the daemon's construction (``supervisor/daemon.py``); the
fast tests give fakes (``tests/fakes/``) and drive every state and failure in-process. See
docs/architecture.md, "Supervisor seams".
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from baton.limits import Limits


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """Wall time, monotonic time and timers: the event loop's, or a test's that it moves by hand."""

    def time(self) -> float:
        """Seconds since the epoch (what the agent table and journal record)."""
        ...

    def monotonic(self) -> float: ...

    def call_later(self, delay_s: float, fn: Callable[..., object], *args: object) -> Timer: ...

    async def sleep(self, delay_s: float) -> None: ...


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


class Gate(Protocol):
    """What is done to a held child before its command runs (``AgentCgroup``: put it in its cgroup)."""

    def enter(self, pid: int) -> None: ...


@dataclass(frozen=True)
class SpawnSpec:
    """One agent process to start, fully resolved (``supervisor/agent_spawn.py`` builds it).

    ``stdout``/``stderr`` are the FIFOs it writes to (``stderr`` None: into ``stdout``). With ``limits.any`` the
    process is held at a gate until ``cgroup`` has taken it and its open-files limit is set.
    """

    argv: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str]
    stdout: Path
    stderr: Path | None
    identity: Identity
    limits: Limits
    cgroup: Gate | None = None


class ProcessWatch(Protocol):
    """A watched process: ``on_exit`` gets its status (exit code, minus the signal, None if not ours to reap)."""

    @property
    def is_child(self) -> bool: ...

    def release(self) -> None:
        """Stop watching without touching the process (a handover passes it on); on_exit is never called."""
        ...


class ProcessDriver(Protocol):
    """Spawning, watching and signalling processes."""

    def spawn(self, spec: SpawnSpec) -> int:
        """Start it in a session and process group of its own; its pid. Raises OSError or AgentError."""
        ...

    def watch(self, pid: int, on_exit: Callable[[int | None], None]) -> ProcessWatch | None:
        """Call ``on_exit`` once, in the event loop, when ``pid`` ends; None if it is already gone."""
        ...

    def start_time(self, pid: int) -> float | None:
        """The kernel's start time of ``pid`` in seconds since the epoch; None if there is no such process."""
        ...

    def kill_group(self, pgid: int, sig: int) -> None:
        """Signal a process group; nothing if it is gone or not ours."""
        ...

    def signal_group(self, pgid: int, sig: int) -> None:
        """Signal a process group; ProcessLookupError if it is gone."""
        ...

    def group_of(self, pid: int) -> int:
        """The process group of ``pid``; OSError if it is gone."""
        ...


@dataclass(frozen=True)
class LaunchedHelper:
    pid: int
    transient_unit: bool  # pid is systemd-run's client; the helper runs in a unit of its own


class HelperLauncher(Protocol):
    """Starting an update's helper and recognising it later by its pid and update id."""

    def launch(self, argv: list[str], unit_name: str, log_path: Path) -> LaunchedHelper:
        """Start ``argv`` in a session of its own, its output appended to ``log_path`` (under systemd, in a
        transient unit ``unit_name``)."""
        ...

    def is_running(self, pid: int, update_id: str, *, journaled_at: float) -> bool:
        """``pid`` is alive (not a zombie) and is the helper of ``update_id`` (not a reused pid): its command
        line names the update, or it is a standby that took it and started before ``journaled_at`` (the time of
        the record that names the pid)."""
        ...

    def signal(self, pid: int, update_id: str, sig: int, *, journaled_at: float) -> None:
        """Send ``sig`` to the helper of ``update_id`` if ``pid`` still is it (as :meth:`is_running` judges)."""
        ...


class StandbyHelpers(Protocol):
    """A helper started and loaded ahead of the next update, handed its id when it comes (docs/protocols.md,
    "Standby helper"). No update ever waits for one: :meth:`take` says None and the caller launches a helper."""

    def start(self) -> None:
        """Open the channel standbys connect to; none is started yet (:meth:`refill` does)."""
        ...

    def take(self, update_id: str) -> int | None:
        """Hand ``update_id`` to the ready standby: its pid, now the update's helper for the caller to watch; None
        when none is ready, its code changed on disk, or it did not take the job."""
        ...

    def refill(self) -> None:
        """Start a standby unless one is ready or starting (called when no helper runs)."""
        ...

    def child_pids(self) -> list[int]:
        """Processes started for standbys and not yet handed out: ours, reaped by the standby side."""
        ...

    def close(self) -> None:
        """Close the channel: a waiting standby exits."""
        ...


class RecordReader(Protocol):
    """Reads a journal record or progress file off the event loop."""

    async def read(self, path: Path) -> bytes: ...
