"""The versioned on-disk layout of one component.

``<install_root>/<component>/versions/<version>/`` holds each installed version;
``<install_root>/<component>/current`` is a relative symlink to one of them,
switched by a single atomic rename. A version directory counts as installed only
once its marker file exists: the marker is written last and removed first, so
a crash can never leave a half-filled directory that looks complete. The
versions that are not current are the backups.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from baton import durable

MARKER = ".baton-installed"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"


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
        return self.versions_dir / version

    def is_installed(self, version: str) -> bool:
        return (self.version_dir(version) / MARKER).is_file()

    def current_version(self) -> str | None:
        try:
            target = os.readlink(self.current_link)
        except (FileNotFoundError, OSError):
            return None
        return Path(target).name

    def current_dir(self) -> Path | None:
        v = self.current_version()
        if v is None or not self.version_dir(v).is_dir():
            return None
        return self.version_dir(v)

    def installed_versions(self) -> list[str]:
        """Installed versions, most recently installed first."""
        if not self.versions_dir.is_dir():
            return []
        found = [d for d in self.versions_dir.iterdir() if d.is_dir() and (d / MARKER).is_file()]
        found.sort(key=lambda d: (d / MARKER).stat().st_mtime_ns, reverse=True)
        return [d.name for d in found]

    def install(self, staged: Path, version: str) -> Path:
        """Move a fully written staging directory into place as ``version``, marker last."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        dest = self.version_dir(version)
        if dest.exists():
            self.remove(version)
        os.chmod(staged, 0o755)
        os.replace(staged, dest)
        durable.fsync_dir(self.versions_dir)
        durable.write_bytes(dest / MARKER, f"{version}\n".encode())
        return dest

    def switch(self, version: str) -> None:
        if not self.is_installed(version):
            raise RuntimeError(f"{self.component}: version {version} is not installed")
        self.root.mkdir(parents=True, exist_ok=True)
        durable.replace_symlink(self.current_link, f"versions/{version}")

    def remove(self, version: str) -> None:
        """Remove a version: marker first, so a crash midway leaves an incomplete (ignored) directory."""
        d = self.version_dir(version)
        durable.remove_file(d / MARKER)
        trash = self.versions_dir / f"{TRASH_PREFIX}{version}-{os.getpid()}"
        if d.exists():
            os.replace(d, trash)
            durable.fsync_dir(self.versions_dir)
            shutil.rmtree(trash, ignore_errors=True)

    def remove_incomplete(self) -> list[str]:
        """Delete directories a crash left without their marker (never the current one)."""
        removed: list[str] = []
        if not self.versions_dir.is_dir():
            return removed
        cur = self.current_version()
        for d in self.versions_dir.iterdir():
            if d.name == cur:
                continue
            if d.name.startswith(".") or not (d / MARKER).is_file():
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
        return removed
