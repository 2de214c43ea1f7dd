"""Talking to systemd through ``$NOTIFY_SOCKET``: READY, STATUS, WATCHDOG, MAINPID.

Without systemd (no ``NOTIFY_SOCKET``) every call is a silent no-op.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send one sd_notify datagram; return False when not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(path)
            s.sendall(message.encode())
        except OSError:
            return False
    return True


def enabled() -> bool:
    """Whether :func:`notify` sends anything (a caller may then skip building the message)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def watchdog_interval_s() -> float | None:
    """Half of ``WATCHDOG_USEC`` when the watchdog is meant for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


def under_systemd() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET") or os.environ.get("INVOCATION_ID"))
