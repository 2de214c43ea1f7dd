"""The one check every package passes before it is installed: bytes, signature, manifest.

An update and ``helper verify`` share it, so what an operator checks offline is
exactly what the helper enforces. The order is cheapest-first and each step
trusts only what the previous ones proved: size, then SHA-256 (the request's
name for the bytes), then both minisign signatures over the BLAKE2b-512 (who
made the bytes and the manifest), then the manifest (what they may be installed
as). The digests come from the one pass that wrote the file, so the bytes
verified are the bytes installed.
"""

from __future__ import annotations

import hmac
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from baton.digest import Digests, digest_stream
from baton.errors import BatonError
from baton.signing import (
    MAX_SIGNATURE_FILE_BYTES,
    Manifest,
    NoTrustedKeys,
    PublicKey,
    SignatureFormatError,
    check_manifest,
    format_time,
    parse_manifest,
    parse_signature,
    verify_signature,
)


class IntegrityError(BatonError):
    """The package's bytes are not the ones the request named."""


class SizeMismatch(IntegrityError):
    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(f"package size is {actual} bytes, but the request says {expected} bytes")
        self.expected = expected
        self.actual = actual


class HashMismatch(IntegrityError):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"package sha256 is {actual}, but the request says {expected}")
        self.expected = expected
        self.actual = actual


class UnreadableFile(BatonError):
    """The package or its signature file cannot be read."""

    def __init__(self, what: str, path: Path | str, reason: str) -> None:
        super().__init__(f"cannot read {what} {path}: {reason}")
        self.what = what
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedPackage:
    manifest: Manifest
    key_id_hex: str
    sha256_hex: str
    size: int


def verify_package(
    digests: Digests,
    *,
    expected_sha256: str,
    expected_size: int,
    signature_text: str,
    trusted_keys: Sequence[PublicKey],
    component: str,
    version: str,
    node_id: str | None,
    now: float,
) -> VerifiedPackage:
    """Accept the package whose one-pass ``digests`` are given, or raise why not.

    Raises:
        SizeMismatch, HashMismatch: the bytes are not the requested ones.
        NoTrustedKeys: no trusted key is configured.
        SignatureFormatError: the signature text is not a prehashed minisign signature.
        UntrustedKey, BadSignature: the signatures do not prove a trusted signer.
        ManifestError: the signed trusted comment is not a manifest.
        ManifestMismatch, PackageExpired, WrongNode: the manifest does not allow this install.
    """
    if digests.size != expected_size:
        raise SizeMismatch(expected_size, digests.size)
    if not hmac.compare_digest(
        expected_sha256.strip().lower().encode("utf-8"), digests.sha256_hex.lower().encode("ascii")
    ):
        raise HashMismatch(expected_sha256, digests.sha256_hex)
    if not trusted_keys:
        raise NoTrustedKeys()
    signature = parse_signature(signature_text)
    verified = verify_signature(signature, digests.blake2b512, trusted_keys)
    manifest = parse_manifest(verified.trusted_comment)
    check_manifest(manifest, component=component, version=version, node_id=node_id, now=now)
    return VerifiedPackage(manifest, verified.key_id_hex, digests.sha256_hex, digests.size)


def open_regular_file(what: str, path: Path | str) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file: a FIFO or a device would block or never end.

    ``O_NONBLOCK`` makes the open of a FIFO return at once; the type is checked
    on the opened descriptor, so a swap after a check cannot slip one in.

    Raises:
        UnreadableFile: it cannot be opened, or is not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise UnreadableFile(what, path, e.strerror or str(e)) from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a file")
        raise UnreadableFile(what, path, f"{kind}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_signature_text(path: Path | str) -> str:
    """The text of a ``.minisig`` file, bounded in size.

    Raises:
        UnreadableFile: the file cannot be read.
        SignatureFormatError: it is too large or not UTF-8.
    """
    with open_regular_file("signature file", path) as f:
        try:
            data = f.read(MAX_SIGNATURE_FILE_BYTES + 1)
        except OSError as e:
            raise UnreadableFile("signature file", path, e.strerror or str(e)) from e
    if len(data) > MAX_SIGNATURE_FILE_BYTES:
        raise SignatureFormatError(f"{path}: larger than {MAX_SIGNATURE_FILE_BYTES} bytes; not a signature")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureFormatError(f"{path}: not UTF-8 text; not a minisign signature") from None


def verify_file(
    path: Path | str,
    signature_path: Path | str,
    keys: Sequence[PublicKey],
    component: str,
    version: str,
    node_id: str | None = None,
    now: float | None = None,
) -> VerifiedPackage:
    """Verify a package file offline: only its signature and manifest decide.

    The file is read once; its own size and SHA-256 stand in for a request's.
    ``now`` defaults to the current time.

    Raises:
        UnreadableFile: the package or signature file cannot be read.
        Every error of :func:`verify_package` except the size and hash mismatches.
    """
    signature_text = read_signature_text(signature_path)
    with open_regular_file("package", path) as f:
        try:
            digests = digest_stream(f)
        except OSError as e:
            raise UnreadableFile("package", path, e.strerror or str(e)) from e
    return verify_package(
        digests,
        expected_sha256=digests.sha256_hex,
        expected_size=digests.size,
        signature_text=signature_text,
        trusted_keys=keys,
        component=component,
        version=version,
        node_id=node_id,
        now=time.time() if now is None else now,
    )


def format_verified(vp: VerifiedPackage) -> str:
    """A few lines for a person: what was verified, by which key, until when, where."""
    m = vp.manifest
    lines = [
        "signature and trusted comment verified",
        f"component: {m.component}",
        f"version:   {m.version}",
        f"expires:   {format_time(m.expires) if m.expires is not None else 'never'}",
        f"nodes:     {', '.join(m.nodes) if m.nodes is not None else 'any'}",
        f"key id:    {vp.key_id_hex}",
        f"sha256:    {vp.sha256_hex}",
        f"size:      {vp.size} bytes",
    ]
    return "\n".join(lines)
