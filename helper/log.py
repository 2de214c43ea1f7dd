"""The helper's log: one line per event on stderr (the supervisor appends it to the update's ``helper.log``).

A helper is a fresh process per update, so its start-up is on every update's path. loguru (the supervisor's
logger) costs about 20 ms of that start on its own (it imports asyncio, multiprocessing and logging machinery the
helper never uses); this writer keeps the same call style (``logger.info("update {} ...", x)``) and line format.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TextIO

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}


class HelperLog:
    """``str.format``-style messages, written whole (one ``write`` per line) and flushed at once."""

    def __init__(self) -> None:
        self._stream: TextIO = sys.stderr
        self._min = LEVELS["INFO"]
        self._json = False

    def configure(self, stream: TextIO, level: str = "INFO", json_lines: bool = False) -> None:
        self._stream, self._min, self._json = stream, LEVELS[level], json_lines

    def _emit(self, level: str, message: str, args: tuple[object, ...]) -> None:
        if LEVELS[level] < self._min:
            return
        text = message.format(*args) if args else message
        now = time.time()
        if self._json:
            line = json.dumps({"time": now, "level": level, "process": os.getpid(), "message": text})
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
            line = f"{stamp} {level: <7} [helper {os.getpid()}] {text}"
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # the log is gone (closed stderr): the journal is the record that matters
            pass

    def debug(self, message: str, *args: object) -> None:
        self._emit("DEBUG", message, args)

    def info(self, message: str, *args: object) -> None:
        self._emit("INFO", message, args)

    def warning(self, message: str, *args: object) -> None:
        self._emit("WARNING", message, args)

    def error(self, message: str, *args: object) -> None:
        self._emit("ERROR", message, args)


logger = HelperLog()


def route_loguru() -> None:
    """Send what the supervisor's modules log through loguru (the bridge runs ``supervisor.front``) into this log."""
    from loguru import logger as loguru_logger

    def sink(msg: object) -> None:
        record = msg.record  # type: ignore[attr-defined]
        level = record["level"].name if record["level"].name in LEVELS else "INFO"
        logger._emit(level, "{}", (record["message"],))

    loguru_logger.remove()
    loguru_logger.add(sink, level="DEBUG", format="{message}")
