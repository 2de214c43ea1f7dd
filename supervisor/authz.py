"""Who may change things through the supervisor's gRPC API.

The supervisor owns the public sockets and splices each accepted connection to
one of gRPC's two private ports (``baton/front.py``): TCP connections to
the TLS port (or, with ``grpc.insecure_tcp``, to a plain one), Unix-socket
connections to the local port once their peer passed the SO_PEERCRED check.
A handler cannot tell those ports apart by itself, so the front labels every
spliced connection: it binds its end to an abstract socket address
``baton.<channel>.<random>`` before connecting, and gRPC reports that address
as the call's peer (``unix-abstract:baton.local.3f2a...``). Only root can reach
the private ports (the run directory is 0700), so the label cannot be forged.

How a call reached us (:class:`Channel`) and what it asks decide:

- ``tls`` (transport ``ssl``: a certificate from our CA): read-only methods for
  anyone; mutating methods (and any method not known to be read-only) for an
  identity in ``grpc.allowed_clients`` or ``grpc.allow_downgrade_clients``;
- ``tcp`` (TCP without TLS, only with ``grpc.insecure_tcp`` on loopback) and
  any unlabelled peer: read-only methods only;
- ``local`` and ``operator`` (Unix-socket peers): every method.

Operator powers (``PushUpdate`` with ``allow_downgrade``, ``force`` or ``reinstall``) need, in
addition, an operator: a TLS identity in ``grpc.allow_downgrade_clients`` or a
local peer whose uid is in ``grpc.allow_downgrade_uids`` (default: root only).
Everyone else gets PERMISSION_DENIED naming the rule.

Allow-list entries: ``CN=name``, ``DNS:name``, ``URI:uri``, or a bare ``name``
matching the common name or a DNS SAN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from baton.identity import PeerIdentity, parse_allow_list, peer_identity
from baton.peer_label import Channel, channel_of
from supervisor.call_hooks import CallHooks, HookedInterceptor

READ_ONLY_METHODS = frozenset({
    "/baton.v1.DaemonService/GetStatus",
    "/baton.v1.DaemonService/ListAgents",
    "/baton.v1.DaemonService/GetUpdate",
    "/baton.v1.DaemonService/WatchUpdate",
    "/baton.v1.DaemonService/ListUpdates",
    "/baton.v1.DaemonService/WatchAgent",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
})
# Request fields that only an operator may set, per method.
OPERATOR_FIELDS = {
    "/baton.v1.DaemonService/PushUpdate": ("allow_downgrade", "force", "reinstall"),
}
class Policy:
    """The decision alone, without gRPC plumbing (what the interceptor asks)."""

    def __init__(self, allowed_clients: Sequence[str], operators: Sequence[str] = ()) -> None:
        self.allowed = parse_allow_list(allowed_clients)
        self.operators = parse_allow_list(operators, key="grpc.allow_downgrade_clients")

    def denial(self, method: str, peer: PeerIdentity, channel: Channel | None = None,
               request: Any = None) -> str | None:
        """None when the call may go ahead, else why not (the PERMISSION_DENIED message)."""
        if channel is None:
            channel = Channel.TLS if peer.tls else Channel.UNKNOWN
        name = method.rsplit("/", 1)[-1]
        if method in READ_ONLY_METHODS:
            return None
        if channel in (Channel.INSECURE_TCP, Channel.UNKNOWN):
            return (f"{name} refused: this TCP listener has no TLS (grpc.insecure_tcp) and serves read-only "
                    "methods only; use the Unix socket or mutual TLS")
        if not self.may_operate(peer, channel):
            return f"{name} refused: client identity {peer.describe()} is not in grpc.allowed_clients"
        operator = channel is Channel.OPERATOR or (
            channel is Channel.TLS and any(peer.matches(e) for e in self.operators))
        wanted = [f for f in OPERATOR_FIELDS.get(method, ()) if request is not None and getattr(request, f, False)]
        if wanted and not operator:
            who = (f"client identity {peer.describe()} is not in grpc.allow_downgrade_clients"
                   if channel is Channel.TLS else "the local peer's uid is not in grpc.allow_downgrade_uids")
            return f"{name} with {' and '.join(wanted)} is an operator power: {who}"
        return None


    def may_operate(self, peer: PeerIdentity, channel: Channel) -> bool:
        """Whether this caller may call mutating methods: start, stop, tail, push. Who may operate an agent may
        also read what it printed; a read-only caller is shown neither (a failed version's last output)."""
        if channel in (Channel.LOCAL, Channel.OPERATOR):
            return True
        return channel is Channel.TLS and any(peer.matches(e) for e in (*self.allowed, *self.operators))

    def context_may_operate(self, context: grpc.aio.ServicerContext) -> bool:
        """:meth:`may_operate` for the caller of ``context`` (as :class:`AuthzInterceptor` decides it)."""
        identity = peer_identity(context.auth_context())
        return self.may_operate(identity, channel_of(context.peer(), identity))


class AuthzInterceptor(HookedInterceptor):
    """Checks every call before its handler runs; read-only methods pass through unwrapped."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def hooks(self, method: str) -> CallHooks | None:
        return None if method in READ_ONLY_METHODS else _Check(self.policy, method)


class _Check:
    """The policy's decision in front of a call (CallHooks); a refusal ends it with PERMISSION_DENIED."""

    def __init__(self, policy: Policy, method: str) -> None:
        self.policy = policy
        self.method = method

    async def begin(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        identity = peer_identity(context.auth_context())
        why = self.policy.denial(self.method, identity, channel_of(context.peer(), identity), request)
        if why is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

    async def end(self, state: Any, response: Any = None, exc: BaseException | None = None) -> None:
        pass
