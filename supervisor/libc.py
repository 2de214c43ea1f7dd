"""The few libc calls the os module does not offer, through ctypes (no dependency): one handle for all."""

from __future__ import annotations

import ctypes
import functools
import os

PR_SET_CHILD_SUBREAPER = 36


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def errno_error(what: str) -> OSError:
    """The OSError for the errno the last call through :func:`libc` left."""
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def set_child_subreaper() -> OSError | None:
    """Orphaned grandchildren of agents come to us to be reaped, not to PID 1; the error if they cannot."""
    return errno_error("prctl(PR_SET_CHILD_SUBREAPER)") if libc().prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) else None


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps what a burst freed (start-up, a handover, a wave of restarts) for reuse; a long-lived daemon
    that idles afterwards would carry it as resident memory.
    """
    trim = getattr(libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
