"""Recognising a running agent after a restart or a handover: a pid names the same process only with the same
kernel start time (pids are reused), within :data:`START_TIME_TOLERANCE_S`.

The start time is read from ``/proc`` here rather than through psutil, which every spawn would otherwise import:
it would stay resident in every supervisor (about 0.7 MiB) for two numbers. The value is kept in the agent table
and compared by other supervisor versions, so it is computed as psutil's ``create_time()`` is.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from baton.agent_table import AgentRecord
from supervisor.ports import ProcessDriver, ProcessWatch

START_TIME_TOLERANCE_S = 1.05  # /proc/stat's btime is whole seconds and moves by one as the clock is slewed


def _proc_stat(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state, ppid, ...); None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:  # gone (ENOENT, ESRCH), or hidden from us
        return None
    return data[data.rfind(b")") + 2:].split()


def process_start_time(pid: int) -> float | None:
    """Seconds since the epoch: starttime in clock ticks since boot, plus ``btime``."""
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


def same_start(recorded: float, actual: float | None) -> bool:
    """Two readings of a start time name one process.

    btime, whole seconds derived from the wall clock, can read one second apart in two processes (psutil's
    create_time() shows the same): with a tighter tolerance a supervisor taking over after a handover once saw
    none of its agents as the processes recorded and started every one again beside them. A pid reused within
    that second would need the whole pid space to wrap in it.
    """
    return actual is not None and abs(actual - recorded) < START_TIME_TOLERANCE_S


def same_process(pid: int, start_time: float) -> bool:
    """``pid`` is still the process recorded with ``start_time`` (on this host's /proc)."""
    return same_start(start_time, process_start_time(pid))


def recognise(driver: ProcessDriver, rec: AgentRecord, on_exit: Callable[[int | None], None]) -> ProcessWatch | None:
    """The recorded agent's process, watched, if it is still the one recorded; None if it is gone or the pid is
    now another process's."""
    if not rec.pid or not same_start(rec.start_time, driver.start_time(rec.pid)):
        return None
    return driver.watch(rec.pid, on_exit)
