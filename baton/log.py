"""Baton's log (supervisor, helper, Manager): loguru, configured here and nowhere else.

Callers write ``from baton.log import logger`` and ``logger.info("agent {} started", name)``: loguru's
``str.format`` placeholders (``{}``, ``{!r}``, ``{:.0f}``), filled only when there are arguments. A program
calls :func:`configure` once it knows its options; until then (and in any process that never calls it) the log
is readable lines at INFO on stderr, never loguru's own default sink, whose tracebacks show variables' values.

Sinks: a stream (stderr unless ``configure`` names another), readable text (colored on a terminal) or one JSON
object per line in loguru's ``serialize`` shape, which scripts read (``text``: the readable line and any
traceback; ``record``: ``message``, ``level.name``/``no``, ``time.repr``/``timestamp``, ``process.id``, ``name``
of the calling module, ``exception``: null or ``type``/``value``); and optionally a file rotated by size.

The file is a loguru sink over :class:`baton.rotating_log.RotatingLog`, not loguru's own rotation: loguru renames a
rotated file to a timestamped name and opens the new one through ``open`` wherever the path leads, where Baton's
promise is ``name.log.1`` .. ``.N`` (the helper quotes ``supervisor.log`` after a failed self-update) and every
log file, at each reopen too, opened without following a link and only if root or our user alone owns it
(``baton/strict_modes.py:open_log``); one writer then rotates every log file, the agents' too.

loguru holds a lock per sink around each line's one ``write``: lines from threads (the Manager's gRPC handlers,
``asyncio.to_thread``) never interleave. A sink that fails (closed stderr, full disk) loses the line; the
program goes on. ``diagnose`` is off everywhere: a traceback never prints local variables (keys, passwords).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO


def _import_loguru_without_its_sink() -> Any:
    """loguru's own stderr sink (``LOGURU_AUTOINIT``, its documented switch) would be removed at once below: each
    sink costs loguru about 3 ms to set up (its traceback formatter expands every sysconfig scheme's paths), paid
    in every helper's start. The switch is set only around the import, not for our children."""
    if "loguru" in sys.modules:
        return sys.modules["loguru"].logger
    before = os.environ.get("LOGURU_AUTOINIT")
    os.environ["LOGURU_AUTOINIT"] = "False"
    try:
        from loguru import logger
    finally:
        if before is None:
            del os.environ["LOGURU_AUTOINIT"]
        else:
            os.environ["LOGURU_AUTOINIT"] = before
    return logger


if TYPE_CHECKING:
    from loguru import logger

    from baton.rotating_log import RotatingLog
else:
    logger = _import_loguru_without_its_sink()

FILE_MAX_BYTES = 10 * 1024 * 1024  # a log file is rotated when it would pass this size
FILE_BACKUPS = 3  # rotated files kept (name.log.1 ... name.log.3)
LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")  # loguru's, what log.level accepts
_WHEN = "{time:YYYY-MM-DD HH:mm:ss.SSS}"

__all__ = ["FILE_BACKUPS", "FILE_MAX_BYTES", "LEVELS", "configure", "logger"]

_lock = threading.Lock()  # configure() from two threads: one set of sinks wins whole
_file: RotatingLog | None = None
_in_file_sink = threading.local()  # set while a line is being written to the file (see _file_sink)


def configure(*, level: str = "INFO", json: bool = False, stream: TextIO | None = None, file: Path | None = None,
              file_max_bytes: int = FILE_MAX_BYTES, file_backups: int = FILE_BACKUPS, tag: str = "") -> None:
    """Replace the sinks. ``tag``, a plain word, names the program in each line (``[helper 1234]``).

    ``file`` is opened without following a link and only if root (or our user) alone owns it; raises
    UnsafePath otherwise, leaving the previous sinks in place. An unknown ``level`` raises ValueError, likewise.
    """
    global _file
    name = level.upper()
    if name not in LEVELS:
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})")
    new_file = None
    if file is not None:
        from baton.rotating_log import RotatingLog

        new_file = RotatingLog(file, file_max_bytes, file_backups)
    head = f"[{tag} {{process}}]" if tag else "[{process}]"
    text = f"{_WHEN} {{level: <7}} {head} {{message}}"
    color = not json and _is_tty(stream or sys.stderr) and "NO_COLOR" not in os.environ
    common: dict[str, Any] = {"level": name, "serialize": json, "backtrace": False, "diagnose": False}
    with _lock:
        logger.remove()
        if _file is not None:
            _file.close()
        _file = new_file
        shown = f"<green>{_WHEN}</green> <level>{{level: <7}}</level> {head} {{message}}" if color else text
        logger.add(_stream_sink(stream), format=shown, colorize=color, **common)
        if new_file is not None:
            logger.add(_file_sink(new_file), format=text, colorize=False, filter=_not_from_file_sink, **common)


def _stream_sink(stream: TextIO | None) -> Any:
    def write(message: str) -> None:
        out = stream or sys.stderr  # None: sys.stderr as it is when the line is written
        try:
            out.write(message)
            out.flush()
        except (OSError, ValueError):  # closed stderr: the file, the journal, the audit log remain
            pass

    return write


def _file_sink(file: RotatingLog) -> Any:
    def write(message: str) -> None:
        _in_file_sink.active = True
        try:
            file.write(message.encode(errors="replace"))
        except OSError:  # a full disk must not stop the supervisor
            pass
        finally:
            _in_file_sink.active = False

    return write


def _not_from_file_sink(record: Any) -> bool:
    """A line logged while the file sink writes (RotatingLog's failed reopen) goes to the stream only: loguru's
    sink lock is not reentrant, and that file is closed anyway."""
    return not getattr(_in_file_sink, "active", False)


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


configure()
