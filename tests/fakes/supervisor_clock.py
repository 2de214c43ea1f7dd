"""A clock for ``supervisor/ports.py``'s :class:`Clock` that moves only when a test advances it."""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable

SETTLE_TURNS = 8  # event-loop turns given to woken tasks after each timer: enough for a chain of awaits


class FakeTimer:
    def __init__(self, when: float, fn: Callable[..., object], args: tuple[object, ...]) -> None:
        self.when = when
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """Wall and monotonic time that start at fixed values; timers fire in order as :meth:`advance` passes them."""

    def __init__(self, wall: float = 1_700_000_000.0) -> None:
        self.wall = wall
        self.mono = 1000.0
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._seq = 0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def call_later(self, delay_s: float, fn: Callable[..., object], *args: object) -> FakeTimer:
        timer = FakeTimer(self.mono + max(0.0, delay_s), fn, args)
        self._seq += 1
        heapq.heappush(self._timers, (timer.when, self._seq, timer))
        return timer

    async def sleep(self, delay_s: float) -> None:
        done = asyncio.get_running_loop().create_future()
        timer = self.call_later(delay_s, lambda: done.done() or done.set_result(None))
        try:
            await done
        finally:
            timer.cancel()

    def pending(self, fn_name: str = "") -> list[float]:
        """The delays (from now) of the timers still to fire (only those calling ``fn_name``, if given), soonest
        first."""
        return sorted(t.when - self.mono for _, _, t in self._timers
                      if not t.cancelled and (not fn_name or getattr(t.fn, "__name__", "") == fn_name))

    async def settle(self) -> None:
        """Let every task woken so far run as far as it can without time passing."""
        for _ in range(SETTLE_TURNS):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``, firing each timer due on the way at its own time."""
        await self.settle()
        end = self.mono + seconds
        while self._timers and self._timers[0][0] <= end:
            when, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self.wall += when - self.mono
            self.mono = when
            timer.fn(*timer.args)
            await self.settle()
        self.wall += end - self.mono
        self.mono = end
        await self.settle()
