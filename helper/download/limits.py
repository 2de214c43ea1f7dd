"""Every bound on one download, from the validated ``[update]`` config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from baton.config import UpdateConfig
from baton.digest import BUFFER_BYTES


@dataclass(frozen=True)
class DownloadLimits:
    """Every bound on one download. Timeouts in seconds, sizes in bytes.

    Built from the validated config with :meth:`from_config`; the config is the
    one place for each default. The rate floor is checked as bytes arrive; a
    connection that delivers nothing at all is the read timeout's job. The
    deadline covers the whole request (connect, response head, body): every
    socket read waits at most until it.
    """

    connect_timeout_s: float
    read_timeout_s: float
    total_timeout_s: float
    min_rate_bytes_per_s: int
    min_rate_window_s: float
    free_space_reserve_bytes: int
    chunk_bytes: int = BUFFER_BYTES  # a tuning knob, not a bound: not in the config; BUFFERS of them in flight
    max_redirects: int = 5
    file_url_root: Path | None = None  # file:// URLs are read only beneath it; None refuses them

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "read_timeout_s", "total_timeout_s", "min_rate_window_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DownloadLimits.{name} must be positive")
        if self.chunk_bytes <= 0:
            raise ValueError("DownloadLimits.chunk_bytes must be positive")
        if self.min_rate_bytes_per_s < 0 or self.free_space_reserve_bytes < 0 or self.max_redirects < 0:
            raise ValueError("DownloadLimits: rate floor, reserve and redirects must not be negative")

    @classmethod
    def from_config(cls, u: UpdateConfig) -> DownloadLimits:
        """The limits the validated ``[update]`` section names."""
        return cls(
            connect_timeout_s=u.connect_timeout_s,
            read_timeout_s=u.read_timeout_s,
            total_timeout_s=u.download_timeout_s,
            min_rate_bytes_per_s=u.min_rate_bytes_per_s,
            min_rate_window_s=u.min_rate_window_s,
            free_space_reserve_bytes=u.free_space_reserve_bytes,
            file_url_root=u.file_url_root,
        )
