"""Logging setup: loguru, readable by default, one JSON object per line with ``--json``."""

from __future__ import annotations

import sys
from pathlib import Path

from loguru import logger

from baton.strict_modes import log_opener


def setup_logging(level: str = "INFO", json: bool = False, file: Path | None = None) -> None:
    """stderr always; ``file`` too (rotated), so a helper can quote a failed version's last lines.

    The file is opened without following a link and only if root (or our user) alone owns it
    (``baton/strict_modes.py``); its directory must exist. Raises UnsafePath otherwise.
    """
    logger.remove()
    if file is not None:
        logger.add(file, level=level.upper(), rotation="10 MB", retention=3, serialize=json, backtrace=False,
                   diagnose=False, format="{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} [{process}] {message}",
                   opener=log_opener)
    if json:
        logger.add(sys.stderr, level=level.upper(), serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(
            sys.stderr,
            level=level.upper(),
            format="<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
            "[{process}] {message}",
            backtrace=False,
            diagnose=False,
        )
