"""What the helper's talk with the supervisor can fail with.

Apart from :mod:`helper.control` (the gRPC client) so that the update machine imports no gRPC: a helper loads
the client in the background while it downloads (``helper/cli.py``), off an agent update's path.
"""

from __future__ import annotations

from baton.errors import BatonError
from baton.reasons import FailureReason


class SupervisorUnavailable(BatonError):
    pass


class HealthCheckFailed(BatonError):
    """The new version did not become ready, or did not stay up through the health window."""

    def __init__(self, message: str, reason: FailureReason = FailureReason.NEW_VERSION_NOT_READY) -> None:
        super().__init__(message)
        self.reason = reason
