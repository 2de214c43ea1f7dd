"""The supervisor's own versioned install: ``<install_root>/supervisor/versions/<v>/``.

A version directory is a self-contained release (helper/release.py, docs/releases.md):
``lib/`` with Baton's code and every dependency, launchers in ``bin/`` that run
the system ``python3`` isolated, and ``RELEASE.json``. ``install_release`` lays a
release out from its unpacked tarball and writes the systemd unit.
systemd's ``ExecStart`` and a self-update's exec both go through
``<install_root>/supervisor/current/bin/supervisor``, so switching the link
switches the version.

``write_tree``/``install_self`` still make *development trees* (Baton's code only,
run with ``$BATON_PYTHON``), which the fast tests use; they are not for hosts.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from baton import durable
from baton.config import SUPERVISOR_COMPONENT, Config
from baton.errors import BatonError
from baton.layout import ComponentLayout
from baton.marks import Marks
from baton.versions import compare_versions

PACKAGES = ("baton", "supervisor", "helper")
LAUNCHER = """#!/bin/sh
# Baton supervisor launcher: run this version's code with $BATON_PYTHON (default python3).
here=$(cd "$(dirname "$0")/.." && pwd -P)
export BATON_SUPERVISOR_HOME="$here"
export PYTHONPATH="$here/lib"
cd /
exec "${BATON_PYTHON:-python3}" -P -m supervisor "$@"
"""


def source_root() -> Path:
    return Path(__file__).resolve().parent.parent


def layout(cfg: Config) -> ComponentLayout:
    return ComponentLayout(cfg.node.install_root, SUPERVISOR_COMPONENT)


def launcher(cfg: Config) -> Path:
    return layout(cfg).current_link / "bin" / "supervisor"


def running_from_layout(cfg: Config) -> bool:
    """True when this process runs code from the installed layout, so an exec of ``current`` replaces it."""
    here = Path(__file__).resolve()
    versions = layout(cfg).versions_dir.resolve()
    return versions in here.parents


def write_tree(dest: Path, version: str, source: Path | None = None) -> Path:
    """Write a supervisor version tree (the content of a supervisor update package)."""
    source = source or source_root()
    lib = dest / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES:
        shutil.copytree(source / pkg, lib / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                        dirs_exist_ok=True)
    (dest / "VERSION").write_text(version + "\n")
    unit = source / "packaging" / "systemd" / "baton-supervisor.service"  # a checkout
    if not unit.is_file():
        unit = source.parent / "share" / "baton-supervisor.service"  # an installed version
    if unit.is_file():  # what `supervisor doctor` compares an installed unit with
        (dest / "share").mkdir(exist_ok=True)
        shutil.copy(unit, dest / "share" / unit.name)
    bin_dir = dest / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "supervisor").write_text(LAUNCHER)
    os.chmod(bin_dir / "supervisor", 0o755)
    return dest


def install_self(cfg: Config, version: str, source: Path | None = None) -> Path:
    """Install the running code as ``version`` and make it current (first installation)."""
    lay = layout(cfg)
    lay.versions_dir.mkdir(parents=True, exist_ok=True)
    staging = lay.versions_dir / f".staging-self-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    write_tree(staging, version, source)
    dest = lay.install(staging, version)
    lay.switch(version)
    return dest


def python_for_launcher() -> str:
    return sys.executable


def helper_command() -> list[str]:
    """How this supervisor starts a helper: its own release's ``bin/helper`` (by its real path, not ``current``).

    The running release's helper carries out every update, a self-update included,
    so a broken new release cannot break the helper that must roll it back.
    """
    from helper.release import release_root_of_running_code

    root = release_root_of_running_code()
    if root is not None:
        return [str(root / "bin" / "helper")]
    return [sys.executable, "-m", "helper"]


# --- installing a release ---------------------------------------------------------------------------

DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
UNIT_NAME = "baton-supervisor.service"
UNIT_TEMPLATE = Path("share") / "systemd" / UNIT_NAME


class InstallRefused(BatonError):
    """install-self would overwrite, downgrade or pull the floor from under a running supervisor."""


@dataclass(frozen=True)
class Installed:
    version: str
    path: Path
    unit: Path | None


def render_unit(template: str, install_root: Path, config: Path) -> str:
    """The unit template with this host's install root and config file filled in."""
    return template.replace("@INSTALL_ROOT@", str(install_root)).replace("@CONFIG@", str(config))


def install_release(cfg: Config, release_root: Path, *, force: bool = False,
                    unit_dir: Path | None = DEFAULT_UNIT_DIR) -> Installed:
    """Install the unpacked release at ``release_root`` as a version, make it current, write the unit.

    Raises:
        InstallRefused: the version is installed already, is below the highest committed
            version (without ``force``), or a supervisor is running on this config.
        ReleaseError: not a release, or built for another Python or platform.
    """
    from helper.release import ReleaseError, check_compatible, compile_bytecode, read_manifest
    from helper.self_update import running_supervisor

    manifest = read_manifest(release_root)
    if manifest is None:
        raise ReleaseError(f"{release_root} is not a release (no RELEASE.json); build one with "
                           "`baton-package release`")
    check_compatible(manifest)
    version = manifest.version
    lay = layout(cfg)
    if lay.version_dir(version).exists():
        raise InstallRefused(f"supervisor {version} is already installed at {lay.version_dir(version)}; "
                             "it is never overwritten")
    marks = Marks(cfg.node.state_dir)
    highest = marks.highest(SUPERVISOR_COMPONENT)
    if highest and compare_versions(version, highest) < 0 and not force:
        raise InstallRefused(f"supervisor {version} is below the highest committed version {highest}; "
                             "use --force to install it anyway")
    running, _ = running_supervisor(cfg)
    if running:
        raise InstallRefused(f"supervisor {running} is running on {cfg.run_dir / 'control.sock'}: stop it first, "
                             "or push this release as a self-update")
    if cfg.source is None:
        raise InstallRefused("install-self needs the config file path for the unit's ExecStart")
    lay.versions_dir.mkdir(parents=True, exist_ok=True)
    staging = lay.versions_dir / f".staging-self-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(release_root, staging, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    compile_bytecode(staging)
    dest = lay.install(staging, version)
    lay.switch(version)
    marks.committed(SUPERVISOR_COMPONENT, version)
    unit = None
    if unit_dir is not None:
        template = (release_root / UNIT_TEMPLATE).read_text()
        unit = unit_dir / UNIT_NAME
        unit_dir.mkdir(parents=True, exist_ok=True)
        text = render_unit(template, cfg.node.install_root.resolve(), cfg.source.resolve())
        durable.write_bytes(unit, text.encode(), 0o644)
    return Installed(version, dest, unit)
