"""Whether a supervisor is serving, asked the one way: GetStatus (and gRPC health) on its control socket.

The helper asks it before and after a self-update and ``restart-daemon``; the operator CLI before
``install-self`` and ``uninstall`` and while it waits for the unit; ``supervisor doctor`` for its checks.
gRPC is imported when asked, so that importing this module costs nothing at a command's start.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from baton.config import Config
    from baton.pb.daemon_pb2 import Status

SERVICE_NAME = "baton.v1.DaemonService"  # the gRPC health service a supervisor reports SERVING for
PROBE_TIMEOUT_S = 3.0  # a supervisor that answers does so in milliseconds; one that does not is not serving


def get_status(socket: Path, timeout: float = PROBE_TIMEOUT_S) -> Status:
    """GetStatus of whatever answers on ``socket``.

    Raises:
        grpc.RpcError: nothing answers (UNAVAILABLE for a stale socket) or the call fails.
    """
    import grpc

    from baton.pb import daemon_pb2, daemon_pb2_grpc

    with grpc.insecure_channel(f"unix:{socket}") as ch:
        return daemon_pb2_grpc.DaemonServiceStub(ch).GetStatus(daemon_pb2.GetStatusRequest(), timeout=timeout)


def status_or_none(socket: Path, timeout: float = PROBE_TIMEOUT_S) -> Status | None:
    """:func:`get_status`, or None while nothing answers."""
    import grpc

    try:
        return get_status(socket, timeout)
    except grpc.RpcError:
        return None


def serving_status(socket: Path, timeout: float = PROBE_TIMEOUT_S) -> tuple[Status, bool]:
    """GetStatus and whether gRPC health says SERVING, of whatever answers on ``socket``.

    Raises:
        grpc.RpcError: nothing answers or a call fails.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from baton.pb import daemon_pb2, daemon_pb2_grpc

    with grpc.insecure_channel(f"unix:{socket}") as ch:
        st = daemon_pb2_grpc.DaemonServiceStub(ch).GetStatus(daemon_pb2.GetStatusRequest(), timeout=timeout)
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                                 timeout=timeout)
    return st, h.status == health_pb2.HealthCheckResponse.SERVING


def running_supervisor(cfg: Config, timeout: float = PROBE_TIMEOUT_S) -> tuple[str, bool]:
    """(version, serving) of the supervisor answering on the control socket; ("", False) if none."""
    import grpc

    try:
        st, serving = serving_status(cfg.control_socket, timeout)
    except grpc.RpcError:
        return "", False
    return st.supervisor_version, serving
