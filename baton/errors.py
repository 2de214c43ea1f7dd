"""The root of Baton's error classes.

Bad untrusted input raises a subclass of :class:`BatonError` carrying what an
operator needs to act; a bug in the caller raises ``RuntimeError``/``ValueError``.
"""


class BatonError(Exception):
    """Base class of every error Baton reports to a user."""
