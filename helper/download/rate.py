"""Rate and time: the whole-download deadline, the rate floor, progress reports and the 503 back-off.

The server is untrusted until the signature is checked, so its pace is bounded:
a whole-download deadline, and a floor on the rate averaged over a sliding
window (the TUF "slow retrieval" defence). A connection that delivers nothing
at all is the transport's read timeout's job.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from helper.download.errors import DownloadTimeout, DownloadTooSlow, ServerBusy
from helper.download.limits import DownloadLimits

PROGRESS_INTERVAL_S = 0.1
BUSY_BACKOFF_INITIAL_S = 0.5  # after a 503 without Retry-After; doubles per 503
BUSY_BACKOFF_MAX_S = 30.0  # and at most this, a Retry-After included


@dataclass(frozen=True)
class DownloadProgress:
    bytes_done: int  # on disk, including bytes resumed from an earlier attempt
    bytes_total: int
    rate_bytes_per_s: float  # of this attempt, over the rate window
    elapsed_s: float
    resumed_from: int


class Meter:
    """Deadline, rate floor and progress reports for one download."""

    def __init__(
        self,
        url: str,
        limits: DownloadLimits,
        total: int,
        progress: Callable[[DownloadProgress], None] | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._limits = limits
        self._total = total
        self._progress = progress
        self._clock = clock  # a seam: the fast tier drives the floor's arithmetic with a fake clock
        self._t0 = clock()
        self.deadline = self._t0 + limits.total_timeout_s  # on the monotonic clock
        self._last_report = self._t0
        self._resumed_from = 0
        self._body_t0 = self._t0
        # (time, bytes of this attempt) samples covering at least the last window
        self._samples: deque[tuple[float, int]] = deque()

    def elapsed_s(self) -> float:
        return self._clock() - self._t0

    def begin(self, resumed_from: int) -> None:
        self._resumed_from = resumed_from
        self._body_t0 = self._clock()
        self._samples = deque([(self._body_t0, 0)])

    def advance(self, done: int, on_disk: int) -> None:
        """``done`` bytes received (bounds and rate), ``on_disk`` of them written (progress)."""
        now = self._clock()
        if now > self.deadline:
            self._timed_out()
        moved = done - self._resumed_from
        window = self._limits.min_rate_window_s
        if now - self._samples[-1][0] >= window / 32:
            self._samples.append((now, moved))
        while len(self._samples) > 1 and self._samples[1][0] <= now - window:
            self._samples.popleft()
        rate = self._rate(now, moved)
        if self._samples[0][0] <= now - window and rate < self._limits.min_rate_bytes_per_s:
            raise DownloadTooSlow(self._url, rate, self._limits.min_rate_bytes_per_s, window)
        if self._progress is not None and now - self._last_report >= PROGRESS_INTERVAL_S:
            self._last_report = now
            self._report(on_disk, rate, now)

    def done(self, done: int) -> None:
        if self._progress is not None:
            now = self._clock()
            self._report(done, self._rate(now, done - self._resumed_from), now)

    def _rate(self, now: float, moved: int) -> float:
        t, b = self._samples[0] if self._samples else (self._body_t0, 0)
        return (moved - b) / (now - t) if now > t else 0.0

    def _report(self, done: int, rate: float, now: float) -> None:
        assert self._progress is not None
        self._progress(DownloadProgress(done, self._total, rate, now - self._t0, self._resumed_from))

    def _timed_out(self) -> None:
        raise DownloadTimeout(self._url, "the whole download took too long", self._limits.total_timeout_s)


def wait_while_busy(busy: ServerBusy, backoff_s: float, deadline: float, total_timeout_s: float) -> float:
    """Sleep as a 503 asks (its ``Retry-After``, else our doubling backoff), never past the deadline.

    Only a 503 is retried: the server is up and said when to come back. Returns the next backoff.
    """
    wait_s = busy.retry_after_s if busy.retry_after_s is not None else backoff_s
    time.sleep(max(0.0, min(wait_s, deadline - time.monotonic())))
    if time.monotonic() >= deadline:
        raise DownloadTimeout(busy.url, "the server was busy (HTTP 503) until the deadline", total_timeout_s)
    return min(backoff_s * 2, BUSY_BACKOFF_MAX_S)

