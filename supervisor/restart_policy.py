"""When an agent that ended is started again: at once, after a backoff, or never (EXITED, FATAL).

A pure object: it is given the exit and the failures in a row so far and answers with a :class:`Decision`; the
agent (``supervisor/agents.py``) keeps the count, sets the state and the timer. Like supervisord, a program
that had been running is restarted at once the first time; a second exit before :data:`STABLE_RUN_S` of running
backs off, doubling from ``backoff_initial_s`` up to ``backoff_max_s``, and more than ``start_retries`` failures
in a row are FATAL.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from baton.config import AgentConfig

STABLE_RUN_S = 30.0  # running this long clears the failures in a row


class Action(enum.Enum):
    EXIT = "exit"  # the policy does not restart it: EXITED
    FATAL = "fatal"  # too many failures in a row
    RESTART_NOW = "restart-now"  # it had been running: no reason to wait
    BACKOFF = "backoff"  # restart after delay_s


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    failures: int  # failures in a row, this exit counted
    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)  # slots: one per agent
class RestartPolicy:
    """The agent's ``restart``, ``start_retries`` and backoff keys (their defaults are AgentConfig's)."""

    restart: str  # always | on-failure | never
    start_retries: int
    backoff_initial_s: float
    backoff_max_s: float

    @classmethod
    def of(cls, cfg: AgentConfig) -> RestartPolicy:
        return cls(cfg.restart, cfg.start_retries, cfg.backoff_initial_s, cfg.backoff_max_s)

    @staticmethod
    def is_failure(status: int | None, was_starting: bool, spawn_failed: bool) -> bool:
        """A spawn that failed, an exit before it was ready, or any status but 0 (unknown included)."""
        return spawn_failed or was_starting or status != 0

    def after_exit(self, failures: int, status: int | None, was_starting: bool, spawn_failed: bool) -> Decision:
        """What to do after an exit (or a failed spawn), ``failures`` in a row before it."""
        failure = self.is_failure(status, was_starting, spawn_failed)
        if self.restart == "never" or (self.restart == "on-failure" and not failure):
            return Decision(Action.EXIT, failures)
        failures += 1
        if failures > self.start_retries:
            return Decision(Action.FATAL, failures)
        if failures == 1 and not was_starting and not spawn_failed:
            return Decision(Action.RESTART_NOW, failures)
        return Decision(Action.BACKOFF, failures, self.backoff_s(failures))

    def backoff_s(self, failures: int) -> float:
        """The wait before the next start after ``failures`` in a row (1 -> backoff_initial_s, doubling)."""
        return min(self.backoff_initial_s * 2 ** (failures - 1), self.backoff_max_s)
