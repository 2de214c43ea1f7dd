"""Certificate identities and the allow-list that names them, shared by the supervisor and the Manager.

Allow-list entries: ``CN=name``, ``DNS:name``, ``URI:uri``, or a bare ``name``
matching the common name or a DNS SAN.

Baton's certificates say what they are by a URI SAN (the development CA,
``manager/devca.py``, issues them so): ``spiffe://baton/node/ID`` for a node,
``spiffe://baton/manager/NAME`` for a Manager, ``spiffe://baton/operator/NAME``
for a person operating the fleet.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from baton.errors import BatonError

_KINDS = ("CN", "DNS", "URI")
NODE_URI_PREFIX = "spiffe://baton/node/"
MANAGER_URI_PREFIX = "spiffe://baton/manager/"
OPERATOR_URI_PREFIX = "spiffe://baton/operator/"


class AllowListError(BatonError):
    """An entry of ``grpc.allowed_clients`` that can never match anything."""


@dataclass(frozen=True)
class PeerIdentity:
    """The names a peer's certificate carries (empty for a peer without one)."""

    common_name: str = ""
    dns: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    tls: bool = False

    @property
    def has_certificate(self) -> bool:
        return bool(self.common_name or self.dns or self.uris)

    def names(self) -> list[str]:
        """Every identity as an allow-list entry would spell it."""
        out = [f"CN={self.common_name}"] if self.common_name else []
        return out + [f"DNS:{d}" for d in self.dns] + [f"URI:{u}" for u in self.uris]

    def describe(self) -> str:
        return ", ".join(self.names()) or "no certificate"

    @property
    def is_node(self) -> bool:
        return any(u.startswith(NODE_URI_PREFIX) for u in self.uris)

    @property
    def is_operator(self) -> bool:
        return any(u.startswith(OPERATOR_URI_PREFIX) for u in self.uris)

    def matches(self, entry: AllowEntry) -> bool:
        if entry.kind == "CN":
            return self.common_name == entry.value
        if entry.kind == "DNS":
            return entry.value in self.dns
        if entry.kind == "URI":
            return entry.value in self.uris
        return self.common_name == entry.value or entry.value in self.dns


def peer_identity(auth_context: Mapping[str, Any]) -> PeerIdentity:
    """Read the identity gRPC's TLS stack verified; typed SANs come as ``peer_dns``/``peer_uri``.

    ``auth_context`` maps each property to a list of bytes values (grpc-stubs types it loosely).
    """

    def values(key: str) -> tuple[str, ...]:
        return tuple(bytes(v).decode("utf-8", "replace") for v in auth_context.get(key, ()))

    cn = values("x509_common_name")
    return PeerIdentity(
        common_name=cn[0] if cn else "",
        dns=values("peer_dns"),
        uris=values("peer_uri"),
        tls=b"ssl" in tuple(auth_context.get("transport_security_type", ())),
    )


def certificate_identity(cert: Mapping[str, Any] | None) -> PeerIdentity:
    """The names in a certificate Python's ``ssl`` verified (``SSLSocket.getpeercert()``)."""
    cert = cert or {}
    cn = [str(v) for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    sans = cert.get("subjectAltName", ())
    return PeerIdentity(common_name=cn[0] if cn else "", dns=tuple(str(v) for k, v in sans if k == "DNS"),
                        uris=tuple(str(v) for k, v in sans if k == "URI"), tls=bool(cert))


@dataclass(frozen=True)
class AllowEntry:
    kind: str  # "CN", "DNS", "URI" or "" (a bare name: CN or DNS)
    value: str


def parse_allow_list(entries: Sequence[str], key: str = "grpc.allowed_clients") -> tuple[AllowEntry, ...]:
    """Raises AllowListError (naming ``key``) for an entry with an unknown kind or no name."""
    out = []
    for raw in entries:
        entry = raw.strip()
        kind, value = "", entry
        if entry[:3].upper() == "CN=":
            kind, value = "CN", entry[3:]
        elif ":" in entry and entry.split(":", 1)[0].upper() in _KINDS[1:]:
            kind, value = entry.split(":", 1)[0].upper(), entry.split(":", 1)[1]
        elif ":" in entry or "=" in entry:
            raise AllowListError(f"{key}: {raw!r} is not CN=name, DNS:name, URI:uri or a bare name")
        if not value:
            raise AllowListError(f"{key}: {raw!r} names nobody")
        out.append(AllowEntry(kind, value))
    return tuple(out)
