"""Push one update to one node and follow it to its end, recording it as it goes.

Order, so that a Manager killed at any point neither loses nor doubles work:

1. choose the update id ourselves and record the row (REQUESTED) first;
2. ``PushUpdate`` with that id; ALREADY_EXISTS means an earlier attempt got
   through, which is fine. If the call fails, ``GetUpdate`` decides whether the
   node has it after all; if not, the row is marked FAILED with the node's reason;
3. follow with ``WatchUpdate``; when the stream breaks (the supervisor is
   restarting, the network blinked) fall back to polling ``GetUpdate`` until the
   update is final and settled or the deadline passes;
4. write the final state (unless the supervisor's own result came first).

A resumed rollout re-enters at step 2 (``start``) or 3 (``follow``) with the
recorded id.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from baton.admission import REFUSAL_METADATA_KEY
from baton.pb import common_pb2, daemon_pb2, daemon_pb2_grpc
from baton.reasons import FailureReason, reason_name
from baton.states import UpdateState
from manager.errors import NodeOffline, PushRefused
from manager.publish import PackageRef
from manager.store import Store, UpdateRow

POLL_S = 0.25
RPC_TIMEOUT_S = 10.0
_UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def refusal_reason(trailing: Sequence[tuple[str, str | bytes]]) -> str:
    """The failure reason a node named for a refused push (``baton-refusal``: TRUSTED_KEYS_BROKEN), else ""."""
    said = {v.decode(errors="replace") if isinstance(v, bytes) else v for k, v in trailing if k == REFUSAL_METADATA_KEY}
    return next((r.value for r in FailureReason if r.value in said and r is not FailureReason.UNSPECIFIED), "")


@dataclass(frozen=True)
class ClientTls:
    """The Manager's client certificate and the CA that signed the nodes' certificates."""

    ca: Path
    cert: Path
    key: Path

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca.read_bytes(),
                                            private_key=self.key.read_bytes(),
                                            certificate_chain=self.cert.read_bytes())


@dataclass(frozen=True)
class Target:
    node_id: str
    address: str  # HOST:PORT of its DaemonService


@dataclass(frozen=True)
class Operator:
    """Who starts a push or rollout: a name (``--as``, else the login behind sudo) and the host it ran on.

    Taken from the command's environment, so it says who typed the command, not who they may be: the
    Manager's own TLS identity is the same for every operator.
    """

    name: str = ""
    host: str = ""

    @classmethod
    def current(cls, explicit: str = "") -> Operator:
        import socket

        from baton.audit import operator_name

        return cls(explicit or operator_name(), socket.gethostname())

    def describe(self) -> str:
        return f"{self.name}@{self.host}" if self.host else self.name or "-"


NO_OPERATOR = Operator()


@dataclass(frozen=True)
class PushOptions:
    force: bool = False
    allow_downgrade: bool = False
    timeout_s: float = 600.0  # to follow one update to its end
    rpc_timeout_s: float = RPC_TIMEOUT_S
    watch: bool = True  # False: poll GetUpdate only (a resumed rollout)
    offline_ok: bool = False  # an unreachable node raises NodeOffline and leaves the row open (rollouts retry)
    operator: Operator = NO_OPERATOR  # recorded on each update pushed


@dataclass(frozen=True)
class Outcome:
    """Where an update ended up, as far as we could follow it."""

    update_id: str
    node_id: str
    state: UpdateState
    success: bool = False
    rolled_back: bool = False
    error: str = ""

    @property
    def final(self) -> bool:
        return self.state.final


Progress = Callable[[str, daemon_pb2.UpdateStatus], None]


def new_update_id() -> str:
    return uuid.uuid4().hex[:16]


def node_channel(target: Target, tls: ClientTls | None) -> grpc.Channel:
    """With TLS the node's certificate must name the node id (``DNS:<id>``), whatever address it has."""
    if tls is None:
        return grpc.insecure_channel(target.address)
    return grpc.secure_channel(target.address, tls.credentials(),
                               options=[("grpc.ssl_target_name_override", target.node_id)])


def state_of(status: daemon_pb2.UpdateStatus) -> UpdateState:
    return UpdateState[common_pb2.UpdateState.Name(status.state).removeprefix("UPDATE_STATE_")]


class Pusher:
    """Pushes and follows updates on one node over one channel; record keeping in ``store``."""

    def __init__(self, store: Store, target: Target, tls: ClientTls | None, options: PushOptions | None = None,
                 on_progress: Progress | None = None) -> None:
        self.store = store
        self.target = target
        self.options = options or PushOptions()
        self.on_progress = on_progress
        self._channel = node_channel(target, tls)
        self.stub = daemon_pb2_grpc.DaemonServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def push(self, pkg: PackageRef, update_id: str = "", rollout_id: str = "") -> Outcome:
        """Steps 1 to 4. Raises PushRefused when the node did not take it (the row says FAILED)."""
        update_id = self.start(pkg, update_id or new_update_id(), rollout_id)
        return self.follow(update_id)

    def start(self, pkg: PackageRef, update_id: str, rollout_id: str = "") -> str:
        self.store.create_update(UpdateRow(update_id=update_id, node=self.target.node_id, component=pkg.component,
                                           to_version=pkg.version, created_at=time.time(), rollout_id=rollout_id,
                                           started_by=self.options.operator.name,
                                           started_on=self.options.operator.host))
        request = pkg.request(self.target.node_id, update_id, force=self.options.force,
                              allow_downgrade=self.options.allow_downgrade)
        try:
            self.stub.PushUpdate(request, timeout=self.options.rpc_timeout_s)
        except grpc.RpcError as e:
            code: grpc.StatusCode = e.code()
            details = str(e.details())
            if code != grpc.StatusCode.ALREADY_EXISTS and not self.has(update_id):
                if self.options.offline_ok and code in _UNREACHABLE:
                    raise NodeOffline(self.target.node_id, code.name, details) from None
                error = f"refused by {self.target.node_id}: {code.name}: {details}"
                trailing = [(m.key, m.value) for m in (e.trailing_metadata() or ())]
                if (REFUSAL_METADATA_KEY, "held") in trailing:
                    error = f"held on {self.target.node_id}: {details}"
                self.store.finish_update(UpdateRow(update_id=update_id, node=self.target.node_id,
                                                   component=pkg.component, to_version=pkg.version,
                                                   state=UpdateState.FAILED, error=error, finished_at=time.time(),
                                                   reason=refusal_reason(trailing)))
                raise PushRefused(self.target.node_id, code.name, details) from None
        return update_id

    def cancel(self, update_id: str) -> str:
        """Ask the node to cancel the update (DaemonService.CancelUpdate); returns what came of it, in words.

        A supervisor before contract version 2 answers UNIMPLEMENTED: the update runs on, and that is said.
        """
        try:
            status = self.stub.CancelUpdate(daemon_pb2.UpdateRef(update_id=update_id),
                                            timeout=self.options.rpc_timeout_s)
        except grpc.RpcError as e:
            return f"could not cancel: {e.code().name}: {e.details()}"
        state = state_of(status).value
        return f"cancel asked: the update is {state}" if status.finished else f"cancelling (was {state})"

    def has(self, update_id: str) -> bool:
        """Whether the node knows this update (a push that got through)."""
        try:
            self.stub.GetUpdate(daemon_pb2.UpdateRef(update_id=update_id), timeout=self.options.rpc_timeout_s)
            return True
        except grpc.RpcError:
            return False

    def follow(self, update_id: str) -> Outcome:
        """Until final and settled, or ``timeout_s``; the row follows every state seen."""
        deadline = time.monotonic() + self.options.timeout_s
        last: daemon_pb2.UpdateStatus | None = None
        watch = self.options.watch
        while time.monotonic() < deadline:
            try:
                if watch:
                    for status in self.stub.WatchUpdate(daemon_pb2.UpdateRef(update_id=update_id),
                                                        timeout=max(0.1, deadline - time.monotonic())):
                        last = self._seen(update_id, status, last)
                        if status.finished:
                            return self._finished(update_id, status)
                    watch = False  # the stream ended without a final state: poll
                status = self.stub.GetUpdate(daemon_pb2.UpdateRef(update_id=update_id),
                                             timeout=self.options.rpc_timeout_s)
                last = self._seen(update_id, status, last)
                if status.finished:
                    return self._finished(update_id, status)
            except grpc.RpcError as e:
                watch = False
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    return self._lost(update_id)
            time.sleep(POLL_S)
        state = state_of(last) if last is not None else UpdateState.REQUESTED
        return Outcome(update_id, self.target.node_id, state,
                       error=f"still {state.value} after {self.options.timeout_s:.0f}s; its result will arrive "
                             "when it ends")

    def _seen(self, update_id: str, status: daemon_pb2.UpdateStatus, last: daemon_pb2.UpdateStatus | None
              ) -> daemon_pb2.UpdateStatus:
        state = state_of(status)
        if not status.finished and not state.final and (last is None or last.state != status.state):
            self.store.progress_update(update_id, state, status.from_version)
        if self.on_progress is not None and (last is None or (last.state, last.finished)
                                             != (status.state, status.finished)):
            self.on_progress(self.target.node_id, status)
        return status

    def _finished(self, update_id: str, status: daemon_pb2.UpdateStatus) -> Outcome:
        state = state_of(status)
        row = self.store.update(update_id)
        self.store.finish_update(UpdateRow(
            update_id=update_id, node=self.target.node_id, component=status.component,
            from_version=status.from_version, to_version=status.to_version, state=state, success=status.success,
            rolled_back=status.rolled_back, error=status.error,
            timings={t.step: t.seconds for t in status.timings},
            finished_at=status.updated_at or time.time(), last_log=status.last_log,
            reason=reason_name(status.reason),
            created_at=row.created_at if row else 0.0,
        ))
        return Outcome(update_id, self.target.node_id, state, status.success, status.rolled_back, status.error)

    def _lost(self, update_id: str) -> Outcome:
        """The node does not know the update (its state directory was wiped?): recorded as FAILED."""
        error = f"{self.target.node_id} has no update {update_id}"
        row = self.store.update(update_id)
        if row is not None and row.state.final:
            return Outcome(update_id, self.target.node_id, row.state, row.success, row.rolled_back, row.error)
        if row is not None:
            self.store.finish_update(UpdateRow(update_id=update_id, node=row.node, component=row.component,
                                               to_version=row.to_version, state=UpdateState.FAILED, error=error))
        return Outcome(update_id, self.target.node_id, UpdateState.FAILED, error=error)
