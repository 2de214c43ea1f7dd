"""Self-contained supervisor releases (docs/releases.md).

A release is one directory, ``baton-<version>/``, that becomes
``<install_root>/supervisor/versions/<version>/`` unchanged::

    bin/supervisor, bin/helper, bin/baton-package,  launchers: ``#!<python3> -IS``
    bin/baton-manager
    lib/                                            Baton's packages and every dependency (pip --target)
    share/                                          the systemd unit, the example config, the guides (doc/baton/)
    RELEASE.json                                    the release manifest (version, Python ABI, platform, deps)
    VERSION

The launchers run the system interpreter isolated (``-I``: no PYTHON* variables,
no user site, no script directory; ``-S``: no site-packages), put their own
release's ``lib/`` first on ``sys.path`` (found from the launcher's real path, so
``current/bin/helper`` runs the current release's code) and call the entry point.
Nothing is read from the environment, so ``env -i .../bin/helper`` works.

``build_release`` makes the tarball ``baton-<v>-<python tag>-<platform>.tar.gz``
byte for byte reproducibly: dependencies come from the lock file with
``pip install --require-hashes --no-deps --no-compile``, modes are normalised,
and the tar is written by ``baton-package build`` (sorted, mtime 0, owner 0). What a host does with a release
(its manifest, the compatibility check, unwrapping and compiling it) is in ``baton/release.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from baton.layout import DOCS_IN_CHECKOUT, DOCS_IN_VERSION, START_LOG_ENV, UNIT_IN_CHECKOUT, UNIT_IN_VERSION
from baton.release import (
    ReleaseError,
    ReleaseManifest,
    Target,
    platform_tag,
    python_tag,
    running_target,
)
from baton.versions import validate_version

if TYPE_CHECKING:
    from baton.digest import Digests  # cryptography: not loaded by a supervisor that asks for its dependencies

PACKAGES = ("baton", "supervisor", "helper", "manager")  # the reference Manager too: one artifact for a fleet
ENTRY_POINTS = {
    "supervisor": "supervisor.entry",
    "helper": "helper.cli",
    "baton-package": "manager.build.package_tool",
    "baton-manager": "manager.cli",
}
DEFAULT_PYTHON = "/usr/bin/python3"
CHECKOUT = Path(__file__).resolve().parents[2]  # the checkout this tool runs from: what a release is built of
RUNTIME_LOCK = CHECKOUT / "requirements" / "runtime.lock"  # the pinned dependencies every release bundles
SHARE_SOURCE = "packaging"  # where SHARE_FILES come from in a checkout
SHARE_FILES = {
    str(UNIT_IN_VERSION.relative_to("share")): str(UNIT_IN_CHECKOUT),
    "supervisor.example.toml": f"{SHARE_SOURCE}/supervisor.example.toml",
}
LAUNCHER = '''#!{python} -IS
"""Baton release launcher: run this release's {name} on the system Python, isolated from the environment."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "lib"))


def broken():
    """A broken dependency: say so where the helper that started us will look."""
    import traceback

    text = traceback.format_exc()
    sys.stderr.write(text)
    if os.environ.get("{start_log_env}"):
        try:
            with open(os.environ["{start_log_env}"], "a") as f:
                f.write(text)
        except OSError:
            pass
    sys.exit(1)


try:
    from {module} import main
except BaseException:
    broken()
try:
    status = main()
except ImportError:  # imported on first use (`supervisor run` imports gRPC only then): the same report
    broken()
sys.exit(status)
'''
_TARGET_PROBE = (
    "import sys, sysconfig; "
    "print(sys.implementation.name, sys.version_info[0], sys.version_info[1], sysconfig.get_platform())"
)


def interpreter_target(python: str) -> Target:
    """Ask ``python`` (the launchers' interpreter) what it is, isolated as the launchers run it."""
    try:
        out = subprocess.run([python, "-IS", "-c", _TARGET_PROBE], capture_output=True, text=True, timeout=60,
                             check=True).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise ReleaseError(f"cannot run the launchers' interpreter {python}: {e}") from None
    return Target(python_tag(out[0], int(out[1]), int(out[2])), platform_tag(out[3]))


# --- building ---------------------------------------------------------------------------------------


def release_file_name(version: str, target: Target) -> str:
    return f"baton-{version}-{target.python_tag}-{target.platform}.tar.gz"


def _normalise_modes(root: Path) -> None:
    """0755 for directories and executables, 0644 for the rest: a build does not depend on the umask."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if os.stat(p).st_mode & 0o111 else 0o644)
        for name in dirnames:
            if os.path.islink(os.path.join(dirpath, name)):
                raise ReleaseError(f"{os.path.join(dirpath, name)}: symlinked directory in a release")


def _pip_install(lock: Path, lib: Path) -> None:
    argv = [sys.executable, "-m", "pip", "install", "--require-hashes", "--no-deps", "--no-compile",
            "--only-binary=:all:", "--disable-pip-version-check", "--no-warn-script-location", "--quiet",
            "--target", str(lib), "-r", str(lock)]
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ReleaseError(f"pip could not install {lock}:\n{tail}")


def _bundled(lib: Path) -> tuple[tuple[str, str], ...]:
    import importlib.metadata  # building a release only; the supervisor imports this module too

    deps = []
    for dist in importlib.metadata.distributions(path=[str(lib)]):
        deps.append((str(dist.metadata["Name"]).lower().replace("_", "-"), dist.version))
    return tuple(sorted(deps))


def write_release_tree(root: Path, version: str, *, lock: Path, python: str, source: Path) -> ReleaseManifest:
    """Fill ``root`` (new, empty) with the release tree; returns its manifest."""
    from baton.tree_links import check_links_inside

    validate_version(version)
    # Before pip, so a refused checkout costs nothing: a link out of the tree would pack what it names (a
    # build host's /etc/passwd, a key) into the release; links inside it are copied as links.
    for top in (*PACKAGES, SHARE_SOURCE):
        check_links_inside(source / top)
    here = running_target()
    target = interpreter_target(python)
    if target != here:
        raise ReleaseError(f"pip installs for {here} ({sys.executable}) but the launchers' interpreter {python} "
                           f"is {target}: run baton-package with a {target.python_tag} interpreter or pass --python")
    lib = root / "lib"
    lib.mkdir(parents=True)
    _pip_install(lock, lib)
    shutil.rmtree(lib / "bin", ignore_errors=True)  # console scripts naming the build's interpreter
    for pkg in PACKAGES:
        shutil.copytree(source / pkg, lib / pkg, symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, module in ENTRY_POINTS.items():
        (bin_dir / name).write_text(LAUNCHER.format(python=python, name=name, module=module,
                                                       start_log_env=START_LOG_ENV))
        os.chmod(bin_dir / name, 0o755)
    for dest, src in SHARE_FILES.items():
        (root / "share" / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / src, root / "share" / dest)
    (root / DOCS_IN_VERSION).mkdir(parents=True)
    for doc in sorted((source / DOCS_IN_CHECKOUT).glob("*.md")):  # the guides an error names (baton/docs.py)
        shutil.copyfile(doc, root / DOCS_IN_VERSION / doc.name)
    (root / "VERSION").write_text(version + "\n")
    from baton.digest import digest_stream

    with open(lock, "rb") as f:
        lock_sha256 = digest_stream(f).sha256_hex
    manifest = ReleaseManifest(version=version, target=target, python=python, dependencies=_bundled(lib),
                               lock_sha256=lock_sha256)
    manifest.write(root)
    for cache in list(root.rglob("__pycache__")):
        shutil.rmtree(cache)
    _normalise_modes(root)
    return manifest


def release_destination(output: str | Path, version: str, target: Target, *, force: bool = False) -> Path:
    """Where a release goes: ``output`` itself, or ``baton-V-<tag>-<platform>.tar.gz`` in it when it is a
    directory or ends with ``/`` (created if missing, as ``-o dist/`` reads).

    Raises:
        ReleaseError: the file exists and ``force`` is false (a build never replaces a file silently).
    """
    text = str(output)
    out = Path(text)
    if text.endswith(os.sep) or out.is_dir():
        out.mkdir(parents=True, exist_ok=True)
        out = out / release_file_name(version, target)
    if os.path.lexists(out) and not force:
        raise ReleaseError(f"{out} already exists; use --force to overwrite it")
    return out


def build_release(version: str, output: str | Path, *, lock: Path, python: str = DEFAULT_PYTHON,
                  source: Path | None = None, force: bool = False) -> tuple[Path, ReleaseManifest, Digests]:
    """Build ``baton-<version>-<tag>-<platform>.tar.gz`` (into ``output`` if it names a directory).

    Raises:
        ReleaseError: the interpreter does not match, pip fails, the lock file is missing, or the
            tarball exists and ``force`` is false (checked before anything is built).
    """
    from manager.build.package_tool import build_package

    source = source or CHECKOUT
    if not lock.is_file():
        raise ReleaseError(f"lock file {lock} not found")
    release_destination(output, version, interpreter_target(python), force=force)  # refuse before pip runs
    work = Path(tempfile.mkdtemp(prefix="baton-release-"))
    try:
        root = work / f"baton-{version}"
        manifest = write_release_tree(root, version, lock=lock, python=python, source=source)
        dest = release_destination(output, version, manifest.target, force=force)
        digests = build_package(work, dest, use_gzip=True)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    return dest, manifest, digests
