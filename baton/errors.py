"""The root of Baton's error classes.

Bad untrusted input raises a subclass of :class:`BatonError` carrying what an
operator needs to act; a bug in the caller raises ``RuntimeError``/``ValueError``.
"""


class BatonError(Exception):
    """Base class of every error Baton reports to a user."""


class KeyedError(BatonError):
    """A problem with one config key: ``key`` names it (``agents[0].after``, "" when none does), ``problem`` says
    what is wrong; the message is the one line ``key: problem``."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


MAX_QUOTED_CHARS = 200  # of a URL, header, server message or pushed value quoted in an error


def clip(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was: remote or pushed data never floods an error."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
