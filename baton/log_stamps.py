"""Timestamps on agent log lines (``log_timestamps = true``), and ``supervisor tail --since`` reading them back.

Each line of the agent's output gets, at its start, the UTC time the supervisor read it
(``2026-12-07T22:43:44.123Z ``): one fixed-width format, so that a line's time is its first 24 bytes and sorts as
text. Output arrives in chunks that do not end at line ends; :class:`LineStamper` remembers whether the next byte
starts a line.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

_STAMP_RE = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z ")
_SINCE_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def stamp_of(t: float) -> bytes:
    whole = time.gmtime(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", whole).encode() + b".%03dZ " % (int(t * 1000) % 1000)


class LineStamper:
    """Puts the time at the start of every line of one stream of output."""

    __slots__ = ("at_line_start",)

    def __init__(self) -> None:
        self.at_line_start = True

    def stamp(self, data: bytes, now: float | None = None) -> bytes:
        if not data:
            return data
        prefix = stamp_of(time.time() if now is None else now)
        lines = data.split(b"\n")
        out = bytearray(prefix if self.at_line_start else b"")
        out += lines[0]
        for j, line in enumerate(lines[1:], 1):
            out += b"\n"
            if line or j < len(lines) - 1:  # an empty line is a line; the empty tail after a last "\n" is not
                out += prefix + line
        self.at_line_start = data.endswith(b"\n")
        return bytes(out)


def parse_since(text: str, now: float | None = None) -> float:
    """``10m``, ``2h``, ``30s``, ``1d`` ago, or an ISO time (``2026-12-07T22:00:00``, UTC unless it says): epoch
    seconds; ValueError with a readable message otherwise."""
    now = time.time() if now is None else now
    m = _SINCE_RE.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (30s, 10m, 2h, 1d) nor a time (2026-12-07T22:00:00)"
                         ) from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def line_time(line: bytes) -> float | None:
    """The time stamped at the start of ``line``, None if it has none."""
    m = _STAMP_RE.match(line)
    if m is None:
        return None
    return datetime.fromisoformat(m.group(1).decode()).replace(tzinfo=UTC).timestamp()


class SinceFilter:
    """``supervisor tail --since``: drops the lines of a stream of output up to the first one stamped at or after
    ``cutoff``, then lets everything through (what follows is newer). ``stamped``: whether any line had a stamp."""

    def __init__(self, cutoff: float) -> None:
        self.cutoff = cutoff
        self.passing = False
        self.stamped = False
        self._partial = b""

    def feed(self, data: bytes) -> bytes:
        if self.passing:
            return data
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # the start of a line not ended yet ("" after a last "\n")
        for i, line in enumerate(lines):
            t = line_time(line)
            if t is None:
                continue
            self.stamped = True
            if t >= self.cutoff:
                self.passing = True
                rest = b"\n".join(lines[i:]) + b"\n" + self._partial
                self._partial = b""
                return rest
        return b""

    def finish(self) -> bytes:
        """The last line when the stream ended without a newline, if it is recent enough."""
        rest, self._partial = self._partial, b""
        t = line_time(rest)
        self.stamped = self.stamped or t is not None
        return rest if self.passing or (t is not None and t >= self.cutoff) else b""
