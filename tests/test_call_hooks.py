"""The hooks around a gRPC call (supervisor/call_hooks.py), on a real grpc.aio server over a Unix socket.

Authorization and the audit trail both stand on them; the supervisor's own service has no streamed
requests, so the four call shapes are each driven here through a generic service.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from supervisor.call_hooks import CallHooks, HookedInterceptor

SERVICE = "test.Hooks"


def _same(b: bytes) -> bytes:
    return b


class _Recorder:
    """Hooks that write down what they saw; ``refuse`` makes ``begin`` abort the call."""

    def __init__(self, events: list[tuple[Any, ...]], method: str, refuse: bool) -> None:
        self.events, self.method, self.refuse = events, method, refuse

    async def begin(self, request: Any, context: grpc.aio.ServicerContext) -> str:
        self.events.append(("begin", self.method, request))
        if self.refuse:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "refused by begin")
        return f"state of {self.method}"

    async def end(self, state: Any, response: Any = None, exc: BaseException | None = None) -> None:
        self.events.append(("end", state, response, type(exc).__name__ if exc else None))


class _Interceptor(HookedInterceptor):
    def __init__(self, events: list[tuple[Any, ...]], passed: frozenset[str], refused: frozenset[str]) -> None:
        self.events, self.passed, self.refused = events, passed, refused

    def hooks(self, method: str) -> CallHooks | None:
        name = method.rsplit("/", 1)[-1]
        return None if name in self.passed else _Recorder(self.events, name, name in self.refused)


async def _uu(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"fail":
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the handler said no")
    return request.upper()


async def _us(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for c in request:
        yield bytes([c])


async def _su(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    return b"+".join([r async for r in requests])


async def _ss(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for r in requests:
        yield r[::-1]


def _serve(tmp_path: Path, body: Callable[[grpc.aio.Channel], Awaitable[Any]], *,
           passed: frozenset[str] = frozenset(), refused: frozenset[str] = frozenset(),
           ) -> tuple[Any, list[tuple[Any, ...]]]:
    """Runs ``body(channel)`` against a fresh server; returns what it returned and the hooks' events."""
    events: list[tuple[Any, ...]] = []

    async def main() -> Any:
        ser = {"request_deserializer": _same, "response_serializer": _same}
        handlers = {
            "UnaryUnary": grpc.unary_unary_rpc_method_handler(_uu, **ser),
            "UnaryStream": grpc.unary_stream_rpc_method_handler(_us, **ser),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(_su, **ser),
            "StreamStream": grpc.stream_stream_rpc_method_handler(_ss, **ser),
        }
        server = grpc.aio.server(interceptors=[_Interceptor(events, passed, refused)])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
        address = f"unix:{tmp_path / 'hooks.sock'}"
        server.add_insecure_port(address)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                return await body(channel)
        finally:
            await server.stop(None)

    return asyncio.run(main()), events


def _method(channel: grpc.aio.Channel, kind: str) -> Any:
    make = {"UnaryUnary": channel.unary_unary, "UnaryStream": channel.unary_stream,
            "StreamUnary": channel.stream_unary, "StreamStream": channel.stream_stream}[kind]
    return make(f"/{SERVICE}/{kind}", request_serializer=_same, response_deserializer=_same)


async def _chunks(*items: bytes) -> AsyncIterator[bytes]:
    for i in items:
        yield i


def test_a_single_request_and_response_is_seen_by_begin_and_by_end(tmp_path):
    got, events = _serve(tmp_path, lambda ch: _method(ch, "UnaryUnary")(b"abc"))
    assert got == b"ABC"
    assert events == [("begin", "UnaryUnary", b"abc"), ("end", "state of UnaryUnary", b"ABC", None)]


def test_a_streamed_response_ends_after_its_last_item_with_no_response_object(tmp_path):
    async def body(ch: grpc.aio.Channel) -> list[bytes]:
        return [r async for r in _method(ch, "UnaryStream")(b"xy")]

    got, events = _serve(tmp_path, body)
    assert got == [b"x", b"y"]
    assert events == [("begin", "UnaryStream", b"xy"), ("end", "state of UnaryStream", None, None)]


def test_a_streamed_request_begins_with_no_request_and_ends_with_the_response(tmp_path):
    got, events = _serve(tmp_path, lambda ch: _method(ch, "StreamUnary")(_chunks(b"a", b"b")))
    assert got == b"a+b"
    assert events == [("begin", "StreamUnary", None), ("end", "state of StreamUnary", b"a+b", None)]


def test_both_ways_streamed_begins_with_no_request_and_ends_with_no_response(tmp_path):
    async def body(ch: grpc.aio.Channel) -> list[bytes]:
        return [r async for r in _method(ch, "StreamStream")(_chunks(b"ab", b"cd"))]

    got, events = _serve(tmp_path, body)
    assert got == [b"ba", b"dc"]
    assert events == [("begin", "StreamStream", None), ("end", "state of StreamStream", None, None)]


def test_a_handler_that_fails_is_ended_with_its_error_and_the_client_gets_the_handlers_status(tmp_path):
    async def body(ch: grpc.aio.Channel) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _method(ch, "UnaryUnary")(b"fail")
        assert e.value.details() == "the handler said no"
        return e.value.code()

    code, events = _serve(tmp_path, body)
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert events == [("begin", "UnaryUnary", b"fail"), ("end", "state of UnaryUnary", None, "AbortError")]


def test_a_call_refused_by_begin_never_reaches_the_handler_and_is_not_ended(tmp_path):
    async def body(ch: grpc.aio.Channel) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _method(ch, "StreamUnary")(_chunks(b"a"))
        return e.value.code()

    code, events = _serve(tmp_path, body, refused=frozenset({"StreamUnary"}))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert events == [("begin", "StreamUnary", None)]


def test_a_method_given_no_hooks_runs_as_it_is(tmp_path):
    got, events = _serve(tmp_path, lambda ch: _method(ch, "UnaryUnary")(b"abc"), passed=frozenset({"UnaryUnary"}))
    assert got == b"ABC"
    assert events == []
