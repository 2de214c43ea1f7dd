"""Logging setup: loguru, readable by default, one JSON object per line with ``--json``."""

from __future__ import annotations

import sys

from loguru import logger


def setup_logging(level: str = "INFO", json: bool = False) -> None:
    logger.remove()
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
