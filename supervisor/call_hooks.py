"""Work done around each gRPC call, whatever the call's shape: written once for the four shapes.

Authorization (``supervisor/authz.py``) checks a call before its handler runs; the audit trail
(``supervisor/audit.py``) records it after, with its outcome. grpc.aio hands an interceptor the method's
handler in one of four shapes (a single request or a stream of them, a single response or a stream), so
wrapping it is the same four-way code for both; it lives here, and each of them says only what it does
before and after a call (:class:`CallHooks`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import grpc


class CallHooks(Protocol):
    """What to do around one call of one method.

    ``begin`` runs before the handler; whatever it raises (a ``context.abort`` included) ends the call
    without the handler and without ``end``. ``end`` runs once the handler has returned, finished its stream
    or raised (``exc``, which is raised again after it, cancellation included); its ``response`` is the
    handler's for a single response, ``None`` for a stream.
    """

    async def begin(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """Before the handler; ``request`` is ``None`` for a streamed request. Returns the call's state."""

    async def end(self, state: Any, response: Any = None, exc: BaseException | None = None) -> None:
        """After the handler, with what ``begin`` returned."""


class HookedInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's handler with the hooks :meth:`hooks` gives for it (``None``: left as it is)."""

    def hooks(self, method: str) -> CallHooks | None:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        hooks = self.hooks(handler_call_details.method) if handler is not None else None
        return handler if hooks is None else wrap_handler(handler, hooks)


def wrap_handler(original: grpc.RpcMethodHandler, hooks: CallHooks) -> grpc.RpcMethodHandler:
    """The same handler with ``hooks`` around each call, for each of the four call shapes."""
    handler: Any = original  # grpc-stubs types the synchronous server's handlers; these are coroutines
    ser = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_one_response(handler.unary_unary, hooks, False), **ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_streamed_response(handler.unary_stream, hooks, False), **ser)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_one_response(handler.stream_unary, hooks, True), **ser)
    return grpc.stream_stream_rpc_method_handler(_streamed_response(handler.stream_stream, hooks, True), **ser)


def _one_response(inner: Any, hooks: CallHooks, streamed_request: bool) -> Any:
    """A handler with one response, wrapped; ``begin`` is not given a streamed request (it is not read yet)."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        state = await hooks.begin(None if streamed_request else request, context)
        try:
            response = await inner(request, context)
        except BaseException as e:
            await hooks.end(state, exc=e)
            raise
        await hooks.end(state, response)
        return response

    return call


def _streamed_response(inner: Any, hooks: CallHooks, streamed_request: bool) -> Any:
    """A handler with a stream of responses, wrapped; ``end`` comes after its last item."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        state = await hooks.begin(None if streamed_request else request, context)
        try:
            async for item in inner(request, context):
                yield item
        except BaseException as e:
            await hooks.end(state, exc=e)
            raise
        await hooks.end(state)

    return call
