"""Is the wall clock where it should be? The supervisor's record of it, and the Manager's word.

A wall clock far AHEAD is invisible to a host alone: every time it ever wrote
down is behind it, as it should be. Two references see it:

- **The time since boot.** ``/proc/uptime`` counts from boot (suspend included),
  moves only forward, and no ``settimeofday``, NTP step or ``LD_PRELOAD`` clock
  (libfaketime) changes it. The supervisor writes ``<state_dir>/clock.json``
  (wall time, time since boot and boot id) at start and every
  :data:`RECORD_EVERY_S`; on the same boot, the wall clock must have moved as
  much as the time since boot did, within :func:`jump_tolerance`. A wall clock
  that moved far more jumped ahead, far less jumped back. The supervisor logs a
  jump it sees; ``supervisor doctor`` judges the record against its own reading.
  An NTP step that corrects a wrong clock is a jump too: doctor names it until
  the supervisor's next record.
- **The Manager's time.** The Manager puts its time in every Register and
  Heartbeat answer; the supervisor keeps the offset (the Manager's time minus
  the middle of the call), GetStatus shows it, and doctor judges it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from baton import durable
from baton.log import logger

CLOCK_FILE = "clock.json"
RECORD_EVERY_S = 600.0  # the supervisor's record of the clock is at most this old while it runs
CLOCK_TOLERANCE_S = 300.0  # a clock off by less than this (from either reference) is fine
MAX_DRIFT = 0.001  # 1,000 ppm: more than NTP ever slews a clock (500 ppm), so slewing is never a jump


@dataclass(frozen=True)
class ClockReading:
    wall: float  # time.time()
    since_boot: float  # /proc/uptime's first field: seconds since boot, suspend included
    boot_id: str

    def jump_since(self, earlier: ClockReading) -> float | None:
        """How much further the wall clock moved than the time since boot since ``earlier`` (negative: back);
        None across a reboot, where nothing relates the two."""
        if earlier.boot_id != self.boot_id or not self.boot_id:
            return None
        return (self.wall - earlier.wall) - (self.since_boot - earlier.since_boot)

    def jumped(self, earlier: ClockReading) -> float | None:
        """:meth:`jump_since`, when it is past :func:`jump_tolerance`; else None."""
        jump = self.jump_since(earlier)
        if jump is None or abs(jump) <= jump_tolerance(self.since_boot - earlier.since_boot):
            return None
        return jump


def jump_tolerance(elapsed_s: float) -> float:
    return CLOCK_TOLERANCE_S + MAX_DRIFT * max(elapsed_s, 0.0)


def read_clock(wall: float | None = None) -> ClockReading:
    """The wall clock (or ``wall``) with the time since boot and the boot's id, read now.

    Raises:
        OSError: /proc is not readable.
    """
    with open("/proc/uptime", "rb") as f:
        since_boot = float(f.read(64).split()[0])
    with open("/proc/sys/kernel/random/boot_id", "rb") as f:
        boot_id = f.read(64).decode().strip()
    return ClockReading(time.time() if wall is None else wall, since_boot, boot_id)


def clock_path(state_dir: Path) -> Path:
    return Path(state_dir) / CLOCK_FILE


def load_record(state_dir: Path) -> ClockReading | None:
    """The supervisor's last record, or None (none yet, or unreadable)."""
    try:
        d = durable.read_json(clock_path(state_dir))
        return ClockReading(float(d["wall"]), float(d["since_boot"]), str(d["boot_id"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe_jump(jump: float) -> str:
    """``3.0 years ahead``, ``12 minutes back``."""
    size = abs(jump)
    for unit, seconds in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if size >= seconds:
            amount = f"{size / seconds:.1f} {unit}" if unit in ("years", "days") else f"{size / seconds:.0f} {unit}"
            break
    else:
        amount = f"{size:.0f} seconds"
    return f"{amount} {'ahead' if jump > 0 else 'back'}"


def record_clock(state_dir: Path) -> None:
    """Write the clock now to ``<state_dir>/clock.json`` (crash-safe), warning of a jump since the last record."""
    now = read_clock()
    last = load_record(state_dir)
    jump = now.jumped(last) if last is not None else None
    if jump is not None:
        logger.warning("the wall clock jumped {} since {:.0f} s ago (against the time since boot)",
                       describe_jump(jump), now.since_boot - last.since_boot if last else 0.0)
    durable.write_json(clock_path(state_dir), asdict(now), 0o644)


def try_record_clock(state_dir: Path) -> None:
    """:func:`record_clock`; a failure is a warning (doctor then judges by an older record, or none)."""
    try:
        record_clock(state_dir)
    except OSError as e:
        logger.warning("could not record the clock in {}: {}", clock_path(state_dir), e)


async def keep_clock_record(state_dir: Path) -> None:
    """The supervisor's task: :func:`record_clock` every :data:`RECORD_EVERY_S` after the first, which the
    supervisor writes before it serves (so a client that saw it answer finds the record). On the loop, as the
    agent table's writes are: a file of 100 bytes."""
    while True:
        await asyncio.sleep(RECORD_EVERY_S)
        try_record_clock(state_dir)
