"""The supervisor's two ends of a self-update handover (protocol: baton/handover.py, docs/handover.md).

Giving: a helper connects to ``<run_dir>/handover.sock`` and asks (PREPARE). The
supervisor stops accepting, stops watching its agents (they keep running, they
stay its children), sends the agent table and the descriptors worth keeping
(listening sockets, the agents' output FIFOs and notify sockets, its stdout and
stderr) to the helper, and execs ``current/bin/supervisor`` in its own pid.

Receiving: a supervisor that starts while ``<run_dir>/handover.json`` names a
live helper says HELLO, takes the table and descriptors from the helper,
adopts every agent, serves, and reports HEALTHY (or UNHEALTHY, and why). The
helper commits or rolls back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import grpc

from baton import faults
from baton import handover as wire
from baton.agent_table import AgentRecord
from baton.config import Config
from baton.front import Front
from baton.layout import START_LOG_ENV, START_LOG_NAME
from baton.log import logger
from supervisor import systemd
from supervisor.agents import ProcessManager
from supervisor.authz import READ_ONLY_METHODS
from supervisor.own_layout import launcher, running_from_layout

STATE_TIMEOUT_S = 30.0
EXEC_CONFIRM_TIMEOUT_S = 10.0
COMMIT_TIMEOUT_S = 30.0
INFLIGHT_GRACE_S = 0.25  # after the drain: what is still open (a watch) ends, then the exec
HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # blocked across the exec: none lost or fatal
PENDING_STOP_ENV = "BATON_PENDING_STOP"
DAEMON_SERVICE = "/baton.v1.DaemonService/"


@dataclass
class ReceivedState:
    """What a starting supervisor got from the helper."""

    conn: socket.socket
    protocol: int
    records: list[AgentRecord]
    listen: dict[str, socket.socket] = field(default_factory=dict)
    fifos: dict[str, int] = field(default_factory=dict)
    notify: dict[str, socket.socket] = field(default_factory=dict)
    err_fifos: dict[str, int] = field(default_factory=dict)
    from_version: str = ""

    def channels(self) -> dict[str, tuple[int | None, object | None, int | None]]:
        """Per agent: (output FIFO, notify socket, stderr FIFO), each None when not handed over."""
        names = set(self.fifos) | set(self.notify) | set(self.err_fifos)
        return {n: (self.fifos.get(n), self.notify.get(n), self.err_fifos.get(n)) for n in names}

    def take_listen(self, address: str) -> socket.socket | None:
        return self.listen.pop(address, None)

    def close_unused(self) -> None:
        for s in self.listen.values():
            s.close()
        self.listen.clear()

    def report(self, msg: wire.Healthy | wire.Unhealthy) -> wire.Message | None:
        """Send HEALTHY/UNHEALTHY and wait for the helper's verdict (None: the helper is gone)."""
        try:
            faults.crash_point("handover-adopted", faults.SUPERVISOR)
            wire.send(self.conn, msg)
            faults.crash_point("handover-healthy-sent", faults.SUPERVISOR)
            reply, fds = wire.recv(self.conn, COMMIT_TIMEOUT_S, "commit")
            wire.close_fds(fds)
            return reply.message
        except wire.HandoverError as e:
            logger.warning("handover: no verdict from the helper: {}", e)
            return None
        finally:
            self.conn.close()


def _socket_address(s: socket.socket) -> str:
    name = s.getsockname()
    if s.family == socket.AF_UNIX:
        return f"unix:{name}"
    host, port = name[0], name[1]
    return f"[{host}]:{port}" if s.family == socket.AF_INET6 else f"{host}:{port}"


def receive(cfg: Config, version: str) -> ReceivedState | None:
    """Blocking: the handshake's first half, if a helper is waiting for us."""
    active = wire.ActiveHandover.read(cfg.run_dir)
    if active is None:
        return None
    try:
        conn = wire.connect(Path(active.socket), timeout_s=5.0)
    except wire.PeerGone as e:
        logger.warning("handover {} announced but its helper is gone ({}); starting on my own", active.update_id, e)
        return None
    try:
        wire.send(conn, wire.Hello(version=version, pid=os.getpid(), update_id=active.update_id))
        faults.crash_point("handover-hello-sent", faults.SUPERVISOR)
        frame, fds = wire.recv(conn, STATE_TIMEOUT_S, "state")
    except wire.HandoverError as e:
        conn.close()
        logger.warning("handover {}: {}; starting on my own", active.update_id, e)
        return None
    msg = frame.message
    if not isinstance(msg, wire.State):
        wire.close_fds(fds)
        conn.close()
        logger.error("handover {}: the helper answered {}: {}", active.update_id, msg.TYPE,
                     msg.reason if isinstance(msg, wire.Refused) else "")
        raise SystemExit(3)
    try:
        protocol = wire.negotiate(frame.protocol)
    except wire.HandoverRefused as e:
        wire.close_fds(fds)
        conn.close()
        logger.error("handover {}: {}", active.update_id, e)
        raise SystemExit(3) from None
    state = ReceivedState(conn=conn, protocol=protocol, records=list(msg.agents),
                          from_version=msg.supervisor_version)
    for desc, fd in zip(msg.fds, fds, strict=False):
        if desc.kind == "listen":
            state.listen[desc.name] = socket.socket(fileno=fd)
        elif desc.kind == "fifo":
            state.fifos[desc.name] = fd
        elif desc.kind == "stderr_fifo":
            state.err_fifos[desc.name] = fd
        elif desc.kind == "notify":
            state.notify[desc.name] = socket.socket(fileno=fd)
        else:
            os.close(fd)
    wire.close_fds(fds[len(msg.fds):])
    logger.info("handover {}: received {} agents and {} descriptors from the helper (protocol {})",
                active.update_id, len(state.records), len(fds), protocol)
    return state


def cannot_hand_over(cfg: Config) -> str:
    """Why this supervisor cannot exec a new version in its pid ("" when it can)."""
    if not running_from_layout(cfg):
        return (f"this supervisor does not run from {cfg.node.install_root}/supervisor "
                "(install it with `supervisor install-self`)")
    if not os.access(launcher(cfg), os.X_OK):
        return f"{launcher(cfg)} is not executable"
    if cfg.source is None:
        return "no config file to restart with"
    return ""


def exec_current(cfg: Config, stop_requested: bool) -> None:
    """Become the current version in this pid: agents stay our children, systemd sees the same main pid."""
    exe = str(launcher(cfg))
    systemd.notify("RELOADING=1\nSTATUS=handing over to the new version")
    logger.info("exec {}", exe)
    env = dict(os.environ)
    env[START_LOG_ENV] = str(cfg.log_dir / START_LOG_NAME)  # where a release that cannot start says why
    if stop_requested:
        env[PENDING_STOP_ENV] = "1"  # a stop request that arrived mid-handover: the next process honours it
    os.execve(exe, [exe, "run", "--config", str(cfg.source)], env)


def exit_keeping_agents(how: str = "handed over to the helper") -> NoReturn:
    """End this process, its agents left running (systemd restarts the unit; the next process takes them from the
    helper, or adopts them from ``agents.json``). As with the exec, nothing of Python's shutdown runs."""
    systemd.notify("STOPPING=1\nSTATUS=restarting: the agents keep running")
    logger.info("exiting for systemd's restart of the unit; the agents keep running ({})", how)
    os._exit(0)


class HandoverGate(grpc.aio.ServerInterceptor):
    """Once closed (at quiesce): every call but the read-only ones is UNAVAILABLE, as the bridge answers, and
    the watches open end UNAVAILABLE too (clients retry it, and reach the next process).

    After it hands over, the old process still answers on the connections it accepted before, until their
    clients close them (``Front.drain``): reads as before, but a change (a push, a stop) must wait for the
    next process, because this one has let go of its agents and its helpers; and a watch left open would
    hold its connection, and so the exec, until the drain's limit.
    """

    def __init__(self) -> None:
        self._closed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        self._closed.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if self.closed and method not in READ_ONLY_METHODS:
            return grpc.unary_unary_rpc_method_handler(_between)
        handler: Any = await continuation(handler_call_details)  # grpc-stubs types the synchronous handlers
        if handler is None or handler.unary_stream is None or not method.startswith(DAEMON_SERVICE):
            return handler
        return grpc.unary_stream_rpc_method_handler(
            self._until_closed(handler.unary_stream), request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _until_closed(self, inner: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]
                      ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            items = aiter(inner(request, context))
            closing = asyncio.ensure_future(self._closed.wait())
            step: asyncio.Future[Any] | None = None
            try:
                while True:
                    step = asyncio.ensure_future(anext(items))
                    await asyncio.wait((step, closing), return_when=asyncio.FIRST_COMPLETED)
                    if not step.done():
                        await context.abort(grpc.StatusCode.UNAVAILABLE, wire.BETWEEN)
                    try:
                        item = step.result()
                    except StopAsyncIteration:
                        return
                    yield item
            finally:
                closing.cancel()
                if step is not None and not step.done():
                    step.cancel()  # the watch's own cleanup runs (its finally)
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await step
                with contextlib.suppress(Exception):
                    await items.aclose()  # type: ignore[attr-defined]

        return stream


async def _between(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, wire.BETWEEN)


class HandoverEndpoint:
    """Listens on ``<run_dir>/handover.sock`` for a helper's PREPARE; gives the supervisor's state away and execs.

    It holds what the handover stops and gives (agents, public sockets, the gRPC server) and is told how to
    stop the rest of the control plane (health, the Manager client, the outbox, helper watching).
    """

    def __init__(self, cfg: Config, version: str, pm: ProcessManager, front: Front, server: grpc.aio.Server,
                 gate: HandoverGate, stop_control_plane: Callable[[], Awaitable[None]],
                 stop_requested: asyncio.Event) -> None:
        self.cfg = cfg
        self.gate = gate
        self.version = version
        self.pm = pm
        self.front = front
        self.server = server
        self._stop_control_plane = stop_control_plane
        self._stop_requested = stop_requested
        self.path = cfg.run_dir / wire.SOCKET_NAME
        self._sock: socket.socket | None = None
        self._busy = False
        self._handed_over: list[socket.socket] = []  # kept open until the exec
        # systemd is restarting the unit: after handing over, exit (systemd starts the next process) instead of exec
        self.exit_after_handover = False

    @property
    def busy(self) -> bool:
        """A helper's PREPARE is being served: this process ends in its exec (or exit) whatever happens now."""
        return self._busy

    def start(self) -> None:
        self._sock = wire.seqpacket_listener(self.path)
        self._sock.setblocking(False)
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _accept(self) -> None:
        assert self._sock is not None
        try:
            conn, _ = self._sock.accept()
        except BlockingIOError:
            return
        uid = wire.peer_uid(conn)
        if uid not in (0, os.getuid()):
            logger.warning("handover: refused a connection from uid {}", uid)
            conn.close()
            return
        if self._busy:
            conn.close()
            return
        self._busy = True
        asyncio.get_running_loop().create_task(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        try:
            frame, fds = await asyncio.to_thread(wire.recv, conn, 10.0, "prepare")
            wire.close_fds(fds)
            prepare = frame.expect(wire.Prepare)
            wire.negotiate(frame.protocol)
            problem = cannot_hand_over(self.cfg)
            if problem:
                raise wire.HandoverRefused(problem)
        except wire.HandoverError as e:
            logger.warning("handover refused: {}", e)
            with contextlib.suppress(OSError):
                wire.send(conn, wire.Refused(str(e)))
            conn.close()
            self._busy = False
            return
        logger.info("handover {}: handing over to the helper", prepare.update_id)
        try:
            state, fds = await self.quiesce()
            faults.crash_point("handover-quiesced", faults.SUPERVISOR)
            wire.send(conn, state, fds)
            faults.crash_point("handover-state-sent", faults.SUPERVISOR)
            # The helper accepts on the sockets from here (helper/bridge.py). The connections we accepted before
            # may still carry calls: the server answers them until they close (Front.drain), then stops.
            left = await self.front.drain()
            if left:
                logger.info("handover: {} connections with a call open after the drain; ending them", left)
            await self.server.stop(grace=INFLIGHT_GRACE_S)
            reply, extra = await asyncio.to_thread(wire.recv, conn, EXEC_CONFIRM_TIMEOUT_S, "exec")
            wire.close_fds(extra)
            logger.info("handover: helper answered {}; {}", reply.message.TYPE,
                        "exit" if self.exit_after_handover else "exec of the current version")
        except (wire.HandoverError, OSError) as e:
            logger.error("handover: {}; exec of the current version anyway (it adopts what runs)", e)
        finally:
            if self.exit_after_handover:
                exit_keeping_agents()
            exec_current(self.cfg, self._stop_requested.is_set())

    async def quiesce(self) -> tuple[wire.State, list[int]]:
        """Stop everything but the agents and return the handover state with its descriptors.

        SIGTERM and SIGINT are blocked from here on: one that arrives during the handover stays pending
        across the exec (the mask is inherited) until the new process has its handlers; one that another
        thread already handled is passed on in ``BATON_PENDING_STOP``. Either way the new process stops cleanly
        once the handover completes.
        """
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        self.gate.close()
        await self._stop_control_plane()
        await self.front.stop_accepting()
        self.close()
        self.pm.release_all()
        self.pm.persist()
        records = self.pm.table.load()
        descs: list[wire.FdDescriptor] = []
        fds: list[int] = []
        for key, s in self.front.detach():
            descs.append(wire.FdDescriptor("listen", key))
            fds.append(s.fileno())
            self._handed_over.append(s)
        for agent in self.pm.agents.values():
            fifo_fd, notify_sock, err_fd = agent.detach_channels()
            if fifo_fd >= 0:
                descs.append(wire.FdDescriptor("fifo", agent.name))
                fds.append(fifo_fd)
            if err_fd >= 0:
                descs.append(wire.FdDescriptor("stderr_fifo", agent.name))
                fds.append(err_fd)
            if notify_sock is not None:
                descs.append(wire.FdDescriptor("notify", agent.name))
                fds.append(notify_sock.fileno())
                self._handed_over.append(notify_sock)
        for name, fd in (("stdout", 1), ("stderr", 2)):
            descs.append(wire.FdDescriptor("stdio", name))
            fds.append(fd)
        state = wire.State(agents=tuple(records), fds=tuple(descs), supervisor_version=self.version,
                           pid=os.getpid())
        return state, fds
