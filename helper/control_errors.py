"""What the helper's talk with the supervisor can fail with.

Apart from :mod:`helper.control` so that the update machine can name them without importing the client,
which it needs only once the new version is in place.
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
