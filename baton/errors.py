"""The root of Baton's error classes.

Bad untrusted input raises a subclass of :class:`BatonError` carrying what an
operator needs to act; a bug in the caller raises ``RuntimeError``/``ValueError``.
"""


class BatonError(Exception):
    """Base class of every error Baton reports to a user."""


MAX_ECHO_CHARS = 120


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` from a remote or a user, quoted for an error message and cut to ``limit`` characters.

    An error goes back to a gRPC client in trailing metadata (8 KiB by default):
    echoing a 100 KiB version string whole would hide the reason behind a
    metadata-size error. The full length is noted so the cut is visible.
    """
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
