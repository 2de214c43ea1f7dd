"""How a spliced connection tells gRPC the way it arrived: the front's peer label.

The front (``baton/front.py``) binds its end of every connection it splices to gRPC's private ports to an
abstract socket address ``baton.<channel>.<random>``, and gRPC reports that address as the call's peer
(``unix-abstract:baton.local.3f2a...``); the supervisor's authorisation (``supervisor/authz.py``) reads it
back. Only root can reach the private ports, so the label cannot be forged. Here, apart from both, because
the helper's bridge accepts through the same front.
"""

from __future__ import annotations

import enum

from baton.identity import PeerIdentity

PEER_LABEL_PREFIX = "baton."


class Channel(enum.Enum):
    """How a call reached gRPC (the front's label, or the TLS transport)."""

    TLS = "tls"
    INSECURE_TCP = "tcp"
    LOCAL = "local"
    OPERATOR = "operator"
    UNKNOWN = "unknown"


def peer_label(channel: Channel, token: str) -> str:
    """The abstract socket address the front binds its end of a spliced connection to."""
    return f"\0{PEER_LABEL_PREFIX}{channel.value}.{token}"


def channel_of(peer: str, identity: PeerIdentity) -> Channel:
    if identity.tls:
        return Channel.TLS
    kind, _, name = peer.partition(":")
    if kind == "unix-abstract" and name.startswith(PEER_LABEL_PREFIX):
        label = name.removeprefix(PEER_LABEL_PREFIX).split(".", 1)[0]
        for ch in (Channel.INSECURE_TCP, Channel.LOCAL, Channel.OPERATOR):
            if ch.value == label:
                return ch
    return Channel.UNKNOWN
