"""Sample agent that ignores SIGTERM, so only SIGKILL after the stop timeout ends it."""

import os
import signal
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(f"stubborn_agent pid {os.getpid()} ignoring SIGTERM", flush=True)
while True:
    time.sleep(1)
