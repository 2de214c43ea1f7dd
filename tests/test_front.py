"""The front's drain: a server behind it is stopped only once the connections it accepted are closed."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from baton.front import Front, UnixPeerPolicy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1024):
        writer.write(data)
        await writer.drain()
    writer.close()


async def _connect_and_send(client: socket.socket, address: str | tuple[str, int], data: bytes) -> None:
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(client, address)
    await loop.sock_sendall(client, data)


@contextlib.asynccontextmanager
async def _front_with_a_client(tmp_path: Path) -> AsyncIterator[tuple[Front, asyncio.StreamReader,
                                                                       asyncio.StreamWriter]]:
    """A front on a public Unix socket before an echo server, and one client connection it has accepted."""
    echo = await asyncio.start_unix_server(_echo, path=str(tmp_path / "backend.sock"))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "public.sock"))
    listener.listen(8)
    front = Front(tmp_path / "backend.sock", UnixPeerPolicy())
    try:
        await front.serve([("public", listener)])
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "public.sock"))
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        yield front, reader, writer
    finally:
        await front.drop_connections()
        listener.close()
        echo.close()
        await echo.wait_closed()


def test_drain_serves_an_accepted_connection_until_its_client_closes_it(tmp_path: Path):
    async def scenario() -> None:
        async with _front_with_a_client(tmp_path) as (front, reader, writer):
            await front.stop_accepting()
            draining = asyncio.create_task(front.drain(30))
            writer.write(b"after stop_accepting")  # the accepted connection is still served while it drains
            assert await reader.readexactly(20) == b"after stop_accepting"
            assert not draining.done()
            writer.close()
            assert await draining == 0

    asyncio.run(scenario())


def test_drain_gives_up_after_its_limit_and_says_how_many_are_open(tmp_path: Path):
    async def scenario() -> None:
        async with _front_with_a_client(tmp_path) as (front, _reader, writer):
            await front.stop_accepting()
            assert await front.drain(0.01) == 1
            writer.close()

    asyncio.run(scenario())


def test_a_client_connecting_as_the_front_stops_accepting_is_answered_or_left_in_the_backlog(tmp_path: Path):
    """Never accepted and then dropped: at a handover such a client's connection would close unanswered (gRPC
    then backs off, or fails the call). Each round stops accepting at a different point of the connection's
    way in: what the front took, it serves; what it did not take waits in the backlog for the next owner."""
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        echo = await asyncio.start_unix_server(_echo, path=str(tmp_path / "backend.sock"))
        public = str(tmp_path / "public.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(public)
        listener.listen(8)
        served = waiting = 0
        try:
            for i in range(300):
                front = Front(tmp_path / "backend.sock", UnixPeerPolicy())
                await front.serve([("public", listener)])
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    await _connect_and_send(client, public, b"x")
                    for _ in range(i % 4):
                        await asyncio.sleep(0)
                    await front.stop_accepting()
                    try:
                        left, _ = listener.accept()
                    except BlockingIOError:  # the front took it
                        assert await asyncio.wait_for(loop.sock_recv(client, 1), 10) == b"x", f"round {i}"
                        served += 1
                    else:
                        left.close()
                        waiting += 1
                finally:
                    client.close()
                    await front.drop_connections()
        finally:
            listener.close()
            echo.close()
            await echo.wait_closed()
        assert served > 0, f"the front never took a connection ({waiting} left waiting)"

    asyncio.run(scenario())


@pytest.mark.parametrize("public_family", ["unix", "tcp"])
def test_what_the_backend_sent_before_closing_reaches_the_client_though_a_write_to_it_failed(tmp_path: Path,
                                                                                            public_family: str):
    """A gRPC server ends a call on a connection it told GOAWAY by sending the call's status and closing; a
    client's PING on its way then cannot be written to it. That failed write must not cost the client the
    status the backend sent (with asyncio's streams it did: the watch ended UNAVAILABLE, "Socket closed")."""
    backend_path, public = tmp_path / "backend.sock", tmp_path / "public.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(backend_path))
    server.listen(1)
    if public_family == "unix":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(public))
        address: str | tuple[str, int] = str(public)
    else:  # over TCP the front also closes its client's side without a reset (baton.front._linger)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        address = listener.getsockname()
    listener.listen(1)

    async def scenario() -> bytes:
        loop = asyncio.get_running_loop()
        front = Front(backend_path, UnixPeerPolicy())
        await front.serve([("public", listener)])
        client = socket.socket(listener.family, socket.SOCK_STREAM)
        try:
            await _connect_and_send(client, address, b"call")
            server.setblocking(False)
            backend, _ = await loop.sock_accept(server)
            with backend:
                assert await loop.sock_recv(backend, 4) == b"call"
                backend.shutdown(socket.SHUT_RD)  # from here the front's writes to it fail (EPIPE)
                await loop.sock_sendall(client, b"ping")
                await asyncio.sleep(0.2)  # the front tries to pass the ping on, and fails
                await loop.sock_sendall(backend, b"status")
            received = b""
            while chunk := await asyncio.wait_for(loop.sock_recv(client, 1024), 10):
                received += chunk
            return received
        finally:
            client.close()
            await front.drop_connections()

    try:
        assert asyncio.run(scenario()) == b"status"
    finally:
        server.close()
        listener.close()


def test_a_group_socket_at_the_longest_path_a_unix_socket_takes_is_bound_with_its_group(tmp_path: Path):
    import grp
    import os
    import stat

    from baton.front import bind_unix

    longest = 107  # sun_path's 108 bytes with the terminating NUL
    name = "supervisor.sock"
    pad = longest - len(str(tmp_path)) - len(name) - 2
    assert pad > 0, tmp_path
    path = tmp_path / ("d" * pad) / name
    assert len(str(path)) == longest
    bind_unix(path, "nogroup").close()
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and st.st_gid == grp.getgrnam("nogroup").gr_gid
    assert [p.name for p in path.parent.iterdir()] == [name], "no private bind directory left"
