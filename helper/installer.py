"""The disk side of an update: download, verify, stage, switch, prune.

Everything here works on files only; talking to running processes is
``control.py``'s job and sequencing is ``machine.py``'s.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from baton.config import SUPERVISOR_COMPONENT, Config
from baton.errors import BatonError
from baton.journal import UpdateRecord
from baton.layout import STAGING_PREFIX, ComponentLayout, version_of_dir
from baton.signing import PublicKey, TrustedKeyError, load_trusted_keys
from baton.strict_modes import UnsafePath, check_trusted, trusted_key_files
from helper.archive import ExtractLimits, extract_package
from helper.download import DownloadedFile, DownloadLimits, DownloadProgress, FileIdentity
from helper.ports import Fetcher
from helper.verify import VerifiedPackage, verify_package


class VerifyTimeout(BatonError):
    def __init__(self, limit_s: float) -> None:
        super().__init__(f"verification did not finish within verify_timeout_s={limit_s:g}s")


def configured_trusted_keys(cfg: Config) -> tuple[PublicKey, ...]:
    """``update.trusted_keys``, failing closed: no key, a key that cannot be read, or one another user could
    have replaced (``baton/strict_modes.py``, checked before a byte of it is read) is a TrustedKeyError."""
    for item in trusted_key_files(cfg):
        try:
            check_trusted(item)
        except UnsafePath as e:
            raise TrustedKeyError(item.path, f"{e.problem} ({item.key})") from None
    return load_trusted_keys(cfg.update.trusted_keys)


class Installer:
    def __init__(self, cfg: Config, component: str, fetcher: Fetcher) -> None:
        """``fetcher`` brings the package's bytes (``helper.download.download``, wired in helper/wiring.py)."""
        self.cfg = cfg
        self.layout = ComponentLayout(cfg.node.install_root, component)
        self.fetch = fetcher

    def package_path(self, update_id: str) -> Path:
        return self.cfg.download_dir / f"{update_id}.pkg"

    def trusted_keys(self) -> tuple[PublicKey, ...]:
        return configured_trusted_keys(self.cfg)

    def download(self, rec: UpdateRecord, progress: Callable[[DownloadProgress], None],
                 created: Callable[[FileIdentity], None]) -> DownloadedFile:
        """Fetch into the helper's own file; resume only the one the journal recorded (``created`` records it)."""
        self.cfg.download_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        owned = FileIdentity(*rec.download_file) if rec.download_file else None
        return self.fetch(rec.request.download_url, self.package_path(rec.update_id),
                        expected_size=rec.request.size, limits=DownloadLimits.from_config(self.cfg.update),
                        progress=progress, owned=owned, created=created)

    def verify(self, dl: DownloadedFile, rec: UpdateRecord, keys: tuple[PublicKey, ...]) -> VerifiedPackage:
        req = rec.request
        with ThreadPoolExecutor(max_workers=1) as pool:
            fut = pool.submit(
                verify_package, dl.digests, expected_sha256=req.sha256, expected_size=req.size,
                signature_text=req.signature, trusted_keys=keys, component=req.component, version=req.version,
                node_id=self.cfg.node.id, now=time.time(),
            )
            try:
                return fut.result(timeout=self.cfg.update.verify_timeout_s)
            except FutureTimeout:
                raise VerifyTimeout(self.cfg.update.verify_timeout_s) from None

    def stage(self, dl: DownloadedFile, version: str) -> Path:
        """Extract the verified bytes into a fresh private directory, then move it into place."""
        u = self.cfg.update
        self.layout.versions_dir.mkdir(parents=True, exist_ok=True)
        staged = extract_package(dl.file, self.layout.versions_dir, ExtractLimits.from_config(u))
        if self.layout.component == SUPERVISOR_COMPONENT:
            from baton.release import prepare_staged  # a release's machinery: not loaded for an agent update

            staged = prepare_staged(staged, version)  # a release for another Python or platform stops here
        return self.layout.install(staged, version)

    def discard_download(self, update_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.package_path(update_id).unlink()

    def discard_version(self, version: str) -> None:
        """Remove every copy of ``version`` but the current directory (a failed reinstall's new copy included)."""
        if not version or not self.layout.versions_dir.is_dir():
            return
        current = self.layout.current_dir_name()
        for d in self.layout.versions_dir.iterdir():
            if d.name != current and not d.name.startswith(".") and version_of_dir(d.name) == version:
                self.layout.remove_dir(d.name)

    def prune(self, keep: int) -> list[str]:
        """Keep the current directory and the ``keep`` most recently installed other versions.

        Another copy of the current version (the one a reinstall replaced) is no backup: it goes.
        """
        self.layout.remove_incomplete()
        current, current_version = self.layout.current_dir_name(), self.layout.current_version()
        others = [n for n in self.layout.installed_dirs() if n != current]
        removed = [n for n in others if version_of_dir(n) == current_version]
        removed += [n for n in others if version_of_dir(n) != current_version][keep:]
        for n in removed:
            self.layout.remove_dir(n)
        return removed

    def remove_staging_leftovers(self) -> None:
        if self.layout.versions_dir.is_dir():
            for d in self.layout.versions_dir.glob(f"{STAGING_PREFIX}*"):
                shutil.rmtree(d, ignore_errors=True)
