"""Attacks on a real update's download, by a hostile package server and by a local user, against real processes.

Each refused attack ends FAILED and changes nothing: the installed version and
the agent's pid are the same, nothing on disk outside the download and journal
areas changed, and the component lock is free for the next push.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from baton.pb import common_pb2, daemon_pb2
from tests.conftest import PY, UpdateHost, install_version, wait_for
from tests.pkgserver import PackageServer, RawServer

pytestmark = pytest.mark.e2e  # every test here starts a process

FAILED = common_pb2.UPDATE_STATE_FAILED
NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else PY
GENEROUS_S = 30.0  # an upper bound for what must end "promptly"; never a speed assertion

# The local attacker: standard library only, run by the system interpreter as `nobody` (a CI clone may be
# unreadable to it). It plants <update id>.pkg holding all but the last byte of the genuine package, keeps its
# descriptor, and once told (the helper has hashed the planted bytes and asked for the rest) overwrites them
# with an unsigned archive.
ATTACKER = r"""
import os, sys
path, genuine, evil = sys.argv[1:4]
prefix = open(genuine, "rb").read()[:-1]
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
os.write(fd, prefix)
print("planted", flush=True)
sys.stdin.readline()
os.pwrite(fd, open(evil, "rb").read(), 0)
os.fsync(fd)
print("rewritten", flush=True)
sys.stdin.readline()
"""


def make_host(make_supervisor: Any, release: Any, **update: Any) -> UpdateHost:
    sup = make_supervisor(
        [{"name": "app", "packaged": True, "command": "bin/agent", "notify": True, "restart": "always",
          "backoff_initial_s": 0.2, "stop_timeout_s": 5.0}],
        extra={"update": {"trusted_keys": [str(release.public_key)], "health_timeout_s": 10.0,
                          "health_window_s": 0.5, "connect_timeout_s": 2.0, "free_space_reserve_bytes": 0,
                          **update}},
    )
    install_version(sup.base / "install", "app", "1.0.0", release.tree("1.0.0"))
    sup.start()
    sup.wait_agent("app", "running")
    return UpdateHost(sup, release)


def assert_nothing_changed(host: UpdateHost, before_disk: dict[str, Any], before_app: Any) -> None:
    after = host.sup.agent("app")
    assert (after.pid, after.version) == (before_app.pid, before_app.version)
    assert host.layout.current_version() == "1.0.0"
    assert host.disk() == before_disk


def later_push_works(host: UpdateHost) -> None:
    """The component lock was released: a genuine update goes through."""
    pkg = host.release.build("1.2.0")
    st = host.wait_final(host.push(pkg))
    assert st.success, st.error
    assert host.sup.agent("app").version == "1.2.0"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory `nobody` may traverse (tmp_path is 0700), removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="baton-h2-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ---- a local user who owns the download directory -------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="an attacker running as another user needs root to start it")
def test_a_package_file_planted_and_rewritten_by_the_download_dir_owner_is_never_installed(
    make_supervisor, release, pkgserver: PackageServer, open_dir: Path
) -> None:
    downloads = open_dir / "downloads"
    downloads.mkdir()
    host = make_host(make_supervisor, release, download_dir=str(downloads), read_timeout_s=10.0)
    # Handed to `nobody` after the start: the helper must hold even if the config check is passed or
    # the directory changes hands later.
    os.chown(downloads, 65534, 65534)

    tree = release.tree("1.1.0")
    (tree / "padding.bin").write_bytes(os.urandom(256 * 1024))  # room for the unsigned archive in the prefix
    genuine = release.build("1.1.0", tree=tree)
    evil_tree = release.tree("1.1.0", behaviour="evil")
    (evil_tree / "PWNED").write_text("unsigned code\n")
    from manager.build.package_tool import build_package

    build_package(evil_tree, open_dir / "evil.tar", False)
    shutil.copy(genuine.path, open_dir / "genuine.pkg")
    for f in ("evil.tar", "genuine.pkg"):
        (open_dir / f).chmod(0o644)
    assert (open_dir / "evil.tar").stat().st_size < genuine.size - 1

    name = genuine.path.name
    (pkgserver.root / name).write_bytes(genuine.path.read_bytes())
    pkgserver.on(name).stall_after(0, 2.0)  # time for the attacker between the helper's hash and its extraction
    update_id = "planted-pkg-attack"
    attacker = subprocess.Popen(
        [*NOBODY, SYSTEM_PYTHON, "-I", "-c", ATTACKER, str(downloads / f"{update_id}.pkg"),
         str(open_dir / "genuine.pkg"), str(open_dir / "evil.tar")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/",
    )
    host.sup.reaper.track(attacker.pid)
    try:
        assert attacker.stdout is not None and attacker.stdin is not None
        assert attacker.stdout.readline().strip() == "planted"
        before_disk, before_app = host.disk(), host.sup.agent("app")
        host.push(genuine, download_url=pkgserver.url(name), update_id=update_id)

        def helper_asked_for_the_rest() -> bool:
            st = host.sup.stub.GetUpdate(daemon_pb2.UpdateRef(update_id=update_id), timeout=5)
            return bool(pkgserver.requests_for(name)) or st.finished

        wait_for(helper_asked_for_the_rest, GENEROUS_S, what="the helper to ask for the package")
        if pkgserver.requests_for(name):
            attacker.stdin.write("go\n")
            attacker.stdin.flush()
            assert attacker.stdout.readline().strip() == "rewritten"
        st = host.wait_final(update_id, timeout=GENEROUS_S)
    finally:
        attacker.kill()
        attacker.wait(10)

    assert not list(host.install_root.rglob("PWNED")), "the unsigned archive was installed"
    assert st.state == FAILED, (st.state, st.error)
    assert "UntrustedDownloadFile" in st.error and "owned by uid 65534" in st.error, st.error
    assert common_pb2.FailureReason.Name(st.reason) == "DOWNLOAD_FILE_UNTRUSTED"
    assert_nothing_changed(host, before_disk, before_app)
    later_push_works(host)


# ---- a hostile package server -----------------------------------------------------------------------------------


def test_a_dripped_response_head_fails_the_update_at_the_download_deadline_and_frees_the_lock(
    make_supervisor, release
) -> None:
    host = make_host(make_supervisor, release, download_timeout_s=2.0, read_timeout_s=5.0)
    pkg = release.build("1.1.0")
    before_disk, before_app = host.disk(), host.sup.agent("app")
    head = b"HTTP/1.1 200 OK\r\nX-Drip: " + b"a" * 100_000 + b"\r\n\r\n"  # a byte per 0.2 s: hours
    with RawServer(head, drip_s=0.2) as raw:
        started = time.monotonic()
        st = host.wait_final(host.push(pkg, download_url=raw.url(pkg.path.name)), timeout=GENEROUS_S)
        assert time.monotonic() - started < GENEROUS_S
    assert st.state == FAILED, (st.state, st.error)
    assert "DownloadTimeout" in st.error and "whole download" in st.error, st.error
    assert_nothing_changed(host, before_disk, before_app)
    later_push_works(host)


@pytest.mark.parametrize(("answer", "said"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Length: 20\r\n\r\n" + b"x" * 20, "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (2 * 1024 * 1024) + b"\r\n\r\n", "response head longer than"),
    (b"HTTP/1.1 TWO-HUNDRED " + b"A" * 50_000 + b"\r\n\r\n", "status line"),
], ids=["two-content-lengths", "2-MiB-head", "malformed-status-line"])
def test_a_protocol_violation_by_the_package_server_is_reported_as_such(
    make_supervisor, release, answer: bytes, said: str
) -> None:
    host = make_host(make_supervisor, release)
    pkg = release.build("1.1.0")
    before_disk, before_app = host.disk(), host.sup.agent("app")
    with RawServer(answer) as raw:
        st = host.wait_final(host.push(pkg, download_url=raw.url(pkg.path.name)), timeout=GENEROUS_S)
    assert st.state == FAILED
    assert "ProtocolViolation" in st.error and said in st.error, st.error
    assert "cannot connect" not in st.error
    assert len(st.error) < 1000
    assert_nothing_changed(host, before_disk, before_app)


# ---- file:// URLs -----------------------------------------------------------------------------------------------


def test_file_urls_are_refused_at_push_when_file_url_root_is_not_set(make_supervisor, release) -> None:
    host = make_host(make_supervisor, release)
    host.sup.cfg["update"].pop("file_url_root")
    host.sup.terminate()
    host.sup.start()
    host.sup.wait_agent("app", "running")
    pkg = release.build("1.1.0")
    before_disk, before_app = host.disk(), host.sup.agent("app")
    with pytest.raises(grpc.RpcError) as e:
        host.sup.stub.PushUpdate(pkg.request(), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # InvalidRequest, as every refused push
    assert "update.file_url_root is not set" in (e.value.details() or "")
    assert_nothing_changed(host, before_disk, before_app)


def test_file_url_outside_the_root_is_refused_at_push_without_revealing_anything(make_supervisor, release) -> None:
    host = make_host(make_supervisor, release)
    with pytest.raises(grpc.RpcError) as e:
        host.sup.stub.PushUpdate(release.build("1.1.0").request(download_url="file:///etc/shadow", size=1),
                                 timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # InvalidRequest, as every refused push
    assert "not a file beneath update.file_url_root" in (e.value.details() or "")
    assert str(os.stat("/etc/shadow").st_size) not in (e.value.details() or "")


def test_a_symlink_beneath_the_file_root_to_etc_shadow_fails_without_revealing_its_size(
    make_supervisor, release
) -> None:
    host = make_host(make_supervisor, release)
    pkg = release.build("1.1.0")
    link = pkg.path.with_name("shadow.tar.gz")
    link.symlink_to("/etc/shadow")
    before_disk, before_app = host.disk(), host.sup.agent("app")
    st = host.wait_final(host.push(pkg, download_url=link.as_uri()), timeout=GENEROUS_S)
    assert st.state == FAILED
    assert "symbolic link" in st.error, st.error
    assert str(os.stat("/etc/shadow").st_size) not in st.error.replace(str(pkg.size), "")
    assert_nothing_changed(host, before_disk, before_app)


def test_a_fifo_beneath_the_file_root_fails_without_blocking(make_supervisor, release) -> None:
    host = make_host(make_supervisor, release)
    pkg = release.build("1.1.0")
    fifo = pkg.path.with_name("pipe.tar.gz")
    os.mkfifo(fifo)
    before_disk, before_app = host.disk(), host.sup.agent("app")
    st = host.wait_final(host.push(pkg, download_url=fifo.as_uri()), timeout=GENEROUS_S)
    assert st.state == FAILED
    assert "not a regular file" in st.error, st.error
    assert_nothing_changed(host, before_disk, before_app)
    later_push_works(host)
