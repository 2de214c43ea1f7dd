"""From a package file to what a push carries: URL, SHA-256, size, signature.

The Manager computes the digest and size itself (one pass, ``baton/digest.py``),
reads the signature from ``FILE.minisig`` beside the file, and copies the file
into its package directory under ``<sha256>/<name>``, named by the URL
``/by-sha256/<sha256>/<name>``: a name is never reused for other bytes, so a node
resuming a download with Range can never splice two files, and caches may keep
it. With ``url`` given the file is not copied and the URL is used as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from baton.digest import digest_stream
from baton.pb import daemon_pb2
from manager.errors import PackageError
from manager.packages import BY_SHA256, copy_into


@dataclass(frozen=True)
class PackageRef:
    """Everything a node needs to fetch and check one package."""

    component: str
    version: str
    url: str
    sha256: str
    size: int  # bytes
    signature: str  # the whole .minisig file

    def request(self, node_id: str, update_id: str, *, force: bool = False, allow_downgrade: bool = False
                ) -> daemon_pb2.UpdateRequest:
        return daemon_pb2.UpdateRequest(node_id=node_id, component=self.component, version=self.version,
                                        download_url=self.url, sha256=self.sha256, size=self.size,
                                        signature=self.signature, update_id=update_id, force=force,
                                        allow_downgrade=allow_downgrade)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PackageRef:
        return cls(**d)


def publish(package: Path, component: str, version: str, *, packages_dir: Path | None = None,
            base_url: str = "", url: str = "") -> PackageRef:
    """Describe ``package`` and, unless ``url`` is given, copy it where the package server serves it.

    Raises:
        PackageError: the file or its ``.minisig`` cannot be read, or there is nowhere to serve it from.
    """
    package = Path(package)
    sig_path = package.with_name(package.name + ".minisig")
    try:
        with open(package, "rb") as f:
            digests = digest_stream(f)
    except OSError as e:
        raise PackageError(f"cannot read package {package}: {e.strerror}") from None
    try:
        signature = sig_path.read_text()
    except OSError as e:
        raise PackageError(f"cannot read the signature {sig_path}: {e.strerror} "
                           "(sign the package with `baton-package sign`)") from None
    if not url:
        if packages_dir is None or not base_url:
            raise PackageError("no package server known: run `baton-manager serve --packages DIR --http HOST:PORT` "
                               "with the same --db, pass --packages and --package-url, or give --url")
        rel = f"{digests.sha256_hex}/{package.name}"
        try:
            dest = Path(packages_dir) / rel
            if not dest.is_file() or dest.stat().st_size != digests.size:
                copy_into(package, dest)
        except OSError as e:
            raise PackageError(f"cannot copy {package} into {packages_dir}: {e.strerror}") from None
        url = f"{base_url.rstrip('/')}{BY_SHA256}{quote(rel)}"
    return PackageRef(component, version, url, digests.sha256_hex, digests.size, signature)
