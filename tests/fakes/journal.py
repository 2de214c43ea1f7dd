"""The journal's storage in memory: what a write made durable, and a kill or an IO error at any write."""

from __future__ import annotations

import errno
import json
from typing import Any

from baton.journal import JournalError, UpdateRecord, check_guarded
from tests.fakes.crash import Crash


class MemoryJournal:
    """A ``JournalStore``: each ``save`` is one durable write, numbered from 1.

    ``crash_after``: the write with that number is made, then the helper is killed (:class:`Crash`).
    ``fail_at``: the write with that number raises ``fail_with`` and writes nothing (a full disk).
    Both are one shot, as a kill is: a helper started afterwards writes freely.
    """

    def __init__(self) -> None:
        self.disk: dict[str, str] = {}  # update id -> the record's JSON, as the last durable write left it
        self.progress: dict[str, dict[str, Any]] = {}
        self.cancelled: set[str] = set()
        self.writes = 0
        self.states_written: list[str] = []
        self.crash_after: int | None = None
        self.fail_at: int | None = None
        self.fail_with: OSError = OSError(errno.ENOSPC, "No space left on device")

    def create(self, rec: UpdateRecord) -> None:
        self.disk[rec.update_id] = json.dumps(rec.moved(rec.state).to_json())

    def load(self, update_id: str) -> UpdateRecord:
        try:
            return UpdateRecord.from_json(json.loads(self.disk[update_id]))
        except KeyError:
            raise JournalError(f"no update {update_id!r}") from None

    def save(self, rec: UpdateRecord) -> None:
        check_guarded(rec)
        self.writes += 1
        if self.writes == self.fail_at:
            self.fail_at = None
            raise self.fail_with
        self.disk[rec.update_id] = json.dumps(rec.to_json())
        self.states_written.append(rec.state.value)
        if self.writes == self.crash_after:
            self.crash_after = None
            raise Crash(f"killed after write {self.writes} ({rec.state.value})")

    def write_progress(self, update_id: str, progress: dict[str, Any]) -> None:
        self.progress[update_id] = dict(progress)

    def cancel_requested(self, update_id: str) -> bool:
        return update_id in self.cancelled
