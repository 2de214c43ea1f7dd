"""The front's drain: a server behind it is stopped only once the connections it accepted are closed."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from supervisor.front import Front, UnixPeerPolicy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1024):
        writer.write(data)
        await writer.drain()
    writer.close()


def test_drain_serves_an_accepted_connection_until_its_client_closes_it(tmp_path: Path):
    async def scenario() -> None:
        backend = tmp_path / "backend.sock"
        echo = await asyncio.start_unix_server(_echo, path=str(backend))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / "public.sock"))
        listener.listen(8)
        front = Front(backend, UnixPeerPolicy())
        await front.serve([("public", listener)])
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "public.sock"))
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        await front.stop_accepting()

        draining = asyncio.create_task(front.drain(30))
        writer.write(b"after stop_accepting")  # the accepted connection is still served while it drains
        assert await reader.readexactly(20) == b"after stop_accepting"
        assert not draining.done()
        writer.close()
        assert await draining == 0
        listener.close()
        echo.close()
        await echo.wait_closed()

    asyncio.run(scenario())


def test_drain_gives_up_after_its_limit_and_says_how_many_are_open(tmp_path: Path):
    async def scenario() -> None:
        backend = tmp_path / "backend.sock"
        echo = await asyncio.start_unix_server(_echo, path=str(backend))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / "public.sock"))
        listener.listen(8)
        front = Front(backend, UnixPeerPolicy())
        await front.serve([("public", listener)])
        reader, writer = await asyncio.open_unix_connection(str(tmp_path / "public.sock"))
        writer.write(b"x")
        await reader.readexactly(1)
        await front.stop_accepting()
        assert await front.drain(0.01) == 1
        writer.close()
        await front.drop_connections()
        listener.close()
        echo.close()

    asyncio.run(scenario())
