"""The versioned on-disk layout of one component.

``<install_root>/<component>/versions/<version>/`` holds each installed version;
``<install_root>/<component>/current`` is a relative symlink to one of them,
switched by a single atomic rename. A version directory counts as installed only
once its marker file exists: the marker is written last and removed first, so
a crash can never leave a half-filled directory that looks complete. The
versions that are not current are the backups.

The current version's directory is never removed or overwritten. Installing
the current version again (a reinstall, ``UpdateRequest.reinstall``) puts the
new copy beside it, in ``versions/<version>..r1`` (or back in
``versions/<version>`` when the current copy is the ``..r1`` one), and the
switch to it is the same atomic rename of ``current``. ``..`` never occurs in a
valid version (:func:`baton.versions.validate_version`), so a directory name
always tells its version: :func:`version_of_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path

from baton import durable

MARKER = ".baton-installed"
REINSTALL_SUFFIX = "..r1"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
# Where a launcher that cannot even import its entry point writes the traceback; the supervisor sets it before
# its exec and the helper before it starts one, then quotes it as the failed update's last_log. Here, not in
# manager/build/release.py, so that the daemon does not import the release builder (and cryptography) for two names.
START_LOG_ENV = "BATON_START_LOG"
START_LOG_NAME = "supervisor-start.log"
# The supervisor's systemd unit: its name, where a checkout keeps it, and where every supervisor version tree
# (a release, or a code-only tree) carries it for install-self to render and doctor to compare with.
SERVICE = "baton-supervisor"  # what systemctl and journalctl -u take
SERVICE_UNIT = f"{SERVICE}.service"
UNIT_IN_CHECKOUT = Path("packaging") / "systemd" / SERVICE_UNIT
UNIT_IN_VERSION = Path("share") / "systemd" / SERVICE_UNIT
# The operator's guides (docs/*.md) as every release carries them, so that an error can name a file on the host.
DOCS_IN_CHECKOUT = Path("docs")
DOCS_IN_VERSION = Path("share") / "doc" / "baton"
# Where a host keeps what the operator installs and configures.
DEFAULT_CONFIG = Path("/etc/baton/supervisor.toml")
SYSTEMD_UNIT_DIR = Path("/etc/systemd/system")  # where install-self writes the unit and doctor looks first
OPERATOR_BIN_DIR = Path("/usr/local/bin")  # the FHS's place for the operator's commands installed locally


def reserved_name_problem(path: str) -> str | None:
    """Why a package path may not be installed, if one of its components is a name this layout uses itself.

    A package member named like the marker would make a half-moved directory
    look installed; ones named like staging or trash directories would be
    swept by the cleanup of those.
    """
    for part in path.split("/"):
        if part == MARKER or part.startswith((STAGING_PREFIX, TRASH_PREFIX)):
            return f"{part!r} is a name Baton reserves for its own bookkeeping"
    return None


def version_of_dir(name: str) -> str:
    """The version a directory under ``versions/`` holds: its name up to a reinstall suffix."""
    return name.split("..", 1)[0]


class ComponentLayout:
    def __init__(self, install_root: Path, component: str) -> None:
        self.root = Path(install_root) / component
        self.component = component

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def current_link(self) -> Path:
        return self.root / "current"

    def version_dir(self, version: str) -> Path:
        """The directory of ``version``: the current one if ``version`` is current, else its newest copy."""
        cur = self.current_dir_name()
        if cur is not None and version_of_dir(cur) == version:
            return self.versions_dir / cur
        copies = [n for n in self.installed_dirs() if version_of_dir(n) == version]
        return self.versions_dir / (copies[0] if copies else version)

    def is_installed(self, version: str) -> bool:
        return self.is_installed_dir(self.version_dir(version).name)

    def is_installed_dir(self, name: str) -> bool:
        return bool(name) and (self.versions_dir / name / MARKER).is_file()

    def current_dir_name(self) -> str | None:
        try:
            target = os.readlink(self.current_link)
        except (FileNotFoundError, OSError):
            return None
        return Path(target).name

    def current_version(self) -> str | None:
        name = self.current_dir_name()
        return None if name is None else version_of_dir(name)

    def current_dir(self) -> Path | None:
        name = self.current_dir_name()
        if name is None or not (self.versions_dir / name).is_dir():
            return None
        return self.versions_dir / name

    def installed_dirs(self) -> list[str]:
        """Names of the installed version directories, most recently installed first."""
        if not self.versions_dir.is_dir():
            return []
        found = [d for d in self.versions_dir.iterdir() if d.is_dir() and (d / MARKER).is_file()]
        found.sort(key=lambda d: (d / MARKER).stat().st_mtime_ns, reverse=True)
        return [d.name for d in found]

    def installed_versions(self) -> list[str]:
        """Installed versions, most recently installed first."""
        return list(dict.fromkeys(version_of_dir(n) for n in self.installed_dirs()))

    def install(self, staged: Path, version: str) -> Path:
        """Move a fully written staging directory into place as ``version``, marker last.

        Never over the current directory: a reinstall of the current version goes
        beside it (any other copy of that version is removed first).
        """
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        cur = self.current_dir_name()
        name = version
        if cur is not None and version_of_dir(cur) == version:
            for d in self.versions_dir.iterdir():
                if d.name != cur and version_of_dir(d.name) == version:
                    self.remove_dir(d.name)
            name = version + REINSTALL_SUFFIX if cur == version else version
        dest = self.versions_dir / name
        if dest.exists():
            self.remove_dir(name)
        os.chmod(staged, 0o755)
        os.replace(staged, dest)
        durable.fsync_dir(self.versions_dir)
        durable.write_bytes(dest / MARKER, f"{version}\n".encode())
        return dest

    def switch(self, version: str) -> None:
        self.switch_dir(self.version_dir(version).name)

    def switch_dir(self, name: str) -> None:
        """Point ``current`` at ``versions/<name>`` (one atomic rename)."""
        if not self.is_installed_dir(name):
            raise RuntimeError(f"{self.component}: version directory {name} is not installed")
        self.root.mkdir(parents=True, exist_ok=True)
        durable.replace_symlink(self.current_link, f"versions/{name}")

    def remove(self, version: str) -> None:
        """Remove the directory :meth:`version_dir` names for ``version``."""
        self.remove_dir(self.version_dir(version).name)

    def remove_dir(self, name: str) -> None:
        """Remove a version directory, marker first, so a crash midway leaves an incomplete (ignored) one.

        Raises:
            RuntimeError: ``name`` is the current directory (a bug in the caller).
        """
        if name == self.current_dir_name():
            raise RuntimeError(f"{self.component}: refusing to remove the current version directory {name}")
        d = self.versions_dir / name
        durable.remove_file(d / MARKER)
        trash = self.versions_dir / f"{TRASH_PREFIX}{name}-{os.getpid()}"
        if d.exists():
            os.replace(d, trash)
            durable.fsync_dir(self.versions_dir)
            durable.remove_tree(trash)

    def remove_incomplete(self) -> list[str]:
        """Delete directories a crash left without their marker (never the current one)."""
        removed: list[str] = []
        if not self.versions_dir.is_dir():
            return removed
        cur = self.current_dir_name()
        for d in self.versions_dir.iterdir():
            if d.name == cur:
                continue
            if d.name.startswith(".") or not (d / MARKER).is_file():
                durable.remove_tree(d)
                removed.append(d.name)
        return removed
