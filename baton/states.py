"""The state vocabulary and its transition tables, defined once for every process that speaks it.

Agent states follow supervisord's names (users know them); update states follow
Elastic Agent's upgrade details. The journal records exactly these update
state names, ``GetUpdate`` shows them and the Manager stores them.

Each machine is a table here, and the one object that holds the state refuses
a move the table does not list, with :class:`IllegalTransition` (a bug in the
caller, like python-tuf's out-of-order load): the journal record
(``baton.journal.UpdateRecord.moved``), the supervisor's ``Agent._set_state``,
and the helper's custody of a supervisor's descriptors during a self-update
(``helper.self_update.HandoverSession``). Nothing else writes a state.

The update machine (docs/update-state-machine.md)::

    REQUESTED -> DOWNLOADING -> VERIFYING -> STAGING -> SWITCHING -> RESTARTING -> WATCHING -> COMMITTED
        |             |             |           |           |             |            |
        +-------------+-------------+-----------+--> FAILED +-------------+------------+--> ROLLING_BACK
                                                                                               |
                                                                                         ROLLED_BACK

Before SWITCHING (:data:`PRE_SWITCH`) nothing outside the download and
journal areas has changed, so a failure or a cancel there is FAILED. From
SWITCHING on, ``current`` may point at the new version, so any failure or a
cancel rolls back. The recovery edges are the moves a helper started on a
journal left by a killed helper makes (``helper/machine.py`` ``RECOVERY``):
back to DOWNLOADING from DOWNLOADING, VERIFYING or STAGING (resume, re-hash,
re-verify, stage again); ROLLING_BACK from SWITCHING, RESTARTING, WATCHING and
ROLLING_BACK itself. A self-update's recovery that finds the new supervisor
serving commits through RESTARTING and WATCHING (each recorded with the note
``recovery``), never around them. ``helper --rollback`` writes no journal state.
"""

from __future__ import annotations

import enum
from typing import TypeVar


class IllegalTransition(RuntimeError):
    """A move its table does not list: a bug in the caller, never bad input."""


_E = TypeVar("_E", bound=enum.Enum)


def check_move(table: dict[_E, frozenset[_E]], old: _E, new: _E, what: str) -> None:
    """Raise IllegalTransition unless ``old -> new`` is an edge of ``table``."""
    if new not in table[old]:
        raise IllegalTransition(f"{what}: illegal transition {old.value} -> {new.value}")


# ---- agents (the supervisor's process manager) ---------------------------------------------------------


class AgentState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    EXITED = "exited"
    FATAL = "fatal"
    NOT_INSTALLED = "not_installed"  # a packaged agent with no version yet: waits for its first update
    CONFIG_ERROR = "config_error"  # its own config section is invalid: not run, the others are (shown, never held)

    @property
    def has_process(self) -> bool:
        return self in (AgentState.STARTING, AgentState.RUNNING, AgentState.STOPPING)


AGENT_TRANSITIONS: dict[AgentState, frozenset[AgentState]] = {
    AgentState.STOPPED: frozenset({AgentState.STARTING, AgentState.BACKOFF, AgentState.FATAL,
                                   AgentState.NOT_INSTALLED}),
    AgentState.STARTING: frozenset(
        {AgentState.RUNNING, AgentState.BACKOFF, AgentState.STOPPING, AgentState.EXITED, AgentState.FATAL}
    ),
    AgentState.RUNNING: frozenset(
        {AgentState.BACKOFF, AgentState.STOPPING, AgentState.EXITED, AgentState.FATAL}
    ),
    AgentState.BACKOFF: frozenset({AgentState.STARTING, AgentState.STOPPED, AgentState.FATAL,
                                   AgentState.NOT_INSTALLED}),
    AgentState.STOPPING: frozenset({AgentState.STOPPED}),
    AgentState.EXITED: frozenset({AgentState.STARTING, AgentState.STOPPED}),
    AgentState.FATAL: frozenset({AgentState.STARTING, AgentState.STOPPED}),
    # no restart counted, no start_retries burnt: a start (an update's restart) once a version is installed
    AgentState.NOT_INSTALLED: frozenset({AgentState.STARTING, AgentState.STOPPED}),
    # No Agent ever holds it, so it has no edge: the process manager shows it for each section the config set
    # apart (Config.broken_agents); a reload that fixes the section makes a new Agent, STOPPED as any other.
    AgentState.CONFIG_ERROR: frozenset(),
}

# The states a later supervisor process keeps for an agent without a process (from the agent table) instead
# of starting it: a stopped agent stays stopped, an exited or fatal one stays so. The restore is the one move
# outside AGENT_TRANSITIONS, made only by a fresh Agent (STOPPED, no process) before anything else.
AGENT_KEPT_STATES = frozenset({AgentState.STOPPED, AgentState.EXITED, AgentState.FATAL})


# ---- updates (the journal) ----------------------------------------------------------------------------


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


_U = UpdateState

UPDATE_TRANSITIONS: dict[UpdateState, frozenset[UpdateState]] = {
    # forward, and FAILED (a failure or a cancel before the helper starts or before the switch)
    _U.REQUESTED: frozenset({_U.DOWNLOADING, _U.FAILED}),
    # DOWNLOADING again: a restarted helper resumes the download
    _U.DOWNLOADING: frozenset({_U.DOWNLOADING, _U.VERIFYING, _U.FAILED}),
    # DOWNLOADING again: a restarted helper re-hashes the downloaded file (resuming it if short)
    _U.VERIFYING: frozenset({_U.DOWNLOADING, _U.STAGING, _U.FAILED}),
    # DOWNLOADING again: a restarted helper discards the staging directory, re-verifies and stages again
    _U.STAGING: frozenset({_U.DOWNLOADING, _U.SWITCHING, _U.FAILED}),
    # from here on a failure, a cancel or a restarted helper rolls back
    _U.SWITCHING: frozenset({_U.RESTARTING, _U.ROLLING_BACK}),
    _U.RESTARTING: frozenset({_U.WATCHING, _U.ROLLING_BACK}),
    _U.WATCHING: frozenset({_U.COMMITTED, _U.ROLLING_BACK}),
    # ROLLING_BACK again: a restarted helper rolls back again (idempotent)
    _U.ROLLING_BACK: frozenset({_U.ROLLING_BACK, _U.ROLLED_BACK}),
    _U.COMMITTED: frozenset(),
    _U.ROLLED_BACK: frozenset(),
    _U.FAILED: frozenset(),
}

# Nothing outside the download and journal areas has changed yet: a failure or a cancel is FAILED.
PRE_SWITCH = frozenset({_U.REQUESTED, _U.DOWNLOADING, _U.VERIFYING, _U.STAGING})


# ---- the helper's custody of a supervisor's state and descriptors during a self-update --------------------


class Custody(enum.Enum):
    """Who has the supervisor's agent table and descriptors, and what was asked of which process.

    The helper keeps its own copies of the descriptors until CLOSED, so after a KILLED it can hand them to
    the next supervisor (the old version started again) as it did to the one it killed.
    """

    UNTOUCHED = "untouched"  # nothing asked of any supervisor, nothing started; no descriptors held
    ASKED = "asked"          # PREPARE sent: unless it refuses, the old supervisor quiesces and execs
    HOLDING = "holding"      # the old supervisor's STATE and descriptors received; EXEC not yet sent
    EXEC_SENT = "exec_sent"  # EXEC sent: the old pid becomes the current link's version
    SPAWNED = "spawned"      # the helper started a supervisor itself (none ran, or a rollback killed it)
    KILLED = "killed"        # the helper SIGKILLed the supervisor; the next one is started by it or by systemd
    HANDED = "handed"        # STATE and descriptors given to the supervisor that said HELLO
    COMMITTED = "committed"  # COMMIT sent: that supervisor owns everything
    CLOSED = "closed"        # the helper's copies closed, its socket and handover.json removed


_C = Custody

CUSTODY_TRANSITIONS: dict[Custody, frozenset[Custody]] = {
    # HANDED: a supervisor started by systemd (none ran, or the old one died on its own) said HELLO
    _C.UNTOUCHED: frozenset({_C.ASKED, _C.SPAWNED, _C.KILLED, _C.HANDED, _C.CLOSED}),
    # UNTOUCHED: the supervisor answered REFUSED and carries on as before
    _C.ASKED: frozenset({_C.UNTOUCHED, _C.HOLDING, _C.KILLED, _C.CLOSED}),
    _C.HOLDING: frozenset({_C.EXEC_SENT, _C.KILLED, _C.CLOSED}),
    _C.EXEC_SENT: frozenset({_C.HANDED, _C.KILLED, _C.CLOSED}),
    _C.SPAWNED: frozenset({_C.HANDED, _C.KILLED, _C.CLOSED}),
    # HANDED: systemd's restart policy started the next one, which said HELLO
    _C.KILLED: frozenset({_C.SPAWNED, _C.HANDED, _C.CLOSED}),
    _C.HANDED: frozenset({_C.COMMITTED, _C.KILLED, _C.CLOSED}),
    _C.COMMITTED: frozenset({_C.CLOSED}),
    _C.CLOSED: frozenset(),
}
