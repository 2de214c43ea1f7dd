"""Sample agent that reports each SIGHUP it gets (as a daemon re-reading its config would) and stops on SIGTERM."""

import os
import signal
import time

hups = 0


def on_hup(signum, frame):
    global hups
    hups += 1
    print(f"hup_agent got SIGHUP {hups}", flush=True)


signal.signal(signal.SIGHUP, on_hup)
print(f"hup_agent pid {os.getpid()} up", flush=True)
while True:
    time.sleep(0.1)
