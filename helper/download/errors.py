"""The download's errors: one family (:class:`DownloadError`), each class carrying what a person needs.

Whatever raised underneath (http.client, the OS), a download reaches its caller
as one of these. Error texts quote remote or pushed data (URLs, headers,
protocol errors) only clipped (:func:`baton.errors.clip`).
"""

from __future__ import annotations

from pathlib import Path

from baton.errors import BatonError, clip


class DownloadError(BatonError):
    """A package could not be fetched; the family of every error this module raises."""


class ProtocolViolation(DownloadError):
    """The server answered, but not in HTTP: a malformed status line, conflicting headers, an oversized head."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{clip(url)} broke the HTTP protocol: {clip(reason)}")
        self.url = url
        self.reason = reason


class UntrustedDownloadFile(DownloadError):
    """``dest`` exists and is not a file this helper created: someone else writes in the download directory."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"refusing {path}: {reason}; it was not created by this helper")
        self.path = path
        self.reason = reason


class UnsupportedUrl(DownloadError):
    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot download {clip(url)}: {reason}")
        self.url = url
        self.reason = reason


class ConnectionFailed(DownloadError):
    """No connection: refused, DNS, TLS, connect timeout, or a local source that cannot be opened."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot connect to {clip(url)}: {clip(reason)}")
        self.url = url
        self.reason = reason


class HttpStatusError(DownloadError):
    def __init__(self, status: int, url: str) -> None:
        super().__init__(f"{clip(url)} answered HTTP {status}")
        self.status = status
        self.url = url


class ServerBusy(HttpStatusError):
    """HTTP 503: the server bounds its concurrent downloads; ``retry_after_s`` is its ``Retry-After``, if any."""

    def __init__(self, url: str, retry_after_s: float | None) -> None:
        super().__init__(503, url)
        self.url = url
        self.retry_after_s = retry_after_s


class UnexpectedResponse(DownloadError):
    """The server answered something we did not ask for (a wrong Content-Range, a stray status)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"unexpected response from {clip(url)}: {clip(reason)}")
        self.url = url
        self.reason = reason


class DownloadTimeout(DownloadError):
    """No byte for ``read_timeout_s``, or the whole download passed ``total_timeout_s``."""

    def __init__(self, url: str, what: str, limit_s: float) -> None:
        super().__init__(f"download of {clip(url)} timed out: {what} (limit {limit_s:g} s)")
        self.url = url
        self.what = what
        self.limit_s = limit_s


class DownloadTooSlow(DownloadError):
    """The average rate over the window fell below the floor: slow-retrieval defence."""

    def __init__(self, url: str, rate_bytes_per_s: float, min_rate_bytes_per_s: int, window_s: float) -> None:
        super().__init__(
            f"download of {clip(url)} too slow: {rate_bytes_per_s:.0f} B/s over the last {window_s:g} s, "
            f"floor is {min_rate_bytes_per_s} B/s"
        )
        self.url = url
        self.rate_bytes_per_s = rate_bytes_per_s
        self.min_rate_bytes_per_s = min_rate_bytes_per_s
        self.window_s = window_s


class DownloadTooLarge(DownloadError):
    """The server announced or sent more than ``expected_size`` bytes."""

    def __init__(self, url: str, expected_size: int, announced: int | None = None) -> None:
        detail = f"announced {announced} bytes" if announced is not None else "sent more bytes"
        super().__init__(f"{clip(url)} {detail}, expected exactly {expected_size}")
        self.url = url
        self.expected_size = expected_size
        self.announced = announced


class DownloadTruncated(DownloadError):
    """The server announced or sent fewer than ``expected_size`` bytes."""

    def __init__(self, url: str, expected_size: int, received: int, reason: str = "") -> None:
        tail = f" ({clip(reason)})" if reason else ""
        super().__init__(f"{clip(url)} ended after {received} of {expected_size} bytes{tail}")
        self.url = url
        self.expected_size = expected_size
        self.received = received
        self.reason = reason


class InsufficientSpace(DownloadError):
    def __init__(self, path: Path, needed_bytes: int, free_bytes: int) -> None:
        super().__init__(
            f"not enough free space for {path}: need {needed_bytes} bytes (package plus reserve), {free_bytes} free"
        )
        self.path = path
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes
