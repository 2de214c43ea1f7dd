"""What a host does with a supervisor release (docs/releases.md): read its manifest, refuse one built for
another interpreter or platform, unwrap a staged one and compile its bytecode.

The release tree and how it is built are in ``manager/build/release.py`` (``baton-package release``); this half
is here because both the helper (installing a pushed release) and the operator CLI (``install-self``,
``restart-daemon``) need it, and it keeps the builder's imports (tempfile, shutil, subprocess) out of them.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from baton import durable
from baton.errors import BatonError
from baton.versions import InvalidVersion, parse_version

MANIFEST_NAME = "RELEASE.json"
MANIFEST_FORMAT = 1


class ReleaseError(BatonError):
    """A release cannot be built, read or used; the message says why."""


class IncompatibleRelease(ReleaseError):
    """This host cannot take the release: built for another Python minor version or architecture, or a
    code-only tree pushed to a host that runs releases."""


@dataclass(frozen=True)
class Target:
    """What compiled code in a release is built for: ``cp311`` and ``linux_x86_64``."""

    python_tag: str
    platform: str

    def __str__(self) -> str:
        return f"{self.python_tag}-{self.platform}"


@dataclass(frozen=True)
class ReleaseManifest:
    """``RELEASE.json``: one encoder (``to_json``), one decoder (``from_json``)."""

    version: str
    target: Target
    python: str
    dependencies: tuple[tuple[str, str], ...]
    lock_sha256: str

    def to_json(self) -> dict[str, object]:
        return {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "python_tag": self.target.python_tag,
            "platform": self.target.platform,
            "python": self.python,
            "dependencies": dict(self.dependencies),
            "lock_sha256": self.lock_sha256,
        }

    @classmethod
    def from_json(cls, data: object) -> ReleaseManifest:
        if not isinstance(data, dict):
            raise ReleaseError(f"{MANIFEST_NAME}: not a JSON object")
        if data.get("format") != MANIFEST_FORMAT:
            raise ReleaseError(f"{MANIFEST_NAME}: unsupported format {data.get('format')!r} "
                               f"(this helper reads format {MANIFEST_FORMAT})")
        try:
            deps = data["dependencies"]
            if not isinstance(deps, dict):
                raise TypeError("dependencies")
            version = str(data["version"])
            parse_version(version)  # the package format's rule: the version becomes versions/<version>/
            return cls(
                version=version,
                target=Target(str(data["python_tag"]), str(data["platform"])),
                python=str(data["python"]),
                dependencies=tuple(sorted((str(k), str(v)) for k, v in deps.items())),
                lock_sha256=str(data["lock_sha256"]),
            )
        except (KeyError, TypeError) as e:
            raise ReleaseError(f"{MANIFEST_NAME}: missing or malformed field {e}") from None
        except InvalidVersion as e:
            raise ReleaseError(f"{MANIFEST_NAME}: {e}") from None

    def write(self, root: Path) -> None:
        text = json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"
        (root / MANIFEST_NAME).write_text(text)


def running_target() -> Target:
    """The target of the interpreter running this code."""
    return Target(python_tag(sys.implementation.name, sys.version_info[0], sys.version_info[1]),
                  platform_tag(sysconfig.get_platform()))


def python_tag(impl: str, major: int, minor: int) -> str:
    return f"{'cp' if impl == 'cpython' else impl}{major}{minor}"


def platform_tag(platform: str) -> str:
    return platform.replace("-", "_").replace(".", "_")


def read_manifest(root: Path) -> ReleaseManifest | None:
    """The manifest of the release at ``root``; None for a tree without one (a development tree)."""
    try:
        text = (root / MANIFEST_NAME).read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ReleaseError(f"{MANIFEST_NAME}: not valid JSON: {e}") from None
    return ReleaseManifest.from_json(data)


def check_compatible(manifest: ReleaseManifest, here: Target | None = None) -> None:
    """Refuse a release whose compiled dependencies cannot load on this host.

    Raises:
        IncompatibleRelease: another Python minor version or another platform.
    """
    here = here or running_target()
    if manifest.target != here:
        raise IncompatibleRelease(
            f"release {manifest.version} is built for {manifest.target} but this host runs {here} "
            f"({sys.executable}); build the release on a host like this one")


def release_root_of_running_code() -> Path | None:
    """The release this process runs from (its ``lib/`` holds our packages), or None (a checkout)."""
    root = Path(__file__).resolve().parent.parent.parent
    return root if (root / MANIFEST_NAME).is_file() else None


def prepare_staged(staged: Path, version: str) -> Path:
    """A staged supervisor package: unwrap ``baton-<version>/`` and refuse an incompatible release.

    Runs before the version is installed, so a refused release changes nothing.

    Raises:
        IncompatibleRelease: built for another Python minor version or platform.
        ReleaseError: the manifest is unreadable or names another version, or a helper running
            from a release got a development tree (it would need ``BATON_PYTHON``).
    """
    inner = staged / f"baton-{version}"
    if inner.is_dir() and not inner.is_symlink() and [p.name for p in staged.iterdir()] == [inner.name]:
        lifted = staged.with_name(staged.name + "-release")
        os.replace(inner, lifted)
        os.rmdir(staged)
        os.replace(lifted, staged)
        durable.fsync_dir(staged.parent)
    manifest = read_manifest(staged)
    if manifest is None:
        if release_root_of_running_code() is not None:
            raise IncompatibleRelease(f"supervisor {version} is not a release (no {MANIFEST_NAME}): a host installed "
                                      "from releases takes only releases (`baton-package release`)")
        return staged
    if manifest.version != version:
        raise ReleaseError(f"{MANIFEST_NAME} says version {manifest.version}, the package is {version}")
    check_compatible(manifest)
    compile_bytecode(staged)
    return staged


def compile_bytecode(root: Path) -> None:
    """Write ``lib/``'s bytecode now, before the switch: a release ships none (it would not be reproducible),
    and compiling on first import would put about a second into the self-update's control-plane window."""
    import compileall

    # A file that does not compile is not fatal here: if it matters, the new version fails its import
    # and is rolled back with the error as last_log.
    compileall.compile_dir(str(root / "lib"), quiet=2, workers=1)
