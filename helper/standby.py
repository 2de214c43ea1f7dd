"""The standby's side of its channel (baton/standby.py): say HELLO, wait for one update id, take it.

``helper apply --standby`` loads the update path's imports, then calls :func:`wait_for_job`; with the id it
continues in ``cmd_apply`` exactly as ``helper apply --update-id ID`` does. Its output, until then
``<run_dir>/standby.log``, goes to the update's ``helper.log`` from the moment it takes the job.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from baton.standby import MAX_LINE_BYTES, Hello, Job, StandbyError, Taken, socket_path
from baton.strict_modes import log_opener


def wait_for_job(run_dir: Path, stamp: str) -> str | None:
    """The update id the supervisor hands us, or None when it hangs up first (then this standby just exits).

    Blocks for as long as the supervisor process that started us lives: its exit or exec closes the channel.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(str(socket_path(run_dir)))
            sock.sendall(Hello(pid=os.getpid(), code=stamp).encode())
            line = _read_line(sock)
        except OSError:
            return None
        if not line:
            return None
        try:
            job = Job.decode(line)
        except StandbyError as e:
            print(f"helper: standby: {e}")
            return None
        sock.sendall(Taken(pid=os.getpid()).encode())
        return job.update_id


def take_output(log_path: Path) -> None:
    """From here on stdout and stderr are the update's helper.log, as a fresh helper's are."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, "ab", opener=log_opener) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)


def _read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n") and len(buf) <= MAX_LINE_BYTES:
        chunk = sock.recv(MAX_LINE_BYTES)
        if not chunk:
            return b""
        buf += chunk
    return buf
