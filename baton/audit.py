"""The audit log: who asked this host to change what, and what came of it.

``<state_dir>/audit/audit.log`` holds one JSON object per line, format version 1
(``"v": 1``; readers ignore unknown keys). It lives under the state directory,
not the install root, so a self-update or a rollback never touches it. The
supervisor writes a record per mutating gRPC call (``supervisor/audit.py``) and
per refused local connection; a manual ``helper --rollback`` writes its own.

On disk it is append-only:

- every write opens the file ``O_RDWR|O_APPEND|O_CREAT|O_NOFOLLOW``, mode
  0600, refuses anything but a regular file owned by us, and appends one whole
  line with a single ``write``; a record is fsynced before the call returns
  (mutating calls are rare, and a record that a crash can lose is no record);
- writers from several processes (the supervisor, a helper run by hand) take
  ``audit.lock`` (flock) around the append, so a line is never interleaved and
  rotation never races an append;
- a line a crash tore is ended with a newline before the next record, so it
  damages only itself (the reader skips lines that do not parse);
- when the file passes :data:`MAX_BYTES` it is rotated by rename
  (``audit.log`` -> ``audit.log.1`` -> ... -> ``audit.log.<BACKUPS>``, the oldest
  dropped); no record is ever rewritten in place.

Refused calls go to a file of their own, ``refused.log`` (same format, same
rules, its own budget: :data:`REFUSALS_MAX_BYTES`, :data:`REFUSALS_BACKUPS`).
Anyone who can reach a listener can make refusals, as many as they like, so they
must never rotate away the records of what was changed; the supervisor also
limits how many it writes per caller (``supervisor/audit.py``). Readers merge
both files by time; files written before the split (refusals in ``audit.log``)
read as they always did.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from baton import durable
from baton.errors import BatonError

AUDIT_FORMAT = 1
MAX_BYTES = 8 * 1024 * 1024  # per file, before rotation
BACKUPS = 5  # rotated files kept: at most (1 + BACKUPS) * MAX_BYTES on disk
REFUSALS_MAX_BYTES = 4 * 1024 * 1024  # refused.log, per file, before rotation
REFUSALS_BACKUPS = 3  # rotated refused.log files kept
MAX_VALUE_CHARS = 256  # a longer argument is cut (the record says so)
CALLER_KEYS = ("identity", "uid", "pid", "command", "address", "login_uid", "login_user", "sudo_user")  # on disk

OUTCOME_OK = "ok"
OUTCOME_REFUSED = "refused"  # PERMISSION_DENIED / UNAUTHENTICATED, or a local peer hung up on
OUTCOME_FAILED = "failed"  # any other error code
OUTCOME_CANCELLED = "cancelled"  # the client went away before the answer


class AuditError(BatonError):
    """The audit log cannot be written (not a regular file, owned by someone else, disk full...)."""


@dataclass(frozen=True)
class Caller:
    """Who made a call: ``tls`` (certificate identity), ``local`` (SO_PEERCRED), ``helper`` (a manual command).

    For a local caller, the person behind the uid: ``login_uid`` is the kernel's audit login uid
    (``/proc/PID/loginuid``, set once at login by PAM and kept across sudo and su; the process cannot change
    it), with its name; ``sudo_user`` is ``$SUDO_USER`` from the caller's environment, which the caller wrote
    itself, so it is recorded as a claim, never as the identity.
    """

    kind: str
    identity: str = ""  # certificate names for tls; the login name for helper
    uid: int | None = None
    pid: int | None = None
    command: str = ""  # the local peer's command line, shortened
    address: str = ""  # the TCP peer address, when known
    login_uid: int | None = None  # None: no login session (a service, a container, the kernel's "unset")
    login_user: str = ""  # login_uid's name when the record was written
    sudo_user: str = ""  # claimed by the caller: its $SUDO_USER

    def describe(self) -> str:
        parts = [self.kind]
        if self.identity:
            parts.append(self.identity)
        if self.uid is not None:
            parts.append(f"uid {self.uid}")
        if self.login_uid is not None:
            parts.append(f"login {self.login_user or '?'}({self.login_uid})")
        if self.sudo_user:
            parts.append(f"claims sudo {self.sudo_user}")
        if self.pid is not None:
            parts.append(f"pid {self.pid}")
        if self.address:
            parts.append(self.address)
        return " ".join(parts)


@dataclass(frozen=True)
class AuditRecord:
    time: float  # when the call arrived (epoch seconds; ISO 8601 UTC on disk)
    caller: Caller
    call: str  # the gRPC method name (PushUpdate), ``connect``, or a helper command (``helper --rollback``)
    outcome: str  # OUTCOME_*
    code: str = "OK"  # the gRPC status code name
    message: str = ""
    args: Mapping[str, Any] = field(default_factory=dict)
    result: Mapping[str, Any] = field(default_factory=dict)  # what the caller got back worth keeping (update_id)
    duration_ms: int = 0

    def to_json(self) -> dict[str, Any]:
        c = self.caller
        caller: dict[str, Any] = {"kind": c.kind}
        for k in CALLER_KEYS:
            v = getattr(c, k)
            if v not in ("", None):
                caller[k] = v
        d: dict[str, Any] = {"v": AUDIT_FORMAT, "time": format_time(self.time), "caller": caller, "call": self.call,
                             "outcome": self.outcome, "code": self.code}
        if self.message:
            d["message"] = self.message
        if self.args:
            d["args"] = dict(self.args)
        if self.result:
            d["result"] = dict(self.result)
        d["duration_ms"] = self.duration_ms
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> AuditRecord:
        c = d.get("caller", {})
        return cls(
            time=parse_time(d["time"]),
            caller=Caller(kind=str(c.get("kind", "")), identity=str(c.get("identity", "")), uid=c.get("uid"),
                          pid=c.get("pid"), command=str(c.get("command", "")), address=str(c.get("address", "")),
                          login_uid=c.get("login_uid"), login_user=str(c.get("login_user", "")),
                          sudo_user=str(c.get("sudo_user", ""))),
            call=str(d["call"]),
            outcome=str(d["outcome"]),
            code=str(d.get("code", "")),
            message=str(d.get("message", "")),
            args=dict(d.get("args", {})),
            result=dict(d.get("result", {})),
            duration_ms=int(d.get("duration_ms", 0)),
        )


def operator_name(environ: Mapping[str, str] | None = None) -> str:
    """The person behind a command: ``$SUDO_USER`` (who ran sudo), else ``$USER``, else the uid's login name."""
    env = os.environ if environ is None else environ
    for var in ("SUDO_USER", "USER", "LOGNAME"):
        if env.get(var):
            return env[var]
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"uid {os.getuid()}"


def format_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def parse_time(text: str) -> float:
    """ISO 8601; a time without a zone is UTC."""
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def shorten(value: str, limit: int = MAX_VALUE_CHARS) -> str:
    return value if len(value) <= limit else value[:limit] + f"...({len(value)} chars)"


def audit_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "audit"


class _RotatingFile:
    """One append-only file of records and its rotated copies (``name``, ``name.1`` ... ``name.<backups>``)."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups

    def append(self, line: bytes) -> None:
        """Append one line and fsync it; rotate after, if it grew past ``max_bytes``. Under the caller's lock."""
        fd = self._open()
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a record a crash tore: end it, lose nothing else
            os.write(fd, line)
            os.fsync(fd)
            size += len(line)
        finally:
            os.close(fd)
        if size >= self.max_bytes:
            self._rotate()

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC  # read: the last byte
        fd = os.open(self.path, flags, 0o600)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            raise AuditError(f"{self.path} is not a regular file owned by uid {os.geteuid()}: not writing to it")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        return fd

    def _rotate(self) -> None:
        """Rename down the chain (the oldest is dropped); under the lock, so no append races it."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._backup(self.backups))
        for i in range(self.backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._backup(i), self._backup(i + 1))
        if self.backups > 0:
            os.replace(self.path, self._backup(1))
        else:
            os.unlink(self.path)
        durable.fsync_dir(self.path.parent)

    def _backup(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def files(self) -> list[Path]:
        """Oldest first."""
        out = [self._backup(i) for i in range(self.backups, 0, -1)] + [self.path]
        return [p for p in out if p.is_file()]


class AuditLog:
    """Appends records to, and reads them back from, ``<state_dir>/audit/``: changes and failures to
    ``audit.log``, refusals to ``refused.log``."""

    def __init__(self, state_dir: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS,
                 refusals_max_bytes: int = REFUSALS_MAX_BYTES, refusals_backups: int = REFUSALS_BACKUPS) -> None:
        self.dir = audit_dir(state_dir)
        self._changes = _RotatingFile(self.dir / "audit.log", max_bytes, backups)
        self._refusals = _RotatingFile(self.dir / "refused.log", refusals_max_bytes, refusals_backups)
        self.path = self._changes.path
        self.refusals_path = self._refusals.path
        self._thread_lock = threading.Lock()

    def append(self, rec: AuditRecord) -> None:
        """Append one record durably (a refusal to ``refused.log``, anything else to ``audit.log``).

        Raises:
            AuditError: the log is not a regular file we own, or the write failed.
        """
        line = (json.dumps(rec.to_json(), separators=(",", ":"), sort_keys=True) + "\n").encode()
        target = self._refusals if rec.outcome == OUTCOME_REFUSED else self._changes
        try:
            with self._thread_lock, self._locked():
                target.append(line)
        except OSError as e:
            raise AuditError(f"cannot write the audit log {target.path}: {e.strerror or e}") from None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.dir / "audit.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def files(self) -> list[Path]:
        """Every file that holds records: the changes' oldest first, then the refusals' oldest first."""
        return self._changes.files() + self._refusals.files()

    def read(self, since: float | None = None) -> list[AuditRecord]:
        """Every record (at or after ``since``) of both files, merged by time, oldest first; lines that do not
        parse are skipped."""
        out: list[AuditRecord] = []
        for p in self.files():
            with open(p, "rb") as f:
                for raw in f:
                    try:
                        rec = AuditRecord.from_json(json.loads(raw))
                    except (ValueError, KeyError, TypeError):
                        continue
                    if since is None or rec.time >= since:
                        out.append(rec)
        out.sort(key=lambda r: r.time)  # stable: records of one time keep their order in their file
        return out
