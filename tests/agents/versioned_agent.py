"""A packaged sample agent; its behaviour is part of the package (behaviour.txt beside it).

good:          READY=1 at once, runs until SIGTERM
exit_at_once:  exits 4 before it is ready
never_ready:   runs but never sends READY=1
die_after_ready: READY=1, then exits 5 after DIE_AFTER seconds (default 0.5)
"""

import os
import signal
import socket
import sys
import time
from pathlib import Path

here = Path(__file__).resolve().parent
behaviour = (here / "behaviour.txt").read_text().strip() if (here / "behaviour.txt").exists() else "good"
version = os.environ.get("BATON_AGENT_VERSION", "?")
stop = False


def on_term(signum, frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
print(f"versioned_agent {version} ({behaviour}) pid {os.getpid()}", flush=True)
if behaviour == "exit_at_once":
    sys.exit(4)


def notify(msg: bytes) -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if path:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(msg)


if behaviour != "never_ready":
    notify(b"READY=1\nSTATUS=version " + version.encode())
started = time.monotonic()
while not stop:
    if behaviour == "die_after_ready" and time.monotonic() - started > float(os.environ.get("DIE_AFTER", "0.5")):
        print("versioned_agent: dying inside the health window", flush=True)
        sys.exit(5)
    time.sleep(0.05)
print(f"versioned_agent {version} stopping", flush=True)
