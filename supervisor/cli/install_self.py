"""The supervisor's own versioned install: ``<install_root>/supervisor/versions/<v>/``.

A version directory is a self-contained release (baton/release.py, docs/releases.md):
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

# shutil (with bz2 and lzma, about 0.3 MiB) is imported where trees are copied, as everywhere in the CLI.
import contextlib
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from baton import durable
from baton.config import SUPERVISOR_COMPONENT, Config
from baton.errors import BatonError
from baton.layout import OPERATOR_BIN_DIR, SERVICE, SERVICE_UNIT, SYSTEMD_UNIT_DIR, UNIT_IN_CHECKOUT, UNIT_IN_VERSION
from baton.marks import Marks
from baton.versions import compare_versions
from supervisor.own_layout import layout, source_root

PACKAGES = ("baton", "supervisor", "helper")
LAUNCHER = """#!/bin/sh
# Baton supervisor launcher: run this version's code with $BATON_PYTHON (default python3).
here=$(cd "$(dirname "$0")/.." && pwd -P)
export BATON_SUPERVISOR_HOME="$here"
export PYTHONPATH="$here/lib"
cd /
exec "${BATON_PYTHON:-python3}" -P -m supervisor "$@"
"""


def write_tree(dest: Path, version: str, source: Path | None = None) -> Path:
    """Write a supervisor version tree (the content of a supervisor update package)."""
    import shutil

    source = source or source_root()
    lib = dest / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES:
        shutil.copytree(source / pkg, lib / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                        dirs_exist_ok=True)
    (dest / "VERSION").write_text(version + "\n")
    unit = source / UNIT_IN_CHECKOUT
    if not unit.is_file():
        unit = source.parent / UNIT_IN_VERSION  # an installed version: source is its lib/
    if unit.is_file():  # what `supervisor doctor` compares an installed unit with
        (dest / UNIT_IN_VERSION).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(unit, dest / UNIT_IN_VERSION)
    bin_dir = dest / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "supervisor").write_text(LAUNCHER)
    os.chmod(bin_dir / "supervisor", 0o755)
    return dest


def install_self(cfg: Config, version: str, source: Path | None = None) -> Path:
    """Install the running code as ``version`` and make it current (first installation)."""
    import shutil

    lay = layout(cfg)
    lay.versions_dir.mkdir(parents=True, exist_ok=True)
    staging = lay.versions_dir / f".staging-self-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    write_tree(staging, version, source)
    dest = lay.install(staging, version)
    lay.switch(version)
    return dest


# --- installing a release ---------------------------------------------------------------------------

DEFAULT_UNIT_DIR = SYSTEMD_UNIT_DIR
DEFAULT_BIN_DIR = OPERATOR_BIN_DIR
OPERATOR_COMMANDS = ("supervisor", "helper")  # linked into the bin directory, through `current`


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


def command_links(cfg: Config, bin_dir: Path) -> dict[Path, str]:
    """Each operator command's link in ``bin_dir`` -> its target, through ``current`` so a self-update moves it."""
    current_bin = layout(cfg).current_link.absolute() / "bin"
    return {bin_dir / name: str(current_bin / name) for name in OPERATOR_COMMANDS}


def _ours(link: Path, target: str) -> bool:
    return link.is_symlink() and os.readlink(link) == target


def check_command_links(cfg: Config, bin_dir: Path) -> None:
    """Refuse (before anything is installed) to replace a command in ``bin_dir`` that is not our link."""
    for link, target in command_links(cfg, bin_dir).items():
        if os.path.lexists(link) and not _ours(link, target):
            raise InstallRefused(f"{link} exists and is not a link to {target}: move it away, or install "
                                 "with --bin-dir DIR (or --bin-dir '' for no links)")


def write_command_links(cfg: Config, bin_dir: Path) -> list[Path]:
    """Link each operator command into ``bin_dir`` (each link made beside and renamed into place)."""
    check_command_links(cfg, bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    for link, target in command_links(cfg, bin_dir).items():
        tmp = link.with_name(f".{link.name}.baton-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(target, tmp)
        os.replace(tmp, link)
    durable.fsync_dir(bin_dir)
    return list(command_links(cfg, bin_dir))


def install_release(cfg: Config, release_root: Path, *, force: bool = False,
                    unit_dir: Path | None = DEFAULT_UNIT_DIR) -> Installed:
    """Install the unpacked release at ``release_root`` as a version, make it current, write the unit.

    The copy gets the modes a package's files get (``helper.archive.fix_modes_and_sync``: no setuid, setgid or
    sticky bit, nothing writable by others) and is fsynced before it is renamed into place.

    Raises:
        InstallRefused: the version is installed already, is below the highest committed
            version (without ``force``), or a supervisor is running on this config.
        ReleaseError: not a release, built for another Python or platform, or its RELEASE.json
            names a version that is not a safe directory name.
        LinkOutsideTree: a symbolic link in the release leads out of it.
    """
    import shutil

    from baton.release import ReleaseError, check_compatible, compile_bytecode, read_manifest
    from baton.serving import running_supervisor
    from baton.tree_links import check_links_inside
    from helper.archive import fix_modes_and_sync

    manifest = read_manifest(release_root)
    if manifest is None:
        raise ReleaseError(f"{release_root} is not a release (no RELEASE.json); build one with "
                           "`baton-package release`")
    check_compatible(manifest)
    check_links_inside(release_root)
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
        raise InstallRefused(f"supervisor {running} is running on {cfg.control_socket}: stop it first, "
                             "or push this release as a self-update")
    if cfg.source is None:
        raise InstallRefused("install-self needs the config file path for the unit's ExecStart")
    lay.versions_dir.mkdir(parents=True, exist_ok=True)
    staging = lay.versions_dir / f".staging-self-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    shutil.copytree(release_root, staging, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    compile_bytecode(staging)
    fix_modes_and_sync(staging)
    dest = lay.install(staging, version)
    lay.switch(version)
    marks.committed(SUPERVISOR_COMPONENT, version)
    unit = None
    if unit_dir is not None:
        template = (release_root / UNIT_IN_VERSION).read_text()
        unit = unit_dir / SERVICE_UNIT
        unit_dir.mkdir(parents=True, exist_ok=True)
        text = render_unit(template, cfg.node.install_root.resolve(), cfg.source.resolve())
        durable.write_bytes(unit, text.encode(), 0o644)
    return Installed(version, dest, unit)


# --- enabling the unit (install-self --enable) -------------------------------------------------------

SYSTEMD_BOOTED = Path("/run/systemd/system")  # what sd_booted(3) checks: systemd is this machine's manager
ENABLE_TIMEOUT_S = 60.0
ENABLE_POLL_S = 0.5
ENABLE_PROGRESS_S = 5.0
SYSTEMCTL_TIMEOUT_S = 120.0


class SystemdUnavailable(BatonError):
    """No systemctl, or systemd is not the running manager: nothing was enabled."""


class EnableFailed(BatonError):
    """systemd was asked to enable and start the unit, but it is not running with a supervisor that answers."""


@dataclass(frozen=True)
class Running:
    """What ``install-self --enable`` saw running once the unit was up."""

    unit: str
    version: str
    main_pid: int
    agent_states: tuple[str, ...]  # one per configured agent: "running", "starting", ...


def _systemctl() -> str:
    """systemctl's path, or :class:`SystemdUnavailable` when it is missing or systemd is not running."""
    import shutil

    exe = shutil.which("systemctl")  # with PATH unset (env -i) this searches os.defpath
    if exe is None:
        raise SystemdUnavailable("systemctl is not on PATH")
    if not SYSTEMD_BOOTED.is_dir():
        raise SystemdUnavailable(f"systemd is not running on this machine (no {SYSTEMD_BOOTED})")
    return exe


def _run_systemctl(exe: str, *args: str) -> str:
    try:
        res = subprocess.run([exe, *args], capture_output=True, text=True, timeout=SYSTEMCTL_TIMEOUT_S,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise EnableFailed(f"`systemctl {' '.join(args)}` did not finish in {SYSTEMCTL_TIMEOUT_S:.0f} s") from None
    if res.returncode != 0:
        why = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        raise EnableFailed(f"`systemctl {' '.join(args)}` failed: {why}")
    return res.stdout


def _unit_state(exe: str, unit: str) -> dict[str, str]:
    out = _run_systemctl(exe, "show", unit, "-p", "ActiveState,SubState,Result,MainPID,ExecMainStartTimestampMonotonic")
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def enable_unit(cfg: Config, unit: str = SERVICE_UNIT, timeout: float = ENABLE_TIMEOUT_S,
                progress: Callable[[str], None] = print) -> Running:
    """``systemctl daemon-reload`` and ``enable --now`` the unit, then wait until it runs a supervisor that answers.

    ``--no-block`` so the wait is ours: bounded, with progress lines, and a start that fails
    (``failed``, or ``auto-restart`` under ``Restart=always``) ends it at once instead of at the
    unit's ``TimeoutStartSec``.

    Raises:
        SystemdUnavailable: no systemctl, or systemd is not running here (nothing was asked of systemd).
        EnableFailed: a systemctl call failed, the unit failed to start, or it did not come up in ``timeout``.
    """
    from baton.serving import status_or_none
    from supervisor.cli.ctl import state_name

    exe = _systemctl()
    _run_systemctl(exe, "daemon-reload")
    asked_us = time.monotonic_ns() // 1000  # systemd's *TimestampMonotonic clock
    _run_systemctl(exe, "enable", "--now", "--no-block", unit)
    t0 = time.monotonic()
    next_progress = t0 + ENABLE_PROGRESS_S
    state: dict[str, str] = {}
    while (now := time.monotonic()) - t0 < timeout:
        state = _unit_state(exe, unit)
        active, sub = state.get("ActiveState", ""), state.get("SubState", "")
        ours = int(state.get("ExecMainStartTimestampMonotonic") or 0) >= asked_us  # not a failure from before
        if ours and (active == "failed" or sub == "auto-restart"):
            raise EnableFailed(f"{unit} failed to start ({active}/{sub}, result {state.get('Result', '?')})")
        if active == "active":
            st = status_or_none(cfg.control_socket)
            main_pid = int(state.get("MainPID") or 0)
            if st is not None and st.pid == main_pid:
                return Running(unit, st.supervisor_version, main_pid, tuple(state_name(a.state) for a in st.agents))
        if now >= next_progress:
            progress(f"waiting for {unit}: {active or '?'}/{sub or '?'} ({now - t0:.0f} s of {timeout:.0f} s)")
            next_progress += ENABLE_PROGRESS_S
        time.sleep(ENABLE_POLL_S)
    raise EnableFailed(f"{unit} is not running a supervisor that answers on {cfg.control_socket} after "
                       f"{timeout:.0f} s ({state.get('ActiveState', '?')}/{state.get('SubState', '?')})")


# --- uninstalling (install-self --uninstall) -----------------------------------------------------------


@dataclass(frozen=True)
class Uninstalled:
    removed: tuple[Path, ...]  # what was removed, in order
    kept: tuple[Path, ...]  # state and logs left in place (without purge)


def uninstall(cfg: Config, *, unit_dir: Path = DEFAULT_UNIT_DIR, bin_dir: Path | None = DEFAULT_BIN_DIR,
              purge: bool = False) -> Uninstalled:
    """Remove what install-self added: the unit (stopped and disabled first under systemd), the command links
    that are ours, and the supervisor's versions; with ``purge`` also the state directory, the logs and the
    agents' installed versions.

    Raises:
        InstallRefused: a supervisor still answers on this config and systemd cannot stop it (stop it first).
        EnableFailed: systemd was asked to stop and disable the unit and failed (nothing removed).
    """
    import shutil

    from baton.serving import running_supervisor

    removed: list[Path] = []
    unit = unit_dir / SERVICE_UNIT
    if unit.is_file():
        try:
            exe = _systemctl()
        except SystemdUnavailable:
            exe = ""
        if exe:
            _run_systemctl(exe, "disable", "--now", SERVICE_UNIT)  # stops the supervisor and its agents
    running, _ = running_supervisor(cfg)
    if running:
        raise InstallRefused(f"supervisor {running} is running on {cfg.control_socket}: stop it first "
                             f"(systemctl stop {SERVICE}); nothing was removed")
    if unit.is_file():
        os.unlink(unit)
        durable.fsync_dir(unit_dir)
        removed.append(unit)
        with contextlib.suppress(SystemdUnavailable, EnableFailed):
            _run_systemctl(_systemctl(), "daemon-reload")
    if bin_dir is not None:
        for link, target in command_links(cfg, bin_dir).items():
            if _ours(link, target):  # a command someone else put there stays
                os.unlink(link)
                removed.append(link)
    trees = [layout(cfg).root]
    if purge:
        trees += [cfg.node.install_root, cfg.node.state_dir, cfg.log_dir, cfg.download_dir]
    for tree in trees:
        if len(tree.resolve().parts) < 3:  # "/" or "/opt": a config naming one is not Baton's own directory
            continue
        if tree.is_dir() and not tree.is_symlink():
            shutil.rmtree(tree)
            removed.append(tree)
    kept = () if purge else tuple(p for p in (cfg.node.state_dir, cfg.log_dir) if p.exists())
    return Uninstalled(tuple(removed), kept)
