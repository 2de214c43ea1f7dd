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
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            state = await hooks.begin(request, context)
            try:
                response = await inner_uu(request, context)
            except BaseException as e:
                await hooks.end(state, exc=e)
                raise
            await hooks.end(state, response)
            return response

        return grpc.unary_unary_rpc_method_handler(unary_unary, **ser)
    if handler.unary_stream is not None:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            state = await hooks.begin(request, context)
            try:
                async for item in inner_us(request, context):
                    yield item
            except BaseException as e:
                await hooks.end(state, exc=e)
                raise
            await hooks.end(state)

        return grpc.unary_stream_rpc_method_handler(unary_stream, **ser)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            state = await hooks.begin(None, context)
            try:
                response = await inner_su(requests, context)
            except BaseException as e:
                await hooks.end(state, exc=e)
                raise
            await hooks.end(state, response)
            return response

        return grpc.stream_unary_rpc_method_handler(stream_unary, **ser)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        state = await hooks.begin(None, context)
        try:
            async for item in inner_ss(requests, context):
                yield item
        except BaseException as e:
            await hooks.end(state, exc=e)
            raise
        await hooks.end(state)

    return grpc.stream_stream_rpc_method_handler(stream_stream, **ser)
