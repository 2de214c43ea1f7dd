"""Sample agent that writes a lot of output as fast as it can, and counts what it wrote."""

import os
import sys
import time

line = ("x" * 200 + "\n").encode()
count_file = os.environ.get("CHATTY_COUNT_FILE")
n = 0
out = sys.stdout.buffer
while True:
    out.write(b"%08d " % n + line)
    n += 1
    if n % 1000 == 0:
        out.flush()
        if count_file:
            with open(count_file + ".tmp", "w") as f:
                f.write(str(n))
            os.replace(count_file + ".tmp", count_file)
        time.sleep(0.001)
