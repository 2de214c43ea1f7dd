"""Specification of baton.signing: minisign keys and signatures, and the signed manifest.

Everything runs on real Ed25519 keys. Compatibility with the stock minisign CLI
is specified separately in test_minisign_interop.py.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from baton.errors import BatonError
from baton.signing import (
    BadSignature,
    KeyFormatError,
    Manifest,
    ManifestError,
    ManifestMismatch,
    NoTrustedKeys,
    PackageExpired,
    PasswordRequired,
    PublicKey,
    SecretKey,
    SecretKeyError,
    Signature,
    SignatureError,
    SignatureFormatError,
    TrustedKeyError,
    UntrustedKey,
    WrongNode,
    check_manifest,
    format_manifest,
    format_public_key,
    format_secret_key,
    generate_keypair,
    load_public_key,
    load_secret_key,
    load_trusted_keys,
    parse_manifest,
    parse_public_key,
    parse_secret_key,
    parse_signature,
    sign_file,
    sign_prehash,
    verify_signature,
)

pytestmark = pytest.mark.timeout(60)

DIGEST = hashlib.blake2b(b"package bytes", digest_size=64).digest()
OTHER_DIGEST = hashlib.blake2b(b"other bytes", digest_size=64).digest()
MANIFEST = "component=web version=1.2.0"
T_2026_12_01 = 1796083200.0  # 2026-12-01T00:00:00Z


def b2(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=64).digest()


def replace_line(sig_text: str, index: int, line: str) -> str:
    lines = sig_text.split("\n")
    lines[index] = line
    return "\n".join(lines)


def encrypted_key_text(secret: SecretKey, password: str, opslimit: int, memlimit: int, n: int) -> str:
    """A minisign ``Sc`` key built from the spec: keynum_sk XOR scrypt(password, salt, N, r=8, p=1)."""
    salt = os.urandom(32)
    keynum_sk = secret.key_id + secret.secret_key
    keynum_sk += hashlib.blake2b(b"Ed" + keynum_sk, digest_size=32).digest()
    stream = hashlib.scrypt(password.encode(), salt=salt, n=n, r=8, p=1, maxmem=256 * 1024 * 1024, dklen=104)
    encrypted = bytes(a ^ b for a, b in zip(keynum_sk, stream, strict=True))
    raw = b"EdScB2" + salt + struct.pack("<QQ", opslimit, memlimit) + encrypted
    return f"untrusted comment: minisign encrypted secret key\n{base64.b64encode(raw).decode()}\n"


# --- keys -------------------------------------------------------------------------------------------


def test_key_id_hex_is_the_stored_bytes_read_as_a_little_endian_integer() -> None:
    pk = PublicKey(bytes.fromhex("aca6d3a73ba8f843"), bytes(32))
    assert pk.key_id_hex == "43F8A83BA7D3A6AC"


def test_public_key_file_round_trips_in_minisign_layout() -> None:
    _, pk = generate_keypair()
    text = format_public_key(pk)
    comment, encoded, end = text.split("\n")
    assert comment == f"untrusted comment: minisign public key {pk.key_id_hex}"
    assert end == ""
    assert base64.b64decode(encoded) == b"Ed" + pk.key_id + pk.public_key
    assert parse_public_key(text) == pk


def test_bare_base64_public_key_is_accepted_like_minisign_dash_P() -> None:
    _, pk = generate_keypair()
    assert parse_public_key(format_public_key(pk).split("\n")[1]) == pk


@pytest.mark.parametrize(
    "text",
    [
        "",
        "untrusted comment: x\nnot base64!\n",
        "untrusted comment: x\n" + base64.b64encode(b"Ed" + bytes(8) + bytes(31)).decode(),
        "untrusted comment: x\n" + base64.b64encode(b"XX" + bytes(40)).decode(),
        "untrusted comment: x\nAAAA\nAAAA\n",
    ],
)
def test_garbled_public_key_is_refused(text: str) -> None:
    with pytest.raises(KeyFormatError):
        parse_public_key(text)


def test_load_public_key_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "garbled.pub"
    path.write_text("untrusted comment: x\n????\n")
    with pytest.raises(KeyFormatError, match=r"garbled\.pub"):
        load_public_key(path)


def test_load_trusted_keys_loads_every_key_in_order(tmp_path: Path) -> None:
    keys = [generate_keypair()[1] for _ in range(3)]
    paths = []
    for i, pk in enumerate(keys):
        paths.append(tmp_path / f"k{i}.pub")
        paths[-1].write_text(format_public_key(pk))
    assert load_trusted_keys(paths) == tuple(keys)


def test_missing_trusted_key_file_fails_closed_naming_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.pub"
    good.write_text(format_public_key(generate_keypair()[1]))
    with pytest.raises(TrustedKeyError, match=r"missing\.pub") as e:
        load_trusted_keys([good, tmp_path / "missing.pub"])
    assert e.value.path == tmp_path / "missing.pub"


def test_garbled_trusted_key_file_fails_closed_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "garbled.pub"
    path.write_text("untrusted comment: x\nRWQ=\n")
    with pytest.raises(TrustedKeyError, match=r"garbled\.pub"):
        load_trusted_keys([path])


def test_unreadable_trusted_key_file_fails_closed(tmp_path: Path) -> None:
    with pytest.raises(TrustedKeyError, match="Is a directory"):
        load_trusted_keys([tmp_path])


def test_empty_trusted_key_list_is_refused() -> None:
    with pytest.raises(NoTrustedKeys):
        load_trusted_keys([])


def test_secret_key_file_round_trips_unencrypted() -> None:
    sk, pk = generate_keypair()
    text = format_secret_key(sk)
    raw = base64.b64decode(text.split("\n")[1])
    assert len(raw) == 158
    assert raw[:6] == b"Ed\0\0B2"
    assert parse_secret_key(text) == sk
    assert parse_secret_key(text).public == pk


def test_secret_key_repr_does_not_show_key_material() -> None:
    sk, _ = generate_keypair()
    shown = repr(sk)
    assert sk.secret_key.hex() not in shown
    assert repr(sk.secret_key) not in shown
    assert "secret_key" not in shown


def test_unencrypted_secret_key_with_zero_checksum_is_accepted_as_minisign_dash_W_writes_it() -> None:
    sk, _ = generate_keypair()
    raw = bytearray(base64.b64decode(format_secret_key(sk).split("\n")[1]))
    raw[-32:] = bytes(32)
    text = "untrusted comment: minisign encrypted secret key\n" + base64.b64encode(bytes(raw)).decode()
    assert parse_secret_key(text) == sk


def test_corrupt_unencrypted_secret_key_is_refused() -> None:
    sk, _ = generate_keypair()
    raw = bytearray(base64.b64decode(format_secret_key(sk).split("\n")[1]))
    raw[60] ^= 1
    with pytest.raises(SecretKeyError, match="corrupt"):
        parse_secret_key("untrusted comment: x\n" + base64.b64encode(bytes(raw)).decode())


def test_secret_key_whose_public_half_does_not_match_its_seed_is_refused() -> None:
    sk, _ = generate_keypair()
    other, _ = generate_keypair()
    mixed = SecretKey(sk.key_id, sk.secret_key[:32] + other.secret_key[32:])
    raw = bytearray(base64.b64decode(format_secret_key(mixed).split("\n")[1]))
    raw[-32:] = bytes(32)
    with pytest.raises(SecretKeyError, match="does not match its seed"):
        parse_secret_key("untrusted comment: x\n" + base64.b64encode(bytes(raw)).decode())


def test_encrypted_secret_key_decrypts_with_libsodium_interactive_limits() -> None:
    sk, _ = generate_keypair()
    # libsodium's OPSLIMIT/MEMLIMIT_INTERACTIVE pick N=2^14, r=8, p=1.
    text = encrypted_key_text(sk, "correct horse", 524288, 16777216, n=1 << 14)
    assert parse_secret_key(text, "correct horse") == sk


def test_encrypted_secret_key_with_opslimit_bound_parameters_decrypts() -> None:
    sk, _ = generate_keypair()
    # opslimit < memlimit / 32: p = 1 and N from opslimit (2^15 / 32 -> N = 2^10).
    text = encrypted_key_text(sk, "pw", 32768, 1 << 30, n=1 << 10)
    assert parse_secret_key(text, "pw") == sk


def test_encrypted_secret_key_with_wrong_password_is_refused() -> None:
    sk, _ = generate_keypair()
    text = encrypted_key_text(sk, "correct horse", 524288, 16777216, n=1 << 14)
    with pytest.raises(SecretKeyError, match="wrong password"):
        parse_secret_key(text, "battery staple")


def test_encrypted_secret_key_without_password_asks_for_one(tmp_path: Path) -> None:
    sk, _ = generate_keypair()
    path = tmp_path / "enc.key"
    path.write_text(encrypted_key_text(sk, "pw", 524288, 16777216, n=1 << 14))
    with pytest.raises(PasswordRequired, match=r"enc\.key"):
        load_secret_key(path)


def test_secret_key_with_unknown_kdf_is_refused() -> None:
    sk, _ = generate_keypair()
    raw = bytearray(base64.b64decode(format_secret_key(sk).split("\n")[1]))
    raw[2:4] = b"Ar"
    with pytest.raises(KeyFormatError, match="key derivation"):
        parse_secret_key("untrusted comment: x\n" + base64.b64encode(bytes(raw)).decode())


# --- signatures -------------------------------------------------------------------------------------


def test_signature_is_four_minisign_lines_over_the_blake2b_prehash() -> None:
    sk, pk = generate_keypair()
    text = sign_prehash(sk, DIGEST, MANIFEST)
    lines = text.split("\n")
    assert lines[0] == "untrusted comment: signature from baton-package"
    assert lines[2] == f"trusted comment: {MANIFEST}"
    assert lines[4] == ""
    raw = base64.b64decode(lines[1])
    assert raw[:2] == b"ED"
    assert raw[2:10] == pk.key_id
    sig = parse_signature(text)
    assert sig.signature == raw[10:]
    assert sig.key_id_hex == pk.key_id_hex


def test_good_signature_verifies_and_returns_the_trusted_comment() -> None:
    sk, pk = generate_keypair()
    verified = verify_signature(parse_signature(sign_prehash(sk, DIGEST, MANIFEST)), DIGEST, [pk])
    assert verified.key_id_hex == pk.key_id_hex
    assert verified.trusted_comment == MANIFEST


def test_signature_is_matched_to_one_of_several_trusted_keys_by_key_id() -> None:
    old_sk, old_pk = generate_keypair()
    new_sk, new_pk = generate_keypair()
    trusted = [old_pk, new_pk]
    assert verify_signature(parse_signature(sign_prehash(old_sk, DIGEST, MANIFEST)), DIGEST, trusted).key_id_hex == (
        old_pk.key_id_hex
    )
    assert verify_signature(parse_signature(sign_prehash(new_sk, DIGEST, MANIFEST)), DIGEST, trusted).key_id_hex == (
        new_pk.key_id_hex
    )


def test_signature_by_an_untrusted_key_names_both_key_ids() -> None:
    sk, pk = generate_keypair()
    _, trusted = generate_keypair()
    with pytest.raises(UntrustedKey) as e:
        verify_signature(parse_signature(sign_prehash(sk, DIGEST, MANIFEST)), DIGEST, [trusted])
    assert pk.key_id_hex in str(e.value)
    assert trusted.key_id_hex in str(e.value)


def test_signature_with_no_trusted_keys_is_refused() -> None:
    sk, _ = generate_keypair()
    with pytest.raises(NoTrustedKeys):
        verify_signature(parse_signature(sign_prehash(sk, DIGEST, MANIFEST)), DIGEST, [])


def test_signature_over_other_bytes_is_a_bad_file_signature() -> None:
    sk, pk = generate_keypair()
    with pytest.raises(BadSignature, match="file signature") as e:
        verify_signature(parse_signature(sign_prehash(sk, DIGEST, MANIFEST)), OTHER_DIGEST, [pk])
    assert e.value.which == BadSignature.FILE


def test_altered_trusted_comment_is_a_bad_trusted_comment_signature() -> None:
    sk, pk = generate_keypair()
    text = sign_prehash(sk, DIGEST, "component=web version=1.0.0")
    forged = replace_line(text, 2, "trusted comment: component=web version=9.9.9")
    with pytest.raises(BadSignature, match="trusted comment") as e:
        verify_signature(parse_signature(forged), DIGEST, [pk])
    assert e.value.which == BadSignature.TRUSTED_COMMENT


def test_key_with_the_right_id_but_other_key_bytes_does_not_verify() -> None:
    sk, pk = generate_keypair()
    _, impostor = generate_keypair()
    with pytest.raises(BadSignature):
        verify_signature(
            parse_signature(sign_prehash(sk, DIGEST, MANIFEST)),
            DIGEST,
            [PublicKey(pk.key_id, impostor.public_key)],
        )


def test_trusted_comment_keeps_trailing_whitespace_as_signed() -> None:
    sk, pk = generate_keypair()
    sig = parse_signature(sign_prehash(sk, DIGEST, MANIFEST + " \t"))
    assert sig.trusted_comment == MANIFEST + " \t"
    verify_signature(sig, DIGEST, [pk])


def test_signature_file_with_crlf_line_endings_verifies() -> None:
    sk, pk = generate_keypair()
    text = sign_prehash(sk, DIGEST, MANIFEST).replace("\n", "\r\n")
    assert verify_signature(parse_signature(text), DIGEST, [pk]).trusted_comment == MANIFEST


def test_untrusted_comment_is_free_text_and_not_signed() -> None:
    sk, pk = generate_keypair()
    text = replace_line(sign_prehash(sk, DIGEST, MANIFEST, "made by ci"), 0, "untrusted comment: edited")
    verify_signature(parse_signature(text), DIGEST, [pk])


def test_sign_file_signs_the_files_blake2b_512(tmp_path: Path) -> None:
    sk, pk = generate_keypair()
    path = tmp_path / "pkg.tar"
    data = os.urandom(300_000)
    path.write_bytes(data)
    sig = parse_signature(sign_file(sk, path, MANIFEST))
    assert verify_signature(sig, b2(data), [pk]).trusted_comment == MANIFEST


def test_multiline_trusted_comment_cannot_be_signed() -> None:
    sk, _ = generate_keypair()
    with pytest.raises(ValueError, match="one line"):
        sign_prehash(sk, DIGEST, "component=web\nversion=1")


def test_legacy_non_prehashed_signature_is_refused_with_a_clear_message() -> None:
    sk, _ = generate_keypair()
    text = sign_prehash(sk, DIGEST, MANIFEST)
    raw = bytearray(base64.b64decode(text.split("\n")[1]))
    raw[:2] = b"Ed"
    with pytest.raises(SignatureFormatError, match="legacy non-prehashed"):
        parse_signature(replace_line(text, 1, base64.b64encode(bytes(raw)).decode()))


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda t: "", "expected 4 lines"),
        (lambda t: "\n".join(t.split("\n")[:3]), "expected 4 lines"),
        (lambda t: t + "extra line\n", "expected 4 lines"),
        (lambda t: replace_line(t, 0, "comment: x"), "line 1"),
        (lambda t: replace_line(t, 2, "component=web version=1.2.0"), "line 3"),
        (lambda t: replace_line(t, 1, "@@@@"), "line 2"),
        (lambda t: replace_line(t, 1, base64.b64encode(b"ED" + bytes(40)).decode()), "line 2"),
        (lambda t: replace_line(t, 1, base64.b64encode(b"XY" + bytes(72)).decode()), "unsupported"),
        (lambda t: replace_line(t, 3, "AAAA"), "line 4"),
    ],
)
def test_garbled_signature_text_is_a_format_error(mutate: object, why: str) -> None:
    sk, _ = generate_keypair()
    text = sign_prehash(sk, DIGEST, MANIFEST)
    with pytest.raises(SignatureFormatError, match=why):
        parse_signature(mutate(text))  # type: ignore[operator]


def test_verify_refuses_a_constructed_legacy_signature() -> None:
    sk, pk = generate_keypair()
    sig = parse_signature(sign_prehash(sk, DIGEST, MANIFEST))
    legacy = Signature(b"Ed", sig.key_id, sig.signature, sig.trusted_comment, sig.global_signature)
    with pytest.raises(SignatureFormatError):
        verify_signature(legacy, DIGEST, [pk])


def test_every_signing_error_is_a_baton_error() -> None:
    for cls in (SignatureFormatError, UntrustedKey, BadSignature, TrustedKeyError, NoTrustedKeys, ManifestError):
        assert issubclass(cls, SignatureError)
        assert issubclass(cls, BatonError)


# --- manifest ---------------------------------------------------------------------------------------


def test_manifest_with_component_and_version_only() -> None:
    assert parse_manifest("component=web version=1.2.0") == Manifest("web", "1.2.0", None, None, {})


def test_manifest_reads_expires_as_rfc3339() -> None:
    assert parse_manifest("component=web version=1 expires=2026-12-01T00:00:00Z").expires == T_2026_12_01


def test_manifest_reads_expires_with_an_offset() -> None:
    assert parse_manifest("component=web version=1 expires=2026-12-01T01:00:00+01:00").expires == T_2026_12_01


def test_manifest_reads_expires_as_unix_seconds() -> None:
    assert parse_manifest("component=web version=1 expires=1796083200").expires == T_2026_12_01


def test_manifest_reads_nodes_as_a_comma_separated_list() -> None:
    assert parse_manifest("component=web version=1 nodes=node-a,node-b").nodes == ("node-a", "node-b")


def test_manifest_keeps_unknown_keys_in_extra() -> None:
    m = parse_manifest("component=web version=1 build=42 channel=beta")
    assert dict(m.extra) == {"build": "42", "channel": "beta"}


def test_manifest_pairs_may_be_separated_by_any_whitespace() -> None:
    assert parse_manifest("  component=web\tversion=1  ").version == "1"


@pytest.mark.parametrize(
    ("comment", "why"),
    [
        ("component=web version=1 stray", "'stray' is not key=value"),
        ("timestamp:1700000000\tfile:pkg.tar.gz", "not key=value"),
        ("version=1.2.0", "no non-empty component="),
        ("component=web", "no non-empty version="),
        ("component= version=1", "no non-empty component="),
        ("component=web version=1 version=2", "'version' twice"),
        ("component=web version=1 =x", "not key=value"),
        ("component=web version=1 expires=tomorrow", "expires="),
        ("component=web version=1 expires=2026-12-01T00:00:00", "expires="),
        ("component=web version=1 nodes=,", "names no node"),
    ],
)
def test_invalid_manifest_is_refused(comment: str, why: str) -> None:
    with pytest.raises(ManifestError, match=why):
        parse_manifest(comment)


def test_format_manifest_round_trips() -> None:
    text = format_manifest("web", "1.2.0", expires=T_2026_12_01, nodes=["a", "b"], extra={"build": "7"})
    assert text == "component=web version=1.2.0 expires=2026-12-01T00:00:00Z nodes=a,b build=7"
    assert parse_manifest(text) == Manifest("web", "1.2.0", T_2026_12_01, ("a", "b"), {"build": "7"})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"component": "my web", "version": "1"},
        {"component": "web", "version": ""},
        {"component": "web", "version": "1", "nodes": ["a,b"]},
        {"component": "web", "version": "1", "nodes": []},
        {"component": "web", "version": "1", "extra": {"version": "2"}},
    ],
)
def test_format_manifest_refuses_values_that_would_not_read_back(kwargs: dict[str, object]) -> None:
    with pytest.raises(ManifestError):
        format_manifest(**kwargs)  # type: ignore[arg-type]


def check(manifest: str, *, component: str = "web", version: str = "1.2.0", node: str | None = "n1") -> None:
    check_manifest(parse_manifest(manifest), component=component, version=version, node_id=node, now=T_2026_12_01)


def test_manifest_for_the_requested_component_and_version_passes() -> None:
    check("component=web version=1.2.0")


def test_manifest_for_another_component_is_refused_naming_both() -> None:
    with pytest.raises(ManifestMismatch, match=r"'db'.*'web'"):
        check("component=db version=1.2.0")


def test_manifest_for_another_version_is_refused_naming_both() -> None:
    with pytest.raises(ManifestMismatch, match=r"'1\.0\.0'.*'1\.2\.0'") as e:
        check("component=web version=1.0.0")
    assert (e.value.key, e.value.signed, e.value.requested) == ("version", "1.0.0", "1.2.0")


def test_manifest_expiring_later_passes() -> None:
    check("component=web version=1.2.0 expires=2026-12-01T00:00:01Z")


def test_manifest_expiring_now_is_refused() -> None:
    with pytest.raises(PackageExpired, match="2026-12-01T00:00:00Z"):
        check("component=web version=1.2.0 expires=2026-12-01T00:00:00Z")


def test_manifest_limited_to_other_nodes_is_refused() -> None:
    with pytest.raises(WrongNode, match="'n1'"):
        check("component=web version=1.2.0 nodes=n2,n3")


def test_manifest_naming_this_node_passes() -> None:
    check("component=web version=1.2.0 nodes=n0,n1")


def test_manifest_limited_to_nodes_is_refused_when_no_node_id_is_known() -> None:
    with pytest.raises(WrongNode, match="no node id"):
        check("component=web version=1.2.0 nodes=n1", node=None)


@pytest.mark.e2e
def test_checking_a_trusted_key_file_loads_neither_hashlib_nor_cryptography(tmp_path: Path) -> None:
    """The supervisor checks its trusted key files at every start: what only signing and verifying need (OpenSSL's
    digests, cryptography) must not be loaded for that, or it stays resident in every supervisor."""
    _, pk = generate_keypair()
    key = tmp_path / "trusted.pub"
    key.write_text(format_public_key(pk))
    code = ("import sys; from baton.signing import load_public_key; load_public_key(sys.argv[1]); "
            "print(' '.join(m for m in ('hashlib', 'hmac', '_hashlib', 'cryptography') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(key)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
