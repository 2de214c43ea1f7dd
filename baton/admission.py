"""Which update requests may proceed: checked by the supervisor at push time and again by the helper.

The supervisor's check gives the caller a clear gRPC error at once; the helper's
check is the authoritative one (the state may have changed in between).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from baton.config import SUPERVISOR_COMPONENT, Config
from baton.errors import BatonError
from baton.holds import Hold, Holds
from baton.layout import ComponentLayout
from baton.marks import Marks
from baton.versions import compare_versions, validate_version

# gRPC trailing metadata on a refused PushUpdate saying why, for callers that record it (the Manager): "held"
REFUSAL_METADATA_KEY = "baton-refusal"

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


class UpdateRefused(BatonError):
    pass


class UnknownComponent(UpdateRefused):
    def __init__(self, component: str, known: list[str]) -> None:
        super().__init__(f"unknown component {component!r}; updatable: {', '.join(known) or 'none'}")
        self.component = component


class InvalidRequest(UpdateRefused):
    pass


class Downgrade(UpdateRefused):
    def __init__(self, component: str, version: str, highest: str) -> None:
        super().__init__(f"{component} {version} is not newer than {highest}, the highest version committed; "
                         "set allow_downgrade to install it anyway")


class KnownBadVersion(UpdateRefused):
    def __init__(self, component: str, version: str) -> None:
        super().__init__(f"{component} {version} failed before and is not retried automatically; set force to retry")


class Held(UpdateRefused):
    def __init__(self, hold: Hold) -> None:
        super().__init__(f"{hold.describe()}; pushes are refused until `helper unhold {hold.component}`")
        self.hold = hold


def updatable_components(cfg: Config) -> list[str]:
    return [a.name for a in cfg.agents if a.packaged] + [SUPERVISOR_COMPONENT]


def check_request(cfg: Config, *, component: str, version: str, download_url: str, sha256: str, size: int,
                  signature: str, node_id: str, allow_downgrade: bool, force: bool) -> None:
    """Raise an :class:`UpdateRefused` subclass naming the problem, or return."""
    known = updatable_components(cfg)
    if component not in known:
        raise UnknownComponent(component, known)
    hold = Holds(cfg.node.state_dir).get(component)
    if hold is not None:
        raise Held(hold)
    if node_id and node_id != cfg.node.id:
        raise InvalidRequest(f"request is for node {node_id!r}, this is {cfg.node.id!r}")
    try:
        validate_version(version)
    except BatonError as e:
        raise InvalidRequest(str(e)) from None
    scheme = urlsplit(download_url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise InvalidRequest(f"download_url must be http(s):// or file://, got {download_url!r}")
    if not _SHA256.match(sha256):
        raise InvalidRequest("sha256 must be 64 hex digits")
    if size <= 0 or size > cfg.update.max_package_bytes:
        raise InvalidRequest(f"size must be between 1 and max_package_bytes={cfg.update.max_package_bytes}, got {size}")
    if not signature.strip():
        raise InvalidRequest("signature is empty: unsigned packages are never installed")
    marks = Marks(cfg.node.state_dir)
    floor = marks.highest(component) or ComponentLayout(cfg.node.install_root, component).current_version()
    if floor and not allow_downgrade:
        try:
            newer = compare_versions(version, floor) > 0
        except BatonError:
            newer = False
        if not newer:
            raise Downgrade(component, version, floor)
    if not force and version in marks.failed(component):
        raise KnownBadVersion(component, version)
