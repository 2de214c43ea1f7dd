"""A clock that moves only when slept on: a timeout in the matrix costs nothing."""

from __future__ import annotations


class FakeClock:
    def __init__(self, start: float = 1_000.0, epoch: float = 1_700_000_000.0) -> None:
        self.now = start
        self.epoch = epoch

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.epoch + self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
