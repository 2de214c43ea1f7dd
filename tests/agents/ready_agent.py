"""Sample agent: announces READY=1 on $NOTIFY_SOCKET, prints a heartbeat, stops cleanly on SIGTERM."""

import os
import signal
import socket
import sys
import time

delay = float(os.environ.get("READY_DELAY", "0"))
tick_s = float(os.environ.get("TICK_S", "0.2"))  # between heartbeats
stop = False


def on_term(signum, frame):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
print(f"ready_agent {os.environ.get('BATON_AGENT_NAME')} pid {os.getpid()} starting", flush=True)
time.sleep(delay)
ready_file = os.environ.get("READY_WHEN_FILE")  # READY only once a test has created this file
while ready_file and not os.path.exists(ready_file) and not stop:
    time.sleep(0.01)
path = os.environ.get("NOTIFY_SOCKET")
if path:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.sendall(b"READY=1\nSTATUS=serving")
n = 0
while not stop:
    n += 1
    print(f"tick {n}", flush=True)
    next_tick = time.monotonic() + tick_s
    while not stop and time.monotonic() < next_tick:
        time.sleep(min(0.2, tick_s))  # a SIGTERM is seen within 0.2 s, however long between ticks
print("ready_agent stopping", flush=True)
sys.exit(0)
