"""Specification of byte-level compatibility with the stock minisign CLI (Debian's minisign 0.11).

Packagers may sign with either tool and operators may verify with either, so
every direction is exercised with real files: minisign signs / Baton verifies,
Baton signs / minisign verifies, and each tool's key files used by the other.
The project's setup installs minisign; if it is missing these tests fail, they
do not skip, because a skipped interop test would hide an incompatibility.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from baton.signing import (
    BadSignature,
    ManifestError,
    SecretKeyError,
    SignatureFormatError,
    UntrustedKey,
    format_public_key,
    generate_keypair,
    load_public_key,
    load_secret_key,
    parse_public_key,
    parse_signature,
    sign_file,
)
from helper.verify import verify_file

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

MINISIGN = Path("/usr/bin/minisign")
MANIFEST = "component=web version=1.2.0"


def minisign(*args: str | Path, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert os.access(MINISIGN, os.X_OK), (
        f"{MINISIGN} is missing: install Debian's minisign package (scripts/bootstrap.sh does)"
    )
    return subprocess.run(
        [str(MINISIGN), *map(str, args)], input=stdin, capture_output=True, text=True, timeout=50, cwd=cwd
    )


def package_tool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "manager.build.package_tool", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=50,
        stdin=subprocess.DEVNULL,
    )


def flip_byte(path: Path, index: int) -> None:
    data = bytearray(path.read_bytes())
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def package(tmp_path: Path) -> Path:
    path = tmp_path / "web-1.2.0.tar.gz"
    path.write_bytes(os.urandom(150_000))
    return path


@pytest.fixture
def minisign_keys(tmp_path: Path) -> tuple[Path, Path]:
    """A key pair made by ``minisign -G -W`` (unencrypted secret key)."""
    pub, sec = tmp_path / "minisign.pub", tmp_path / "minisign.key"
    result = minisign("-G", "-W", "-p", pub, "-s", sec)
    assert result.returncode == 0, result.stderr
    return pub, sec


@pytest.fixture
def baton_keys(tmp_path: Path) -> tuple[Path, Path]:
    """A key pair made by ``baton-package keygen``."""
    pub, sec = tmp_path / "baton.pub", tmp_path / "baton.key"
    result = package_tool("keygen", "-p", pub, "-s", sec)
    assert result.returncode == 0, result.stderr
    return pub, sec


def minisign_sign(sec: Path, file: Path, trusted_comment: str = MANIFEST) -> Path:
    result = minisign("-S", "-s", sec, "-m", file, "-t", trusted_comment)
    assert result.returncode == 0, result.stderr
    return Path(str(file) + ".minisig")


def test_minisign_is_installed() -> None:
    result = minisign("-v")
    assert result.returncode == 0
    assert result.stdout.startswith("minisign")


def test_file_signed_by_minisign_verifies_with_baton(package: Path, minisign_keys: tuple[Path, Path]) -> None:
    pub, sec = minisign_keys
    sig = minisign_sign(sec, package)
    vp = verify_file(package, sig, [load_public_key(pub)], "web", "1.2.0", "node-1")
    assert (vp.manifest.component, vp.manifest.version) == ("web", "1.2.0")


def test_key_id_is_printed_as_minisign_prints_it(minisign_keys: tuple[Path, Path]) -> None:
    pub, _ = minisign_keys
    m = re.match(r"untrusted comment: minisign public key ([0-9A-F]{1,16})\n", pub.read_text())
    assert m is not None
    assert load_public_key(pub).key_id_hex == m.group(1)


def test_untrusted_key_error_names_the_key_ids_minisign_reports(
    tmp_path: Path, package: Path, minisign_keys: tuple[Path, Path], baton_keys: tuple[Path, Path]
) -> None:
    _, minisign_sec = minisign_keys
    baton_pub, _ = baton_keys
    sig = minisign_sign(minisign_sec, package)
    refused = minisign("-V", "-p", baton_pub, "-m", package)
    assert refused.returncode != 0
    with pytest.raises(UntrustedKey) as e:
        verify_file(package, sig, [load_public_key(baton_pub)], "web", "1.2.0", "node-1")
    assert f"is {e.value.key_id_hex}\n" in refused.stderr
    assert f"public key is {e.value.trusted_ids[0]}\n" in refused.stderr


def test_minisign_dash_P_public_key_string_parses(minisign_keys: tuple[Path, Path]) -> None:
    pub, _ = minisign_keys
    bare = pub.read_text().split("\n")[1]
    assert parse_public_key(bare) == load_public_key(pub)


def test_baton_signature_verifies_with_minisign_and_shows_the_trusted_comment(
    package: Path, baton_keys: tuple[Path, Path]
) -> None:
    pub, sec = baton_keys
    Path(str(package) + ".minisig").write_text(sign_file(load_secret_key(sec), package, MANIFEST))
    result = minisign("-V", "-p", pub, "-m", package)
    assert result.returncode == 0, result.stderr
    assert "Signature and comment signature verified" in result.stdout
    assert f"Trusted comment: {MANIFEST}" in result.stdout


def test_public_key_file_is_byte_identical_to_minisigns_layout(minisign_keys: tuple[Path, Path]) -> None:
    pub, _ = minisign_keys
    assert format_public_key(load_public_key(pub)) == pub.read_text()


def test_flipped_byte_fails_minisign_and_baton_alike(package: Path, minisign_keys: tuple[Path, Path]) -> None:
    pub, sec = minisign_keys
    sig = minisign_sign(sec, package)
    flip_byte(package, 1000)
    result = minisign("-V", "-p", pub, "-m", package)
    assert result.returncode != 0
    assert "Signature verification failed" in result.stderr
    with pytest.raises(BadSignature, match="file signature"):
        verify_file(package, sig, [load_public_key(pub)], "web", "1.2.0", "node-1")


def test_edited_trusted_comment_fails_minisign_and_baton_alike(package: Path, baton_keys: tuple[Path, Path]) -> None:
    pub, sec = baton_keys
    sig = Path(str(package) + ".minisig")
    sig.write_text(sign_file(load_secret_key(sec), package, "component=web version=1.0.0"))
    sig.write_text(sig.read_text().replace("version=1.0.0", "version=1.2.0"))
    result = minisign("-V", "-p", pub, "-m", package)
    assert result.returncode != 0
    assert "Comment signature verification failed" in result.stderr
    with pytest.raises(BadSignature, match="trusted comment"):
        verify_file(package, sig, [load_public_key(pub)], "web", "1.2.0", "node-1")


def test_baton_keygen_secret_key_signs_with_minisign(package: Path, baton_keys: tuple[Path, Path]) -> None:
    pub, sec = baton_keys
    sig = minisign_sign(sec, package)
    assert minisign("-V", "-p", pub, "-m", package).returncode == 0
    verify_file(package, sig, [load_public_key(pub)], "web", "1.2.0", "node-1")


def test_minisign_unencrypted_key_signs_with_baton_package(package: Path, minisign_keys: tuple[Path, Path]) -> None:
    pub, sec = minisign_keys
    result = package_tool("sign", package, "--key", sec, "--component", "web", "--version", "1.2.0")
    assert result.returncode == 0, result.stderr
    verified = minisign("-V", "-p", pub, "-m", package)
    assert verified.returncode == 0, verified.stderr
    assert f"Trusted comment: {MANIFEST}" in verified.stdout


def test_minisign_legacy_signature_is_refused_with_a_clear_message(
    package: Path, minisign_keys: tuple[Path, Path]
) -> None:
    _, sec = minisign_keys
    result = minisign("-S", "-l", "-s", sec, "-m", package, "-t", MANIFEST)
    assert result.returncode == 0, result.stderr
    with pytest.raises(SignatureFormatError, match="legacy non-prehashed"):
        parse_signature(Path(str(package) + ".minisig").read_text())


def test_minisign_default_trusted_comment_is_not_a_manifest(package: Path, minisign_keys: tuple[Path, Path]) -> None:
    pub, sec = minisign_keys
    result = minisign("-S", "-s", sec, "-m", package)
    assert result.returncode == 0, result.stderr
    with pytest.raises(ManifestError, match="not key=value"):
        verify_file(package, Path(str(package) + ".minisig"), [load_public_key(pub)], "web", "1.2.0")


def test_minisign_password_protected_key_signs_with_its_password(tmp_path: Path, package: Path) -> None:
    pub, sec = tmp_path / "enc.pub", tmp_path / "enc.key"
    made = minisign("-G", "-p", pub, "-s", sec, stdin="s3cret pass\ns3cret pass\n")
    assert made.returncode == 0, made.stderr
    with pytest.raises(SecretKeyError, match="wrong password"):
        load_secret_key(sec, "not it")
    password_file = tmp_path / "password"
    password_file.write_text("s3cret pass\n")
    signed = package_tool(
        "sign", package, "--key", sec, "--password-file", password_file, "--component", "web", "--version", "1.2.0"
    )
    assert signed.returncode == 0, signed.stderr
    assert minisign("-V", "-p", pub, "-m", package).returncode == 0


def test_minisign_password_protected_key_without_a_password_is_refused(tmp_path: Path, package: Path) -> None:
    pub, sec = tmp_path / "enc.pub", tmp_path / "enc.key"
    assert minisign("-G", "-p", pub, "-s", sec, stdin="pw\npw\n").returncode == 0
    result = package_tool("sign", package, "--key", sec, "--component", "web", "--version", "1.2.0")
    assert result.returncode == 1
    assert "encrypted" in result.stderr and "--password-file" in result.stderr


def test_generated_key_pair_is_accepted_by_minisign_verify(tmp_path: Path, package: Path) -> None:
    sk, pk = generate_keypair()
    pub = tmp_path / "k.pub"
    pub.write_text(format_public_key(pk))
    Path(str(package) + ".minisig").write_text(sign_file(sk, package, MANIFEST))
    assert minisign("-V", "-p", pub, "-m", package).returncode == 0
