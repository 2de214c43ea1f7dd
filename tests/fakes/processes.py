"""A process driver (``supervisor/ports.py``'s :class:`ProcessDriver`) with no processes behind it.

Each spawn makes a :class:`FakeProcess` the test can make exit with a code, be killed by a signal, or ignore
signals; a spawn can be made to fail. Exits are delivered in the next event-loop turn, as a pidfd's are.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from supervisor.ports import LaunchedHelper, SpawnSpec
from tests.fakes.supervisor_clock import FakeClock


@dataclass
class FakeProcess:
    pid: int
    start_time: float
    spec: SpawnSpec | None = None
    is_child: bool = True
    ignores: set[int] = field(default_factory=set)  # signals it catches and carries on (never SIGKILL)
    signals: list[int] = field(default_factory=list)  # every signal sent to its group, in order
    alive: bool = True
    on_exit: Callable[[int | None], None] | None = None


class FakeWatch:
    def __init__(self, proc: FakeProcess) -> None:
        self.proc = proc

    @property
    def is_child(self) -> bool:
        return self.proc.is_child

    def release(self) -> None:
        self.proc.on_exit = None


class FakeProcesses:
    def __init__(self, clock: FakeClock, first_pid: int = 4000) -> None:
        self.clock = clock
        self.next_pid = first_pid
        self.procs: dict[int, FakeProcess] = {}
        self.spawned: list[SpawnSpec] = []
        self.spawn_error: OSError | None = None  # every spawn fails with it while set
        self.ignore_next: set[int] = set()  # what the next processes spawned ignore
        self.sent: list[tuple[int, int]] = []  # (pid, signal) to live processes, in the order sent
        self.events: list[tuple[str, int]] = []  # ("SIGTERM", pid), ("exit", pid): what happened, in order

    # ---- the driver ------------------------------------------------------------------------------------

    def spawn(self, spec: SpawnSpec) -> int:
        if self.spawn_error is not None:
            raise self.spawn_error
        proc = self.add(spec=spec, ignores=set(self.ignore_next))
        self.spawned.append(spec)
        return proc.pid

    def watch(self, pid: int, on_exit: Callable[[int | None], None]) -> FakeWatch | None:
        proc = self.procs.get(pid)
        if proc is None or not proc.alive:
            return None
        proc.on_exit = on_exit
        return FakeWatch(proc)

    def start_time(self, pid: int) -> float | None:
        proc = self.procs.get(pid)
        return proc.start_time if proc is not None and proc.alive else None

    def kill_group(self, pgid: int, sig: int) -> None:
        proc = self.procs.get(pgid)
        if proc is not None and proc.alive:
            self._deliver(proc, sig)

    def signal_group(self, pgid: int, sig: int) -> None:
        proc = self.procs.get(pgid)
        if proc is None or not proc.alive:
            raise ProcessLookupError(pgid)
        self._deliver(proc, sig)

    def group_of(self, pid: int) -> int:
        proc = self.procs.get(pid)
        if proc is None or not proc.alive:
            raise ProcessLookupError(pid)
        return pid

    # ---- what the test does to its processes -------------------------------------------------------------

    def add(self, *, spec: SpawnSpec | None = None, start_time: float | None = None, is_child: bool = True,
            ignores: set[int] | None = None) -> FakeProcess:
        """A live process (a spawn, or one left running by an earlier supervisor: ``is_child=False``)."""
        self.next_pid += 1
        proc = FakeProcess(self.next_pid, self.clock.time() if start_time is None else start_time, spec, is_child,
                           ignores or set())
        self.procs[proc.pid] = proc
        return proc

    def exit(self, pid: int, status: int) -> None:
        """The process ends with ``status`` (an exit code, or minus a signal)."""
        proc = self.procs[pid]
        assert proc.alive, f"pid {pid} has already exited"
        proc.alive = False
        self.events.append(("exit", pid))
        on_exit, proc.on_exit = proc.on_exit, None
        if on_exit is not None:
            reported = status if proc.is_child else None  # not ours to reap: status unknown
            asyncio.get_running_loop().call_soon(on_exit, reported)

    def last(self) -> FakeProcess:
        return self.procs[self.next_pid]

    def _deliver(self, proc: FakeProcess, sig: int) -> None:
        proc.signals.append(sig)
        self.sent.append((proc.pid, sig))
        self.events.append((signal.Signals(sig).name, proc.pid))
        if sig == signal.SIGKILL or sig not in proc.ignores:
            self.exit(proc.pid, -sig)


class FakeHelpers:
    """:class:`supervisor.ports.HelperLauncher`: each launch is a FakeProcess of ``processes``."""

    def __init__(self, processes: FakeProcesses) -> None:
        self.processes = processes
        self.launched: list[tuple[list[str], str, Path]] = []
        self.running: dict[int, str] = {}  # pid -> update id, for is_running
        self.signalled: list[tuple[int, int]] = []
        self.transient_unit = False  # launches behave as systemd-run's: the pid is the client's

    def launch(self, argv: list[str], unit_name: str, log_path: Path) -> LaunchedHelper:
        proc = self.processes.add()
        self.launched.append((argv, unit_name, log_path))
        if "--update-id" in argv:
            self.running[proc.pid] = argv[argv.index("--update-id") + 1]
        return LaunchedHelper(proc.pid, self.transient_unit)

    def is_running(self, pid: int, update_id: str, *, journaled_at: float) -> bool:
        proc = self.processes.procs.get(pid)
        return proc is not None and proc.alive and self.running.get(pid) == update_id

    def signal(self, pid: int, update_id: str, sig: int, *, journaled_at: float) -> None:
        if self.is_running(pid, update_id, journaled_at=journaled_at):
            self.signalled.append((pid, sig))


class FakeStandby:
    """:class:`supervisor.ports.StandbyHelpers`: a standby is a FakeProcess of ``helpers``' processes, ready once
    the test says so (:meth:`ready`); taking a job makes it that update's helper for ``helpers.is_running``."""

    def __init__(self, helpers: FakeHelpers) -> None:
        self.helpers = helpers
        self.started = False
        self.closed = False
        self.refills = 0  # calls of refill that started one
        self.waiting: FakeProcess | None = None  # launched, not yet handed a job
        self.is_ready = False
        self.taken: list[tuple[str, int]] = []  # (update id, pid) handed out

    def start(self) -> None:
        self.started = True

    def ready(self) -> FakeProcess:
        """The standby started by the last refill says HELLO."""
        assert self.waiting is not None, "no standby was started"
        self.is_ready = True
        return self.waiting

    def take(self, update_id: str) -> int | None:
        if self.waiting is None or not self.is_ready or not self.waiting.alive:
            return None
        proc, self.waiting, self.is_ready = self.waiting, None, False
        self.helpers.running[proc.pid] = update_id
        self.taken.append((update_id, proc.pid))
        return proc.pid

    def refill(self) -> None:
        if self.closed or (self.waiting is not None and self.waiting.alive):
            return
        self.refills += 1
        self.waiting = self.helpers.processes.add()
        self.is_ready = False

    def child_pids(self) -> list[int]:
        return [self.waiting.pid] if self.waiting is not None and self.waiting.alive else []

    def close(self) -> None:
        self.closed = True


class FileReader:
    """:class:`supervisor.ports.RecordReader` that reads in the event loop's thread (a test's files are small)."""

    def __init__(self) -> None:
        self.failing: set[Path] = set()  # reads of these raise OSError

    async def read(self, path: Path) -> bytes:
        if path in self.failing:
            raise OSError(f"cannot read {path}")
        return path.read_bytes()
