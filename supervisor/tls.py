"""TLS credentials for the supervisor's gRPC server."""

from __future__ import annotations

import grpc

from baton.config import GrpcConfig


def server_credentials(cfg: GrpcConfig) -> grpc.ServerCredentials | None:
    """Mutual TLS when configured: a client certificate from our CA is required."""
    if cfg.tls_cert is None or cfg.tls_key is None or cfg.tls_ca is None:
        return None
    return grpc.ssl_server_credentials(
        [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
        root_certificates=cfg.tls_ca.read_bytes(),
        require_client_auth=True,
    )
