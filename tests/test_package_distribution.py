"""Package distribution at fleet scale, with a real ``baton-manager serve``: packages by content address
(ETag, immutable caching, 304), a bound on concurrent downloads (503 with Retry-After), and the package
bytes a rollout's nodes downloaded, recorded in the store."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
from pathlib import Path

import pytest

from manager.publish import publish
from tests.conftest import PY, ROOT, Release, free_port, wait_for
from tests.manager_fixtures import (
    ManagerProc,
    make_manager_fixture,  # noqa: F401  (the make_manager fixture)
    package_args,
    signed,
)
from tests.test_fleet import fleet, submit

pytestmark = pytest.mark.e2e  # every test here starts a process

IMMUTABLE = "public, max-age=31536000, immutable"


def get(manager: ManagerProc, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", manager.http_port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def published(manager: ManagerProc, path: Path) -> str:
    """Publish ``path`` (its .minisig beside it) as rollout and push do; returns the URL path."""
    base = f"http://127.0.0.1:{manager.http_port}"
    ref = publish(path, "app", "9.9.9", packages_dir=manager.packages, base_url=base)
    return ref.url.removeprefix(base)


def test_a_published_package_is_served_by_its_sha256_with_an_immutable_etag_and_304_when_unchanged(
        make_manager, release: Release):
    manager = make_manager()
    pkg = signed(release.build("1.1.0"))
    path = published(manager, pkg.path)
    assert path == f"/by-sha256/{pkg.sha256}/{pkg.path.name}"

    status, headers, body = get(manager, path)
    assert (status, body) == (200, pkg.path.read_bytes())
    assert (headers["ETag"], headers["Cache-Control"]) == (f'"{pkg.sha256}"', IMMUTABLE)
    status, headers, body = get(manager, path, {"If-None-Match": f'"{pkg.sha256}"'})
    assert (status, body, headers["ETag"]) == (304, b"", f'"{pkg.sha256}"')
    status, headers, body = get(manager, path, {"Range": "bytes=10-19"})
    assert (status, body, headers["ETag"]) == (206, pkg.path.read_bytes()[10:20], f'"{pkg.sha256}"')


def test_a_content_address_that_is_not_a_sha256_or_names_other_bytes_is_not_found(make_manager, release):
    manager = make_manager()
    pkg = signed(release.build("1.1.0"))
    published(manager, pkg.path)
    for bad in (f"/by-sha256/{'0' * 64}/{pkg.path.name}", f"/by-sha256/{pkg.sha256[:63]}/{pkg.path.name}",
                f"/by-sha256/{pkg.sha256.upper()}/{pkg.path.name}", f"/by-sha256/../{pkg.sha256}/{pkg.path.name}",
                f"/by-sha256/{pkg.sha256}/../../manager.db", "/by-sha256/"):
        assert get(manager, bad)[0] == 404, bad


def test_downloads_beyond_max_downloads_are_answered_503_with_retry_after_until_a_slot_frees(
        make_manager, tmp_path):
    manager = make_manager(args=("--max-downloads", "1"))
    big = tmp_path / "big.tar.gz"
    big.write_bytes(b"\0" * (32 * 1024 * 1024))  # far more than the socket buffers hold
    big.with_name(big.name + ".minisig").write_text("untrusted comment: not checked by the server\n")
    path = published(manager, big)

    hog = socket.create_connection(("127.0.0.1", manager.http_port), timeout=10)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        hog.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert hog.recv(12) == b"HTTP/1.1 200", "the head arrives; the body then stalls on our full buffer"
        status, headers, _ = get(manager, path)
        assert (status, headers["Retry-After"]) == (503, "1"), "the one slot is taken by the stalled download"
        sha256 = path.split("/")[2]
        assert get(manager, path, {"If-None-Match": f'"{sha256}"'})[0] == 304, \
            "a revalidation sends no body and takes no slot"
    finally:
        hog.close()
    wait_for(lambda: get(manager, path, {"Range": "bytes=0-9"})[0] == 206, 20, interval=0.2,
             what="the slot to be free once the stalled client went away")


def test_a_rollout_records_the_package_bytes_its_nodes_downloaded(make_manager, make_supervisor, release):
    manager = make_manager(args=("--max-downloads", "1"))
    fleet(make_supervisor, release, [manager], {f"node-{i}": {} for i in (1, 2, 3)})
    pkg = signed(release.build("1.1.0"))
    rollout_id = submit(manager, "--all", "--canary", "1", "--batch-size", "2", *package_args(pkg))
    res = manager.cli("rollout", "follow", rollout_id)
    assert "completed: 3 of 3 nodes updated" in res.stdout, res.stdout
    [row] = [r for r in json.loads(manager.cli("rollouts", "--json").stdout) if r["id"] == rollout_id]
    assert row["download_bytes"] == 3 * pkg.size, "each node fetched the package once, whole"


def test_max_downloads_below_one_is_refused_with_one_line(tmp_path):
    res = subprocess.run([PY, "-m", "manager", "serve", "--db", str(tmp_path / "m.db"), "--listen",
                          f"127.0.0.1:{free_port()}", "--insecure-loopback", "--max-downloads", "0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert (res.returncode, res.stderr.strip().splitlines()) == (
        2, ["baton-manager: --max-downloads must be at least 1"])
