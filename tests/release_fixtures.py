"""Session-scoped supervisor releases for the tests (docs/releases.md): built once, shared by every module.

Building a release runs pip over the whole lock file, so the suite builds two (1.0.0 from
requirements/runtime.lock, 1.1.0 with prometheus-client at another version) and derives the broken and
foreign ones from 1.0.0's tree. Tests that use them are marked ``slow`` (still run in CI).

Under pytest-xdist the workers share one build: the first to take the lock beside the run's base directory
builds, the others wait and use it (a build costs minutes on 2 cores; one per worker would cost as many).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PY, ROOT

LOCK = ROOT / "requirements" / "runtime.lock"
# A pure-Python dependency at another pinned version than runtime.lock's (from pip's configured index).
ALT_DEP = ("prometheus-client", "0.25.0", "d5aec89e349a6ec230805d0df882f3807f74fd6c1a2fa86864e3c2279059fed1")
BUILD_TIMEOUT_S = 600


def package_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "manager.build.package_tool", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=BUILD_TIMEOUT_S)


def alt_lock(dest: Path) -> Path:
    """runtime.lock with ALT_DEP pinned to another version: the second release's only dependency change."""
    text = LOCK.read_text()
    name, version, digest = ALT_DEP
    new, n = re.subn(rf"^{re.escape(name)}==\S+ \\\n(?:    --hash=sha256:[0-9a-f]+(?: \\)?\n)+",
                     f"{name}=={version} \\\n    --hash=sha256:{digest}\n", text, flags=re.M)
    assert n == 1, f"runtime.lock has no {name} entry to replace"
    dest.write_text(new)
    return dest


@dataclass(frozen=True)
class Releases:
    """The tarballs of the session: 1.0.0 (the lock), 1.1.0 (prometheus-client differs), derived broken/foreign ones."""

    dir: Path
    v100: Path
    v110: Path

    def derived(self, version: str, edit: Callable[[Path], None]) -> Path:
        """1.0.0's tree as ``version``, changed by ``edit``, packed like a release (not rebuilt)."""
        out = self.dir / f"derived-{version}-{edit.__name__}.tar.gz"
        with locked(self.dir / "derived.lock"):  # another worker may be deriving the same one
            if not out.exists():
                self._derive(version, edit, out)
        return out

    def _derive(self, version: str, edit: Callable[[Path], None], out: Path) -> None:
        from baton.release import read_manifest
        from manager.build.package_tool import build_package

        work = self.dir / f"derived-{version}-{edit.__name__}"
        shutil.rmtree(work, ignore_errors=True)  # what a failed attempt left
        with tarfile.open(self.v100) as tar:
            tar.extractall(work, filter="tar")
        root = work / f"baton-{version}"
        (work / "baton-1.0.0").rename(root)
        (root / "VERSION").write_text(version + "\n")
        manifest = read_manifest(root)
        assert manifest is not None
        data = manifest.to_json()
        data["version"] = version
        (root / "RELEASE.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        edit(root)
        build_package(work, out, True)  # atomic: whole or absent


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created), held across processes: the pytest-xdist workers."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory all of this run's workers see: the base temp directory, or under pytest-xdist its parent
    (each worker's base is a ``popen-gwN`` in it), as pytest-xdist's docs recommend for session fixtures."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    shared = run_shared_dir(tmp_path_factory)
    d = shared / "releases"
    built = d / "built"
    with locked(shared / "releases.lock"):
        if not built.exists():
            d.mkdir(exist_ok=True)
            r = package_cli("release", "--version", "1.0.0", "-o", d)
            assert r.returncode == 0, r.stderr
            r = package_cli("release", "--version", "1.1.0", "--lock", alt_lock(d / "alt.lock"), "-o",
                             d / "baton-1.1.0.tar.gz")
            assert r.returncode == 0, r.stderr
            built.touch()
    return Releases(d, d / "baton-1.0.0-cp311-linux_x86_64.tar.gz", d / "baton-1.1.0.tar.gz")


def unpack(tarball: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(dest)], check=True)
    (root,) = dest.iterdir()
    return root


def envi(*argv: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run with an empty environment from ``/``, as a new host's root shell or a unit would."""
    return subprocess.run(["env", "-i", *map(str, argv)], capture_output=True, text=True, cwd="/", timeout=timeout)


def install_self(launcher_root: Path, config: Path, base: Path, *extra: str | Path) -> subprocess.CompletedProcess[str]:
    """``<release>/bin/supervisor install-self`` with the unit and the command links kept in ``base`` (a test
    never writes to the machine's /etc/systemd/system or /usr/local/bin)."""
    return envi(launcher_root / "bin" / "supervisor", "install-self", "--config", config, "--unit-dir", base / "units",
                "--bin-dir", base / "bin", *extra)
