"""Read-only answers on the supervisor's public sockets while no supervisor process serves them.

During a self-update (docs/handover.md) the helper holds the listening sockets from the old process's
STATE until the new process's HELLO: the old process has stopped accepting and the new one is still
starting its interpreter and importing. Rather than leave clients in the kernel's backlog for that
long, the helper accepts on the same sockets, through the same :class:`baton.front.Front` (the
same SO_PEERCRED check on the Unix socket, TLS with the supervisor's own credentials on TCP), and
answers the read-only calls that the handed-over agent table can answer honestly: ``GetStatus``
and ``ListAgents``. Anything else is UNAVAILABLE ("retry"), so a push waits for the new process; gRPC
health says the host is up ("" SERVING) but the DaemonService is not taking changes (NOT_SERVING).

The bridge holds nothing a crash could lose: its sockets are duplicates of descriptors the helper
holds anyway, and its answers come from memory. A bridge that cannot start is logged and skipped;
clients then wait in the backlog as before. Before the sockets go to the next process it stops
accepting; after, it answers on the connections it accepted until their clients close them
(``baton.front.Front.drain``), and only then stops its gRPC server: a call that reaches a stopping
gRPC server is CANCELLED, which no client retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from baton import handover as wire
from baton.config import Config
from baton.holds import Holds
from baton.log import logger
from baton.pb import common_pb2, daemon_pb2
from baton.serving import SERVICE_NAME

STOP_GRACE_S = 1.0  # after the drain: a call still open (a health watch) ends
# A bridge lives for a second or so: every connection to it is told GOAWAY (gRPC's graceful one: a call that
# crosses it is still answered) once idle 0.1 s or 0.2 s old, so that its drain (Front.drain) is short.
SERVER_OPTIONS = [("grpc.max_connection_idle_ms", 100), ("grpc.max_connection_age_ms", 200)]
DRAIN_S = 0.5
START_TIMEOUT_S = 5.0
MAX_UNIX_PATH = 107  # sun_path less its terminating NUL


def _agent_state(name: str) -> common_pb2.AgentState.ValueType:
    try:
        return common_pb2.AgentState.Value(f"AGENT_STATE_{name.upper()}")
    except ValueError:
        return common_pb2.AGENT_STATE_UNSPECIFIED


def status_from(cfg: Config, state: wire.State) -> daemon_pb2.Status:
    """What the handed-over table says: the agents as the old process left them, its version and pid."""
    try:
        holds = [daemon_pb2.ComponentHold(component=h.component, reason=h.reason, since=h.since)
                 for h in Holds(cfg.node.state_dir).all()]
    except OSError:
        holds = []
    return daemon_pb2.Status(
        node_id=cfg.node.id,
        supervisor_version=state.supervisor_version,
        agents=[common_pb2.AgentInfo(name=r.name, state=_agent_state(r.state), pid=r.pid, start_time=r.start_time,
                                     restarts=r.restarts, version=r.version, kept=True)
                for r in state.agents],
        pid=state.pid,
        manager_configured=bool(cfg.manager.address),
        holds=holds,
    )


class _ReadOnly(grpc.GenericRpcHandler):
    """GetStatus and ListAgents from the table; every other DaemonService method is UNAVAILABLE."""

    def __init__(self, status: Callable[[], daemon_pb2.Status]) -> None:
        self._status = status

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if method == f"/{SERVICE_NAME}/GetStatus":
            return grpc.unary_unary_rpc_method_handler(
                lambda req, ctx: self._status(), request_deserializer=daemon_pb2.GetStatusRequest.FromString,
                response_serializer=daemon_pb2.Status.SerializeToString)
        if method == f"/{SERVICE_NAME}/ListAgents":
            return grpc.unary_unary_rpc_method_handler(
                lambda req, ctx: daemon_pb2.ListAgentsResponse(agents=self._status().agents),
                request_deserializer=daemon_pb2.ListAgentsRequest.FromString,
                response_serializer=daemon_pb2.ListAgentsResponse.SerializeToString)
        if method.startswith(f"/{SERVICE_NAME}/"):
            return grpc.unary_unary_rpc_method_handler(_unavailable)
        return None


def _unavailable(request: Any, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNAVAILABLE, wire.BETWEEN)


class Bridge:
    """gRPC's read-only answers behind a Front on the held sockets; see the module docstring.

    :meth:`prepare` binds the private ports before the old process is asked anything (so the first
    answer comes as soon as the sockets arrive); :meth:`serve` accepts on them; :meth:`stop` gives
    them back. Every method is safe to call in any order, and more than once.
    """

    def __init__(self, cfg: Config, update_id: str) -> None:
        self.cfg = cfg
        self.update_id = update_id
        # Short names: a Unix socket path has at most 107 bytes (the supervisor's are grpc-<pid>.sock).
        self.tcp_backend = cfg.run_dir / f"bridge-{os.getpid()}-t.sock"
        self.local_backend = cfg.run_dir / f"bridge-{os.getpid()}-l.sock"
        self._status = daemon_pb2.Status()
        self._server: grpc.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._front: Any = None
        self._sockets: list[socket.socket] = []
        self.served_since = 0.0

    def prepare(self) -> None:
        from baton.tls import server_credentials

        for path in (self.tcp_backend, self.local_backend):
            if len(os.fsencode(path)) > MAX_UNIX_PATH:
                raise OSError(f"{path}: longer than a Unix socket path may be ({MAX_UNIX_PATH} bytes)")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        server = grpc.server(ThreadPoolExecutor(max_workers=4, thread_name_prefix="bridge"),
                             handlers=[_ReadOnly(lambda: self._status)], options=SERVER_OPTIONS)
        checks = health.HealthServicer()
        checks.set("", health_pb2.HealthCheckResponse.SERVING)
        checks.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checks, server)
        creds = server_credentials(self.cfg.grpc)
        if creds is None:
            server.add_insecure_port(f"unix:{self.tcp_backend}")
        else:
            server.add_secure_port(f"unix:{self.tcp_backend}", creds)
        server.add_insecure_port(f"unix:{self.local_backend}")
        server.start()
        self._server = server

    def serve(self, state: wire.State, listening: list[tuple[str, int]]) -> None:
        """Accept on the (config address, descriptor) pairs; the descriptors stay the caller's."""
        if self._server is None or not listening:
            return
        from baton.front import Front, UnixPeerPolicy

        self._status = status_from(self.cfg, state)
        g = self.cfg.grpc
        self._front = Front(self.tcp_backend, UnixPeerPolicy(g.unix_socket_group, g.allow_downgrade_uids),
                            local_backend=self.local_backend)
        self._sockets = [socket.socket(fileno=os.dup(fd)) for _, fd in listening]
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="bridge-front", daemon=True)
        self._thread.start()
        pairs = [(key, s) for (key, _), s in zip(listening, self._sockets, strict=True)]
        asyncio.run_coroutine_threadsafe(self._front.serve(pairs), loop).result(START_TIMEOUT_S)
        self.served_since = time.monotonic()
        logger.info("handover {}: answering read-only calls on {} until the next supervisor takes over",
                    self.update_id, ", ".join(k for k, _ in listening))

    def stop_accepting(self) -> None:
        """Accept no more connections: the listening sockets may go to the next process (see :meth:`stop`)."""
        loop, front = self._loop, self._front
        if loop is not None and front is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(front.stop_accepting(), loop).result(START_TIMEOUT_S)

    def stop(self) -> None:
        """Stop accepting, answer on the connections accepted until they close (``DRAIN_S`` at most), and let
        go of every socket (the caller's stay open). Once it has stopped accepting, the next process may
        accept meanwhile: the drain is then out of the clients' window."""
        self.stop_accepting()
        loop, front = self._loop, self._front
        if loop is not None and front is not None:
            with contextlib.suppress(Exception):
                left = asyncio.run_coroutine_threadsafe(front.drain(DRAIN_S), loop).result(DRAIN_S + START_TIMEOUT_S)
                if left:
                    logger.info("handover {}: {} connections with a call open after the drain", self.update_id, left)
        if self._server is not None:
            self._server.stop(grace=STOP_GRACE_S).wait(STOP_GRACE_S + 1.0)
            self._server = None
        if loop is not None and front is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(front.drop_connections(), loop).result(START_TIMEOUT_S)
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(START_TIMEOUT_S)
            with contextlib.suppress(RuntimeError):  # still running: a daemon thread, gone with the helper
                loop.close()
        self._loop, self._thread, self._front = None, None, None
        for s in self._sockets:
            s.close()
        self._sockets = []
        for path in (self.tcp_backend, self.local_backend):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if self.served_since:
            logger.info("handover {}: stopped answering after {:.0f} ms", self.update_id,
                        (time.monotonic() - self.served_since) * 1000)
            self.served_since = 0.0
