"""A plain HTTP/1.1 file server for the benchmarks: ``bench_httpd.py DIR PORT`` on 127.0.0.1.

The standard library's ``http.server`` with one change: the body is sent with
``sendfile(2)`` instead of a Python copy loop, so the server is not what limits
a 1 GiB download on loopback (the benchmark measures ``curl -o /dev/null``
against it to show that). GET and HEAD, no Range; no logging.
"""

from __future__ import annotations

import signal
import sys
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def copyfile(self, source: Any, outputfile: Any) -> None:
        outputfile.flush()
        self.connection.sendfile(source)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> int:
    directory, port = sys.argv[1], int(sys.argv[2])
    server = ThreadingHTTPServer(("127.0.0.1", port), partial(Handler, directory=directory))
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
