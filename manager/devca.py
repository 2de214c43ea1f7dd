"""A development certificate authority for Baton's mutual TLS (not for production).

Creates a CA and leaf certificates with ``cryptography`` (ECDSA P-256):

- ``ca.pem``/``ca.key``: the CA that both supervisors and the Manager trust;
- ``manager.pem``/``manager.key`` for the first Manager identity and
  ``manager-NAME.pem``/``.key`` for any further one: SAN ``DNS:NAME`` and
  ``URI:spiffe://baton/manager/NAME``;
- ``node-ID.pem``/``.key`` for each node: SAN ``DNS:ID``, ``IP:127.0.0.1`` and
  ``URI:spiffe://baton/node/ID``;
- ``operator-NAME.pem``/``.key`` for each operator (a person, reading the fleet
  page): SAN ``URI:spiffe://baton/operator/NAME`` only;
- optionally an expired Manager certificate (``expired-NAME.pem``) and a second,
  unrelated CA (``other-ca.pem``) with a Manager certificate of the same name
  (``other-manager-NAME.pem``), which tests use to prove they are refused.

Every leaf may act as TLS server and client (a node serves DaemonService and
calls ManagerService; the Manager does the reverse). Keys are written 0600.
``scripts/dev_ca.py`` is the command line.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from baton.identity import MANAGER_URI_PREFIX, NODE_URI_PREFIX, OPERATOR_URI_PREFIX

CA_VALID_DAYS = 3650
LEAF_VALID_DAYS = 825


@dataclass(frozen=True)
class Issued:
    """A certificate and its key on disk."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A CA that can sign leaves (its key in memory)."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    files: Issued


@dataclass(frozen=True)
class DevPki:
    """What ``make_dev_pki`` wrote."""

    ca: Issued
    managers: dict[str, Issued]
    nodes: dict[str, Issued]
    expired: dict[str, Issued]
    other_ca: Issued | None
    other_managers: dict[str, Issued]
    operators: dict[str, Issued] = field(default_factory=dict)

    @property
    def manager(self) -> Issued:
        return next(iter(self.managers.values()))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_ca(outdir: Path, name: str = "Baton development CA", stem: str = "ca") -> Authority:
    """A self-signed CA, written as ``<stem>.pem`` and ``<stem>.key``."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Baton"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    files = Issued(outdir / f"{stem}.pem", outdir / f"{stem}.key")
    _write_cert(files.cert, cert)
    _write_key(files.key, key)
    return Authority(name, cert, key, files)


def issue(ca: Authority, outdir: Path, stem: str, common_name: str, sans: list[x509.GeneralName], *,
          expired: bool = False, valid_days: float = LEAF_VALID_DAYS) -> Issued:
    """A leaf signed by ``ca`` for TLS server and client use, written as ``<stem>.pem``/``<stem>.key``."""
    outdir = Path(outdir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    if expired:
        not_before, not_after = now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)
    else:
        not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=valid_days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Baton"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    files = Issued(outdir / f"{stem}.pem", outdir / f"{stem}.key")
    _write_cert(files.cert, cert)
    _write_key(files.key, key)
    return files


def manager_sans(name: str) -> list[x509.GeneralName]:
    return [x509.DNSName(name), x509.UniformResourceIdentifier(f"{MANAGER_URI_PREFIX}{name}")]


def node_sans(node_id: str) -> list[x509.GeneralName]:
    return [x509.DNSName(node_id), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.UniformResourceIdentifier(f"{NODE_URI_PREFIX}{node_id}")]


def operator_sans(name: str) -> list[x509.GeneralName]:
    """An operator is a person, not a host: no DNS name or address a host's check could mistake for one."""
    return [x509.UniformResourceIdentifier(f"{OPERATOR_URI_PREFIX}{name}")]


def issue_manager(ca: Authority, outdir: Path, name: str, *, stem: str = "", expired: bool = False) -> Issued:
    return issue(ca, outdir, stem or f"manager-{name}", name, manager_sans(name), expired=expired)


def issue_node(ca: Authority, outdir: Path, node_id: str, *, valid_days: float = LEAF_VALID_DAYS) -> Issued:
    return issue(ca, outdir, f"node-{node_id}", node_id, node_sans(node_id), valid_days=valid_days)


def issue_operator(ca: Authority, outdir: Path, name: str) -> Issued:
    return issue(ca, outdir, f"operator-{name}", name, operator_sans(name))


def make_dev_pki(outdir: Path, managers: list[str], nodes: list[str], *, expired: list[str] | None = None,
                 other_ca: bool = False, operators: list[str] | None = None) -> DevPki:
    """Everything a development fleet needs; see the module docstring for the file names.

    Raises:
        ValueError: no Manager name (the caller's mistake).
    """
    if not managers:
        raise ValueError("at least one Manager name is needed")
    outdir = Path(outdir)
    ca = make_ca(outdir)
    first = managers[0]
    issued_managers = {first: issue_manager(ca, outdir, first, stem="manager")}
    issued_managers.update({m: issue_manager(ca, outdir, m) for m in managers[1:]})
    issued_nodes = {n: issue_node(ca, outdir, n) for n in nodes}
    issued_expired = {m: issue_manager(ca, outdir, m, stem=f"expired-{m}", expired=True) for m in expired or []}
    other: Issued | None = None
    other_managers: dict[str, Issued] = {}
    if other_ca:
        oca = make_ca(outdir, "Unrelated CA", stem="other-ca")
        other = oca.files
        other_managers = {first: issue_manager(oca, outdir, first, stem=f"other-manager-{first}")}
    issued_operators = {o: issue_operator(ca, outdir, o) for o in operators or []}
    return DevPki(ca.files, issued_managers, issued_nodes, issued_expired, other, other_managers, issued_operators)
