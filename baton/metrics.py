"""The Prometheus endpoint both the supervisor and the reference Manager can serve (``prometheus_client``).

Import this module only when metrics are configured: the daemon pays nothing
(not even the import) when ``[metrics] listen`` is unset. Values are computed
at scrape time by a collector from the process's own state (no counters to
keep in step with events), so a scrape always shows what the process knows.
The HTTP server runs in its own thread; a port still held by a previous
process (a supervisor handing over to its successor) is retried for a while.
It is prometheus_client's WSGI exposition (``make_wsgi_app``) on a
``baton.bounded_http`` server instead of ``start_http_server``'s, whose
thread per connection waits for ever: idle connections are timed out and
evicted, and at most ``HttpLimits.max_connections`` have a thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.registry import Collector

from baton.bounded_http import BoundedHTTPServer, BoundedRequestHandler, HttpLimits
from baton.log import logger

BIND_RETRY_S = 30.0
BIND_RETRY_INTERVAL_S = 0.25


class _MetricsHTTPServer(BoundedHTTPServer, WSGIServer):
    pass


class _MetricsHandler(BoundedRequestHandler, WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


class MetricsServer:
    """Serves one registry on ``host:port`` until :meth:`stop`."""

    def __init__(self, host: str, port: int, collectors: Iterable[Collector], limits: HttpLimits | None = None
                 ) -> None:
        self.host = host
        self.port = port
        self.limits = limits
        self.registry = CollectorRegistry(auto_describe=False)
        for c in collectors:
            self.registry.register(c)
        self._server: _MetricsHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._binder: threading.Thread | None = None
        self.last_error: OSError | None = None

    def start(self, retry: bool = False) -> MetricsServer:
        """Bind now; a busy port raises OSError, or with ``retry`` is tried again in the background."""
        if self._try_bind():
            return self
        if not retry:
            assert self.last_error is not None
            raise self.last_error
        self._binder = threading.Thread(target=self._keep_binding, name="metrics-bind", daemon=True)
        self._binder.start()
        return self

    def _try_bind(self) -> bool:
        try:
            # wsgiref's make_server, with the limits
            server = _MetricsHTTPServer((self.host, self.port), _MetricsHandler, limits=self.limits)
            server.set_app(make_wsgi_app(self.registry))
        except OSError as e:
            self.last_error = e
            return False
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        logger.info("metrics: serving Prometheus metrics on http://{}:{}/metrics", self.host, self.port)
        return True

    def _keep_binding(self) -> None:
        deadline = time.monotonic() + BIND_RETRY_S
        while not self._stopped.wait(BIND_RETRY_INTERVAL_S):
            if self._try_bind():
                return
            if time.monotonic() > deadline:
                logger.error("metrics: cannot listen on {}:{}: {}; no metrics endpoint", self.host, self.port,
                             self.last_error)
                return

    def stop(self) -> None:
        self._stopped.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
