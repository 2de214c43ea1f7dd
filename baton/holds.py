"""Update holds: an operator pins a component so no push changes it (like ``apt-mark hold``).

One file per held component under ``<state_dir>/holds``, written with
write-temp/fsync/rename/fsync-dir and removed the same durable way, so a hold is
on disk completely or not at all. The supervisor checks holds at admission
(baton/admission.py) and the helper checks them again before it starts; the
helper's ``hold``/``unhold`` commands (helper/holds.py) are the only writers.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton import durable
from baton.errors import BatonError

HOLD_FORMAT = 1
MAX_REASON_CHARS = 500
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class HoldError(BatonError):
    """A hold cannot be read or written (bad component name, unreadable file)."""


@dataclass(frozen=True)
class Hold:
    component: str
    reason: str
    since: float  # Unix seconds
    by_uid: int

    def to_json(self) -> dict[str, object]:
        return {"format": HOLD_FORMAT, "component": self.component, "reason": self.reason, "since": self.since,
                "by_uid": self.by_uid}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Hold:
        if d.get("format") != HOLD_FORMAT:
            raise HoldError(f"hold file format {d.get('format')!r} is not {HOLD_FORMAT}")
        return cls(component=str(d["component"]), reason=str(d.get("reason", "")),
                   since=float(d.get("since", 0.0)), by_uid=int(d.get("by_uid", -1)))

    def describe(self) -> str:
        """One phrase for refusals and status lines: ``app is held since ... (reason: ...)``."""
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"{self.component} is held since {when}" + (f" (reason: {self.reason})" if self.reason else "")


class Holds:
    """The holds of one host."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "holds"

    def _path(self, component: str) -> Path:
        if not _COMPONENT.match(component):
            raise HoldError(f"invalid component name {component!r}")
        return self.dir / f"{component}.json"

    def get(self, component: str) -> Hold | None:
        """The hold on ``component``, or None. An unreadable hold file counts as a hold: fail closed."""
        path = self._path(component)
        try:
            return Hold.from_json(durable.read_json(path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, HoldError) as e:
            return Hold(component, f"hold file {path} is unreadable ({e}); remove it with `helper unhold "
                                   f"{component}`", 0.0, -1)

    def all(self) -> list[Hold]:
        if not self.dir.is_dir():
            return []
        out = []
        for p in sorted(self.dir.glob("*.json")):
            hold = self.get(p.stem)
            if hold is not None:
                out.append(hold)
        return out

    def hold(self, component: str, reason: str) -> Hold:
        """Place (or replace) the hold; durable before it returns."""
        if len(reason) > MAX_REASON_CHARS or any(c in reason for c in "\n\r\0"):
            raise HoldError(f"reason must be one line of at most {MAX_REASON_CHARS} characters")
        path = self._path(component)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        hold = Hold(component, reason, time.time(), os.getuid())
        durable.write_json(path, hold.to_json(), 0o600)
        return hold

    def unhold(self, component: str) -> bool:
        """Remove the hold; False when there was none."""
        path = self._path(component)
        if not path.exists():
            return False
        durable.remove_file(path)
        return True
