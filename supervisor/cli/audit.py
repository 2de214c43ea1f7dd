"""``supervisor audit``: who changed what on this host, read from the audit log (``baton/audit.py``) that the
daemon's side (``supervisor/audit.py``) writes."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any

from baton.audit import OUTCOME_OK, AuditLog, AuditRecord, format_time
from baton.layout import DEFAULT_CONFIG

_SINCE_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float) -> float:
    """``90s``, ``30m``, ``1h``, ``7d`` ago, or an ISO 8601 time (UTC if it names no zone).

    Raises:
        ValueError: neither.
    """
    from baton.audit import parse_time

    m = _SINCE_RE.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return parse_time(text.strip())
    except ValueError:
        raise ValueError(f"--since {text!r}: expected a duration like 30m, 1h, 7d or an ISO time "
                         "like 2026-01-31T12:00:00Z") from None


MIN_CUT_COLUMN = 16  # a column cut to fit a terminal keeps at least this many characters
CUT_MARK = "..."


def format_records(records: list[AuditRecord], width: int | None = None) -> str:
    """The table ``supervisor audit`` prints; every field went through :func:`baton.text.printable` (a caller
    chose the arguments, and a record on disk may hold anything).

    ``width``: the terminal's columns; the widest of CALLER, ARGS and OUTCOME is cut (ending ``...``) until a
    row fits, so a record is one line on screen. None: nothing is cut (a pipe gets whole records).
    """
    from baton.text import printable

    rows: list[list[str]] = [["TIME (UTC)", "CALLER", "CALL", "ARGS", "OUTCOME"]]
    for r in records:
        args = " ".join(f"{k}={v}" for k, v in sorted(r.args.items()))
        args += "".join(f" -> {k}={v}" for k, v in r.result.items())
        outcome = r.outcome if r.outcome == OUTCOME_OK else f"{r.outcome} {r.code}: {r.message}"
        cells = (format_time(r.time), r.caller.describe(), r.call, args or "-", outcome)
        rows.append([printable(c) for c in cells])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    if width is not None:
        _fit(widths, width - 2 * (len(widths) - 1), cuttable=(1, 3, 4))
    for row in rows:
        for i, w in enumerate(widths):
            if len(row[i]) > w:
                row[i] = row[i][:w - len(CUT_MARK)] + CUT_MARK
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)), row[-1]]).rstrip()
                     for row in rows)


def _fit(widths: list[int], room: int, cuttable: tuple[int, ...]) -> None:
    """Narrow the widest of the ``cuttable`` columns, one character at a time, until they fit in ``room``."""
    while sum(widths) > room:
        i = max(cuttable, key=lambda c: widths[c])
        if widths[i] <= MIN_CUT_COLUMN:
            return  # a terminal this narrow wraps: better than cells cut to nothing
        widths[i] -= 1


def _terminal_columns() -> int | None:
    """The width of the terminal stdout is, or None when it is not one."""
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns if sys.stdout.isatty() else None
    except OSError:
        return None


def cmd_audit(ns: argparse.Namespace) -> int:
    from supervisor.cli.main import readable_config

    cfg = readable_config(ns.config, "audit")  # a file being fixed still says where the audit log is
    try:
        since = parse_since(ns.since, time.time()) if ns.since else None
    except ValueError as e:
        print(f"supervisor audit: {e}", file=sys.stderr)
        return 2
    try:
        records = AuditLog(cfg.node.state_dir).read(since)
    except OSError as e:
        print(f"supervisor audit: cannot read {e.filename}: {e.strerror} (run it as the supervisor's user)",
              file=sys.stderr)
        return 1
    try:
        if ns.json:
            for r in records:
                sys.stdout.write(json.dumps(r.to_json(), sort_keys=True) + "\n")
        else:
            print(format_records(records, None if ns.wide else _terminal_columns()))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader had enough (| head): not an error. Python would complain again flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def add_parser(sub: Any) -> None:
    a = sub.add_parser("audit", help="show who changed what on this host (the audit log)")
    a.add_argument("--config", "-c", default=str(DEFAULT_CONFIG))
    a.add_argument("--since", help="only records since: a duration (30m, 1h, 7d) or an ISO time")
    a.add_argument("--json", action="store_true", help="one JSON record per line, as stored")
    a.add_argument("--wide", action="store_true", help="on a terminal too, print every cell whole")
    a.set_defaults(fn=cmd_audit)
