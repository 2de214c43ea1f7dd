"""The update journal: one crash-safe record per update, shared by supervisor and helper.

``<state_dir>/updates/<update_id>/journal.json`` is rewritten whole on every
state change (write temp, fsync, rename, fsync dir), so after a kill -9 it holds
the last state that was reached, never a torn one. The helper is the only
writer while it runs (it holds the component's lock); the supervisor creates
the record (REQUESTED) and reads it. Byte-level download progress is not
worth an fsync: it goes to ``progress.json`` beside it, written with a plain
atomic rename.

The record guards its own state: :meth:`UpdateRecord.moved` is the only way to
a new state and refuses a move that ``baton.states.UPDATE_TRANSITIONS`` does
not list (``IllegalTransition``), and :meth:`Journal.save` refuses a record
whose state is not the last one ``moved`` recorded (a ``replace(state=...)``),
so no writer, helper or supervisor, can put a state on disk around the table.

Update ids and Baton's own names share ``<state_dir>/updates/``: the helpers'
lock directory (``LOCKS_DIR``) lives there, at the same path in every version, so
that an old and a new helper still exclude each other. An id is therefore never
one of ``RESERVED_IDS`` (:func:`check_update_id`), and every internal name in that
directory is built here, from that set, so none can be added without reserving it.

Format version 1. Readers ignore unknown keys, so a newer writer can add some.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from baton import durable
from baton.errors import BatonError
from baton.states import UPDATE_TRANSITIONS, IllegalTransition, UpdateState, check_move

JOURNAL_FORMAT = 1
# Cancel (docs/protocols.md): the supervisor writes <update dir>/cancel durably, then sends CANCEL_SIGNAL to the
# helper pid the journal names; the helper checks the file between steps and on the signal.
JOURNAL_FILE = "journal.json"  # in <state_dir>/updates/<update_id>/, replaced whole by rename
CANCELLED = "cancelled"  # the reason and error of a cancelled update
CANCEL_SIGNAL = signal.SIGUSR1
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PRUNED_PREFIX = ".pruned-"  # not a valid update id, so never read as a record
JOURNAL_DIR = "updates"  # <state_dir>/updates: one directory per update id, and LOCKS_DIR
LOCKS_DIR = "locks"  # <state_dir>/updates/locks/<component>.lock: helper/locks.py
# Names in JOURNAL_DIR that are Baton's, not an update's: an id equal to one would make a record of the
# helpers' lock directory, and pruning that record would delete the lock files under a running helper.
RESERVED_IDS = frozenset({LOCKS_DIR})


class JournalError(BatonError):
    pass


@dataclass(frozen=True)
class UpdateRequestRecord:
    node_id: str
    component: str
    version: str
    download_url: str
    sha256: str
    signature: str
    size: int
    allow_downgrade: bool = False
    force: bool = False
    reinstall: bool = False


@dataclass(frozen=True)
class Transition:
    state: str
    at: float
    note: str = ""


@dataclass(frozen=True)
class UpdateRecord:
    update_id: str
    request: UpdateRequestRecord
    state: UpdateState = UpdateState.REQUESTED
    from_version: str = ""
    from_dir: str = ""  # what ``current`` named at push: where a rollback goes (a reinstall shares the version)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    finished_at: float = 0.0
    success: bool = False
    rolled_back: bool = False
    error: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    history: tuple[Transition, ...] = ()
    settled: bool = False
    attempts: int = 0
    helper_pid: int = 0
    last_log: str = ""
    reason: str = ""  # a baton.reasons.FailureReason value once the update ended other than committed
    download_file: tuple[int, int] | None = None  # (st_dev, st_ino) of the download file the helper created
    format: int = JOURNAL_FORMAT

    @property
    def component(self) -> str:
        return self.request.component

    @property
    def to_version(self) -> str:
        return self.request.version

    @property
    def final(self) -> bool:
        return self.state.final

    def moved(self, state: UpdateState, note: str = "", **changes: Any) -> UpdateRecord:
        """This record in ``state``, with the move in its history.

        Raises:
            IllegalTransition: the move is not in UPDATE_TRANSITIONS (a fresh record's only move is its
                creation, REQUESTED -> REQUESTED, which starts the history).
        """
        what = f"update {self.update_id}"
        if self.history:
            check_move(UPDATE_TRANSITIONS, self.state, state, what)
        elif not (self.state is UpdateState.REQUESTED and state is UpdateState.REQUESTED):
            raise IllegalTransition(f"{what}: a new record starts in requested, not "
                                    f"{self.state.value} -> {state.value}")
        now = time.time()
        return replace(self, state=state, updated_at=now, history=(*self.history, Transition(state.value, now, note)),
                       **changes)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        d["history"] = [asdict(t) for t in self.history]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> UpdateRecord:
        req = d["request"]
        known_req = {k: req[k] for k in UpdateRequestRecord.__dataclass_fields__ if k in req}
        return cls(
            update_id=d["update_id"],
            request=UpdateRequestRecord(**known_req),
            state=UpdateState(d["state"]),
            from_version=d.get("from_version", ""),
            from_dir=d.get("from_dir", ""),
            created_at=d.get("created_at", 0.0),
            updated_at=d.get("updated_at", 0.0),
            finished_at=d.get("finished_at", 0.0),
            success=d.get("success", False),
            rolled_back=d.get("rolled_back", False),
            error=d.get("error", ""),
            timings=dict(d.get("timings", {})),
            history=tuple(Transition(**t) for t in d.get("history", [])),
            settled=d.get("settled", False),
            attempts=d.get("attempts", 0),
            helper_pid=d.get("helper_pid", 0),
            last_log=d.get("last_log", ""),
            reason=d.get("reason", ""),
            download_file=(int(d["download_file"][0]), int(d["download_file"][1])) if d.get("download_file") else None,
            format=d.get("format", JOURNAL_FORMAT),
        )


def check_guarded(rec: UpdateRecord) -> None:
    """Raises IllegalTransition unless ``rec``'s state is the last one :meth:`UpdateRecord.moved` recorded: the
    check of every store of records (this module's :class:`Journal`, the fast tier's in-memory one)."""
    if not rec.history or rec.history[-1].state != rec.state.value:
        last = rec.history[-1].state if rec.history else "nothing"
        raise IllegalTransition(f"update {rec.update_id}: state {rec.state.value} was not reached by a "
                                f"guarded move (last recorded: {last})")


def check_update_id(update_id: str) -> None:
    """Raises JournalError, with the reason, unless ``update_id`` may name a record in the journal."""
    if update_id in RESERVED_IDS:
        raise JournalError(f"update id {update_id!r} is reserved: it names Baton's own directory "
                           f"{JOURNAL_DIR}/{update_id} in the state directory")
    if not _ID_RE.match(update_id):
        raise JournalError(f"invalid update id {update_id[:80]!r}: 1-64 letters, digits, '_', '.', '-', "
                           "starting with a letter or digit")


def valid_update_id(update_id: str) -> bool:
    try:
        check_update_id(update_id)
    except JournalError:
        return False
    return True


def journal_root(state_dir: Path) -> Path:
    return Path(state_dir) / JOURNAL_DIR


def lock_dir(state_dir: Path) -> Path:
    """Where helpers hold their component locks: the same path in every version (see the module docstring)."""
    return journal_root(state_dir) / LOCKS_DIR


class Ended(NamedTuple):
    """What pruning and the result outbox need of a final, settled record (such a record never changes again)."""

    update_id: str
    component: str
    finished_at: float  # its updated_at if it has no finish time
    created_at: float
    state: UpdateState  # final


class Journal:
    """All update records under ``<state_dir>/updates``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = journal_root(state_dir)
        self._ended: dict[str, Ended] = {}  # read once per process: see ended()

    def dir(self, update_id: str) -> Path:
        check_update_id(update_id)
        return self.root / update_id

    def path(self, update_id: str) -> Path:
        return self.dir(update_id) / JOURNAL_FILE

    def progress_path(self, update_id: str) -> Path:
        return self.dir(update_id) / "progress.json"

    def cancel_path(self, update_id: str) -> Path:
        return self.dir(update_id) / "cancel"

    def request_cancel(self, update_id: str) -> None:
        """Durable before the helper is signalled: a helper started later, or restarted, still sees it."""
        durable.write_bytes(self.cancel_path(update_id), f"{time.time()}\n".encode(), 0o600)

    def cancel_requested(self, update_id: str) -> bool:
        return self.cancel_path(update_id).exists()

    def create(self, rec: UpdateRecord) -> None:
        d = self.dir(rec.update_id)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            raise JournalError(f"update {rec.update_id} already exists") from None
        self._ended.pop(rec.update_id, None)  # an id used again after its record was pruned
        durable.fsync_dir(self.root)
        self.save(rec.moved(UpdateState.REQUESTED))

    def save(self, rec: UpdateRecord) -> None:
        """Write ``rec`` durably; IllegalTransition if its state was not reached through ``moved``."""
        check_guarded(rec)
        durable.write_json(self.path(rec.update_id), rec.to_json(), 0o600)

    def load(self, update_id: str) -> UpdateRecord:
        try:
            return UpdateRecord.from_json(durable.read_json(self.path(update_id)))
        except FileNotFoundError:
            raise JournalError(f"no update {update_id!r}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise JournalError(f"journal of update {update_id} is unreadable: {e!r}") from None

    def all(self) -> list[UpdateRecord]:
        out: list[UpdateRecord] = []
        if not self.root.is_dir():
            return out
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and (d / JOURNAL_FILE).is_file():
                try:
                    out.append(self.load(d.name))
                except JournalError:
                    continue
        out.sort(key=lambda r: r.created_at)
        return out

    def ended(self) -> list[Ended]:
        """Every final, settled record, oldest first, each parsed once by this Journal object.

        A settled record is never written again, so a supervisor that prunes and reports after each update
        reads only the records that changed since, not all of them (100 by default) twice per update.
        """
        if not self.root.is_dir():
            return []
        names = {d.name for d in self.root.iterdir() if valid_update_id(d.name)}
        for gone in self._ended.keys() - names:
            del self._ended[gone]
        for name in names - self._ended.keys():
            try:
                rec = self.load(name)
            except JournalError:  # being created, or unreadable: all() skips it too
                continue
            if rec.final and rec.settled:
                self._ended[name] = Ended(rec.update_id, rec.component, rec.finished_at or rec.updated_at,
                                          rec.created_at, rec.state)
        return sorted((self._ended[n] for n in sorted(names) if n in self._ended), key=lambda e: e.created_at)

    def unfinished(self) -> list[UpdateRecord]:
        """Updates still needing a helper: not final, or final with their after-effects not yet settled."""
        return [r for r in self.all() if not (r.final and r.settled)]

    def write_progress(self, update_id: str, progress: dict[str, Any]) -> None:
        """Not durable on purpose: progress is advisory and frequent."""
        p = self.progress_path(update_id)
        tmp = p.with_name(f".progress.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(progress))
        os.replace(tmp, p)

    def read_progress(self, update_id: str) -> dict[str, Any]:
        try:
            return dict(json.loads(self.progress_path(update_id).read_text()))
        except (OSError, ValueError):
            return {}

    def prune(self, keep: int, max_age_s: float, delivered: Callable[[Ended], bool],
              now: float | None = None, before_remove: Callable[[list[Ended]], None] | None = None) -> list[str]:
        """Remove delivered final records beyond the newest ``keep`` or finished more than ``max_age_s`` ago.

        Only final, settled records for which ``delivered`` says yes (the Manager
        has it, or there is no Manager) are removed; unfinished ones never count
        or go. ``before_remove`` is given the records about to go before any is
        touched (the running totals keep them: ``supervisor/update_totals.py``).
        Each removal is durable: the directory is renamed out of the record
        namespace and the rename fsynced before it is deleted, so a crash leaves
        a whole record or a leftover the next prune deletes.
        """
        now = time.time() if now is None else now
        self._sweep_pruned()
        final = sorted(self.ended(), key=lambda e: (e.finished_at, e.created_at), reverse=True)
        going = [rec for i, rec in enumerate(final)
                 if (i >= keep or now - rec.finished_at > max_age_s) and delivered(rec)]
        if going and before_remove is not None:
            before_remove(going)
        removed: list[str] = []
        for rec in going:
            gone = self.root / f"{_PRUNED_PREFIX}{rec.update_id}"
            os.replace(self.dir(rec.update_id), gone)
            durable.fsync_dir(self.root)
            self._ended.pop(rec.update_id, None)
            durable.remove_tree(gone)
            removed.append(rec.update_id)
        return removed

    def _sweep_pruned(self) -> None:
        if self.root.is_dir():
            for d in self.root.glob(f"{_PRUNED_PREFIX}*"):
                durable.remove_tree(d)
