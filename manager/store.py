"""What the Manager remembers: nodes, every update, rollouts. One interface, two databases behind it.

The Manager's commands are separate processes (``serve`` records what
supervisors report and carries out rollouts; ``push`` and ``rollout`` record
what they start), so the database is shared between processes, and with
PostgreSQL between several ``serve`` replicas on several machines:

- SQLite (the embedded default, one machine): WAL mode (readers never block the
  writer), a busy timeout for the writers, ``synchronous=FULL`` because an
  acknowledged result must survive a crash (the supervisor forgets it after our
  ack). The schema version is ``PRAGMA user_version``.
- PostgreSQL (psycopg 3): the same tables and the same statements; the schema
  version is the ``schema_version`` table, and migrations take an advisory lock
  so replicas starting together migrate once.

``MIGRATIONS`` are applied in order, each in its own transaction, and a database
newer than this code is refused rather than written to. ``open_store(url)``
chooses the database: ``postgresql://...``, ``sqlite:///path`` or a bare path;
anything else is refused, and no message or log shows a password.

Update rows obey two rules, so that the two writers of a row (a push following
its update, the supervisor's result) cannot go backwards:

- a row in a final state never moves to a non-final one;
- once the supervisor's result has arrived (``reported_at``), only another
  result may change the row: the result is the node's own record.

and a result obeys two more, checked in the statement that writes it:

- it comes from the node the update belongs to (``NotOwner`` otherwise): update
  ids are not secret, and any node could otherwise rewrite another's record;
- a final result, once reported, is never replaced by a different one
  (``FinalResultKept``); the same one delivered again counts as a duplicate.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from baton.states import UpdateState
from manager.errors import FinalResultKept, NotOwner, SchemaTooNew, StoreError

if TYPE_CHECKING:
    import psycopg

BUSY_TIMEOUT_S = 10.0
FINAL_STATES = tuple(s.value for s in UpdateState if s.final)

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: nodes, updates, rollouts, and the settings `serve` leaves for the other commands.
    (
        """CREATE TABLE nodes (
            id TEXT PRIMARY KEY,
            version TEXT NOT NULL DEFAULT '',
            hostname TEXT NOT NULL DEFAULT '',
            address TEXT NOT NULL DEFAULT '',
            identity TEXT NOT NULL DEFAULT '',
            registered_at REAL NOT NULL,
            last_seen REAL NOT NULL,
            agents TEXT NOT NULL DEFAULT '[]')""",
        """CREATE TABLE updates (
            update_id TEXT PRIMARY KEY,
            node TEXT NOT NULL,
            component TEXT NOT NULL,
            from_version TEXT NOT NULL DEFAULT '',
            to_version TEXT NOT NULL,
            state TEXT NOT NULL,
            success INTEGER NOT NULL DEFAULT 0,
            rolled_back INTEGER NOT NULL DEFAULT 0,
            error TEXT NOT NULL DEFAULT '',
            timings TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            finished_at REAL,
            rollout_id TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX updates_by_node ON updates (node, created_at)",
        """CREATE TABLE rollouts (
            id TEXT PRIMARY KEY,
            spec TEXT NOT NULL,
            state TEXT NOT NULL,
            progress TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL)""",
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    # 2: result delivery: when the supervisor's own report arrived, how many times, and its log tail.
    (
        "ALTER TABLE updates ADD COLUMN reported_at REAL",
        "ALTER TABLE updates ADD COLUMN reports INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE updates ADD COLUMN last_log TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX updates_by_state ON updates (state)",
    ),
    # 3: fleet scale: node labels; a rollout carried out by the serve replica holding its lease, and the
    # pause/resume/cancel asked of it.
    (
        "ALTER TABLE nodes ADD COLUMN labels TEXT NOT NULL DEFAULT '{}'",
        "ALTER TABLE rollouts ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE rollouts ADD COLUMN lease_until REAL NOT NULL DEFAULT 0",
        "ALTER TABLE rollouts ADD COLUMN control TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX rollouts_by_state ON rollouts (state, created_at)",
        # One row per node of a rollout: a step is one small write, and progress per batch is a query.
        """CREATE TABLE rollout_nodes (
            rollout_id TEXT NOT NULL,
            node TEXT NOT NULL,
            position INTEGER NOT NULL,
            batch INTEGER NOT NULL,
            step TEXT NOT NULL DEFAULT 'pending',
            update_id TEXT NOT NULL DEFAULT '',
            error TEXT NOT NULL DEFAULT '',
            offline_since REAL NOT NULL DEFAULT 0,
            cancel TEXT NOT NULL DEFAULT '',
            updated_at REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (rollout_id, node))""",
        "CREATE INDEX rollout_nodes_by_batch ON rollout_nodes (rollout_id, batch, step)",
    ),
    # 4: who started each push and rollout (the operator's name and the host the command ran on).
    (
        "ALTER TABLE updates ADD COLUMN started_by TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE updates ADD COLUMN started_on TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE rollouts ADD COLUMN started_by TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE rollouts ADD COLUMN started_on TEXT NOT NULL DEFAULT ''",
    ),
    # 5: why an update ended other than committed (a baton.reasons.FailureReason name; '' when committed or
    # when an older supervisor did not say).
    (
        "ALTER TABLE updates ADD COLUMN reason TEXT NOT NULL DEFAULT ''",
    ),
    # 6: why a node refuses every update now (its broken trust material), as its last register or heartbeat said.
    (
        "ALTER TABLE nodes ADD COLUMN updates_refused TEXT NOT NULL DEFAULT ''",
    ),
)
ACTIVE_ROLLOUT_STATES = ("running", "paused")  # a serve replica carries these out
ROLLOUT_CONTROLS = ("", "pause", "cancel")  # what `rollout pause|resume|cancel` leaves for the owner
SCHEMA_VERSION = len(MIGRATIONS)
SERVED_BYTES_KEY = "served_bytes:"  # + sha256: the settings row counting that package's bytes sent


@dataclass(frozen=True)
class Node:
    id: str
    version: str = ""
    hostname: str = ""
    address: str = ""  # where DaemonService is reachable, as the node registered it
    identity: str = ""  # the TLS identity it registered with, "" without TLS
    registered_at: float = 0.0
    last_seen: float = 0.0
    agents: tuple[dict[str, Any], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs from its [node] labels
    updates_refused: str = ""  # why it refuses every update now (broken trust material), "" if it does not

    def matches(self, selector: dict[str, str]) -> bool:
        """Whether every ``key=value`` of the selector is among its labels."""
        mine = dict(self.labels)
        return all(mine.get(k) == v for k, v in selector.items())


@dataclass(frozen=True)
class UpdateRow:
    update_id: str
    node: str
    component: str
    to_version: str
    state: UpdateState = UpdateState.REQUESTED
    from_version: str = ""
    success: bool = False
    rolled_back: bool = False
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    created_at: float = 0.0
    finished_at: float | None = None
    rollout_id: str = ""
    reported_at: float | None = None  # when the supervisor's result arrived
    reports: int = 0  # how many times it arrived (the repeats were answered duplicate=True)
    last_log: str = ""
    reason: str = ""  # a baton.reasons.FailureReason name, "" when committed or not said
    started_by: str = ""  # the operator who started it ("" for an update only a node reported)
    started_on: str = ""  # the host their command ran on

    def to_json(self) -> dict[str, Any]:
        return {
            "update_id": self.update_id, "node": self.node, "component": self.component,
            "from_version": self.from_version, "to_version": self.to_version, "state": self.state.value,
            "success": self.success, "rolled_back": self.rolled_back, "error": self.error,
            "timings": self.timings, "created_at": self.created_at, "finished_at": self.finished_at,
            "rollout_id": self.rollout_id, "reported_at": self.reported_at, "reports": self.reports,
            "last_log": self.last_log, "reason": self.reason, "started_by": self.started_by,
            "started_on": self.started_on,
        }


def failures_by_reason(updates: Iterable[UpdateRow]) -> dict[str, list[UpdateRow]]:
    """The updates that ended other than committed, grouped by failure reason code, most frequent first (the
    ``updates --by-reason`` table and the web page's); an older supervisor's result counts as UNSPECIFIED."""
    groups: dict[str, list[UpdateRow]] = {}
    for u in updates:
        if u.state.final and not u.success:
            groups.setdefault(u.reason or "FAILURE_REASON_UNSPECIFIED", []).append(u)
    return dict(sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))


@dataclass(frozen=True)
class ResultRow:
    """A supervisor's ``UpdateResult``, as the store takes it."""

    update_id: str
    node: str
    component: str
    from_version: str
    to_version: str
    state: UpdateState
    success: bool
    rolled_back: bool
    error: str
    timings: dict[str, float]
    started_at: float
    finished_at: float
    last_log: str = ""
    reason: str = ""


@dataclass(frozen=True)
class RolloutNodeRow:
    """One node of a rollout: its place, its batch, and the step the rollout is at with it."""

    node: str
    batch: int
    position: int = 0  # its place in the rollout's order
    step: str = "pending"
    update_id: str = ""
    error: str = ""
    offline_since: float = 0.0
    cancel: str = ""
    updated_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "batch": self.batch, "update_id": self.update_id, "error": self.error,
                "offline_since": self.offline_since, "cancel": self.cancel}


@dataclass(frozen=True)
class RolloutRow:
    id: str
    spec: dict[str, Any]
    state: str
    progress: dict[str, Any]  # "reason", "offline_deadline"; read back with "nodes" and "batches" added
    created_at: float
    updated_at: float
    owner: str = ""  # the serve replica carrying it out, "" when none
    lease_until: float = 0.0  # the owner's lease: another replica may take it over after this
    control: str = ""  # "", "pause" or "cancel": asked by `rollout pause|cancel`, acted on by the owner
    started_by: str = ""  # the operator who submitted it
    started_on: str = ""  # the host their command ran on


class Store(Protocol):
    """The storage interface the service and the commands use: :class:`SqliteStore` or :class:`PostgresStore`."""

    def register_node(self, node: Node) -> None: ...
    def touch_node(self, node_id: str, version: str = "", updates_refused: str = "") -> bool: ...
    def set_agents(self, node_id: str, agents: list[dict[str, Any]]) -> bool: ...
    def node(self, node_id: str) -> Node | None: ...
    def nodes(self) -> list[Node]: ...
    def create_update(self, row: UpdateRow) -> bool: ...
    def progress_update(self, update_id: str, state: UpdateState, from_version: str = "") -> None: ...
    def finish_update(self, row: UpdateRow) -> None: ...
    def record_result(self, result: ResultRow) -> bool: ...
    def update(self, update_id: str) -> UpdateRow | None: ...
    def updates(self, node: str = "", component: str = "", state: str = "", rollout_id: str = ""
                ) -> list[UpdateRow]: ...
    def create_rollout(self, row: RolloutRow, nodes: Sequence[RolloutNodeRow] = ()) -> None: ...
    def save_rollout(self, rollout_id: str, state: str, progress: dict[str, Any], owner: str = "") -> bool: ...
    def save_rollout_node(self, rollout_id: str, node: RolloutNodeRow, owner: str = "") -> bool: ...
    def rollout_nodes(self, rollout_id: str) -> list[RolloutNodeRow]: ...
    def rollout_batches(self, rollout_id: str) -> dict[int, dict[str, int]]: ...
    def rollout(self, rollout_id: str, with_nodes: bool = True) -> RolloutRow | None: ...
    def rollouts(self) -> list[RolloutRow]: ...
    def claim_rollout(self, owner: str, lease_s: float) -> str | None: ...
    def renew_lease(self, rollout_id: str, owner: str, lease_s: float) -> bool: ...
    def release_rollout(self, rollout_id: str, owner: str) -> None: ...
    def control_rollout(self, rollout_id: str, control: str) -> bool: ...
    def set_setting(self, key: str, value: str) -> None: ...
    def setting(self, key: str) -> str | None: ...
    def add_served_bytes(self, sha256: str, n: int) -> None: ...
    def served_bytes(self, sha256: str) -> int: ...
    def close(self) -> None: ...


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _too_new(current: int) -> SchemaTooNew:
    return SchemaTooNew(f"database schema version {current} is newer than this Manager's "
                        f"({SCHEMA_VERSION}); upgrade the Manager")


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Apply the missing migrations in order, each atomically; returns the version reached.

    Raises:
        SchemaTooNew: the database is ahead of this code.
    """
    current = schema_version(conn)
    if current > SCHEMA_VERSION:
        raise _too_new(current)
    while current < target:
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = schema_version(conn)  # another process may have migrated meanwhile
            if current < target:
                for stmt in MIGRATIONS[current]:
                    conn.execute(stmt)
                current += 1
                conn.execute(f"PRAGMA user_version = {current}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return current


class _SqlStore:
    """The statements, written once with ``?`` placeholders; a subclass supplies the connection."""

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        raise NotImplementedError

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        raise NotImplementedError

    def _exec(self, c: Any, sql: str, args: tuple[Any, ...] = ()) -> Any:
        """Run one statement inside ``_tx`` and return its cursor."""
        return c.execute(sql, args)

    def close(self) -> None:
        raise NotImplementedError

    # ---- nodes -----------------------------------------------------------------------------------------

    def register_node(self, node: Node) -> None:
        now = time.time()
        with self._tx() as c:
            self._exec(
                c,
                """INSERT INTO nodes (id, version, hostname, address, identity, registered_at, last_seen, agents,
                                      labels, updates_refused)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (id) DO UPDATE SET version = excluded.version, hostname = excluded.hostname,
                     address = excluded.address, identity = excluded.identity,
                     registered_at = excluded.registered_at, last_seen = excluded.last_seen,
                     agents = excluded.agents, labels = excluded.labels,
                     updates_refused = excluded.updates_refused""",
                (node.id, node.version, node.hostname, node.address, node.identity, now, now,
                 json.dumps(list(node.agents)), json.dumps(dict(node.labels), sort_keys=True), node.updates_refused),
            )

    def touch_node(self, node_id: str, version: str = "", updates_refused: str = "") -> bool:
        """A heartbeat: False when the node is unknown (it should register again)."""
        with self._tx() as c:
            cur = self._exec(c, "UPDATE nodes SET last_seen = ?, version = COALESCE(NULLIF(?, ''), version), "
                                "updates_refused = ? WHERE id = ?", (time.time(), version, updates_refused, node_id))
            return bool(cur.rowcount > 0)

    def set_agents(self, node_id: str, agents: list[dict[str, Any]]) -> bool:
        with self._tx() as c:
            cur = self._exec(c, "UPDATE nodes SET agents = ?, last_seen = ? WHERE id = ?",
                             (json.dumps(agents), time.time(), node_id))
            return bool(cur.rowcount > 0)

    def node(self, node_id: str) -> Node | None:
        rows = self._query("SELECT * FROM nodes WHERE id = ?", (node_id,))
        return _node(rows[0]) if rows else None

    def nodes(self) -> list[Node]:
        return [_node(r) for r in self._query("SELECT * FROM nodes ORDER BY id")]

    # ---- updates ---------------------------------------------------------------------------------------

    def create_update(self, row: UpdateRow) -> bool:
        """Record an update we are about to push; False if it is recorded already (a resumed push)."""
        with self._tx() as c:
            cur = self._exec(
                c,
                """INSERT INTO updates (update_id, node, component, from_version, to_version, state, created_at,
                                        rollout_id, started_by, started_on)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (update_id) DO NOTHING""",
                (row.update_id, row.node, row.component, row.from_version, row.to_version, row.state.value,
                 row.created_at or time.time(), row.rollout_id, row.started_by, row.started_on),
            )
            return bool(cur.rowcount > 0)

    def progress_update(self, update_id: str, state: UpdateState, from_version: str = "") -> None:
        """A non-final state seen while following; ignored once the row is final or reported."""
        if state.final:
            raise ValueError("progress_update takes non-final states; use finish_update")
        with self._tx() as c:
            self._exec(
                c,
                f"""UPDATE updates SET state = ?, from_version = COALESCE(NULLIF(?, ''), from_version)
                    WHERE update_id = ? AND reported_at IS NULL
                      AND state NOT IN ({",".join("?" * len(FINAL_STATES))})""",
                (state.value, from_version, update_id, *FINAL_STATES),
            )

    def finish_update(self, row: UpdateRow) -> None:
        """The final state as the pusher saw it (or a refused push); ignored once the result has arrived."""
        if not row.state.final:
            raise ValueError("finish_update takes final states")
        with self._tx() as c:
            self._exec(
                c,
                """UPDATE updates SET state = ?, success = ?, rolled_back = ?, error = ?, timings = ?,
                     finished_at = ?, last_log = ?, reason = ?,
                     from_version = COALESCE(NULLIF(?, ''), from_version)
                   WHERE update_id = ? AND reported_at IS NULL""",
                (row.state.value, int(row.success), int(row.rolled_back), row.error, json.dumps(row.timings),
                 row.finished_at or time.time(), row.last_log, row.reason, row.from_version, row.update_id),
            )

    def record_result(self, result: ResultRow) -> bool:
        """Upsert a supervisor's result by update id in one statement; True if it had arrived before.

        One statement, so two replicas given the same result at once still count it once each: the row's
        ``reports`` after the upsert says whether this delivery was the first. The statement's ``WHERE``
        leaves the row alone when it belongs to another node or holds a different final result already.

        Raises:
            NotOwner: the update belongs to another node (nothing written).
            FinalResultKept: the node reported another final result for it before (nothing written).
        """
        now = time.time()
        finals = ",".join("?" * len(FINAL_STATES))
        with self._tx() as c:
            cur = self._exec(
                c,
                f"""INSERT INTO updates (update_id, node, component, from_version, to_version, state, success,
                                        rolled_back, error, timings, created_at, finished_at, reported_at,
                                        reports, last_log, reason)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)
                   ON CONFLICT (update_id) DO UPDATE SET
                     state = excluded.state, success = excluded.success, rolled_back = excluded.rolled_back,
                     error = excluded.error, timings = excluded.timings, finished_at = excluded.finished_at,
                     from_version = excluded.from_version, last_log = excluded.last_log, reason = excluded.reason,
                     reported_at = COALESCE(updates.reported_at, excluded.reported_at),
                     reports = updates.reports + 1
                   WHERE updates.node = excluded.node
                     AND (updates.reported_at IS NULL OR updates.state = excluded.state
                          OR updates.state NOT IN ({finals}))
                   RETURNING reports""",
                (result.update_id, result.node, result.component, result.from_version, result.to_version,
                 result.state.value, int(result.success), int(result.rolled_back), result.error,
                 json.dumps(result.timings), result.started_at or now, result.finished_at or now, now,
                 result.last_log, result.reason, *FINAL_STATES),
            )
            written = cur.fetchone()
            if written is not None:
                return int(written["reports"]) > 1
            kept = self._exec(c, "SELECT node, state FROM updates WHERE update_id = ?",
                              (result.update_id,)).fetchone()
        if kept["node"] != result.node:
            raise NotOwner(result.update_id, kept["node"], result.node)
        raise FinalResultKept(result.update_id, kept["state"], result.state.value)

    def update(self, update_id: str) -> UpdateRow | None:
        rows = self._query("SELECT * FROM updates WHERE update_id = ?", (update_id,))
        return _update(rows[0]) if rows else None

    def updates(self, node: str = "", component: str = "", state: str = "", rollout_id: str = ""
                ) -> list[UpdateRow]:
        """The history, oldest first, filtered by any of node, component, state (a state name), rollout."""
        where, args = [], []
        for col, value in (("node", node), ("component", component), ("state", state.lower()),
                           ("rollout_id", rollout_id)):
            if value:
                where.append(f"{col} = ?")
                args.append(value)
        sql = "SELECT * FROM updates" + (" WHERE " + " AND ".join(where) if where else "")
        return [_update(r) for r in self._query(sql + " ORDER BY created_at, update_id", tuple(args))]

    # ---- rollouts --------------------------------------------------------------------------------------

    def create_rollout(self, row: RolloutRow, nodes: Sequence[RolloutNodeRow] = ()) -> None:
        """The rollout and its nodes, in their order (``progress`` keeps only the rollout's own fields)."""
        with self._tx() as c:
            self._exec(c, "INSERT INTO rollouts (id, spec, state, progress, created_at, updated_at, started_by, "
                          "started_on) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (row.id, json.dumps(row.spec), row.state, json.dumps(_own_fields(row.progress)),
                        row.created_at, row.updated_at, row.started_by, row.started_on))
            for i, n in enumerate(nodes):
                self._exec(c, """INSERT INTO rollout_nodes (rollout_id, node, position, batch, step, update_id, error,
                                                            offline_since, cancel, updated_at)
                                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                           (row.id, n.node, i, n.batch, n.step, n.update_id, n.error, n.offline_since, n.cancel,
                            row.created_at))

    def _owned(self, c: Any, rollout_id: str, owner: str) -> bool:
        """Inside a transaction: whether ``owner`` holds the rollout, its row locked until the commit."""
        row = self._exec(c, f"SELECT owner FROM rollouts WHERE id = ? {self._ROW_LOCK}", (rollout_id,)).fetchone()
        return row is not None and row["owner"] == owner

    def save_rollout(self, rollout_id: str, state: str, progress: dict[str, Any], owner: str = "") -> bool:
        """Write the rollout's state and progress; with ``owner``, only while that replica still owns it.

        False means another replica took the rollout over: the caller must stop acting on it (a fence, so
        a replica that was merely slow never pushes after its lease passed to another).
        """
        progress = _own_fields(progress)
        sql = "UPDATE rollouts SET state = ?, progress = ?, updated_at = ? WHERE id = ?"
        args: tuple[Any, ...] = (state, json.dumps(progress), time.time(), rollout_id)
        if owner:
            sql += " AND owner = ?"
            args += (owner,)
        with self._tx() as c:
            return bool(self._exec(c, sql, args).rowcount > 0)

    def save_rollout_node(self, rollout_id: str, node: RolloutNodeRow, owner: str = "") -> bool:
        """Write one node's step; with ``owner``, only while that replica still owns the rollout (a fence).

        An upsert: a rollout started before schema 3 kept its nodes in ``progress`` and gets its rows here.
        """
        with self._tx() as c:
            if owner and not self._owned(c, rollout_id, owner):
                return False
            self._exec(c, """INSERT INTO rollout_nodes (rollout_id, node, position, batch, step, update_id, error,
                                                        offline_since, cancel, updated_at)
                             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                             ON CONFLICT (rollout_id, node) DO UPDATE SET step = excluded.step,
                               update_id = excluded.update_id, error = excluded.error,
                               offline_since = excluded.offline_since, cancel = excluded.cancel,
                               updated_at = excluded.updated_at""",
                       (rollout_id, node.node, node.position, node.batch, node.step, node.update_id, node.error,
                        node.offline_since, node.cancel, time.time()))
            return True

    def rollout_nodes(self, rollout_id: str) -> list[RolloutNodeRow]:
        """Its nodes in the rollout's order."""
        return [_rollout_node(r) for r in self._query(
            "SELECT * FROM rollout_nodes WHERE rollout_id = ? ORDER BY position", (rollout_id,))]

    def rollout_batches(self, rollout_id: str) -> dict[int, dict[str, int]]:
        """Progress per batch: for each batch, how many of its nodes are at each step."""
        out: dict[int, dict[str, int]] = {}
        for r in self._query("SELECT batch, step, COUNT(*) AS n FROM rollout_nodes WHERE rollout_id = ? "
                             "GROUP BY batch, step ORDER BY batch, step", (rollout_id,)):
            out.setdefault(int(r["batch"]), {})[r["step"]] = int(r["n"])
        return out

    def rollout(self, rollout_id: str, with_nodes: bool = True) -> RolloutRow | None:
        """The rollout; with its nodes and batches in ``progress`` unless ``with_nodes`` is False."""
        rows = self._query("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        if not rows:
            return None
        row = _rollout(rows[0])
        if not with_nodes:
            return row
        return _with_nodes(row, self.rollout_nodes(rollout_id))

    def rollouts(self) -> list[RolloutRow]:
        nodes: dict[str, list[RolloutNodeRow]] = {}
        for r in self._query("SELECT * FROM rollout_nodes ORDER BY rollout_id, position"):
            nodes.setdefault(r["rollout_id"], []).append(_rollout_node(r))
        return [_with_nodes(_rollout(r), nodes.get(r["id"], []))
                for r in self._query("SELECT * FROM rollouts ORDER BY created_at")]

    _CLAIM_LOCK = ""  # PostgreSQL: FOR UPDATE SKIP LOCKED
    _ROW_LOCK = ""  # PostgreSQL: FOR UPDATE (SQLite's BEGIN IMMEDIATE locks the whole database)

    def claim_rollout(self, owner: str, lease_s: float) -> str | None:
        """Take the oldest active rollout nobody holds (or whose owner's lease ran out); its id, or None.

        A replica never gets back a rollout it holds: it is driving that one already.
        """
        now = time.time()
        with self._tx() as c:
            row = self._exec(
                c,
                f"""SELECT id FROM rollouts
                    WHERE state IN (?, ?) AND (owner = '' OR lease_until < ?)
                    ORDER BY created_at LIMIT 1 {self._CLAIM_LOCK}""",
                (*ACTIVE_ROLLOUT_STATES, now),
            ).fetchone()
            if row is None:
                return None
            self._exec(c, "UPDATE rollouts SET owner = ?, lease_until = ? WHERE id = ?",
                       (owner, now + lease_s, row["id"]))
            return str(row["id"])

    def renew_lease(self, rollout_id: str, owner: str, lease_s: float) -> bool:
        """Extend the lease; False when it is no longer ours (taken over): stop at once."""
        with self._tx() as c:
            cur = self._exec(c, "UPDATE rollouts SET lease_until = ? WHERE id = ? AND owner = ?",
                             (time.time() + lease_s, rollout_id, owner))
            return bool(cur.rowcount > 0)

    def release_rollout(self, rollout_id: str, owner: str) -> None:
        with self._tx() as c:
            self._exec(c, "UPDATE rollouts SET owner = '', lease_until = 0 WHERE id = ? AND owner = ?",
                       (rollout_id, owner))

    def control_rollout(self, rollout_id: str, control: str) -> bool:
        """Ask the owner to pause (``pause``), go on (``""``) or cancel (``cancel``); False once it ended.

        A cancel is never taken back by a later pause or resume.
        """
        if control not in ROLLOUT_CONTROLS:
            raise ValueError(f"unknown rollout control {control!r}")
        with self._tx() as c:
            cur = self._exec(c, "UPDATE rollouts SET control = ?, updated_at = ? "
                                "WHERE id = ? AND state IN (?, ?) AND control <> 'cancel'",
                             (control, time.time(), rollout_id, *ACTIVE_ROLLOUT_STATES))
            return bool(cur.rowcount > 0)

    # ---- settings --------------------------------------------------------------------------------------

    def set_setting(self, key: str, value: str) -> None:
        with self._tx() as c:
            self._exec(c, "INSERT INTO settings (key, value) VALUES (?, ?) "
                          "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    def setting(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM settings WHERE key = ?", (key,))
        return str(rows[0]["value"]) if rows else None

    # ---- package bytes served ---------------------------------------------------------------------------
    # A counter per content address, added to by every replica's package server in one statement (no
    # read-modify-write race), kept among the settings so that it needs no migration.

    def add_served_bytes(self, sha256: str, n: int) -> None:
        with self._tx() as c:
            self._exec(c, "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                          "value = CAST(CAST(settings.value AS BIGINT) + CAST(excluded.value AS BIGINT) AS TEXT)",
                       (SERVED_BYTES_KEY + sha256, str(int(n))))

    def served_bytes(self, sha256: str) -> int:
        """Package bytes sent for this content address by every package server on this database."""
        value = self.setting(SERVED_BYTES_KEY + sha256)
        return int(value) if value else 0


class SqliteStore(_SqlStore):
    """The SQLite implementation of :class:`Store`; safe to share between threads of one process."""

    def __init__(self, path: Path, *, migrate_to: int = SCHEMA_VERSION) -> None:
        self.path = Path(path)
        self.url = str(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                         check_same_thread=False)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            migrate(self._conn, migrate_to)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the database {self.path}: {e}") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE) so a read-then-write cannot interleave."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()


PG_POOL_SIZE = 8  # connections per process: the service's worker threads (manager/service.py WORKERS)
_PG_SCHEMA_LOCK = 0x6261746F6E  # "baton": the advisory lock replicas take to migrate one at a time
_PLACEHOLDER = re.compile(r"\?")


def _pg(sql: str) -> str:
    """Our statements in PostgreSQL's dialect: ``%s`` placeholders, DOUBLE PRECISION for REAL."""
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", _PLACEHOLDER.sub("%s", sql))


class PostgresStore(_SqlStore):
    """The PostgreSQL implementation of :class:`Store` (psycopg 3).

    A small pool of connections (``pool_size``, opened as needed), so the service's threads and the
    rollouts' workers run their statements in parallel; autocommit outside the explicit transactions. A
    connection the server dropped (a restart, a failover) is replaced when it is next taken; the call
    that found it broken fails.
    """

    _CLAIM_LOCK = "FOR UPDATE SKIP LOCKED"
    _ROW_LOCK = "FOR UPDATE"

    def __init__(self, url: str, *, migrate_to: int = SCHEMA_VERSION, pool_size: int = PG_POOL_SIZE,
                 password: str = "") -> None:
        import psycopg

        self.url = _redacted(url, password)
        self._dsn = url
        self._password = password  # "" leaves it to the URL, PGPASSWORD or PGPASSFILE (libpq's conventions)
        self.pool_size = pool_size
        self._cond = threading.Condition()
        self._idle: list[psycopg.Connection[dict[str, Any]]] = []
        self._opened = 0
        try:
            with self._checkout() as conn:
                self._migrate(conn, migrate_to)
        except psycopg.Error as e:
            self.close()
            raise StoreError(_redacted(f"cannot open the database {url}: {str(e).strip()}", password)) from None

    def _connect(self) -> psycopg.Connection[dict[str, Any]]:
        import psycopg
        from psycopg.rows import dict_row

        # password=None is left out of the connection string: then the URL's, PGPASSWORD's or PGPASSFILE's.
        return psycopg.connect(self._dsn, autocommit=True, row_factory=dict_row,
                               connect_timeout=int(BUSY_TIMEOUT_S), password=self._password or None)

    @contextmanager
    def _checkout(self) -> Iterator[psycopg.Connection[dict[str, Any]]]:
        """A connection of the pool for one call; a new one when none is idle and the pool is not full."""
        with self._cond:
            while not self._idle and self._opened >= self.pool_size:
                self._cond.wait()
            conn = self._idle.pop() if self._idle else None
            if conn is None:
                self._opened += 1
        try:
            if conn is None or conn.closed or conn.broken:
                conn = self._connect()
        except BaseException:
            with self._cond:
                self._opened -= 1
                self._cond.notify()
            raise
        try:
            yield conn
        finally:
            with self._cond:
                self._idle.append(conn)
                self._cond.notify()

    def schema_version(self) -> int:
        with self._checkout() as conn:
            return self._version(conn)

    @staticmethod
    def _version(conn: psycopg.Connection[dict[str, Any]]) -> int:
        row = conn.execute("SELECT to_regclass('schema_version') AS t").fetchone()
        if row is None or row["t"] is None:
            return 0
        got = conn.execute("SELECT version FROM schema_version").fetchone()
        return int(got["version"]) if got else 0

    def _migrate(self, conn: psycopg.Connection[dict[str, Any]], target: int) -> int:
        current = self._version(conn)
        if current > SCHEMA_VERSION:
            raise _too_new(current)
        while current < target:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_SCHEMA_LOCK,))
                conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                current = self._version(conn)  # another replica may have migrated meanwhile
                if current > SCHEMA_VERSION:
                    raise _too_new(current)
                if current < target:
                    for stmt in MIGRATIONS[current]:
                        conn.execute(_pg(stmt).encode())
                    current += 1
                    conn.execute("DELETE FROM schema_version")
                    conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (current,))
        return current

    def close(self) -> None:
        with self._cond:
            for conn in self._idle:
                conn.close()
            self._idle.clear()

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        with self._checkout() as conn, conn.transaction():
            yield conn

    def _exec(self, c: Any, sql: str, args: tuple[Any, ...] = ()) -> Any:
        return c.execute(_pg(sql).encode(), args)

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._checkout() as conn:
            return conn.execute(_pg(sql).encode(), args).fetchall()


# Every spelling of a password a database string can carry: ``user:PASSWORD@`` in a URL, and ``password=``
# as a URL query parameter or a libpq keyword (quoted or not).
_URL_PASSWORD = re.compile(r"(://[^:/@?#]*):[^@/?#]*@")
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]*)", re.IGNORECASE)
_KEYWORD_DSN = re.compile(r"^\s*[A-Za-z_]+\s*=")  # libpq's "host=... dbname=..." form
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
PG_SCHEMES = ("postgresql://", "postgres://")


def _redacted(text: str, password: str = "") -> str:
    """A database URL (or a message holding one) without its password, for messages and logs."""
    text = _KEYWORD_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", text))
    return text.replace(password, "***") if password else text


def password_from_file(path: Path) -> str:
    """The database password kept in a file of its own (its first line), so that it is in no command line.

    Raises:
        StoreError: the file cannot be read, is empty, or group or others may read it.
    """
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"--db-password-file {path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    if mode & 0o077:
        raise StoreError(f"--db-password-file {path}: group or others may read it (mode {mode & 0o777:04o}); "
                         "chmod 600 it")
    password = text.split("\n", 1)[0]
    if not password:
        raise StoreError(f"--db-password-file {path}: its first line is empty")
    return password


def open_store(url: str, password: str = "") -> SqliteStore | PostgresStore:
    """``postgresql://...`` (or ``postgres://``), ``sqlite:///path``, or a bare path to a SQLite file.

    ``password`` (from ``--db-password-file``) is for PostgreSQL; without it libpq's own ``PGPASSWORD`` and
    ``PGPASSFILE`` (``~/.pgpass``) apply. Anything else is refused without being echoed whole: a libpq keyword
    string would otherwise become a SQLite file named after it, password included.

    Raises:
        StoreError: not a database string this Manager knows, or the database cannot be opened.
    """
    if url.startswith(PG_SCHEMES):
        if password and (_URL_PASSWORD.search(url) or _KEYWORD_PASSWORD.search(url.partition("?")[2])):
            raise StoreError(f"--db {_redacted(url)} has a password and --db-password-file gives another: give "
                             "it once")
        return PostgresStore(url, password=password)
    if _KEYWORD_DSN.match(url):
        raise StoreError("--db looks like a libpq keyword string (KEY=VALUE ...), which this Manager does not "
                         "read: give postgresql://USER@HOST/DB (the password by PGPASSWORD, ~/.pgpass or "
                         "--db-password-file)")
    if not url.strip():
        raise StoreError("--db is empty: give a SQLite path, sqlite:///PATH or postgresql://...")
    if password:
        raise StoreError("--db-password-file is for a PostgreSQL --db (postgresql://...); SQLite has no password")
    if url.startswith("sqlite:"):
        path = url.removeprefix("sqlite://")
        if not url.startswith("sqlite://") or not path.startswith("/"):
            raise StoreError(f"{_redacted(url)}: expected sqlite:///ABSOLUTE/PATH")
        return SqliteStore(Path(path))
    if _SCHEME.match(url):
        raise StoreError(f"{_redacted(url)}: unknown database URL (postgresql://... or sqlite:///PATH)")
    return SqliteStore(Path(url))


def _node(r: Any) -> Node:
    return Node(id=r["id"], version=r["version"], hostname=r["hostname"], address=r["address"],
                identity=r["identity"], registered_at=r["registered_at"], last_seen=r["last_seen"],
                agents=tuple(json.loads(r["agents"])), labels=tuple(sorted(json.loads(r["labels"]).items())),
                updates_refused=r["updates_refused"])


def _update(r: Any) -> UpdateRow:
    return UpdateRow(
        update_id=r["update_id"], node=r["node"], component=r["component"], from_version=r["from_version"],
        to_version=r["to_version"], state=UpdateState(r["state"]), success=bool(r["success"]),
        rolled_back=bool(r["rolled_back"]), error=r["error"], timings=json.loads(r["timings"]),
        created_at=r["created_at"], finished_at=r["finished_at"], rollout_id=r["rollout_id"],
        reported_at=r["reported_at"], reports=r["reports"], last_log=r["last_log"], reason=r["reason"],
        started_by=r["started_by"], started_on=r["started_on"],
    )


def _rollout(r: Any) -> RolloutRow:
    return RolloutRow(id=r["id"], spec=json.loads(r["spec"]), state=r["state"], progress=json.loads(r["progress"]),
                      created_at=r["created_at"], updated_at=r["updated_at"], owner=r["owner"],
                      lease_until=r["lease_until"], control=r["control"], started_by=r["started_by"],
                      started_on=r["started_on"])


def _rollout_node(r: Any) -> RolloutNodeRow:
    return RolloutNodeRow(node=r["node"], batch=r["batch"], position=r["position"], step=r["step"],
                          update_id=r["update_id"], error=r["error"], offline_since=r["offline_since"],
                          cancel=r["cancel"], updated_at=r["updated_at"])


def _with_nodes(row: RolloutRow, nodes: list[RolloutNodeRow]) -> RolloutRow:
    """``progress`` as the commands show it: the rollout's own fields, each node, and counts per batch.

    A rollout from before schema 3 kept its nodes in ``progress``: those, overridden by any row since.
    """
    merged: dict[str, dict[str, Any]] = {**row.progress.get("nodes", {}), **{n.node: n.to_json() for n in nodes}}
    batches: dict[str, dict[str, int]] = {}
    for p in merged.values():
        counts = batches.setdefault(str(p["batch"]), {})
        counts[p["step"]] = counts.get(p["step"], 0) + 1
    return replace(row, progress={**row.progress, "nodes": merged, "batches": batches})


def _own_fields(progress: dict[str, Any]) -> dict[str, Any]:
    """What the rollouts row keeps of a progress document: not its nodes (table rollout_nodes) nor counts."""
    return {k: v for k, v in progress.items() if k not in ("nodes", "batches")}
