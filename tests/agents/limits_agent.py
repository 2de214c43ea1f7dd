"""An agent for resource limits: prints where it runs (cgroups, open-files limit), then does what argv says.

``hog MIB``: allocates and touches MIB MiB, then sleeps; ``fork N``: forks N sleeping children, exits 3 when a
fork is refused; ``hog-on-usr1 MIB``: the same as ``hog`` when it receives SIGUSR1; ``show``: only sleeps.
"""

import os
import resource
import signal
import sys
import time

with open("/proc/self/cgroup") as f:
    print("CGROUP", f.read().replace("\n", " "), flush=True)
print("NOFILE", resource.getrlimit(resource.RLIMIT_NOFILE)[0], flush=True)
mode = sys.argv[1]
if mode == "hog-on-usr1":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    print("WAITING", flush=True)
    signal.sigwait({signal.SIGUSR1})
    mode = "hog"
if mode == "hog":
    chunks = []
    for _ in range(int(sys.argv[2])):
        chunks.append(bytearray(b"x" * (1 << 20)))
    print("ALLOCATED", flush=True)
elif mode == "fork":
    for i in range(int(sys.argv[2])):
        try:
            pid = os.fork()
        except BlockingIOError:
            print("FORK REFUSED", i, flush=True)
            sys.exit(3)
        if pid == 0:
            time.sleep(600)
            os._exit(0)
    print("FORKED ALL", flush=True)
time.sleep(600)
