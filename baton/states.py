"""The state vocabulary, defined once for every process that speaks it.

Agent states follow supervisord's names (users know them); update states follow
Elastic Agent's upgrade details. The journal records exactly these update
state names, ``GetUpdate`` shows them and the Manager stores them.
"""

from __future__ import annotations

import enum


class AgentState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FATAL = "fatal"

    @property
    def has_process(self) -> bool:
        return self in (AgentState.STARTING, AgentState.RUNNING, AgentState.STOPPING)


AGENT_TRANSITIONS: dict[AgentState, frozenset[AgentState]] = {
    AgentState.STOPPED: frozenset({AgentState.STARTING, AgentState.BACKOFF, AgentState.FATAL}),
    AgentState.STARTING: frozenset(
        {AgentState.RUNNING, AgentState.BACKOFF, AgentState.STOPPING, AgentState.EXITED, AgentState.FATAL}
    ),
    AgentState.RUNNING: frozenset(
        {AgentState.BACKOFF, AgentState.STOPPING, AgentState.EXITED, AgentState.FATAL}
    ),
    AgentState.BACKOFF: frozenset({AgentState.STARTING, AgentState.STOPPED, AgentState.FATAL}),
    AgentState.STOPPING: frozenset({AgentState.STOPPED}),
    AgentState.EXITED: frozenset({AgentState.STARTING, AgentState.STOPPED}),
    AgentState.FATAL: frozenset({AgentState.STARTING, AgentState.STOPPED}),
}


class UpdateState(enum.Enum):
    REQUESTED = "requested"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    SWITCHING = "switching"
    RESTARTING = "restarting"
    WATCHING = "watching"
    COMMITTED = "committed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (UpdateState.COMMITTED, UpdateState.ROLLED_BACK, UpdateState.FAILED)
