"""The errors of the process manager and its agents, each carrying what an operator needs."""

from __future__ import annotations

from baton.config import BrokenAgent
from baton.errors import BatonError


class AgentError(BatonError):
    pass


class BadSignal(AgentError):
    pass


class UnknownAgent(AgentError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown agent {name!r}")
        self.name = name


class NotRunnable(UnknownAgent):
    """An agent whose config section is invalid: there is nothing to start, stop or signal until it is fixed."""

    def __init__(self, broken: BrokenAgent) -> None:
        AgentError.__init__(self, f"agent {broken.name!r} is not run: its config section is invalid: {broken.error}")
        self.name = broken.name
