"""Stopping an agent's process group: its stop signal, SIGKILL after ``stop_timeout_s``, then a bounded wait.

The waits are on the agent's :class:`ExitSignal` and the driver's clock (``supervisor/ports.py``), so a test
can stand in a process that ignores the signal and move time by hand.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from baton.log import logger
from supervisor.ports import Clock, ProcessDriver

KILL_WAIT_S = 5.0  # after SIGKILL: a process in D state may take a while to go


class ExitSignal:
    """Set when an agent's process has exited, cleared when the next one is spawned.

    asyncio.Event's set, clear and wait, without its deque of waiters (0.8 KiB an agent, for a wait that is
    rare): one future, made by the first waiter, shielded so that a waiter that gives up cancels only itself.
    """

    __slots__ = ("_is_set", "_waiter")

    def __init__(self) -> None:
        self._is_set = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._is_set

    def set(self) -> None:
        self._is_set = True
        if self._waiter is not None:
            if not self._waiter.done():
                self._waiter.set_result(None)
            self._waiter = None

    def clear(self) -> None:
        self._is_set = False

    async def wait(self) -> None:
        if self._is_set:
            return
        if self._waiter is None:
            self._waiter = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._waiter)


async def exited_within(exited: ExitSignal, clock: Clock, timeout_s: float) -> bool:
    """Whether ``exited`` is set within ``timeout_s`` of ``clock``."""
    if exited.is_set():
        return True
    expired = asyncio.get_running_loop().create_future()

    def expire() -> None:
        if not expired.done():
            expired.set_result(None)

    timer = clock.call_later(timeout_s, expire)
    waiter = asyncio.ensure_future(exited.wait())
    try:
        await asyncio.wait((waiter, expired), return_when=asyncio.FIRST_COMPLETED)
        return waiter.done() and not waiter.cancelled()
    finally:
        timer.cancel()
        waiter.cancel()
        expired.cancel()


async def stop_group(processes: ProcessDriver, clock: Clock, exited: ExitSignal, pgid: int, what: str,
                     signum: int, signal_name: str, timeout_s: float, on_ignored: Callable[[], None]) -> None:
    """Send ``signum`` to the group ``pgid``; if it has not exited within ``timeout_s``, call ``on_ignored``
    (before the kill, so the exit it causes is seen with its reason) and SIGKILL it, waiting up to KILL_WAIT_S.
    The group is SIGKILLed at the end in any case: whatever the agent left behind in it goes too."""
    logger.info("{}: stopping pid {} with SIG{}", what, pgid, signal_name)
    processes.kill_group(pgid, signum)
    if not await exited_within(exited, clock, timeout_s):
        logger.warning("{}: pid {} ignored SIG{} for {}s; killing its group", what, pgid, signal_name, timeout_s)
        on_ignored()
        processes.kill_group(pgid, signal.SIGKILL)
        await exited_within(exited, clock, KILL_WAIT_S)
    processes.kill_group(pgid, signal.SIGKILL)
