"""Fetch an update package into the download directory, bounded and hashed on the fly.

The server is untrusted until the signature is checked, so everything it
controls is bounded: bytes (cut off at ``expected_size + 1``), time (a read
timeout, a whole-download deadline) and rate (a floor averaged over a sliding
window). The bytes are hashed while they are written, and :func:`download`
hands back a read-only handle on the very inode it wrote.

One job per module:

- :mod:`~helper.download.transport`: where the bytes come from (http, https, file), behind :class:`Fetcher`;
- :mod:`~helper.download.files`: file safety (the helper's own download file, ``file://`` sources beneath a root);
- :mod:`~helper.download.rate`: the deadline, the rate floor, progress and the 503 back-off;
- :mod:`~helper.download.writer`: the write to disk and both digests in one pass;
- :mod:`~helper.download.workflow`: one download through all of them (:func:`download`);
- :mod:`~helper.download.errors` and :mod:`~helper.download.limits`: what they share.
"""

from helper.download.errors import (
    ConnectionFailed,
    DownloadError,
    DownloadTimeout,
    DownloadTooLarge,
    DownloadTooSlow,
    DownloadTruncated,
    HttpStatusError,
    InsufficientSpace,
    ProtocolViolation,
    ServerBusy,
    UnexpectedResponse,
    UnsupportedUrl,
    UntrustedDownloadFile,
)
from helper.download.files import FileIdentity
from helper.download.limits import DownloadLimits
from helper.download.rate import BUSY_BACKOFF_INITIAL_S, BUSY_BACKOFF_MAX_S, PROGRESS_INTERVAL_S, DownloadProgress
from helper.download.transport import MAX_RESPONSE_HEAD_BYTES, Body, Fetcher
from helper.download.workflow import DownloadedFile, download

__all__ = [
    "BUSY_BACKOFF_INITIAL_S",
    "BUSY_BACKOFF_MAX_S",
    "MAX_RESPONSE_HEAD_BYTES",
    "PROGRESS_INTERVAL_S",
    "Body",
    "ConnectionFailed",
    "DownloadError",
    "DownloadLimits",
    "DownloadProgress",
    "DownloadTimeout",
    "DownloadTooLarge",
    "DownloadTooSlow",
    "DownloadTruncated",
    "DownloadedFile",
    "Fetcher",
    "FileIdentity",
    "HttpStatusError",
    "InsufficientSpace",
    "ProtocolViolation",
    "ServerBusy",
    "UnexpectedResponse",
    "UnsupportedUrl",
    "UntrustedDownloadFile",
    "download",
]
