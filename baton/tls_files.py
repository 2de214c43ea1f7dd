"""Reading a TLS certificate, its private key and a CA bundle, checked to belong together.

One place for the check that ``supervisor check-config`` (``baton/config.py``), ``supervisor reload``
(``baton/tls.py``) and ``supervisor doctor`` make: each file is PEM of its kind and the key is the
certificate's. ``cryptography`` is imported only when called (a config without TLS never loads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from baton.errors import KeyedError


class TlsFilesError(KeyedError):
    """A TLS file that does not load; ``key`` names the config key at fault (``grpc.tls_key``)."""


@dataclass(frozen=True)
class TlsFiles:
    """The bytes of a certificate, its key and (for a server) the client CA, checked to belong together."""

    cert: bytes
    key: bytes
    ca: bytes
    serial: int  # the certificate's, for logs and answers


def key_belongs_to(key: Any, cert: Any) -> bool:
    """Whether the private ``key`` is the one of ``cert``'s public key (cryptography's objects)."""
    from cryptography.hazmat.primitives import serialization

    spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki))


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TlsFilesError(key, f"cannot read {path}: {e.strerror or e}") from None


def read_tls_files(section: str, cert_path: Path, key_path: Path, ca_path: Path | None) -> TlsFiles:
    """Read and check ``<section>.tls_cert``, ``tls_key`` and (if given) ``tls_ca``.

    Raises:
        TlsFilesError: a file cannot be read, is not PEM of its kind, or the key is not the certificate's.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_pem = _read(cert_path, f"{section}.tls_cert")
    key_pem = _read(key_path, f"{section}.tls_key")
    ca_pem = _read(ca_path, f"{section}.tls_ca") if ca_path is not None else b""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise TlsFilesError(f"{section}.tls_cert", f"{cert_path} is not a PEM certificate: {e}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise TlsFilesError(f"{section}.tls_key", f"{key_path} is not an unencrypted PEM private key: {e}") from None
    if ca_path is not None:
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError as e:
            raise TlsFilesError(f"{section}.tls_ca", f"{ca_path} is not a PEM certificate: {e}") from None
    if not key_belongs_to(key, cert):
        raise TlsFilesError(f"{section}.tls_key", f"{key_path} is not the key of the certificate {cert_path}")
    return TlsFiles(cert_pem, key_pem, ca_pem, cert.serial_number)
