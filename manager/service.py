"""ManagerService: what supervisors tell the Manager, written to the store.

Register, Heartbeat and SyncAgentStates keep the node table; ReportUpdateResult
upserts the update by its id and answers ``duplicate=True`` when that result had
arrived before. The supervisor writes its ``reported`` marker only after our
ack, and we ack only after the row is committed, so every result is recorded
exactly once however often it is sent.

With mutual TLS, a node may only speak for itself, in every method: the node id
in a request must be named by its certificate, and the identity it registered
with is recorded. A certificate that carries a Baton identity
(``URI:spiffe://baton/...``, as ``manager/devca.py`` issues them) names node ID
only by ``URI:spiffe://baton/node/ID``, so a Manager's certificate
(``spiffe://baton/manager/NAME``, ``DNS:NAME``) never speaks for a node; any
other certificate names it by ``DNS:ID`` or ``CN=ID``. A result is taken only
for an update of the node that reports it, and a final result once reported
is never replaced (``manager/store.py``). Without TLS (``--insecure-loopback``)
there is no identity: every caller on the host may speak for any node.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from concurrent import futures
from typing import Any

import grpc

from baton.identity import PeerIdentity, peer_identity
from baton.log import logger
from baton.pb import common_pb2, manager_pb2, manager_pb2_grpc
from baton.reasons import reason_name
from baton.states import UpdateState
from baton.throttle import RETRY_AFTER_KEY
from manager.errors import FinalResultKept, NotOwner
from manager.ratelimit import CallKind, CallLimits, NodeRateLimiter
from manager.store import Node, ResultRow, Store

WORKERS = 8
_UNROUTABLE_HOSTS = ("", "0.0.0.0", "::", "[::]")


BATON_URI = "spiffe://baton/"  # the prefix of every identity manager/devca.py issues


def node_uri(node_id: str) -> str:
    return f"{BATON_URI}node/{node_id}"


def speaks_for(peer: PeerIdentity, node_id: str) -> bool:
    """Whether the certificate names this node (see the module docstring for the mapping)."""
    if any(u.startswith(BATON_URI) for u in peer.uris):
        return node_uri(node_id) in peer.uris
    return node_id in peer.dns or peer.common_name == node_id


def reachable_address(registered: str, peer: str) -> str:
    """The node's DaemonService address; a wildcard host (``0.0.0.0:7000``) becomes the peer's own IP."""
    host, sep, port = registered.rpartition(":")
    if not sep or host not in _UNROUTABLE_HOSTS:
        return registered
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return f"{rest.rsplit(':', 1)[0]}:{port}"
    if kind == "ipv6":
        return f"{rest.rsplit(':', 1)[0]}:{port}"  # already bracketed: [::1]
    return registered


def agents_json(agents: Iterable[common_pb2.AgentInfo]) -> list[dict[str, Any]]:
    return [{"name": a.name, "state": common_pb2.AgentState.Name(a.state).removeprefix("AGENT_STATE_").lower(),
             "pid": a.pid, "version": a.version, "restarts": a.restarts, "last_error": a.last_error}
            for a in agents]


def result_row(r: common_pb2.UpdateResult) -> ResultRow:
    state = UpdateState[common_pb2.UpdateState.Name(r.state).removeprefix("UPDATE_STATE_")] \
        if r.state else (UpdateState.COMMITTED if r.success else UpdateState.FAILED)
    return ResultRow(update_id=r.update_id, node=r.node_id, component=r.component, from_version=r.from_version,
                     to_version=r.to_version, state=state, success=r.success, rolled_back=r.rolled_back,
                     error=r.error, timings={t.step: t.seconds for t in r.timings}, started_at=r.started_at,
                     finished_at=r.finished_at, last_log=r.last_log, reason=reason_name(r.reason))


class ManagerService(manager_pb2_grpc.ManagerServiceServicer):
    def __init__(self, store: Store, *, tls: bool, heartbeat_interval_s: float = 0.0,
                 limits: CallLimits | None = None) -> None:
        self.store = store
        self.tls = tls
        self.heartbeat_interval_s = heartbeat_interval_s
        self.limiter = NodeRateLimiter(limits)

    def _identity(self, node_id: str, context: grpc.ServicerContext, kind: CallKind) -> str:
        """The caller's certificate identity; aborts when it does not name ``node_id`` or the node calls too often.

        Both are decided before the store is touched, so a refused call costs the store nothing.
        """
        if not node_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "node_id is required")
        identity = ""
        if self.tls:
            peer = peer_identity(context.auth_context())
            if not speaks_for(peer, node_id):
                context.abort(grpc.StatusCode.PERMISSION_DENIED,
                              f"certificate {peer.describe()} does not name node {node_id!r}")
            identity = next((n for n in peer.names() if n.startswith("URI:")), peer.describe())
        wait_s = self.limiter.admit(kind, node_id)
        if wait_s:
            bucket = self.limiter.limits.of(kind)
            context.set_trailing_metadata(((RETRY_AFTER_KEY, f"{max(wait_s, 0.001):.3f}"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"node {node_id!r} calls {kind.value} more often than {bucket.rate_per_s:g}/s "
                          f"(bursts of {bucket.burst}); retry in {wait_s:.1f}s")
        return identity

    def Register(self, request: manager_pb2.RegisterRequest, context: grpc.ServicerContext
                 ) -> manager_pb2.RegisterResponse:
        identity = self._identity(request.node_id, context, CallKind.REGISTER)
        address = reachable_address(request.grpc_address, context.peer())
        self.store.register_node(Node(id=request.node_id, version=request.supervisor_version,
                                      hostname=request.hostname, address=address, identity=identity,
                                      agents=tuple(agents_json(request.agents)),
                                      labels=tuple(sorted(request.labels.items())),
                                      updates_refused=request.updates_refused))
        logger.info("node {} registered (supervisor {}, {}{})", request.node_id, request.supervisor_version,
                    address or "no address", f", {identity}" if identity else "")
        return manager_pb2.RegisterResponse(heartbeat_interval_seconds=self.heartbeat_interval_s,
                                            manager_time=time.time())

    def Heartbeat(self, request: manager_pb2.HeartbeatRequest, context: grpc.ServicerContext
                  ) -> manager_pb2.HeartbeatResponse:
        self._identity(request.node_id, context, CallKind.REPORT)
        known = self.store.touch_node(request.node_id, request.supervisor_version, request.updates_refused)
        return manager_pb2.HeartbeatResponse(known=known, manager_time=time.time())

    def SyncAgentStates(self, request: manager_pb2.SyncAgentStatesRequest, context: grpc.ServicerContext
                        ) -> manager_pb2.SyncAgentStatesResponse:
        self._identity(request.node_id, context, CallKind.REPORT)
        self.store.set_agents(request.node_id, agents_json(request.agents))
        return manager_pb2.SyncAgentStatesResponse()

    def ReportUpdateResult(self, request: common_pb2.UpdateResult, context: grpc.ServicerContext
                           ) -> manager_pb2.ReportAck:
        self._identity(request.node_id, context, CallKind.REPORT)
        if not request.update_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "update_id is required")
        try:
            duplicate = self.store.record_result(result_row(request))
        except NotOwner as e:
            logger.warning("refused a result from {} for update {}: {}", request.node_id, request.update_id, e)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        except FinalResultKept as e:
            # Acknowledged, so that the node's outbox moves on to its other results; the record is unchanged.
            logger.warning("ignored a result from {}: {}", request.node_id, e)
            return manager_pb2.ReportAck(update_id=request.update_id, duplicate=True)
        logger.info("result of update {} from {}: {}{}", request.update_id, request.node_id,
                    common_pb2.UpdateState.Name(request.state).removeprefix("UPDATE_STATE_").lower(),
                    " (duplicate)" if duplicate else "")
        return manager_pb2.ReportAck(update_id=request.update_id, duplicate=duplicate)


def server_credentials(cert: bytes, key: bytes, ca: bytes) -> grpc.ServerCredentials:
    """Mutual TLS: supervisors must present a certificate from our CA."""
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def make_server(store: Store, listen: str, credentials: grpc.ServerCredentials | None,
                heartbeat_interval_s: float = 0.0, limits: CallLimits | None = None) -> tuple[grpc.Server, int]:
    """A started-later gRPC server with ManagerService; returns it and the bound port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="manager-rpc"),
                         options=[("grpc.so_reuseport", 0)])
    manager_pb2_grpc.add_ManagerServiceServicer_to_server(
        ManagerService(store, tls=credentials is not None, heartbeat_interval_s=heartbeat_interval_s,
                       limits=limits), server)
    port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    return server, port
