"""A kill -9 of the helper, in-process."""

from __future__ import annotations


class Crash(BaseException):
    """The helper was killed here: a ``BaseException`` so that no ``except Exception`` in the driver sees it,
    as none sees a SIGKILL. What was durably written before it is all a restarted helper finds."""
