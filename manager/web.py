"""The fleet on a web page: a read-only view of the Manager's store, served by ``baton-manager serve --web``.

Three views, server-rendered from the store on every request (no front-end build,
no JavaScript framework, only the standard library):

- ``/``: the nodes (supervisor and agent versions, last heartbeat, online or
  offline, labels), the rollouts with their progress per batch and per node,
  and the updates that did not commit grouped by failure reason;
- ``/node/<id>``: one node and its update history with each update's operator,
  failure reason and error;
- ``/live`` and ``/node/<id>/live``: the same content as an HTML fragment. The
  page's one inline script fetches its fragment every ``REFRESH_MS`` and swaps
  it in, so progress moves without reloading the page.

Everything that comes from the store (node ids, labels, versions, error text) is
HTML-escaped at the one place text enters the markup (``_e``); links carry node
ids percent-encoded. A Content-Security-Policy allows only the page's own inline
script and style (by hash) and same-origin fetches.

Exposure follows the Manager's rules: without TLS the page listens on loopback
only (no unauthenticated TCP); with the Manager's TLS files it requires a client
certificate from the same CA that is an operator's: by default one with an
operator identity (``URI:spiffe://baton/operator/NAME``, ``scripts/dev_ca.py
--operator``) or the Manager's own certificate, else exactly the identities
``--web-allow`` names. A node's certificate (``spiffe://baton/node/ID``) is
refused with 403 whatever the list says: the page is for operators, not for the
fleet's hosts (nor for any other certificate the CA signed).

Each request's ``Host`` must name the page: the listen address, ``localhost``
when it listens on loopback, any IP address when it listens on all of them, or
a ``--web-host`` name; anything else is answered 421 with no content, so a page
on another site whose name was re-bound to this address (DNS rebinding) reads
nothing.
"""

from __future__ import annotations

import base64
import hashlib
import html
import ipaddress
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from baton.bounded_http import BoundedHTTPServer, BoundedRequestHandler, HttpLimits
from baton.identity import AllowEntry, PeerIdentity, certificate_identity
from baton.log import logger
from manager.errors import ManagerError
from manager.push import Operator
from manager.rollout import download_bytes
from manager.store import Node, RolloutNodeRow, RolloutRow, Store, UpdateRow, failures_by_reason

REFRESH_MS = 2000
OFFLINE_AFTER_HEARTBEATS = 3  # a node is offline once this many heartbeat intervals passed without one
DEFAULT_HEARTBEAT_S = 10.0  # the supervisors' own default ([manager] heartbeat_interval_s)
MAX_ROLLOUTS = 20  # the most recent ones on the page
MAX_UPDATES = 200  # of one node's history
MAX_REASON_NODES = 10  # nodes named per failure reason; the rest are counted

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
.online{color:#080}.offline{color:#b00}
.step-succeeded{color:#080}.step-failed{color:#b00}.step-running,.step-pushing{color:#a60}
.muted{color:#777}
ul.steps{margin:0;padding-left:1.2em}
"""
SCRIPT = f"""
(function(){{
  var live=document.getElementById("live");
  setInterval(function(){{
    fetch(live.dataset.src,{{cache:"no-store"}}).then(function(r){{
      if(r.ok){{return r.text().then(function(t){{live.innerHTML=t;live.dataset.refreshed=Date.now();}});}}
    }}).catch(function(){{}});
  }},{REFRESH_MS});
}})();
"""


def _sha256_b64(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


CSP = (f"default-src 'none'; script-src 'sha256-{_sha256_b64(SCRIPT)}'; style-src 'sha256-{_sha256_b64(STYLE)}'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class WebError(ManagerError):
    """The web page cannot be served as asked (an address or TLS file it cannot use)."""


def _e(value: object) -> str:
    """The one door from data into markup."""
    return html.escape(str(value), quote=True)


def _node_href(node_id: str) -> str:
    return "/node/" + quote(node_id, safe="")


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "-"
    s = max(0.0, now - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _table(head: Iterable[str], rows: Iterable[str], cls: str) -> str:
    ths = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join(rows)
    return f'<table class="{cls}"><thead><tr>{ths}</tr></thead><tbody>{body}</tbody></table>'


@dataclass(frozen=True)
class FleetView:
    """Renders the store; ``offline_after_s`` decides online/offline from a node's last heartbeat."""

    store: Store
    offline_after_s: float

    # ---- pages ----------------------------------------------------------------------------------------

    def page(self, title: str, live_src: str, fragment: str) -> str:
        return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
                f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>"
                f'<div id="live" data-src="{_e(live_src)}">{fragment}</div>'
                f"<script>{SCRIPT}</script></body></html>")

    def fleet(self) -> str:
        now = time.time()
        return (f'<p class="muted">as of {_e(_when(now))}</p>'
                f"<h2>Nodes</h2>{self.nodes_table(self.store.nodes(), now)}"
                f"<h2>Rollouts</h2>{self.rollouts_section(now)}"
                f"<h2>Failures by reason</h2>{self.reasons_table(self.store.updates())}")

    def node(self, node_id: str) -> str | None:
        node = self.store.node(node_id)
        if node is None:
            return None
        now = time.time()
        updates = sorted(self.store.updates(node=node_id), key=lambda u: u.created_at, reverse=True)[:MAX_UPDATES]
        return (f'<p><a href="/">fleet</a> · <span class="muted">as of {_e(_when(now))}</span></p>'
                f"{self.nodes_table([node], now)}<h2>Updates</h2>{self.updates_table(updates)}")

    # ---- pieces ---------------------------------------------------------------------------------------

    def online(self, node: Node, now: float) -> bool:
        return now - node.last_seen <= self.offline_after_s

    def nodes_table(self, nodes: list[Node], now: float) -> str:
        rows = []
        for n in nodes:
            status = "online" if self.online(n, now) else "offline"
            agents = "".join(
                f"<li>{_e(a.get('name', ''))} {_e(a.get('version') or '-')} "
                f"<span class=\"muted\">{_e(a.get('state', ''))}</span></li>" for a in n.agents)
            labels = ", ".join(f"{_e(k)}={_e(v)}" for k, v in n.labels)
            rows.append(
                f'<tr data-node="{_e(n.id)}"><td><a href="{_e(_node_href(n.id))}">{_e(n.id)}</a></td>'
                f"<td>{_e(n.version or '-')}</td><td><ul class=\"steps\">{agents}</ul></td>"
                f'<td title="{_e(_when(n.last_seen))}">{_e(_ago(n.last_seen, now))}</td>'
                f'<td class="{status}">{status}</td><td>{labels or "-"}</td>'
                f"<td>{_e(n.address or '-')}</td><td>{_e(n.hostname or '-')}</td></tr>")
        if not rows:
            return '<p class="muted">no node has registered</p>'
        return _table(("node", "supervisor", "components", "last heartbeat", "status", "labels", "address",
                       "hostname"), rows, "nodes")

    def rollouts_section(self, now: float) -> str:
        items = sorted(self.store.rollouts(), key=lambda r: r.created_at, reverse=True)[:MAX_ROLLOUTS]
        if not items:
            return '<p class="muted">no rollouts</p>'
        return "".join(self.rollout_block(r, now) for r in items)

    def rollout_block(self, r: RolloutRow, now: float) -> str:
        pkg = r.spec.get("package", {})
        canary = int(r.spec.get("canary", 0))
        reason = str(r.progress.get("reason", ""))
        head = (f'<h3 data-rollout="{_e(r.id)}">{_e(r.id)}: {_e(pkg.get("component", ""))} '
                f'{_e(pkg.get("version", ""))} <span class="rollout-state">{_e(r.state)}</span>'
                f'{" (" + _e(r.control) + " asked)" if r.control else ""}</h3>'
                f'<p class="muted">started {_e(_ago(r.created_at, now))}'
                f"{' by ' + _e(r.started_by) if r.started_by else ''}"
                f"{', owner ' + _e(r.owner) if r.owner else ''}{': ' + _e(reason) if reason else ''}; "
                f'<span class="download-bytes">{download_bytes(self.store, r)}</span> package bytes served</p>')
        by_batch: dict[int, list[RolloutNodeRow]] = {}
        for n in self.store.rollout_nodes(r.id):
            by_batch.setdefault(n.batch, []).append(n)
        rows = []
        for batch, counts in sorted(self.store.rollout_batches(r.id).items()):
            label = "canary" if batch == 0 and canary else f"batch {batch}"
            total = sum(counts.values())
            done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "skipped", "cancelled"))
            summary = ", ".join(f"{_e(step)} {n}" for step, n in sorted(counts.items()))
            steps = "".join(
                f'<li class="step-{_e(n.step)}" data-rollout="{_e(r.id)}" data-node="{_e(n.node)}" '
                f'data-step="{_e(n.step)}"><a href="{_e(_node_href(n.node))}">{_e(n.node)}</a>: {_e(n.step)}'
                f"{' (' + _e(n.error) + ')' if n.error else ''}</li>" for n in by_batch.get(batch, []))
            rows.append(f'<tr data-batch="{batch}"><td>{_e(label)}</td><td>{done}/{total}</td>'
                        f'<td><progress max="{total}" value="{done}"></progress> {summary}</td>'
                        f'<td><ul class="steps">{steps}</ul></td></tr>')
        return head + _table(("batch", "done", "progress", "nodes"), rows, "rollout")

    def reasons_table(self, updates: list[UpdateRow]) -> str:
        """The updates that did not commit, grouped by their stable reason code (docs/troubleshooting.md has a
        section per code), with the nodes they happened on and the latest message."""
        groups = failures_by_reason(updates)
        if not groups:
            return '<p class="muted">no failed updates</p>'
        rows = []
        for reason, group in groups.items():
            nodes = sorted({u.node for u in group})
            links = ", ".join(f'<a href="{_e(_node_href(n))}">{_e(n)}</a>' for n in nodes[:MAX_REASON_NODES])
            more = f" and {len(nodes) - MAX_REASON_NODES} more" if len(nodes) > MAX_REASON_NODES else ""
            latest = max(group, key=lambda u: u.finished_at or u.created_at)
            rows.append(f'<tr data-reason="{_e(reason)}"><td>{_e(reason)}</td><td class="count">{len(group)}</td>'
                        f"<td>{links}{_e(more)}</td><td class=\"error\">{_e(latest.error or '-')}</td></tr>")
        return _table(("reason", "updates", "nodes", "latest error"), rows, "reasons")

    def updates_table(self, updates: list[UpdateRow]) -> str:
        if not updates:
            return '<p class="muted">no updates</p>'
        rows = []
        for u in updates:
            result = "ok" if u.success else "rolled back" if u.rolled_back else "failed" if u.state.final else "-"
            took = f"{u.finished_at - u.created_at:.1f}s" if u.finished_at else "-"
            rows.append(
                f'<tr data-update="{_e(u.update_id)}"><td>{_e(u.update_id)}</td><td>{_e(u.component)}</td>'
                f"<td>{_e(u.from_version or '-')} → {_e(u.to_version)}</td><td>{_e(u.state.value)}</td>"
                f"<td>{_e(result)}</td><td>{_e(_when(u.created_at))}</td><td>{_e(took)}</td>"
                f"<td>{_e(u.rollout_id or '-')}</td><td>{_e(Operator(u.started_by, u.started_on).describe())}</td>"
                f"<td>{_e(u.reason or '-')}</td>"
                f'<td class="error">{_e(u.error or "-")}</td></tr>')
        return _table(("update", "component", "version", "state", "result", "created", "took", "rollout",
                       "by", "reason", "error"), rows, "updates")


def offline_after(heartbeat_interval_s: float) -> float:
    """Seconds without a heartbeat before a node shows offline: a few of the intervals the Manager hands out."""
    return OFFLINE_AFTER_HEARTBEATS * (heartbeat_interval_s if heartbeat_interval_s > 0 else DEFAULT_HEARTBEAT_S)


@dataclass(frozen=True)
class WebAccess:
    """Who may read the page: the ``Host`` names it answers to and, over TLS, the client certificates."""

    hosts: frozenset[str]  # lower case, without a port
    any_ip_host: bool = False  # listening on every address: any IP literal names it
    allow: tuple[AllowEntry, ...] = ()  # empty: operator identities and the Manager's own certificate
    own_cert: bytes = field(default=b"", repr=False)  # the Manager's certificate, DER

    def host_refusal(self, header: str | None) -> str:
        """Why the request's ``Host`` does not name this page, or ""."""
        name = request_host(header or "")
        if not name:
            return "a request without a Host header"
        if name in self.hosts:
            return ""
        if self.any_ip_host and _is_ip(name):
            return ""
        return f"Host {name!r} does not name this page"

    def peer_refusal(self, peer: PeerIdentity, der: bytes | None) -> str:
        """Why a verified client certificate may not read the page, or ""."""
        if peer.is_node:
            return "a node's certificate may not read the fleet page"
        if self.allow:
            allowed = any(peer.matches(e) for e in self.allow)
        else:
            allowed = peer.is_operator or (bool(self.own_cert) and der == self.own_cert)
        return "" if allowed else f"{peer.describe()} is not an operator of this fleet page"


def request_host(header: str) -> str:
    """The host a ``Host`` header names, lower case, without its port or a final dot."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Handler(BoundedRequestHandler):
    server_version = "baton-manager-web"
    view: FleetView
    tls: bool
    access: WebAccess

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("web {} {}", self.address_string(), format % args)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        if self.tls:
            peer = certificate_identity(self.connection.getpeercert())
            why = self.access.peer_refusal(peer, self.connection.getpeercert(binary_form=True))
            if why:
                logger.info("web: refused {}: {}", self.address_string(), why)
                return self._send(HTTPStatus.FORBIDDEN, why + "\n", "text/plain", body)
        why = self.access.host_refusal(self.headers.get("Host"))
        if why:
            logger.info("web: refused {}: {}", self.address_string(), why)
            return self._send(HTTPStatus.MISDIRECTED_REQUEST, why + "\n", "text/plain", body)
        path = unquote(urlsplit(self.path).path)
        try:
            status, text, ctype = self._route(path)
        except Exception as e:  # a store error: say so, do not kill the thread
            logger.warning("web page {}: {}", path, e)
            status, text, ctype = HTTPStatus.SERVICE_UNAVAILABLE, "the store cannot be read now\n", "text/plain"
        self._send(status, text, ctype, body)

    def _route(self, path: str) -> tuple[HTTPStatus, str, str]:
        view = self.view
        if path == "/":
            return HTTPStatus.OK, view.page("Baton fleet", "/live", view.fleet()), "text/html"
        if path == "/live":
            return HTTPStatus.OK, view.fleet(), "text/html"
        if path.startswith("/node/"):
            rest = path[len("/node/"):]
            node_id, live = (rest[: -len("/live")], True) if rest.endswith("/live") else (rest, False)
            fragment = view.node(node_id) if node_id else None
            if fragment is None:
                return HTTPStatus.NOT_FOUND, "no such node\n", "text/plain"
            if live:
                return HTTPStatus.OK, fragment, "text/html"
            return HTTPStatus.OK, view.page(f"Node {node_id}", _node_href(node_id) + "/live", fragment), "text/html"
        return HTTPStatus.NOT_FOUND, "not found\n", "text/plain"

    def _send(self, status: HTTPStatus, text: str, ctype: str, body: bool) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{ctype}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if body:
            self.wfile.write(data)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _first_certificate(pem: str) -> bytes:
    """The first certificate of a PEM file (the leaf, before any chain), DER; ValueError without one."""
    start, end = pem.index(ssl.PEM_HEADER), pem.index(ssl.PEM_FOOTER) + len(ssl.PEM_FOOTER)
    return ssl.PEM_cert_to_DER_cert(pem[start:end])


def tls_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """Server side of mutual TLS: a client certificate from ``ca`` is required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Server(BoundedHTTPServer):
    """Its connections are bounded (``baton.bounded_http``); a TLS handshake is part of the request head's time."""

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 ctx: ssl.SSLContext | None, limits: HttpLimits | None = None) -> None:
        self.ctx = ctx
        super().__init__(addr, handler, limits=limits)

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.ctx is None:
            return sock, addr
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.ctx is not None:
            try:
                request.do_handshake()
            except (OSError, ssl.SSLError) as e:
                logger.info("web: TLS handshake with {} refused: {}", client_address, e)
                return
        super().finish_request(request, client_address)


class WebServer:
    """The page on ``host:port`` in a thread; ``tls`` = (cert, key, ca) or None (then loopback only).

    ``allow``: the identities that may read it over TLS (default: operators, module docstring);
    ``hosts``: more names it answers to in ``Host``; ``limits``: its connections' bounds (default: every
    endpoint's).
    """

    def __init__(self, store: Store, listen: str, *, tls: tuple[Path, Path, Path] | None = None,
                 heartbeat_interval_s: float = 0.0, allow: tuple[AllowEntry, ...] = (),
                 hosts: tuple[str, ...] = (), limits: HttpLimits | None = None) -> None:
        host, sep, port = listen.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit():
            raise WebError(f"--web {listen!r}: expected HOST:PORT")
        if tls is None and not _is_loopback(host):
            raise WebError(f"--web {listen}: without --tls-* the page listens on loopback only "
                           "(127.0.0.1, ::1): no unauthenticated TCP")
        if tls is None and allow:
            raise WebError("--web-allow names client certificates: it needs --tls-cert, --tls-key and --tls-ca")
        for name in hosts:
            if not name or name != request_host(name):
                raise WebError(f"--web-host {name!r}: expected a host name without a port")
        try:
            ctx = tls_context(*tls) if tls else None
            own_cert = _first_certificate(tls[0].read_text()) if tls else b""
        except (OSError, ssl.SSLError, ValueError) as e:
            raise WebError(f"--web: cannot use the TLS files: {e}") from None
        wildcard = _is_ip(host) and ipaddress.ip_address(host).is_unspecified
        names = {request_host(host), *hosts} | ({"localhost"} if _is_loopback(host) else set())
        access = WebAccess(frozenset(names), any_ip_host=wildcard, allow=allow, own_cert=own_cert)
        handler = type("Handler", (_Handler,), {"view": FleetView(store, offline_after(heartbeat_interval_s)),
                                                 "tls": ctx is not None, "access": access})
        try:
            self.httpd = _Server((host, int(port)), handler, ctx, limits)
        except OSError as e:
            raise WebError(f"cannot serve the web page on {listen}: {e}") from None
        self.scheme = "https" if ctx else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="manager-web", daemon=True)

    @property
    def url(self) -> str:
        host, port = str(self.httpd.server_address[0]), int(self.httpd.server_address[1])
        return f"{self.scheme}://{f'[{host}]' if ':' in host else host}:{port}/"

    def start(self) -> WebServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
