"""Stable failure reasons: why an update ended other than committed, defined once.

The values are the names of the contract's ``FailureReason`` enum (proto/baton/pb/common.proto), so the
journal, ``UpdateStatus``, ``UpdateResult`` and the Manager's ``updates.reason`` column all carry the same
word; docs/troubleshooting.md has one section per code (``TROUBLESHOOTING``). The exception classes are
named here by ``module.Class`` rather than imported, so ``baton`` keeps not depending on ``helper``.
"""

from __future__ import annotations

import errno
import string
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from baton.docs import guide
from baton.errors import MAX_QUOTED_CHARS, clip

OUTPUT_LINES = 5  # of a failed version's output quoted in the error a person reads
OUTPUT_QUOTE = "; its last output: "  # what precedes that quote in the error
OUTPUT_WITHHELD = "; its last output is shown to the callers allowed to operate it"


class FailureReason(StrEnum):
    UNSPECIFIED = "FAILURE_REASON_UNSPECIFIED"
    DOWNLOAD_UNREACHABLE = "DOWNLOAD_UNREACHABLE"
    DOWNLOAD_TOO_SLOW = "DOWNLOAD_TOO_SLOW"
    DOWNLOAD_TIMEOUT = "DOWNLOAD_TIMEOUT"
    DOWNLOAD_PROTOCOL = "DOWNLOAD_PROTOCOL"
    DISK_FULL = "DISK_FULL"
    DOWNLOAD_FILE_UNTRUSTED = "DOWNLOAD_FILE_UNTRUSTED"
    SIGNATURE_UNTRUSTED_KEY = "SIGNATURE_UNTRUSTED_KEY"
    SIGNATURE_INVALID = "SIGNATURE_INVALID"
    SIGNATURE_MANIFEST_MISMATCH = "SIGNATURE_MANIFEST_MISMATCH"
    SIGNATURE_EXPIRED = "SIGNATURE_EXPIRED"
    HASH_MISMATCH = "HASH_MISMATCH"
    SIZE_MISMATCH = "SIZE_MISMATCH"
    UNSAFE_ARCHIVE = "UNSAFE_ARCHIVE"
    INSTALL_FAILED = "INSTALL_FAILED"
    NEW_VERSION_EXITED = "NEW_VERSION_EXITED"
    NEW_VERSION_NOT_READY = "NEW_VERSION_NOT_READY"
    HANDSHAKE_TIMEOUT = "HANDSHAKE_TIMEOUT"
    HANDSHAKE_REFUSED = "HANDSHAKE_REFUSED"
    ROLLBACK_FAILED = "ROLLBACK_FAILED"
    CANCELLED = "CANCELLED"
    HELPER_CRASHED = "HELPER_CRASHED"
    INCOMPATIBLE_RELEASE = "INCOMPATIBLE_RELEASE"
    SUPERVISOR_UNAVAILABLE = "SUPERVISOR_UNAVAILABLE"
    TRUSTED_KEYS_BROKEN = "TRUSTED_KEYS_BROKEN"
    INTERNAL = "INTERNAL"

    @classmethod
    def parse(cls, value: str) -> FailureReason:
        """The reason named ``value``; an unknown or empty name (a newer or older writer) is UNSPECIFIED."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNSPECIFIED

    @property
    def anchor(self) -> str:
        """This reason's section in docs/troubleshooting.md."""
        return TROUBLESHOOTING[self]


R = FailureReason

# The exception classes an update can end with, most specific first; ``classify`` walks the MRO.
BY_EXCEPTION: dict[str, FailureReason] = {
    "helper.download.errors.ConnectionFailed": R.DOWNLOAD_UNREACHABLE,
    "helper.download.errors.HttpStatusError": R.DOWNLOAD_UNREACHABLE,
    "helper.download.errors.UnsupportedUrl": R.DOWNLOAD_UNREACHABLE,
    "helper.download.errors.DownloadTimeout": R.DOWNLOAD_TIMEOUT,
    "helper.download.errors.DownloadTooSlow": R.DOWNLOAD_TOO_SLOW,
    "helper.download.errors.ProtocolViolation": R.DOWNLOAD_PROTOCOL,
    "helper.download.errors.UnexpectedResponse": R.DOWNLOAD_PROTOCOL,
    "helper.download.errors.DownloadTooLarge": R.DOWNLOAD_PROTOCOL,
    "helper.download.errors.DownloadTruncated": R.DOWNLOAD_PROTOCOL,
    "helper.download.errors.InsufficientSpace": R.DISK_FULL,
    "helper.download.errors.UntrustedDownloadFile": R.DOWNLOAD_FILE_UNTRUSTED,
    "helper.download.errors.DownloadError": R.DOWNLOAD_UNREACHABLE,
    "baton.signing.UntrustedKey": R.SIGNATURE_UNTRUSTED_KEY,
    "baton.signing.BadSignature": R.SIGNATURE_INVALID,
    "baton.signing.SignatureFormatError": R.SIGNATURE_INVALID,
    "baton.signing.PackageExpired": R.SIGNATURE_EXPIRED,
    "baton.signing.ManifestError": R.SIGNATURE_MANIFEST_MISMATCH,
    "baton.signing.ManifestRejected": R.SIGNATURE_MANIFEST_MISMATCH,
    "baton.signing.TrustedKeyError": R.TRUSTED_KEYS_BROKEN,
    "baton.signing.NoTrustedKeys": R.TRUSTED_KEYS_BROKEN,
    "baton.signing.KeyFormatError": R.TRUSTED_KEYS_BROKEN,
    "baton.signing.SignatureError": R.SIGNATURE_INVALID,
    "helper.verify.HashMismatch": R.HASH_MISMATCH,
    "helper.verify.SizeMismatch": R.SIZE_MISMATCH,
    "helper.verify.UnreadableFile": R.INSTALL_FAILED,
    "helper.archive.UnsafeArchive": R.UNSAFE_ARCHIVE,
    "helper.archive.ArchiveTooLarge": R.UNSAFE_ARCHIVE,
    "helper.archive.ArchiveError": R.UNSAFE_ARCHIVE,
    "helper.installer.VerifyTimeout": R.INSTALL_FAILED,
    "helper.control_errors.SupervisorUnavailable": R.SUPERVISOR_UNAVAILABLE,
    "helper.control_errors.HealthCheckFailed": R.NEW_VERSION_NOT_READY,
    "helper.recovery.RollbackError": R.ROLLBACK_FAILED,
    "helper.machine.UpdateCancelled": R.CANCELLED,
    "helper.self_update.SupervisorDied": R.HANDSHAKE_REFUSED,
    "helper.self_update.Unhealthy": R.NEW_VERSION_NOT_READY,
    "baton.handover.HandshakeTimeout": R.HANDSHAKE_TIMEOUT,
    "baton.handover.HandoverRefused": R.HANDSHAKE_REFUSED,
    "baton.handover.PeerGone": R.HANDSHAKE_REFUSED,
    "baton.handover.ProtocolError": R.HANDSHAKE_REFUSED,
    "baton.handover.HandoverError": R.HANDSHAKE_REFUSED,
    "baton.admission.UpdateRefused": R.INCOMPATIBLE_RELEASE,
    "baton.release.IncompatibleRelease": R.INCOMPATIBLE_RELEASE,
    "baton.release.ReleaseError": R.INSTALL_FAILED,
    "baton.versions.InvalidVersion": R.INCOMPATIBLE_RELEASE,
}

# Per reason, the next step a person takes; ``{name}`` fields come from the exception (``facts``).
NEXT_STEP: dict[FailureReason, str] = {
    R.UNSPECIFIED: "",
    R.DOWNLOAD_UNREACHABLE: "check that {url} is right and reachable from this node (network policy, proxy, "
                            "the package server's log)",
    R.DOWNLOAD_TOO_SLOW: "check the network path to the package server (or lower update.min_rate_bytes_per_s "
                         "for a known slow link)",
    R.DOWNLOAD_TIMEOUT: "check that the package server answers; it stalled (raise update.read_timeout_s or "
                        "update.download_timeout_s only for a known slow link)",
    R.DOWNLOAD_PROTOCOL: "check the package server or a proxy in between: it did not serve the package as pushed",
    R.DISK_FULL: "free space in {path} (update.download_dir) and the install filesystem, then push again",
    R.DOWNLOAD_FILE_UNTRUSTED: "check who else writes to update.download_dir; it must be root-owned and not "
                               "writable by others",
    R.SIGNATURE_UNTRUSTED_KEY: "check that update.trusted_keys holds the key the package should be signed with "
                               "(it holds key ids {trusted_ids}); this signature was made with key id {key_id}: "
                               "re-sign with a trusted key, or add key {key_id} if you trust it",
    R.SIGNATURE_INVALID: "re-sign the package with `baton-package sign` and publish it again; it was altered or "
                         "the signature is not the one for this file",
    R.SIGNATURE_MANIFEST_MISMATCH: "push the component and version the package was signed for, or re-sign it",
    R.SIGNATURE_EXPIRED: "re-sign the package and publish it again",
    R.HASH_MISMATCH: "check that the pushed sha256 is the published one and that the server serves that file",
    R.SIZE_MISMATCH: "check that the pushed size is the published one and that the server serves that file",
    R.UNSAFE_ARCHIVE: "rebuild the package with `baton-package build`; this archive is unsafe to unpack",
    R.INSTALL_FAILED: "check the install directory's owner, mode and free space, and the helper's log",
    R.NEW_VERSION_EXITED: "fix the new version (its output is quoted here; the full log is the agent's log), "
                          "then push again",
    R.NEW_VERSION_NOT_READY: "check that the new version signals READY (sd_notify) within update.health_timeout_s "
                             "and that its command, arguments and working directory are right",
    R.HANDSHAKE_TIMEOUT: "check the new supervisor's log: it did not complete the handover in time",
    R.HANDSHAKE_REFUSED: "check the new supervisor's log: it refused or broke the handover",
    R.ROLLBACK_FAILED: "recover by hand: `helper --rollback COMPONENT`, check the backup and the old version's log",
    R.CANCELLED: "push again when ready",
    R.HELPER_CRASHED: "read the helper's log for the crash; the update was given up after repeated attempts",
    R.INCOMPATIBLE_RELEASE: "push a version this node accepts (allow_downgrade/force when meant)",
    R.SUPERVISOR_UNAVAILABLE: "check that the supervisor runs and answers on its socket (`supervisor doctor`)",
    R.TRUSTED_KEYS_BROKEN: "fix the files in update.trusted_keys (`supervisor doctor` shows each key's id)",
    R.INTERNAL: "read the helper's log",
}

TROUBLESHOOTING: dict[FailureReason, str] = {
    R.UNSPECIFIED: "failure-kinds",
    R.DOWNLOAD_UNREACHABLE: "failure-download-failed",
    R.DOWNLOAD_TOO_SLOW: "failure-download-failed",
    R.DOWNLOAD_TIMEOUT: "failure-download-failed",
    R.DOWNLOAD_PROTOCOL: "failure-download-failed",
    R.DOWNLOAD_FILE_UNTRUSTED: "failure-download-failed",
    R.DISK_FULL: "failure-disk-full",
    R.SIGNATURE_UNTRUSTED_KEY: "failure-signature-failed",
    R.SIGNATURE_INVALID: "failure-signature-failed",
    R.SIGNATURE_MANIFEST_MISMATCH: "failure-signature-failed",
    R.SIGNATURE_EXPIRED: "failure-signature-failed",
    R.TRUSTED_KEYS_BROKEN: "failure-signature-failed",
    R.HASH_MISMATCH: "failure-hash-mismatch",
    R.SIZE_MISMATCH: "failure-hash-mismatch",
    R.UNSAFE_ARCHIVE: "failure-unsafe-archive",
    R.INSTALL_FAILED: "failure-install-failed",
    R.NEW_VERSION_EXITED: "failure-new-version-exited",
    R.NEW_VERSION_NOT_READY: "failure-new-version-not-ready",
    R.HANDSHAKE_TIMEOUT: "failure-handshake-timeout",
    R.HANDSHAKE_REFUSED: "failure-handshake-timeout",
    R.ROLLBACK_FAILED: "failure-rollback-failed",
    R.CANCELLED: "failure-cancelled",
    R.HELPER_CRASHED: "failure-helper-crashed",
    R.INCOMPATIBLE_RELEASE: "failure-incompatible-release",
    R.SUPERVISOR_UNAVAILABLE: "failure-supervisor-unavailable",
    R.INTERNAL: "failure-internal",
}
"""The anchor of each reason's section in docs/troubleshooting.md (several codes share a section)."""


def to_pb(value: str) -> int:
    """The contract's enum number for a journal's reason ("" and unknown names: UNSPECIFIED)."""
    from baton.pb import common_pb2  # protobuf only where the wire needs it: a helper loads it off its main path

    return int(common_pb2.FailureReason.Value(FailureReason.parse(value).value))


def from_pb(number: int) -> FailureReason:
    """The reason a peer sent; a number this side does not know yet (a newer peer) is UNSPECIFIED."""
    try:
        from baton.pb import common_pb2

        return FailureReason.parse(common_pb2.FailureReason.Name(number))  # type: ignore[arg-type]
    except ValueError:
        return FailureReason.UNSPECIFIED


def reason_name(number: int) -> str:
    """What a store keeps for a peer's reason: its name, or "" for UNSPECIFIED (committed, or not said)."""
    reason = from_pb(number)
    return "" if reason is FailureReason.UNSPECIFIED else reason.value


def classify(exc: BaseException) -> FailureReason:
    """The reason an exception stands for: its class or the nearest base class named in ``BY_EXCEPTION``."""
    own = getattr(exc, "reason", None)
    if isinstance(own, FailureReason):  # an error that knows better than its class (exited vs not ready)
        return own
    for cls in type(exc).__mro__:
        found = BY_EXCEPTION.get(f"{cls.__module__}.{cls.__qualname__}")
        if found is not None:
            return found
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return R.DISK_FULL
    if isinstance(exc, OSError):
        return R.INSTALL_FAILED
    return R.INTERNAL


def facts(exc: BaseException) -> dict[str, str]:
    """The fields a next-step template may name, from the exception's attributes."""
    out: dict[str, str] = {}
    for attr, key in (("key_id_hex", "key_id"), ("url", "url"), ("path", "path")):
        value = getattr(exc, attr, None)
        if value:
            out[key] = clip(str(value))
    trusted = getattr(exc, "trusted_ids", None)
    if trusted is not None:
        out["trusted_ids"] = ", ".join(trusted) or "none"
    if isinstance(exc, OSError) and exc.filename and "path" not in out:
        out["path"] = clip(str(exc.filename))
    return out


class _Blank(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return f"<{key}>"


def next_step(reason: FailureReason, known: Mapping[str, str] | None = None) -> str:
    """The next step for ``reason``, its template filled from ``known`` (a missing field reads ``<name>``)."""
    return string.Formatter().vformat(NEXT_STEP[reason], (), _Blank(known or {}))


def message(reason: FailureReason, detail: str, known: Mapping[str, str] | None = None) -> str:
    """What a person reads: what happened, then what to do (``detail``; next step: ...)."""
    step = next_step(reason, known)
    return f"{detail}; next step: {step} ({guide('troubleshooting.md', reason.anchor)})" if step else detail


def quote_output(log: str, lines: int = OUTPUT_LINES) -> str:
    """The last ``lines`` lines of ``log`` on one line, clipped: the error stays readable in a table."""
    tail = " | ".join(line.strip() for line in log.strip().splitlines()[-lines:] if line.strip())
    return repr(clip(tail[-MAX_QUOTED_CHARS * 2:], MAX_QUOTED_CHARS * 2))


def with_output(text: str, last_log: str) -> str:
    """``text`` with the failed version's last output quoted after it (nothing added when it wrote nothing)."""
    return text + OUTPUT_QUOTE + quote_output(last_log) if last_log.strip() else text


def without_output(error: str, last_log: str) -> str:
    """``error`` with the quote :func:`with_output` put in it (from the same ``last_log``) replaced by a note.

    A failed version's output may hold what it must not show to anyone but its operators (a secret it
    printed on the way down); the quote is found exactly, as it was made, not by parsing text it wrote.
    """
    if not last_log.strip():
        return error
    return error.replace(OUTPUT_QUOTE + quote_output(last_log), OUTPUT_WITHHELD, 1)
