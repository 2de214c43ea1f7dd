"""The supervisor's end of the agent channel (``baton/agent_channel.py``): get, restart, stop and watch an agent.

Each supervisor process binds ``<run_dir>/agents.sock`` afresh once its agents are adopted and closes it with
the control plane; it is not handed over. A helper whose connection breaks in a handover connects again, and
one that finds no socket at all (a supervisor older than the channel) asks over gRPC instead. A peer must be
root or this process's uid (SO_PEERCRED); anyone else is refused and the refusal audited. A restart or a stop
is audited as the gRPC call it stands for (``RestartAgent``, ``StopAgent``, with ``via: agents.sock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

from baton.agent_channel import (
    BAD_REQUEST,
    HEARTBEAT_S,
    MAX_LINE_BYTES,
    NOT_FOUND,
    PERMISSION_DENIED,
    REFUSED,
    UNAVAILABLE,
    AgentView,
    ChannelError,
    Reply,
    Request,
)
from baton.audit import OUTCOME_FAILED, OUTCOME_OK, AuditRecord, Caller
from baton.front import bind_unix, peer_credentials
from baton.log import logger
from supervisor.agents import AgentError, AgentSnapshot, ProcessManager, UnknownAgent
from supervisor.audit import AuditTrail, local_caller

AUDITED = {"restart": "RestartAgent", "stop": "StopAgent"}  # what the gRPC API calls the same action
READ_TIMEOUT_S = 5.0  # a peer that connects and sends no request is hung up on


def view(s: AgentSnapshot) -> AgentView:
    return AgentView(name=s.name, state=s.state, pid=s.pid, version=s.version, restarts=s.restarts,
                     exit_status=s.last_exit_status, error=s.last_error, adopted=s.adopted)


class AgentSocket:
    def __init__(self, pm: ProcessManager, audit: AuditTrail, path: Path) -> None:
        self.pm = pm
        self.audit = audit
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._closed = False

    async def start(self) -> None:
        sock = bind_unix(self.path)  # 0600, no window where it is wider
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE_BYTES)

    async def close(self) -> None:
        """Stop accepting and end every connection (a watching helper connects again to the next process).

        From here on a request already on its way is answered UNAVAILABLE, not carried out: a handover has
        begun (the caller asks again and the next process answers), as the gRPC side's HandoverGate does.
        """
        self._closed = True
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._connections):
            writer.close()
        self._server = None
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # ours, not the next process's
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            pid, uid, _gid = peer_credentials(writer.get_extra_info("socket"))
            caller = local_caller(uid, pid)
            if uid not in (0, os.geteuid()):
                await self.audit.refused_connection(caller, f"agent channel: uid {uid} is neither root nor the "
                                                            "supervisor's")
                await _send(writer, Reply(code=PERMISSION_DENIED, error=f"uid {uid} may not use the agent channel"))
                return
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), READ_TIMEOUT_S)
                req = Request.decode(line)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ChannelError) as e:
                await _send(writer, Reply(code=BAD_REQUEST, error=_why(e)))
                return
            if self._closed:
                await _send(writer, Reply(code=UNAVAILABLE, error="the supervisor is being replaced or stopping"))
            elif req.op == "watch":
                await self._watch(req.agent, writer)
            else:
                await _send(writer, await self._act(req, caller))
        except (ConnectionError, OSError):
            pass  # the helper went away: nothing to answer
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _act(self, req: Request, caller: Caller) -> Reply:
        started, t0 = time.time(), time.monotonic()
        code = "OK"
        try:
            agent = self.pm.get(req.agent)
            if req.op == "restart":
                await agent.restart()
            elif req.op == "stop":
                await agent.stop()
            reply = Reply(agent=view(agent.snapshot()))
        except UnknownAgent as e:
            reply, code = Reply(code=NOT_FOUND, error=str(e)), "NOT_FOUND"
        except AgentError as e:
            reply, code = Reply(code=REFUSED, error=str(e)), "FAILED_PRECONDITION"
        if req.op in AUDITED:
            logger.info("agent channel: {} {} for pid {} ({})", req.op, req.agent, caller.pid, code)
            await self.audit.write(AuditRecord(
                time=started, caller=caller, call=AUDITED[req.op], outcome=OUTCOME_OK if reply.ok else OUTCOME_FAILED,
                code=code, message=reply.error, args={"name": req.agent, "via": "agents.sock"},
                duration_ms=int((time.monotonic() - t0) * 1000)))
        return reply

    async def _watch(self, name: str, writer: asyncio.StreamWriter) -> None:
        """The agent now, then on each change (in the event-loop turn it happens), at least every HEARTBEAT_S."""
        try:
            async with contextlib.aclosing(self.pm.watch(name, HEARTBEAT_S)) as changes:
                async for snap in changes:
                    if writer.is_closing():
                        return
                    await _send(writer, Reply(agent=view(snap)))
        except UnknownAgent as e:
            await _send(writer, Reply(code=NOT_FOUND, error=str(e)))


async def _send(writer: asyncio.StreamWriter, reply: Reply) -> None:
    writer.write(reply.encode())
    await writer.drain()


def _why(e: BaseException) -> str:
    if isinstance(e, asyncio.IncompleteReadError):
        return "the request ended before its newline"
    if isinstance(e, asyncio.LimitOverrunError):
        return f"a request longer than {MAX_LINE_BYTES} bytes"
    if isinstance(e, TimeoutError):
        return f"no request within {READ_TIMEOUT_S:g}s"
    return str(e)
