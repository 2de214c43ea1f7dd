"""Per-component high-water marks and the versions that failed.

A version at or below the highest version ever committed is refused unless the
request allows a downgrade: a validly signed old package cannot be replayed.
Only a commit moves the mark. A version that failed or was rolled back is
remembered so it is not retried automatically (Teleport's skip list).
"""

from __future__ import annotations

from pathlib import Path

from baton import durable
from baton.versions import compare_versions


class Marks:
    """One file per component, written only by the holder of that component's update lock."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "marks"

    def _path(self, component: str) -> Path:
        return self.dir / f"{component}.json"

    def _load(self, component: str) -> tuple[str | None, list[str]]:
        try:
            data = durable.read_json(self._path(component))
        except (FileNotFoundError, ValueError):
            return None, []
        return (str(data["highest"]) if data.get("highest") else None), [str(v) for v in data.get("failed", [])]

    def _save(self, component: str, highest: str | None, failed: list[str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        durable.write_json(self._path(component), {"format": 1, "highest": highest, "failed": failed[-50:]}, 0o600)

    def highest(self, component: str) -> str | None:
        return self._load(component)[0]

    def failed(self, component: str) -> list[str]:
        return self._load(component)[1]

    def committed(self, component: str, version: str) -> None:
        highest, failed = self._load(component)
        if not highest or compare_versions(version, highest) > 0:
            highest = version
        self._save(component, highest, [v for v in failed if v != version])

    def record_failure(self, component: str, version: str) -> None:
        highest, failed = self._load(component)
        if version not in failed:
            failed.append(version)
        self._save(component, highest, failed)

    def clear_failed(self, component: str, version: str | None = None) -> list[str]:
        """Forget one failed version (or all of them); returns what was forgotten. The mark stays."""
        highest, failed = self._load(component)
        gone = [v for v in failed if version is None or v == version]
        if gone:
            self._save(component, highest, [v for v in failed if v not in gone])
        return gone
