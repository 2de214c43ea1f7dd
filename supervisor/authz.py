"""Who may change things through the supervisor's gRPC API.

With TLS configured, the supervisor's gRPC server has two private ports
(``supervisor/daemon.py``): a TLS port that the public TCP sockets are spliced
to, and an insecure port for the local Unix sockets, whose peers were already
checked with SO_PEERCRED (``supervisor/front.py``). Both ports look alike to a
handler (``context.peer()`` is ``unix:`` on either), but their transports do
not: the TLS port only completes a handshake with a client certificate from
our CA (so every call on it carries an x509 identity, transport ``ssl``), and
the local port carries none (transport ``insecure``). The interceptor decides
on that:

- local (insecure transport, no certificate): every method;
- TLS: read-only methods for any certificate from our CA; mutating methods
  (and any method not known to be read-only) only for an identity named in
  ``grpc.allowed_clients``; otherwise PERMISSION_DENIED naming the identity.

Allow-list entries: ``CN=name``, ``DNS:name``, ``URI:uri``, or a bare ``name``
matching the common name or a DNS SAN.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from baton.identity import PeerIdentity, parse_allow_list, peer_identity

READ_ONLY_METHODS = frozenset({
    "/baton.v1.DaemonService/GetStatus",
    "/baton.v1.DaemonService/ListAgents",
    "/baton.v1.DaemonService/GetUpdate",
    "/baton.v1.DaemonService/WatchUpdate",
    "/baton.v1.DaemonService/ListUpdates",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
})
class Policy:
    """The decision alone, without gRPC plumbing (what the interceptor asks)."""

    def __init__(self, allowed_clients: Sequence[str]) -> None:
        self.allowed = parse_allow_list(allowed_clients)

    def denial(self, method: str, peer: PeerIdentity) -> str | None:
        """None when the call may go ahead, else why not (the PERMISSION_DENIED message)."""
        if not peer.tls and not peer.has_certificate:
            return None  # the local port: its peers passed the SO_PEERCRED check
        if method in READ_ONLY_METHODS:
            return None
        if any(peer.matches(e) for e in self.allowed):
            return None
        return (f"{method.rsplit('/', 1)[-1]} refused: client identity {peer.describe()} is not in "
                "grpc.allowed_clients")


class AuthzInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call before its handler runs; read-only methods pass through unwrapped."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in READ_ONLY_METHODS:
            return handler
        return _guarded(handler, method, self.policy)


async def _check(policy: Policy, method: str, context: grpc.aio.ServicerContext) -> None:
    why = policy.denial(method, peer_identity(context.auth_context()))
    if why is not None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)


def _guarded(original: grpc.RpcMethodHandler, method: str, policy: Policy) -> grpc.RpcMethodHandler:
    """The same handler with the check in front, for each of the four call shapes."""
    handler: Any = original  # grpc-stubs types the synchronous server's handlers; these are coroutines
    ser = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await _check(policy, method, context)
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **ser)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await _check(policy, method, context)
            async for item in inner_us(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **ser)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await _check(policy, method, context)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **ser)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _check(policy, method, context)
        async for item in inner_ss(requests, context):
            yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, **ser)
