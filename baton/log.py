"""Baton's log (supervisor, helper, Manager): ``logger.info("agent {} started", name)``, one line per event.

``str.format`` placeholders (``{}``, ``{!r}``, ``{:.0f}``), filled only when there are arguments. It replaced
loguru, which cost the daemon about 3 MiB resident (its import brings multiprocessing, pickle, decimal, ...) and
every helper about 20 ms of its start.

Sinks: a stream (stderr unless :meth:`Log.configure` names another), readable text (colored on a terminal) or
one JSON object per line; and optionally a file rotated by size (:class:`baton.rotating_log.RotatingLog`,
opened like every log root writes). Each event is formatted once and written whole, one ``write`` per sink,
under the logger's lock: lines from threads (the Manager's gRPC handlers, ``asyncio.to_thread``) never
interleave. A sink that fails (closed stderr, full disk) loses the line; the program goes on.

A JSON line keeps the shape of loguru's ``serialize``, which scripts read: ``{"text": <the readable line>,
"record": {"message", "level": {"name", "no"}, "time": {"repr", "timestamp"}, "process": {"id"},
"name": <the calling module>, "exception": null | {"type", "value"}}}``; a traceback is in ``text``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from baton.rotating_log import RotatingLog

FILE_MAX_BYTES = 10 * 1024 * 1024  # a log file is rotated when it would pass this size
FILE_BACKUPS = 3  # rotated files kept (name.log.1 ... name.log.3)
LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
# What ``configure(level=...)`` accepts: the four levels, and loguru's other names (configs written for it).
THRESHOLDS = {"TRACE": 5, **LEVELS, "SUCCESS": 25, "CRITICAL": 50}
_COLORS = {"DEBUG": "\x1b[34;1m", "INFO": "\x1b[1m", "WARNING": "\x1b[33;1m", "ERROR": "\x1b[31;1m"}
_GREEN, _RESET = "\x1b[32m", "\x1b[0m"


class Log:
    """Levels DEBUG < INFO < WARNING < ERROR; ``exception`` logs an ERROR with the traceback."""

    def __init__(self) -> None:
        self._lock = threading.RLock()  # reentrant: a failed rotation of the file logs through this same logger
        self._stream: TextIO | None = None  # None: sys.stderr as it is when a line is written
        self._min = LEVELS["INFO"]
        self._json = False
        self._color = False
        self._tag = ""
        self._file: RotatingLog | None = None

    def configure(self, *, level: str = "INFO", json: bool = False, stream: TextIO | None = None,
                  file: Path | None = None, file_max_bytes: int = FILE_MAX_BYTES,
                  file_backups: int = FILE_BACKUPS, tag: str = "") -> None:
        """Replace the sinks. ``tag`` names the program in each line (``[helper 1234]``).

        ``file`` is opened without following a link and only if root (or our user) alone owns it; raises
        UnsafePath otherwise, leaving the previous sinks in place. An unknown ``level`` raises ValueError.
        """
        if level.upper() not in THRESHOLDS:
            raise ValueError(f"unknown log level {level!r} (one of {', '.join(THRESHOLDS)})")
        new_file = None
        if file is not None:
            from baton.rotating_log import RotatingLog

            new_file = RotatingLog(file, file_max_bytes, file_backups)
        out = stream or sys.stderr
        with self._lock:
            if self._file is not None:
                self._file.close()
            self._stream, self._file = stream, new_file
            self._min, self._json, self._tag = THRESHOLDS[level.upper()], json, f"{tag} " if tag else ""
            self._color = not json and _is_tty(out) and "NO_COLOR" not in os.environ

    def debug(self, message: str, *args: object) -> None:
        self._emit("DEBUG", message, args, None)

    def info(self, message: str, *args: object) -> None:
        self._emit("INFO", message, args, None)

    def warning(self, message: str, *args: object) -> None:
        self._emit("WARNING", message, args, None)

    def error(self, message: str, *args: object) -> None:
        self._emit("ERROR", message, args, None)

    def exception(self, message: str, *args: object, exc: BaseException | None = None) -> None:
        """An ERROR followed by the traceback of ``exc``, by default the exception being handled."""
        self._emit("ERROR", message, args, exc or sys.exc_info()[1])

    def _emit(self, level: str, message: str, args: tuple[object, ...], exc: BaseException | None) -> None:
        if LEVELS[level] < self._min:
            return
        text = message.format(*args) if args else message
        now = time.time()
        local = time.localtime(now)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", local)
        when = f"{stamp}.{int(now % 1 * 1000):03d}"
        head = f"{level: <7} [{self._tag}{os.getpid()}]"
        trace = ""
        if exc is not None:
            import traceback

            trace = "".join(traceback.format_exception(exc))
        line = f"{when} {head} {text}\n{trace}"
        if self._json:
            zone = time.strftime("%z", local)
            record = {
                "message": text,
                "level": {"name": level, "no": LEVELS[level]},
                "time": {"repr": f"{stamp}.{int(now % 1 * 1_000_000):06d}{zone[:3]}:{zone[3:]}", "timestamp": now},
                "process": {"id": os.getpid()},
                "name": sys._getframe(2).f_globals.get("__name__"),
                "exception": None if exc is None else {"type": type(exc).__name__, "value": str(exc)},
            }
            line = json.dumps({"text": line, "record": record}) + "\n"
            shown = line
        elif self._color:
            shown = (f"{_GREEN}{when}{_RESET} {_COLORS[level]}{level: <7}{_RESET} [{self._tag}{os.getpid()}] "
                     f"{text}\n{trace}")
        else:
            shown = line
        with self._lock:
            stream = self._stream or sys.stderr
            try:
                stream.write(shown)
                stream.flush()
            except (OSError, ValueError):  # closed stderr: the file, the journal, the audit log remain
                pass
            if self._file is not None:
                with contextlib.suppress(OSError):  # a full disk must not stop the supervisor
                    self._file.write(line.encode(errors="replace"))


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


logger = Log()
