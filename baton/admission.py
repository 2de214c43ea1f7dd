"""Which update requests may proceed: checked by the supervisor at push time and again by the helper.

The supervisor's check gives the caller a clear gRPC error at once; the helper's
check is the authoritative one (the state may have changed in between).
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from baton.config import SUPERVISOR_COMPONENT, Config
from baton.errors import BatonError, clip
from baton.holds import Hold, Holds
from baton.layout import ComponentLayout
from baton.marks import Marks
from baton.signing import MAX_SIGNATURE_FILE_BYTES, parse_signature
from baton.versions import compare_versions, validate_version

# gRPC trailing metadata on a refused PushUpdate saying why, for callers that record it (the Manager): "held"
REFUSAL_METADATA_KEY = "baton-refusal"

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
MAX_URL_CHARS = 8192


class UpdateRefused(BatonError):
    pass


class UnknownComponent(UpdateRefused):
    def __init__(self, component: str, known: list[str]) -> None:
        super().__init__(f"unknown component {clip(component)!r}; updatable: {', '.join(known) or 'none'}")
        self.component = component


class InvalidRequest(UpdateRefused):
    pass


class Downgrade(UpdateRefused):
    def __init__(self, component: str, version: str, highest: str) -> None:
        super().__init__(f"{component} {version} is not newer than {highest}, the highest version committed; "
                         "set allow_downgrade to install it anyway")


class AlreadyInstalled(UpdateRefused):
    def __init__(self, component: str, version: str, current: bool) -> None:
        where = "installed and current" if current else "installed"
        super().__init__(f"{component} {version} is already {where}; its directory is never overwritten: "
                         "set reinstall to install it again into a fresh directory")


class KnownBadVersion(UpdateRefused):
    def __init__(self, component: str, version: str) -> None:
        super().__init__(f"{component} {version} failed before and is not retried automatically; set force to retry")


def file_url_relative_path(url: str, root: Path) -> PurePosixPath | None:
    """The path a ``file://`` URL names relative to ``root``, or None if it is not beneath it.

    Purely lexical: absolute, no ``..``, no NUL, under ``root`` as configured.
    The supervisor checks a push with it; the helper opens the result component
    by component and refuses symlinks and anything but a regular file.
    """
    raw = unquote(urlsplit(url).path)
    if "\0" in raw or not raw.startswith("/"):
        return None
    path = PurePosixPath(raw)
    if ".." in path.parts or not path.is_relative_to(root):
        return None
    rel = path.relative_to(root)
    return rel if rel.parts else None


def _check_file_url(cfg: Config, download_url: str) -> None:
    root = cfg.update.file_url_root
    if root is None:
        raise InvalidRequest("file:// download URLs are disabled on this node (update.file_url_root is not set); "
                             "serve the package over https")
    if file_url_relative_path(download_url, root) is None:
        raise InvalidRequest(f"download_url {clip(download_url)!r} is not a file beneath "
                             f"update.file_url_root {str(root)!r}")


class Held(UpdateRefused):
    def __init__(self, hold: Hold) -> None:
        super().__init__(f"{hold.describe()}; pushes are refused until `helper unhold {hold.component}`")
        self.hold = hold


def updatable_components(cfg: Config) -> list[str]:
    return [a.name for a in cfg.agents if a.packaged] + [SUPERVISOR_COMPONENT]


def check_request(cfg: Config, *, component: str, version: str, download_url: str, sha256: str, size: int,
                  signature: str, node_id: str, allow_downgrade: bool, force: bool, reinstall: bool = False) -> None:
    """Raise an :class:`UpdateRefused` subclass naming the problem, or return.

    Everything is checked before anything is downloaded or journaled; text from
    the caller is echoed clipped (:func:`baton.errors.clip`).
    """
    known = updatable_components(cfg)
    if component not in known:
        raise UnknownComponent(component, known)
    hold = Holds(cfg.node.state_dir).get(component)
    if hold is not None:
        raise Held(hold)
    if node_id and node_id != cfg.node.id:
        raise InvalidRequest(f"request is for node {clip(node_id)!r}, this is {cfg.node.id!r}")
    try:
        validate_version(version)
    except BatonError as e:
        raise InvalidRequest(str(e)) from None
    if len(download_url) > MAX_URL_CHARS:
        raise InvalidRequest(f"download_url is longer than {MAX_URL_CHARS} characters: {clip(download_url)!r}")
    scheme = urlsplit(download_url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise InvalidRequest(f"download_url must be http(s):// or file://, got {clip(download_url)!r}")
    if scheme == "file":
        _check_file_url(cfg, download_url)
    if not _SHA256.match(sha256):
        raise InvalidRequest("sha256 must be 64 hex digits")
    if size <= 0 or size > cfg.update.max_package_bytes:
        raise InvalidRequest(f"size must be between 1 and max_package_bytes={cfg.update.max_package_bytes}, got {size}")
    if not signature.strip():
        raise InvalidRequest("signature is empty: unsigned packages are never installed")
    if len(signature.encode("utf-8", "surrogatepass")) > MAX_SIGNATURE_FILE_BYTES:
        raise InvalidRequest(f"signature is longer than {MAX_SIGNATURE_FILE_BYTES} bytes: not a minisign signature")
    try:
        parse_signature(signature)
    except BatonError as e:
        raise InvalidRequest(f"signature: {e}") from None
    marks = Marks(cfg.node.state_dir)
    layout = ComponentLayout(cfg.node.install_root, component)
    current = layout.current_version()
    if reinstall and component == SUPERVISOR_COMPONENT:
        raise InvalidRequest("reinstall is for agents only; the supervisor is replaced by a newer version")
    floor = marks.highest(component) or current
    if floor and not allow_downgrade and not (reinstall and version == current):
        try:
            newer = compare_versions(version, floor) > 0
        except BatonError:
            newer = False
        if not newer:
            raise Downgrade(component, version, floor)
    if layout.is_installed(version) and not reinstall:
        raise AlreadyInstalled(component, version, current == version)
    if not force and version in marks.failed(component):
        raise KnownBadVersion(component, version)
