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


class ResultRefused(ManagerError):
    """A supervisor's result that the store does not take; nothing was written."""

    def __init__(self, message: str, update_id: str) -> None:
        super().__init__(message)
        self.update_id = update_id


class NotOwner(ResultRefused):
    """A result for an update that belongs to another node: a node reports on its own updates only."""

    def __init__(self, update_id: str, owner: str, node: str) -> None:
        super().__init__(f"update {update_id} belongs to node {owner!r}, not {node!r}", update_id)
        self.owner = owner
        self.node = node


class FinalResultKept(ResultRefused):
    """A result that would replace the final one the node reported before: the first final result stands."""

    def __init__(self, update_id: str, kept: str, offered: str) -> None:
        super().__init__(f"update {update_id} was reported {kept}; a later {offered} does not replace it", update_id)
        self.kept = kept
        self.offered = offered
