"""Specification of helper.verify: the check every package passes before it is installed.

Each test signs a real package with a real key, then changes one thing: the
bytes, the request, the key set, the manifest, or the signature file.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from baton.digest import Digests, digest_stream
from baton.signing import (
    BadSignature,
    ManifestError,
    ManifestMismatch,
    NoTrustedKeys,
    PackageExpired,
    PublicKey,
    SecretKey,
    SignatureFormatError,
    UntrustedKey,
    WrongNode,
    format_manifest,
    generate_keypair,
    sign_prehash,
)
from helper.verify import (
    HashMismatch,
    SizeMismatch,
    UnreadableFile,
    VerifiedPackage,
    format_verified,
    verify_file,
    verify_package,
)

pytestmark = pytest.mark.timeout(60)

NOW = 1_790_000_000.0  # 2026-09-21
DAY = 86400.0


@dataclass(frozen=True)
class Signed:
    data: bytes
    digests: Digests
    signature: str
    secret: SecretKey
    public: PublicKey


def digests_of(data: bytes) -> Digests:
    return digest_stream(io.BytesIO(data))


def signed_package(manifest: str = "component=web version=1.2.0", size: int = 200_000) -> Signed:
    data = os.urandom(size)
    secret, public = generate_keypair()
    digests = digests_of(data)
    return Signed(data, digests, sign_prehash(secret, digests.blake2b512, manifest), secret, public)


def verify(
    pkg: Signed,
    *,
    data: bytes | None = None,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    signature: str | None = None,
    keys: list[PublicKey] | None = None,
    component: str = "web",
    version: str = "1.2.0",
    node_id: str | None = "node-1",
    now: float = NOW,
) -> VerifiedPackage:
    """verify_package as an update calls it, with the request taken from ``pkg`` unless overridden."""
    return verify_package(
        digests_of(data) if data is not None else pkg.digests,
        expected_sha256=expected_sha256 if expected_sha256 is not None else pkg.digests.sha256_hex,
        expected_size=expected_size if expected_size is not None else pkg.digests.size,
        signature_text=signature if signature is not None else pkg.signature,
        trusted_keys=keys if keys is not None else [pkg.public],
        component=component,
        version=version,
        node_id=node_id,
        now=now,
    )


def flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def test_good_package_is_accepted_with_its_manifest_key_and_digests() -> None:
    pkg = signed_package()
    vp = verify(pkg)
    assert vp.manifest.component == "web"
    assert vp.manifest.version == "1.2.0"
    assert vp.key_id_hex == pkg.public.key_id_hex
    assert vp.sha256_hex == pkg.digests.sha256_hex
    assert vp.size == len(pkg.data)


def test_expected_sha256_is_compared_case_insensitively() -> None:
    pkg = signed_package()
    verify(pkg, expected_sha256=pkg.digests.sha256_hex.upper())


def test_package_signed_by_an_untrusted_key_is_refused() -> None:
    pkg = signed_package()
    _, stranger = generate_keypair()
    with pytest.raises(UntrustedKey, match=pkg.public.key_id_hex):
        verify(pkg, keys=[stranger])


def test_package_is_accepted_when_its_key_is_one_of_several_trusted() -> None:
    pkg = signed_package()
    _, other = generate_keypair()
    assert verify(pkg, keys=[other, pkg.public]).key_id_hex == pkg.public.key_id_hex


def test_package_with_no_trusted_keys_is_refused() -> None:
    pkg = signed_package()
    with pytest.raises(NoTrustedKeys):
        verify(pkg, keys=[])


def test_package_with_a_flipped_byte_is_refused_by_the_signature() -> None:
    pkg = signed_package()
    tampered = flip(pkg.data, 12345)
    tampered_digests = digests_of(tampered)
    # The request names the tampered bytes, so only the signature can catch it.
    with pytest.raises(BadSignature, match="file signature"):
        verify(pkg, data=tampered, expected_sha256=tampered_digests.sha256_hex)


def test_package_whose_sha256_differs_from_the_request_is_refused_naming_both() -> None:
    pkg = signed_package()
    wrong = "0" * 64
    with pytest.raises(HashMismatch) as e:
        verify(pkg, expected_sha256=wrong)
    assert (e.value.expected, e.value.actual) == (wrong, pkg.digests.sha256_hex)
    assert wrong in str(e.value) and pkg.digests.sha256_hex in str(e.value)


def test_package_whose_size_differs_from_the_request_is_refused_before_hashing_matters() -> None:
    pkg = signed_package()
    with pytest.raises(SizeMismatch) as e:
        verify(pkg, expected_size=len(pkg.data) + 1, expected_sha256="0" * 64)
    assert (e.value.expected, e.value.actual) == (len(pkg.data) + 1, len(pkg.data))


def test_package_signed_for_another_component_is_refused() -> None:
    pkg = signed_package("component=db version=1.2.0")
    with pytest.raises(ManifestMismatch, match=r"'db'.*'web'"):
        verify(pkg)


def test_package_signed_for_another_version_is_refused() -> None:
    pkg = signed_package("component=web version=1.1.0")
    with pytest.raises(ManifestMismatch, match=r"'1\.1\.0'.*'1\.2\.0'"):
        verify(pkg)


def test_expired_package_is_refused() -> None:
    pkg = signed_package(format_manifest("web", "1.2.0", expires=NOW - DAY))
    with pytest.raises(PackageExpired):
        verify(pkg)


def test_package_expiring_later_is_accepted() -> None:
    pkg = signed_package(format_manifest("web", "1.2.0", expires=NOW + DAY))
    assert verify(pkg).manifest.expires == NOW + DAY


def test_package_for_other_nodes_is_refused() -> None:
    pkg = signed_package("component=web version=1.2.0 nodes=node-2,node-3")
    with pytest.raises(WrongNode, match="node-1"):
        verify(pkg)


def test_package_whose_nodes_name_this_node_is_accepted() -> None:
    pkg = signed_package("component=web version=1.2.0 nodes=node-0,node-1")
    assert verify(pkg).manifest.nodes == ("node-0", "node-1")


def test_package_whose_trusted_comment_is_not_a_manifest_is_refused() -> None:
    pkg = signed_package("timestamp:1700000000\tfile:web.tar.gz\thashed")
    with pytest.raises(ManifestError):
        verify(pkg)


def test_garbled_signature_is_refused() -> None:
    pkg = signed_package()
    with pytest.raises(SignatureFormatError):
        verify(pkg, signature=pkg.signature.replace("trusted comment: ", "comment: "))


def test_signature_with_an_edited_trusted_comment_is_refused() -> None:
    pkg = signed_package("component=web version=1.1.0")
    forged = pkg.signature.replace("version=1.1.0", "version=1.2.0")
    with pytest.raises(BadSignature, match="trusted comment"):
        verify(pkg, signature=forged)


# --- verify_file: offline, only signature and manifest matter --------------------------------------


def write_package(tmp_path: Path, pkg: Signed) -> tuple[Path, Path]:
    path = tmp_path / "web-1.2.0.tar.gz"
    path.write_bytes(pkg.data)
    sig = tmp_path / "web-1.2.0.tar.gz.minisig"
    sig.write_text(pkg.signature)
    return path, sig


def test_verify_file_accepts_a_good_package(tmp_path: Path) -> None:
    pkg = signed_package()
    path, sig = write_package(tmp_path, pkg)
    vp = verify_file(path, sig, [pkg.public], "web", "1.2.0", "node-1", NOW)
    assert (vp.sha256_hex, vp.size) == (pkg.digests.sha256_hex, len(pkg.data))


def test_verify_file_refuses_a_flipped_byte(tmp_path: Path) -> None:
    pkg = signed_package()
    path, sig = write_package(tmp_path, pkg)
    path.write_bytes(flip(pkg.data, 0))
    with pytest.raises(BadSignature):
        verify_file(path, sig, [pkg.public], "web", "1.2.0", "node-1", NOW)


def test_verify_file_refuses_a_garbled_signature_file(tmp_path: Path) -> None:
    pkg = signed_package()
    path, sig = write_package(tmp_path, pkg)
    sig.write_bytes(b"\xff\xfe not a signature")
    with pytest.raises(SignatureFormatError, match="minisig"):
        verify_file(path, sig, [pkg.public], "web", "1.2.0", "node-1", NOW)


def test_verify_file_refuses_an_oversized_signature_file(tmp_path: Path) -> None:
    pkg = signed_package()
    path, sig = write_package(tmp_path, pkg)
    sig.write_text(pkg.signature + "x" * 100_000)
    with pytest.raises(SignatureFormatError, match="larger than"):
        verify_file(path, sig, [pkg.public], "web", "1.2.0", "node-1", NOW)


def test_verify_file_reports_a_missing_signature_file(tmp_path: Path) -> None:
    pkg = signed_package()
    path, _ = write_package(tmp_path, pkg)
    with pytest.raises(UnreadableFile, match=r"signature file .*nope\.minisig"):
        verify_file(path, tmp_path / "nope.minisig", [pkg.public], "web", "1.2.0", "node-1", NOW)


def test_verify_file_reports_a_missing_package(tmp_path: Path) -> None:
    pkg = signed_package()
    _, sig = write_package(tmp_path, pkg)
    with pytest.raises(UnreadableFile, match=r"package .*gone\.tar"):
        verify_file(tmp_path / "gone.tar", sig, [pkg.public], "web", "1.2.0", "node-1", NOW)


def test_verify_file_checks_expiry_against_the_current_time_by_default(tmp_path: Path) -> None:
    pkg = signed_package(format_manifest("web", "1.2.0", expires=1_000_000_000))
    path, sig = write_package(tmp_path, pkg)
    with pytest.raises(PackageExpired):
        verify_file(path, sig, [pkg.public], "web", "1.2.0")


def test_format_verified_shows_what_a_person_needs() -> None:
    pkg = signed_package(format_manifest("web", "1.2.0", expires=1796083200, nodes=["node-1", "node-2"]))
    text = format_verified(verify(pkg))
    for expected in (
        "component: web",
        "version:   1.2.0",
        "expires:   2026-12-01T00:00:00Z",
        "nodes:     node-1, node-2",
        f"key id:    {pkg.public.key_id_hex}",
        f"sha256:    {pkg.digests.sha256_hex}",
        f"size:      {len(pkg.data)} bytes",
    ):
        assert expected in text.splitlines()


def test_format_verified_says_never_and_any_without_expiry_or_nodes() -> None:
    text = format_verified(verify(signed_package()))
    assert "expires:   never" in text
    assert "nodes:     any" in text
