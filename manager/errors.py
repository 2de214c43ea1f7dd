"""The Manager's error classes: one family, so the CLI reports each as one line."""

from __future__ import annotations

from baton.errors import BatonError


class ManagerError(BatonError):
    """Base class of every error the Manager reports to a user."""


class StoreError(ManagerError):
    """The database cannot be used (unreadable, or a schema this Manager does not know)."""


class SchemaTooNew(StoreError):
    """The database was migrated by a newer Manager; an older one must not write to it."""


class PackageError(ManagerError):
    """A package file (or its ``.minisig``) cannot be published."""


class UnknownNode(ManagerError):
    """No address for a node: it never registered and no ``--node-address`` was given."""


class PushRefused(ManagerError):
    """The node refused the push or could not be reached (its gRPC status and message are kept)."""

    def __init__(self, node_id: str, code: str, details: str) -> None:
        super().__init__(f"{node_id} did not take the push: {code}: {details}")
        self.node_id = node_id
        self.code = code
        self.details = details


class RolloutError(ManagerError):
    """A rollout cannot be started or resumed as asked."""


class NodeOffline(PushRefused):
    """The node could not be reached for a push (UNAVAILABLE, DEADLINE_EXCEEDED): a rollout retries it later."""
