"""The table of running agents, as persisted and as handed over.

A later supervisor process, whether started by a handover, by systemd after a
crash or by a rollback, reads it and adopts each agent whose pid still names the
same process (same kernel start time) instead of starting a second instance.

What a crash must not lose is (a) the pid and start time of every agent that has
a process (else the next supervisor starts a second instance beside it) and (b)
a state kept without a process (STOPPED, EXITED, FATAL, NOT_INSTALLED: else a
stopped agent comes back) and (c) a notify agent's READY (STARTING -> RUNNING on
READY=1: the agent sends it once and the kernel cannot tell a successor it came,
so a lost one left the adopted agent STARTING for good; found by 200 chaos rounds).
A lost transition without a new pid otherwise (STARTING -> RUNNING after
``start_seconds``, RUNNING -> BACKOFF, BACKOFF -> STARTING before the spawn) costs
nothing: the next supervisor checks each pid against the kernel's start time,
starts what is gone, and counts ``start_seconds`` from the recorded start time.
So the supervisor does not write the table on every state change
(``ProcessManager._persist_soon``): a new pid, a kept state or a READY is written at the
start of the next event-loop turn, before any callback that reacts to it and
before a status answer shows it (``snapshots`` writes first); any other change
waits up to 0.2 s and shares that write. The fsync is thus never between an
agent's exit and its respawn, and every change of one turn (100 agents killed
and restarted together) costs one write-temp/fsync/rename/fsync-dir. A SIGKILL
inside the turn that spawned an agent (sub-millisecond) can still lose its new
pid, as a crash between fork and the write always could.
``save`` skips the write when the table did not change.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from baton import durable

TABLE_FORMAT = 1


@dataclass(frozen=True)
class AgentRecord:
    name: str
    pid: int
    start_time: float
    version: str
    restarts: int
    consecutive_failures: int
    state: str
    # How to stop it, so a supervisor whose config no longer names it can still stop it to completion.
    stop_signal: str = "TERM"
    stop_timeout_s: float = 10.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> AgentRecord:
        return cls(
            name=str(d["name"]),
            pid=int(d["pid"]),  # type: ignore[call-overload]
            start_time=float(d["start_time"]),  # type: ignore[arg-type]
            version=str(d.get("version", "")),
            restarts=int(d.get("restarts", 0)),  # type: ignore[call-overload]
            consecutive_failures=int(d.get("consecutive_failures", 0)),  # type: ignore[call-overload]
            state=str(d.get("state", "running")),
            stop_signal=str(d.get("stop_signal", "TERM")),
            stop_timeout_s=float(d.get("stop_timeout_s", 10.0)),  # type: ignore[arg-type]
        )


class AgentTable:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._last: bytes | None = None

    def load(self) -> list[AgentRecord]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            return []
        return [AgentRecord.from_dict(d) for d in data.get("agents", [])]

    def save(self, records: list[AgentRecord]) -> None:
        body = json.dumps(
            {"format": TABLE_FORMAT, "agents": [r.to_dict() for r in records]}, indent=2, sort_keys=True
        ).encode()
        if body == self._last:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_bytes(self.path, body + b"\n", 0o600)
        self._last = body
