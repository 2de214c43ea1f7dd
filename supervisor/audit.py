"""The supervisor's side of the audit trail (the log itself: ``baton/audit.py``).

Every call that is not known to be read-only (``authz.READ_ONLY_METHODS``) is
recorded, so a mutating method added later is audited without a change here;
read-only calls only when ``grpc.audit_read_calls`` asks (a host polled by
monitoring would otherwise write and fsync a record per poll).
:class:`AuditInterceptor` is the outermost interceptor: it wraps the
authorization check, so a call the allow-list refuses is recorded as refused.

Who called: gRPC's own view of a peer is the Front's spliced connection
(``context.peer()`` is ``unix:`` for everyone), so the Front binds each backend
connection to a fresh abstract Unix address and :class:`Callers` remembers who
is behind it: uid, pid and command line from SO_PEERCRED for a local peer, the
TCP address for a remote one, whose certificate identity the interceptor then
reads from the TLS auth context. A local peer the Front hangs up on never
reaches gRPC; :meth:`AuditTrail.refused_connection` records it instead.

Refusals are limited (:class:`RefusalBudget`): anyone who can reach a listener
can make them as fast as they like (1,500 in 2.6 s over the read-only loopback
listener), so only the first few per caller in each window are written one by
one, and at the window's end one record per caller says how many more there
were and of which calls. They also go to a file of their own (``baton/audit.py``),
so they can never rotate away the records of accepted changes.

A record is written after the call ends, with the outcome; writing it is
fsynced off the event loop. A record that cannot be written is logged as an
error and does not fail the call: an operator repairing a full disk must still
be able to stop an agent.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from baton.audit import (
    OUTCOME_CANCELLED,
    OUTCOME_FAILED,
    OUTCOME_OK,
    OUTCOME_REFUSED,
    AuditError,
    AuditLog,
    AuditRecord,
    Caller,
    shorten,
)
from baton.identity import peer_identity
from baton.log import logger
from baton.peer_label import Channel, peer_label
from supervisor.authz import READ_ONLY_METHODS
from supervisor.call_hooks import CallHooks, HookedInterceptor

REFUSED_CODES = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})
RESULT_FIELDS = ("update_id",)  # fields of a response worth keeping in the record
REFUSAL_WINDOW_S = 10.0  # refusals are counted per window of this many seconds
REFUSALS_PER_CALLER = 5  # refusal records written one by one per caller in a window
REFUSALS_PER_WINDOW = 50  # ... and by all callers together (loopback alone has 2**24 addresses to call from)
SUPPRESSED_CALL = "refusals not recorded"  # the call name of the record that counts the rest
_ABSTRACT_PREFIX = "unix-abstract:"


ENVIRON_READ_BYTES = 128 * 1024  # of a caller's /proc/PID/environ, looking for SUDO_USER
NO_LOGIN_UID = 0xFFFFFFFF  # the kernel's "never logged in" ((uid_t)-1)


def local_caller(uid: int, pid: int) -> Caller:
    """A local peer with the person behind it: the kernel's login uid, and the ``SUDO_USER`` it claims."""
    login_uid = _login_uid(pid)
    return Caller(kind="local", uid=uid, pid=pid, command=_command_line(pid), login_uid=login_uid,
                  login_user=_user_name(login_uid) if login_uid is not None else "",
                  sudo_user=_claimed_sudo_user(pid))


def _command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return ""
    return shorten(raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace"), 200)


def _login_uid(pid: int) -> int | None:
    """``/proc/PID/loginuid``: written by PAM at login, inherited, and unchangeable without CAP_AUDIT_CONTROL."""
    try:
        with open(f"/proc/{pid}/loginuid", "rb") as f:
            value = int(f.read(16))
    except (OSError, ValueError):
        return None
    return None if value == NO_LOGIN_UID else value


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


def _claimed_sudo_user(pid: int) -> str:
    """``$SUDO_USER`` of the caller (readable by root only); anyone can set it, so it is only ever a claim."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read(ENVIRON_READ_BYTES)
    except OSError:
        return ""
    for entry in raw.split(b"\0"):
        if entry.startswith(b"SUDO_USER="):
            return shorten(entry[len(b"SUDO_USER="):].decode("utf-8", "replace"), 64)
    return ""


class Callers:
    """Who is behind each backend connection the Front opened, by the abstract address it is bound to."""

    def __init__(self) -> None:
        # os.urandom, not secrets: that would keep hashlib resident for these names (tests/test_startup_rules.py)
        self._prefix = f"baton-front-{os.getpid()}-{os.urandom(6).hex()}-"
        self._count = itertools.count()
        self._by_name: dict[str, Caller] = {}

    def bound_socket(self, caller: Caller, channel: Channel) -> tuple[socket.socket, str]:
        """A Unix stream socket bound to a fresh abstract name registered for ``caller``; release it after.

        The name is also the channel's label (:func:`baton.peer_label.peer_label`), which authz reads.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        for _ in range(3):  # abstract names are visible to every user, who may squat on the next one
            label = peer_label(channel, f"{self._prefix}{next(self._count)}-{os.urandom(4).hex()}")
            try:
                sock.bind(label)
            except OSError:
                continue
            name = label[1:]
            self._by_name[name] = caller
            return sock, name
        sock.close()  # the call must not go out unlabelled: authz would see an unknown channel
        raise OSError("no free abstract address to label the connection with")

    def release(self, name: str) -> None:
        self._by_name.pop(name, None)

    def lookup(self, peer: str) -> Caller | None:
        if not peer.startswith(_ABSTRACT_PREFIX):
            return None
        return self._by_name.get(peer[len(_ABSTRACT_PREFIX):])


def request_args(request: Any) -> dict[str, Any]:
    """The call's arguments for the record: no secrets, nothing long.

    A signature is not secret but is four lines of base64: the record keeps the key id that made it.
    """
    from google.protobuf.json_format import MessageToDict
    from google.protobuf.message import Message

    if not isinstance(request, Message):
        return {}
    args = MessageToDict(request, preserving_proto_field_name=True)
    if "signature" in args:
        args["signature_key_id"] = _signature_key_id(str(args.pop("signature")))
    return {k: shorten(v) if isinstance(v, str) else v for k, v in args.items()}


def _signature_key_id(text: str) -> str:
    from baton.signing import SignatureError, parse_signature

    try:
        return parse_signature(text).key_id_hex
    except SignatureError:
        return "unparseable"


def _result(response: Any) -> dict[str, Any]:
    return {f: getattr(response, f) for f in RESULT_FIELDS if getattr(response, f, "")}


def refusal_key(caller: Caller) -> str:
    """Whom refusals are counted against: a certificate identity, a local uid, a TCP peer's host (not its port:
    a new connection is a new port)."""
    if caller.kind == "tls" and caller.identity:
        return f"tls {caller.identity}"
    if caller.uid is not None:
        return f"uid {caller.uid}"
    return f"{caller.kind} {caller.address.rpartition(':')[0] or caller.address}"


@dataclass
class _Suppressed:
    """The refusals of one caller not written one by one in this window."""

    first: float  # epoch seconds
    caller: Caller
    calls: Counter[str] = field(default_factory=Counter)


class RefusalBudget:
    """How many refusals are written one by one in each window: :data:`REFUSALS_PER_CALLER` per caller and
    :data:`REFUSALS_PER_WINDOW` in all; the rest are counted, per caller (callers past the overall limit
    together), for :meth:`take` to sum up at the window's end."""

    OTHERS = "other callers"

    def __init__(self, per_caller: int = REFUSALS_PER_CALLER, overall: int = REFUSALS_PER_WINDOW,
                 window_s: float = REFUSAL_WINDOW_S) -> None:
        self.per_caller = per_caller
        self.overall = overall
        self.window_s = window_s
        self.window_start = -math.inf  # monotonic
        self._written: Counter[str] = Counter()
        self._suppressed: dict[str, _Suppressed] = {}

    def admit(self, key: str, caller: Caller, call: str, now: float) -> bool:
        """True: write this refusal one by one. False: it was counted instead (``now`` is monotonic)."""
        if now >= self.window_start + self.window_s:
            self.window_start = now
            self._written.clear()
        if self._written[key] < self.per_caller and self._written.total() < self.overall:
            self._written[key] += 1
            return True
        if key not in self._suppressed and len(self._suppressed) >= self.overall:
            key, caller = self.OTHERS, Caller(kind="many")  # the counts stay bounded whoever calls
        entry = self._suppressed.setdefault(key, _Suppressed(time.time(), caller))
        entry.calls[call] += 1
        return False

    def take(self) -> dict[str, _Suppressed]:
        """The refusals counted so far, by caller; the counts start again from nothing."""
        out, self._suppressed = self._suppressed, {}
        return out


class AuditTrail:
    """Writes the supervisor's records; shared by the interceptor and the Front."""

    def __init__(self, log: AuditLog, callers: Callers, refusals: RefusalBudget | None = None) -> None:
        self.log = log
        self.callers = callers
        self.refusals = refusals or RefusalBudget()
        self._summary: asyncio.TimerHandle | None = None
        self._summaries: set[asyncio.Task[None]] = set()

    @staticmethod
    def local_caller(uid: int, pid: int) -> Caller:
        return local_caller(uid, pid)

    @staticmethod
    def remote_caller(peername: Any) -> Caller:
        """A TCP peer: ``tls`` once its certificate is read, ``tcp`` when the port has no TLS."""
        address = ""
        if isinstance(peername, tuple) and len(peername) >= 2:
            host = str(peername[0])
            address = f"[{host}]:{peername[1]}" if ":" in host else f"{host}:{peername[1]}"
        return Caller(kind="tcp", address=address)

    async def write(self, rec: AuditRecord) -> None:
        """Write ``rec``; a refusal only within the caller's budget (the rest are summed up at the window's end)."""
        if rec.outcome == OUTCOME_REFUSED and not self.refusals.admit(refusal_key(rec.caller), rec.caller,
                                                                      rec.call, time.monotonic()):
            if self._summary is None:  # the loop's clock is time.monotonic, the budget's
                self._summary = asyncio.get_running_loop().call_at(
                    self.refusals.window_start + self.refusals.window_s, self._write_summaries)
            return
        await self._append(rec)

    async def _append(self, rec: AuditRecord) -> None:
        try:
            await asyncio.to_thread(self.log.append, rec)
        except AuditError as e:
            logger.error("audit record not written ({} {} by {}): {}", rec.call, rec.outcome,
                         rec.caller.describe(), e)

    def _write_summaries(self) -> None:
        self._summary = None
        for key, s in self.refusals.take().items():
            n = s.calls.total()
            calls = ", ".join(f"{c} {k}" for c, k in sorted(s.calls.items()))
            rec = AuditRecord(time=s.first, caller=s.caller, call=SUPPRESSED_CALL, outcome=OUTCOME_REFUSED,
                              code=grpc.StatusCode.PERMISSION_DENIED.name,
                              message=f"{n} more refusals of {key} not recorded one by one ({calls}): at most "
                                      f"{self.refusals.per_caller} per caller are, every "
                                      f"{self.refusals.window_s:g} s",
                              args={"suppressed": n, "calls": dict(s.calls)})
            task = asyncio.get_running_loop().create_task(self._append(rec))
            self._summaries.add(task)  # held until done: the loop keeps only a weak reference
            task.add_done_callback(self._summaries.discard)

    async def refused_connection(self, caller: Caller, why: str) -> None:
        await self.write(AuditRecord(time=time.time(), caller=caller, call="connect", outcome=OUTCOME_REFUSED,
                                     code=grpc.StatusCode.PERMISSION_DENIED.name, message=why))

    def caller_of(self, context: grpc.aio.ServicerContext) -> Caller:
        peer = context.peer() or ""
        caller = self.callers.lookup(peer) or Caller(kind="unknown", address=peer)
        ident = peer_identity(context.auth_context())
        if ident.tls or ident.has_certificate:
            caller = replace(caller, kind="tls", identity=ident.describe())
        return caller


class AuditInterceptor(HookedInterceptor):
    """Records every call not known to be read-only (every call with ``read_calls``: ``grpc.audit_read_calls``),
    with its outcome. Register it first (outermost)."""

    def __init__(self, trail: AuditTrail, read_calls: bool = False) -> None:
        self.trail = trail
        self.read_calls = read_calls

    def hooks(self, method: str) -> CallHooks | None:
        if method in READ_ONLY_METHODS and not self.read_calls:
            return None
        return _Audit(self.trail, method.rsplit("/", 1)[-1])


class _Audit:
    """Audits each call of one method (CallHooks): a :class:`_Call` from its start, written at its end."""

    def __init__(self, trail: AuditTrail, name: str) -> None:
        self.trail = trail
        self.name = name

    async def begin(self, request: Any, context: grpc.aio.ServicerContext) -> _Call:
        return _Call(self.trail, self.name, request, context)

    async def end(self, state: _Call, response: Any = None, exc: BaseException | None = None) -> None:
        await state.done(response, exc)


class _Call:
    """One audited call: collects the outcome, writes the record at the end."""

    def __init__(self, trail: AuditTrail, name: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        self.trail = trail
        self.name = name
        self.context = context
        self.started = time.time()
        self.t0 = time.monotonic()
        self.caller = trail.caller_of(context)
        self.args = request_args(request)

    async def done(self, response: Any = None, exc: BaseException | None = None) -> None:
        code = self.context.code() if exc is not None else None
        message = ""
        if isinstance(exc, asyncio.CancelledError):
            outcome, code_name = OUTCOME_CANCELLED, grpc.StatusCode.CANCELLED.name
        elif exc is None:
            outcome, code_name = OUTCOME_OK, grpc.StatusCode.OK.name
        else:
            status = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
            outcome = OUTCOME_REFUSED if status in REFUSED_CODES else OUTCOME_FAILED
            code_name = status.name
            details = self.context.details() if isinstance(exc, grpc.aio.AbortError) else None
            message = str(details if details else exc)
        rec = AuditRecord(time=self.started, caller=self.caller, call=self.name, outcome=outcome, code=code_name,
                          message=shorten(message, 1000), args=self.args,
                          result=_result(response) if response is not None else {},
                          duration_ms=int((time.monotonic() - self.t0) * 1000))
        await self.trail.write(rec)
