"""Failures before SWITCHING end in one clean FAILED: no helper crash loop, nothing left behind.

A package signed by the trusted key is still refused when it holds a member named
like Baton's own bookkeeping (the install marker, staging or trash directories),
and a disk error in the helper is a FAILED with cleanup, not five helper crashes.
"""

from __future__ import annotations

import io
import shutil
import tarfile

import pytest

from baton.pb import common_pb2
from tests.conftest import UpdateHost

pytestmark = pytest.mark.e2e  # every test here starts a process

FAILED = common_pb2.UPDATE_STATE_FAILED


def _package_with(host: UpdateHost, member: str):
    """The good 1.1.0 tree plus one extra member, built and signed by the trusted release key."""
    tree = host.release.tree("1.1.0")
    path = host.release.base / "pkgs" / f"reserved-{member.replace('/', '_')}.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tree, arcname=".")
        data = b"1.1.0\n"
        ti = tarfile.TarInfo(member)
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    return host.release.sign(path, "app", "1.1.0")


def _fails_once_and_leaves_nothing(host: UpdateHost, pkg, error_part: str) -> None:
    before, before_disk = host.sup.agent("app"), host.disk()
    uid = host.push(pkg)
    st = host.wait_final(uid, timeout=60)
    assert st.state == FAILED, (st.state, st.error)
    assert error_part in st.error, st.error
    assert host.journal(uid).attempts == 1
    assert "died" not in host.sup.output()
    assert host.disk() == before_disk
    assert not (host.layout.versions_dir / "1.1.0").exists()
    assert [p.name for p in host.layout.versions_dir.iterdir()] == ["1.0.0"]
    after = host.sup.agent("app")
    assert (after.pid, after.restarts, after.version) == (before.pid, before.restarts, before.version)


RESERVED = [".baton-installed", ".staging-x/agent.py", ".trash-1.0.0-1", "bin/.baton-installed"]


@pytest.mark.parametrize("member", RESERVED)
def test_signed_package_with_a_member_named_like_baton_bookkeeping_is_refused(update_host, member):
    _fails_once_and_leaves_nothing(update_host, _package_with(update_host, member), "reserves")


def test_disk_error_before_the_switch_ends_failed_once_with_cleanup(update_host):
    downloads = update_host.sup.state_dir / "downloads"
    shutil.rmtree(downloads, ignore_errors=True)
    downloads.write_text("not a directory\n")
    _fails_once_and_leaves_nothing(update_host, update_host.release.build("1.1.0"), "Error")
