"""Sample agent that crashes on demand: SIGUSR1, a file named by $CRASH_FILE, or after $CRASH_AFTER seconds."""

import os
import signal
import sys
import time

code = int(os.environ.get("CRASH_CODE", "3"))
after = float(os.environ.get("CRASH_AFTER", "-1"))
crash_file = os.environ.get("CRASH_FILE", "")


def crash(signum, frame):
    print("crash_agent: crashing on request", flush=True)
    os._exit(code)


signal.signal(signal.SIGUSR1, crash)
print(f"crash_agent pid {os.getpid()} up", flush=True)
start = time.monotonic()
while True:
    if after >= 0 and time.monotonic() - start >= after:
        print(f"crash_agent: exiting with {code} after {after}s", flush=True)
        sys.exit(code)
    if crash_file and os.path.exists(crash_file):
        print("crash_agent: crash file found", flush=True)
        sys.exit(code)
    time.sleep(0.05)
