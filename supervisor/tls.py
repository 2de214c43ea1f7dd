"""TLS credentials for the supervisor's gRPC server, re-read on ``supervisor reload``.

The server is given gRPC's *dynamic* credentials: at each new TLS handshake gRPC asks
:meth:`ServerTls.fetch` whether the certificate changed. :meth:`ServerTls.reload` reads
``grpc.tls_cert``, ``tls_key`` and ``tls_ca`` again and checks them completely before
they are offered (each parses, the key belongs to the certificate); files that do not
load leave the old ones served and raise :class:`TlsReloadError` naming the key. So a
renewed certificate is served from the next connection on, without a restart, and a
broken one never replaces a working one. Connections already open keep their session.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import grpc

from baton.config import GrpcConfig
from baton.errors import BatonError


class TlsReloadError(BatonError):
    """The TLS files on disk do not load; ``key`` names the config key at fault."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class TlsFiles:
    """The bytes of the server's certificate, key and client CA, checked to belong together."""

    cert: bytes
    key: bytes
    ca: bytes
    serial: int  # the certificate's, for the log and the reload's answer

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(self.key, self.cert)], root_certificates=self.ca)


def key_belongs_to(key: Any, cert: Any) -> bool:
    """Whether the private ``key`` is the one of ``cert``'s public key (cryptography's objects)."""
    from cryptography.hazmat.primitives import serialization

    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki))


def read_tls_files(cfg: GrpcConfig) -> TlsFiles:
    """Read and check ``grpc.tls_*``.

    Raises:
        TlsReloadError: a file cannot be read, is not PEM of its kind, or the key is not the certificate's.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    assert cfg.tls_cert is not None and cfg.tls_key is not None and cfg.tls_ca is not None
    data: dict[str, bytes] = {}
    for name in ("tls_cert", "tls_key", "tls_ca"):
        path = getattr(cfg, name)
        try:
            data[name] = path.read_bytes()
        except OSError as e:
            raise TlsReloadError(f"grpc.{name}", f"cannot read {path}: {e.strerror or e}") from None
    try:
        cert = x509.load_pem_x509_certificate(data["tls_cert"])
    except ValueError as e:
        raise TlsReloadError("grpc.tls_cert", f"{cfg.tls_cert} is not a PEM certificate: {e}") from None
    try:
        key = serialization.load_pem_private_key(data["tls_key"], password=None)
    except (ValueError, TypeError) as e:
        raise TlsReloadError("grpc.tls_key", f"{cfg.tls_key} is not an unencrypted PEM private key: {e}") from None
    try:
        x509.load_pem_x509_certificates(data["tls_ca"])
    except ValueError as e:
        raise TlsReloadError("grpc.tls_ca", f"{cfg.tls_ca} is not a PEM certificate: {e}") from None
    if not key_belongs_to(key, cert):
        raise TlsReloadError("grpc.tls_key", f"{cfg.tls_key} is not the key of the certificate {cfg.tls_cert}")
    return TlsFiles(data["tls_cert"], data["tls_key"], data["tls_ca"], cert.serial_number)


class ServerTls:
    """The server's current TLS files, and the change gRPC picks up at its next handshake."""

    def __init__(self, cfg: GrpcConfig) -> None:
        self.files = read_tls_files(cfg)
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()  # fetch() runs on gRPC's threads

    def credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: a client certificate from our CA is required."""
        # grpc-stubs omit the fetcher's documented None ("no change")
        return grpc.dynamic_ssl_server_credentials(self.files.configuration(), self.fetch,  # type: ignore[arg-type]
                                                   require_client_authentication=True)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question at each handshake: the new configuration once after a reload, else None (no change)."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def reload(self, cfg: GrpcConfig) -> bool:
        """Read the files again; True when they changed. On TlsReloadError the old files stay served."""
        files = read_tls_files(cfg)
        if files == self.files:
            return False
        with self._lock:
            self.files = files
            self._pending = files.configuration()
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
