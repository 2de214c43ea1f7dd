"""TLS credentials for the supervisor's gRPC server, re-read on ``supervisor reload``.

The server is given gRPC's *dynamic* credentials: at each new TLS handshake gRPC asks
:meth:`ServerTls.fetch` whether the certificate changed. :meth:`ServerTls.reload` reads
``grpc.tls_cert``, ``tls_key`` and ``tls_ca`` again and checks them completely before
they are offered (each parses, the key belongs to the certificate); files that do not
load leave the old ones served and raise ``TlsFilesError`` naming the key (``baton/tls_files.py``). So a
renewed certificate is served from the next connection on, without a restart, and a
broken one never replaces a working one. Connections already open keep their session.
"""

from __future__ import annotations

import threading

import grpc

from baton.config import GrpcConfig
from baton.tls_files import TlsFiles, read_tls_files


def server_configuration(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(files.key, files.cert)], root_certificates=files.ca)


def read_server_files(cfg: GrpcConfig) -> TlsFiles:
    """``grpc.tls_*`` read and checked (TlsFilesError names the key at fault)."""
    assert cfg.tls_cert is not None and cfg.tls_key is not None and cfg.tls_ca is not None
    return read_tls_files("grpc", cfg.tls_cert, cfg.tls_key, cfg.tls_ca)


class ServerTls:
    """The server's current TLS files, and the change gRPC picks up at its next handshake."""

    def __init__(self, cfg: GrpcConfig) -> None:
        self.files = read_server_files(cfg)
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()  # fetch() runs on gRPC's threads

    def credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: a client certificate from our CA is required."""
        # grpc-stubs omit the fetcher's documented None ("no change")
        return grpc.dynamic_ssl_server_credentials(server_configuration(self.files), self.fetch,  # type: ignore[arg-type]
                                                   require_client_authentication=True)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question at each handshake: the new configuration once after a reload, else None (no change)."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def reload(self, cfg: GrpcConfig) -> bool:
        """Read the files again; True when they changed. On TlsFilesError the old files stay served."""
        files = read_server_files(cfg)
        if files == self.files:
            return False
        with self._lock:
            self.files = files
            self._pending = server_configuration(files)
        return True


def server_tls(cfg: GrpcConfig) -> ServerTls | None:
    """None without TLS (the TCP backend port is then insecure)."""
    if cfg.tls_cert is None or cfg.tls_key is None or cfg.tls_ca is None:
        return None
    return ServerTls(cfg)


def server_credentials(cfg: GrpcConfig) -> grpc.ServerCredentials | None:
    """Fixed mutual TLS credentials from the files as they are now (the helper's bridge: it lives seconds)."""
    if cfg.tls_cert is None or cfg.tls_key is None or cfg.tls_ca is None:
        return None
    return grpc.ssl_server_credentials(
        [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
        root_certificates=cfg.tls_ca.read_bytes(),
        require_client_auth=True,
    )
