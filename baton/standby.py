"""The standby helper's channel: a helper started and loaded ahead of time, waiting for the one update it runs.

A helper's start (the interpreter and its imports) was the largest part of an agent update
(docs/benchmarks.md, section 3). So the supervisor keeps one helper started ahead of time, exactly as it
starts a helper for an update (same command, session, environment and systemd unit), with the update path's
imports loaded; it waits for an update id and then runs ``helper apply`` for it on the same code path a
fresh helper takes. Both sides import this module: it is the channel's wire format (version 1).

- Socket: ``<run_dir>/standby.sock``, Unix stream, bound by each supervisor process (0600, in the run
  directory only root or its user may change) and removed when its update manager stops. The peer must be
  root or the supervisor's uid (SO_PEERCRED), and its HELLO must name the peer's own pid.
- The standby connects once loaded and sends HELLO ``{"v": 1, "op": "hello", "pid": PID, "code": STAMP}``.
- The supervisor sends JOB ``{"v": 1, "op": "apply", "update_id": ID}``; the standby answers
  ``{"v": 1, "ok": true, "pid": PID}``, closes the channel and carries the update out.
- End of file before a JOB (the supervisor stopped, exec'd a new version, or retired this standby): the
  standby exits. So a standby never outlives the supervisor process that started it without a job.
- STAMP (:func:`code_stamp`) says which code the standby loaded; the supervisor compares it with the code on
  disk when it hands out a job and retires a standby whose code is no longer what a fresh helper would run.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from baton.errors import BatonError

VERSION = 1
SOCKET_NAME = "standby.sock"
LOG_NAME = "standby.log"  # the standby's output until it has a job (then the update's helper.log)
FLAG = "--standby"  # in a standby's command line: `helper apply --standby ...`
MAX_LINE_BYTES = 4096
CODE_PACKAGES = ("baton", "helper")  # what a helper runs of Baton's own code


class StandbyError(BatonError):
    """A message on the standby channel that is not a version-1 message of the expected kind."""


def socket_path(run_dir: Path) -> Path:
    return run_dir / SOCKET_NAME


def code_stamp() -> str:
    """Which code a helper started now would run: every module file of Baton's packages (path, size, mtime)
    and the interpreter's. A stat of each file, no read: about 100 files, a millisecond or two."""
    import hashlib

    h = hashlib.sha256()
    exe = os.path.realpath(sys.executable)
    h.update(_entry(exe))
    for package in CODE_PACKAGES:
        spec = find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise StandbyError(f"cannot find the {package} package")
        for root in spec.submodule_search_locations:
            for path in sorted(_module_files(root)):
                h.update(_entry(path))
    return h.hexdigest()


def _module_files(root: str) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        out.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return out


def _entry(path: str) -> bytes:
    st = os.stat(path)
    return f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()


@dataclass(frozen=True)
class Hello:
    pid: int
    code: str

    def encode(self) -> bytes:
        return _line({"op": "hello", "pid": self.pid, "code": self.code})

    @classmethod
    def decode(cls, line: bytes) -> Hello:
        d = _object(line, "hello")
        return cls(pid=_typed(d, "pid", int), code=_typed(d, "code", str))


@dataclass(frozen=True)
class Job:
    update_id: str

    def encode(self) -> bytes:
        return _line({"op": "apply", "update_id": self.update_id})

    @classmethod
    def decode(cls, line: bytes) -> Job:
        return cls(update_id=_typed(_object(line, "apply"), "update_id", str))


@dataclass(frozen=True)
class Taken:
    pid: int

    def encode(self) -> bytes:
        return _line({"ok": True, "pid": self.pid})

    @classmethod
    def decode(cls, line: bytes) -> Taken:
        d = _object(line, None)
        if d.get("ok") is not True:
            raise StandbyError(f"the standby did not take the job: {line[:200]!r}")
        return cls(pid=_typed(d, "pid", int))


def _line(d: dict[str, Any]) -> bytes:
    return json.dumps({"v": VERSION, **d}, separators=(",", ":")).encode() + b"\n"


def _object(line: bytes, op: str | None) -> dict[str, Any]:
    if len(line) > MAX_LINE_BYTES or not line.endswith(b"\n"):
        raise StandbyError("not one line of at most 4 KiB")
    try:
        d = json.loads(line)
    except ValueError as e:
        raise StandbyError(f"not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("v") != VERSION:
        raise StandbyError(f"not a version-{VERSION} message")
    if op is not None and d.get("op") != op:
        raise StandbyError(f"expected {op!r}, got {d.get('op')!r}")
    return d


def _typed(d: dict[str, Any], key: str, kind: type) -> Any:
    value = d.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise StandbyError(f"{key!r} must be a {kind.__name__}")
    return value
