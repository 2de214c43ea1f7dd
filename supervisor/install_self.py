"""The supervisor's own versioned install: ``<install_root>/supervisor/versions/<v>/``.

A version directory holds ``lib/`` (the baton, supervisor and helper packages),
``VERSION`` and ``bin/supervisor``, a launcher that runs that version's code with
the interpreter in ``$BATON_PYTHON`` (which carries the third-party packages).
systemd's ``ExecStart`` and a self-update's exec both go through
``<install_root>/supervisor/current/bin/supervisor``, so switching the link
switches the version.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from baton.config import SUPERVISOR_COMPONENT, Config
from baton.layout import ComponentLayout

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
