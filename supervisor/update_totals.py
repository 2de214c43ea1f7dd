"""Running totals of finished updates that never go down, although the journal they come from is pruned.

``baton_updates_finished_total`` is a counter: Prometheus reads a drop as a
restart and counts everything again, so a total rebuilt from the journal (which
keeps ``update.keep_updates`` records) went down at every prune and lied.

``<state_dir>/metrics/update-totals.json`` (format version 1) keeps the results
of the records pruning removed, and the ids it folded in that may still be in
the journal. A total is the file's count plus the settled records in the journal
it has not folded. Pruning folds the records it is about to remove first
(:meth:`UpdateTotals.fold`, durable: write-temp, fsync, rename, fsync the
directory), so a crash before the removal counts them once (from the file; the
journal's copy is skipped by id) and one after it too. Ids no longer in the
journal are dropped from the file at the next fold, so it stays small.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from baton import durable
from baton.journal import Ended, Journal
from baton.log import logger
from baton.states import UpdateState

TOTALS_FORMAT = 1
TOTALS_FILE = "update-totals.json"


def totals_path(state_dir: Path) -> Path:
    return Path(state_dir) / "metrics" / TOTALS_FILE


def update_result(state: UpdateState) -> str | None:
    """committed / failed / rolled_back for a final state, None otherwise."""
    return {UpdateState.COMMITTED: "committed", UpdateState.FAILED: "failed",
            UpdateState.ROLLED_BACK: "rolled_back"}.get(state)


class UpdateTotals:
    """Finished updates by (component, result) since this host's state directory began; one per supervisor."""

    def __init__(self, state_dir: Path) -> None:
        self.path = totals_path(state_dir)
        self._lock = threading.Lock()  # the metrics thread reads while the event loop's prune folds

    def _load(self) -> tuple[Counter[tuple[str, str]], set[str]]:
        try:
            d = durable.read_json(self.path)
        except FileNotFoundError:
            return Counter(), set()
        except (OSError, ValueError) as e:
            logger.error("{} is unreadable ({}): finished-update totals start from the journal", self.path, e)
            return Counter(), set()
        totals: Counter[tuple[str, str]] = Counter()
        for comp, results in dict(d.get("finished", {})).items():
            for result, n in dict(results).items():
                totals[(str(comp), str(result))] = int(n)
        return totals, {str(i) for i in d.get("folded", [])}

    def fold(self, going: Iterable[Ended], still_there: Iterable[str]) -> None:
        """Add ``going`` (records about to be pruned) to the file, durably, before they are removed.

        ``still_there``: the ids of the journal now, to forget folded ids that are gone.

        Raises:
            OSError: the file could not be written; the caller must then not prune.
        """
        with self._lock:
            totals, folded = self._load()
            for e in going:
                result = update_result(e.state)
                if result is not None and e.update_id not in folded:
                    totals[(e.component, result)] += 1
                    folded.add(e.update_id)
            folded &= set(still_there) | {e.update_id for e in going}
            finished: dict[str, dict[str, int]] = {}
            for (comp, result), n in sorted(totals.items()):
                finished.setdefault(comp, {})[result] = n
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            durable.write_json(self.path, {"v": TOTALS_FORMAT, "finished": finished, "folded": sorted(folded)},
                               0o600)

    def finished(self, journal: Journal) -> Counter[tuple[str, str]]:
        """The totals now: the file's plus the journal's settled records not yet folded into it."""
        with self._lock:
            totals, folded = self._load()
            for e in journal.ended():
                result = update_result(e.state)
                if result is not None and e.update_id not in folded:
                    totals[(e.component, result)] += 1
        return totals
