"""The supervisor's own log: stderr (readable, or one JSON object per line with ``--json``) and a rotated file."""

from __future__ import annotations

from pathlib import Path

from baton import log


def setup_logging(level: str = "INFO", json: bool = False, file: Path | None = None) -> None:
    """stderr always; ``file`` too (rotated), so a helper can quote a failed version's last lines.

    The file is opened without following a link and only if root (or our user) alone owns it
    (``baton/strict_modes.py``); its directory must exist. Raises UnsafePath otherwise.
    """
    log.configure(level=level, json=json, file=file)
