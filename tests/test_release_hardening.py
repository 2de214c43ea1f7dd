"""What a release may carry and what ``install-self`` makes of it (docs/security.md, round 3).

A symbolic link committed to a checkout used to be followed by ``baton-package release``, packing what it named
on the build host (``/etc/passwd``, a key) into the release. ``install-self`` used RELEASE.json's version as a
directory name unchecked and kept setuid bits. Now the build refuses links that leave the tree, the manifest's
version must be a version as the package format defines it, and an installed release has a package's modes.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import PY, ROOT, SELF_AGENTS, SupervisorProc, snapshot_tree
from tests.release_fixtures import BUILD_TIMEOUT_S, Releases, install_self, unpack

pytestmark = pytest.mark.e2e  # every test here starts a process

# ---- building: fails before pip, so no release is built here ----------------------------------------------


def _checkout(dest: Path) -> Path:
    """What `baton-package release` reads of a checkout, copied so that a test may plant links in it."""
    from manager.build.release import PACKAGES, SHARE_SOURCE

    for top in (*PACKAGES, SHARE_SOURCE, "requirements"):
        shutil.copytree(ROOT / top, dest / top, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _outside(tmp_path: Path) -> str:
    secret = tmp_path / "build-host-secret"
    secret.write_text("not for the release\n")
    return os.path.relpath(secret, tmp_path / "checkout" / "packaging")


@pytest.mark.parametrize(("where", "target"), [
    ("helper/passwd", lambda tmp: "/etc/passwd"),
    ("packaging/notes", _outside),
])
def test_a_symlink_out_of_the_checkout_fails_the_release_naming_it_and_writes_no_tarball(
        tmp_path: Path, where: str, target: Callable[[Path], str]) -> None:
    checkout = _checkout(tmp_path / "checkout")
    link = checkout / where
    link.symlink_to(target(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    temps_before = set(Path("/tmp").glob("baton-release-*"))
    r = subprocess.run([PY, "-m", "manager.build.package_tool", "release", "--version", "1.0.0", "-o", str(out)],
                       capture_output=True, text=True, cwd=checkout, timeout=BUILD_TIMEOUT_S)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(link) in lines[0] and "points outside" in lines[0]
    assert list(out.iterdir()) == []
    assert set(Path("/tmp").glob("baton-release-*")) == temps_before


# ---- installing: an already-built release, edited -----------------------------------------------------------


@pytest.fixture
def host(make_supervisor: Callable[..., SupervisorProc]) -> SupervisorProc:
    """A host with a config and nothing installed yet."""
    sup = make_supervisor(list(SELF_AGENTS), tcp=False)
    sup.write_config()
    return sup


def _unpacked(host: SupervisorProc, releases: Releases, edit: Callable[[Path], None]) -> Path:
    root = unpack(releases.v100, host.base.parent / "unpacked")
    edit(root)
    return root


def _install_self(host: SupervisorProc, root: Path) -> subprocess.CompletedProcess[str]:
    return install_self(root, host.config_path, host.base)


def _world(host: SupervisorProc) -> dict[str, tuple[int, int, str]]:
    """Everything in the test's directory but the unpacked release and the supervisor's own output."""
    return snapshot_tree(host.base.parent, skip=("unpacked", "release"))


@pytest.mark.slow
@pytest.mark.parametrize("version", ["../../x", "1.0/../..", ".hidden", "1.0.0/x"])
def test_install_self_refuses_a_release_json_version_that_is_no_version_and_writes_nothing(
        host: SupervisorProc, releases: Releases, version: str) -> None:
    def bad_version(root: Path) -> None:
        manifest = json.loads((root / "RELEASE.json").read_text())
        manifest["version"] = version
        (root / "RELEASE.json").write_text(json.dumps(manifest))

    root = _unpacked(host, releases, bad_version)
    before = _world(host)
    r = _install_self(host, root)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "RELEASE.json" in lines[0] and repr(version) in lines[0]
    assert _world(host) == before
    assert not (host.base / "install").exists()


@pytest.mark.slow
def test_install_self_refuses_a_release_with_a_symlink_leading_out_of_it_and_writes_nothing(
        host: SupervisorProc, releases: Releases) -> None:
    def planted(root: Path) -> None:
        (root / "lib" / "shadow").symlink_to("/etc/shadow")

    root = _unpacked(host, releases, planted)
    before = _world(host)
    r = _install_self(host, root)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(root / "lib" / "shadow") in lines[0] and "points outside" in lines[0]
    assert _world(host) == before


@pytest.mark.slow
def test_a_release_with_setuid_and_setgid_files_installs_with_the_bits_stripped(
        host: SupervisorProc, releases: Releases) -> None:
    def privileged(root: Path) -> None:
        os.chmod(root / "bin" / "helper", 0o4755)
        (root / "lib" / "sgid-tool").write_text("#!/bin/sh\n")
        os.chmod(root / "lib" / "sgid-tool", 0o2775)
        os.chmod(root / "VERSION", 0o6666)
        os.chmod(root / "share", 0o3777)

    root = _unpacked(host, releases, privileged)
    r = _install_self(host, root)
    assert r.returncode == 0, r.stderr
    installed = host.base / "install" / "supervisor" / "versions" / "1.0.0"

    def mode(rel: str) -> int:
        return stat.S_IMODE((installed / rel).lstat().st_mode)

    assert (mode("bin/helper"), mode("lib/sgid-tool"), mode("VERSION"), mode("share")) == (0o755, 0o755, 0o644,
                                                                                          0o755)
    for dirpath, dirnames, filenames in os.walk(installed):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWGRP | stat.S_IWOTH), \
                os.path.join(dirpath, name)
