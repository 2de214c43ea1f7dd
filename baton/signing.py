"""minisign-compatible Ed25519 keys and signatures, and the signed package manifest.

Packages are signed so that the stock ``minisign`` tool and Baton interoperate
byte for byte (layouts from jedisct1/minisign ``src/minisign.h``):

* public key file: ``untrusted comment: ...`` then base64(``Ed`` || key id (8) || public key (32));
* secret key file: ``untrusted comment: ...`` then base64(``Ed`` || kdf || ``B2`` || salt (32) ||
  opslimit (8, LE) || memlimit (8, LE) || key id (8) || seed+public key (64) || checksum (32)),
  the last 104 bytes XORed with scrypt(password) when kdf is ``Sc``, plain when it is ``\\0\\0``;
* signature file: ``untrusted comment: ...``, base64(``ED`` || key id || Ed25519 over the file's
  BLAKE2b-512), ``trusted comment: <text>``, base64(Ed25519 over signature || text).

Only the prehashed ``ED`` form is accepted: it lets one streaming pass produce both
the SHA-256 the request names and the BLAKE2b-512 the signature covers. Verifying
checks both signatures, so the trusted comment (the :class:`Manifest`) is as
authentic as the bytes: it binds component, version, expiry and nodes, which is
what stops a validly signed old or foreign package from being replayed.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from baton.errors import BatonError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# cryptography, hashlib and hmac are imported where a key is used, not here: the supervisor imports this module
# at every start (its trusted key files) and keeps them off its RSS (tests/test_signing.py, docs/benchmarks.md).

SIGALG = b"Ed"
SIGALG_HASHED = b"ED"
KDF_SCRYPT = b"Sc"
KDF_NONE = b"\0\0"
CHKALG = b"B2"
COMMENT_PREFIX = "untrusted comment: "
TRUSTED_COMMENT_PREFIX = "trusted comment: "
DEFAULT_SIGNATURE_COMMENT = "signature from baton-package"
KEY_ID_BYTES = 8
PUBLIC_KEY_BYTES = 32
SECRET_KEY_BYTES = 64  # seed (32) || public key (32), as libsodium stores it
SIGNATURE_BYTES = 64
BLAKE2B512_BYTES = 64
# minisign refuses a trusted comment of TRUSTEDCOMMENTMAXBYTES - sizeof "trusted comment: " or more.
TRUSTED_COMMENT_MAX_BYTES = 8192 - len(TRUSTED_COMMENT_PREFIX) - 2
# The largest .minisig minisign can write: an untrusted comment of at most 1024 bytes, the signature
# line, a trusted comment under 8192 bytes and the comment signature. Capped at push (baton/admission.py)
# and when a signature file is read: a longer text is not a signature, and it would be journaled.
MAX_SIGNATURE_FILE_BYTES = 10 * 1024
MAX_KEY_FILE_BYTES = 64 * 1024
# hashlib.scrypt cannot be given more than INT_MAX bytes of memory.
_SCRYPT_MAXMEM_LIMIT = 2**31 - 1

_PUBKEY_LEN = 2 + KEY_ID_BYTES + PUBLIC_KEY_BYTES
_KEYNUM_SK_LEN = KEY_ID_BYTES + SECRET_KEY_BYTES + 32
_SECKEY_LEN = 2 + 2 + 2 + 32 + 8 + 8 + _KEYNUM_SK_LEN
_SIG_LEN = 2 + KEY_ID_BYTES + SIGNATURE_BYTES


class SignatureError(BatonError):
    """Base of every reason a package's signature or signed manifest is refused."""


class SignatureFormatError(SignatureError):
    """The signature text is not a minisign prehashed signature."""


class KeyFormatError(SignatureError):
    """A key file or key text is not in minisign's format."""


class SecretKeyError(SignatureError):
    """A secret key cannot be used: encrypted without a password, wrong password, or corrupt."""


class PasswordRequired(SecretKeyError):
    """The secret key is encrypted and no password was given."""


class UntrustedKey(SignatureError):
    """The signature was made by a key that is not among the trusted ones."""

    def __init__(self, key_id_hex: str, trusted_ids: Sequence[str]) -> None:
        trusted = ", ".join(trusted_ids) if trusted_ids else "none"
        super().__init__(f"signature made by key {key_id_hex}, which is not trusted (trusted keys: {trusted})")
        self.key_id_hex = key_id_hex
        self.trusted_ids = tuple(trusted_ids)


class BadSignature(SignatureError):
    """A signature by a trusted key does not verify; ``which`` says which of the two."""

    FILE = "file"
    TRUSTED_COMMENT = "trusted comment"

    def __init__(self, which: str, key_id_hex: str) -> None:
        if which == self.FILE:
            msg = f"the file signature by key {key_id_hex} does not match the package's contents"
        else:
            msg = f"the trusted comment signature by key {key_id_hex} is invalid (the comment was altered)"
        super().__init__(msg)
        self.which = which
        self.key_id_hex = key_id_hex


class TrustedKeyError(SignatureError):
    """A configured trusted key file is missing, unreadable or garbled: refuse, never skip it."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"trusted key file {path}: {problem}")
        self.path = Path(path)
        self.problem = problem


class NoTrustedKeys(SignatureError):
    """No trusted key is configured, so nothing can be verified: fail closed."""

    def __init__(self) -> None:
        super().__init__("no trusted public keys are configured; refusing to accept any package")


class ManifestError(SignatureError):
    """The trusted comment is not a valid package manifest."""


class ManifestRejected(SignatureError):
    """The manifest is valid and authentic but does not allow this install."""


class ManifestMismatch(ManifestRejected):
    """The signed component or version differs from the one requested."""

    def __init__(self, key: str, signed: str, requested: str) -> None:
        super().__init__(f"the package is signed for {key} {signed!r}, but {key} {requested!r} was requested")
        self.key = key
        self.signed = signed
        self.requested = requested


class PackageExpired(ManifestRejected):
    """The manifest's ``expires`` time has passed."""

    def __init__(self, expires: float, now: float) -> None:
        super().__init__(f"the package's signature expired at {format_time(expires)} (now {format_time(now)})")
        self.expires = expires
        self.now = now


class WrongNode(ManifestRejected):
    """The manifest limits the package to nodes that do not include this one."""

    def __init__(self, node_id: str | None, nodes: Sequence[str]) -> None:
        allowed = ", ".join(nodes)
        if not node_id:
            msg = f"the package is limited to nodes {allowed}, and no node id is configured or given"
        else:
            msg = f"the package is limited to nodes {allowed}, not to this node {node_id!r}"
        super().__init__(msg)
        self.node_id = node_id
        self.nodes = tuple(nodes)


def _key_id_hex(key_id: bytes) -> str:
    # minisign prints le64_load(keynum) with "%" PRIX64: no zero padding (seen: 8FDBF6FBFD549C0).
    return format(int.from_bytes(key_id, "little"), "X")


@dataclass(frozen=True)
class PublicKey:
    key_id: bytes
    public_key: bytes

    def __post_init__(self) -> None:
        if len(self.key_id) != KEY_ID_BYTES or len(self.public_key) != PUBLIC_KEY_BYTES:
            raise ValueError("a public key needs an 8-byte key id and 32 key bytes")

    @property
    def key_id_hex(self) -> str:
        """The key id as ``minisign`` prints it (``minisign public key 43F8A83BA7D3A6AC``)."""
        return _key_id_hex(self.key_id)


@dataclass(frozen=True)
class SecretKey:
    """An Ed25519 secret key with its minisign key id; never shown in ``repr``."""

    key_id: bytes
    secret_key: bytes = field(repr=False)  # seed (32) || public key (32)

    def __post_init__(self) -> None:
        if len(self.key_id) != KEY_ID_BYTES or len(self.secret_key) != SECRET_KEY_BYTES:
            raise ValueError("a secret key needs an 8-byte key id and 64 key bytes")

    @property
    def key_id_hex(self) -> str:
        return _key_id_hex(self.key_id)

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.key_id, self.secret_key[32:])

    def _private(self) -> Ed25519PrivateKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        return Ed25519PrivateKey.from_private_bytes(self.secret_key[:32])


@dataclass(frozen=True)
class Signature:
    """A parsed ``.minisig``: the file signature and the signed trusted comment."""

    algorithm: bytes
    key_id: bytes
    signature: bytes
    trusted_comment: str
    global_signature: bytes
    untrusted_comment: str = ""

    @property
    def key_id_hex(self) -> str:
        return _key_id_hex(self.key_id)


@dataclass(frozen=True)
class VerifiedSignature:
    key_id_hex: str
    trusted_comment: str


# --- keys -------------------------------------------------------------------------------------------


def _b64decode(s: str) -> bytes | None:
    try:
        return base64.b64decode(s.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def _lines(text: str) -> list[str]:
    # minisign reads with fgets and trims CR/LF; other whitespace is part of the line.
    return [line.rstrip("\r") for line in text.split("\n")]


def parse_public_key(text: str) -> PublicKey:
    """Parse a minisign public key file, or a bare base64 key as given to ``minisign -P``.

    Raises:
        KeyFormatError: not base64 of ``Ed`` || key id || 32-byte key.
    """
    lines = [line for line in _lines(text) if line.strip()]
    if len(lines) == 2 and lines[0].startswith(COMMENT_PREFIX):
        encoded = lines[1]
    elif len(lines) == 1 and not lines[0].startswith(COMMENT_PREFIX):
        encoded = lines[0]
    else:
        raise KeyFormatError("expected an 'untrusted comment:' line followed by one base64 key line")
    raw = _b64decode(encoded)
    if raw is None or len(raw) != _PUBKEY_LEN:
        raise KeyFormatError("the key line is not base64 of a 42-byte minisign public key")
    if raw[:2] != SIGALG:
        raise KeyFormatError(f"unsupported key algorithm {raw[:2]!r} (expected 'Ed')")
    return PublicKey(raw[2:10], raw[10:])


def _read_small_text(path: Path, limit: int) -> str:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise KeyFormatError(f"larger than {limit} bytes; not a key file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KeyFormatError("not UTF-8 text") from e


def load_public_key(path: Path | str) -> PublicKey:
    """Read a minisign public key file.

    Raises:
        OSError: the file cannot be read.
        KeyFormatError: its content is not a minisign public key (the message names the file).
    """
    try:
        return parse_public_key(_read_small_text(Path(path), MAX_KEY_FILE_BYTES))
    except KeyFormatError as e:
        raise KeyFormatError(f"{path}: {e}") from None


def load_trusted_keys(paths: Iterable[Path | str]) -> tuple[PublicKey, ...]:
    """Load every configured trusted key, failing closed.

    Raises:
        NoTrustedKeys: ``paths`` is empty.
        TrustedKeyError: one file is missing, unreadable or garbled; it is never skipped.
    """
    keys: list[PublicKey] = []
    for path in paths:
        try:
            keys.append(parse_public_key(_read_small_text(Path(path), MAX_KEY_FILE_BYTES)))
        except OSError as e:
            raise TrustedKeyError(path, e.strerror or str(e)) from e
        except KeyFormatError as e:
            raise TrustedKeyError(path, str(e)) from e
    if not keys:
        raise NoTrustedKeys()
    return tuple(keys)


def generate_keypair() -> tuple[SecretKey, PublicKey]:
    """A new Ed25519 key pair with a random 8-byte key id, as ``minisign -G`` makes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    private = Ed25519PrivateKey.generate()
    pk = private.public_key().public_bytes_raw()
    secret = SecretKey(os.urandom(KEY_ID_BYTES), private.private_bytes_raw() + pk)
    return secret, secret.public


def format_public_key(pk: PublicKey) -> str:
    """The public key file, byte for byte as ``minisign -G`` writes it."""
    encoded = base64.b64encode(SIGALG + pk.key_id + pk.public_key).decode()
    return f"{COMMENT_PREFIX}minisign public key {pk.key_id_hex}\n{encoded}\n"


def _secret_checksum(key_id: bytes, sk: bytes) -> bytes:
    import hashlib

    return hashlib.blake2b(SIGALG + key_id + sk, digest_size=32).digest()


def format_secret_key(sk: SecretKey) -> str:
    """An unencrypted secret key file (kdf ``\\0\\0``), loadable by ``minisign -S``.

    Unlike ``minisign -G -W`` (which leaves the checksum zero) the checksum is
    filled in, so corruption is detected on load; minisign ignores it for
    unencrypted keys.
    """
    raw = (
        SIGALG
        + KDF_NONE
        + CHKALG
        + bytes(32)  # kdf salt: unused
        + struct.pack("<QQ", 0, 0)  # kdf opslimit, memlimit: unused
        + sk.key_id
        + sk.secret_key
        + _secret_checksum(sk.key_id, sk.secret_key)
    )
    comment = f"{COMMENT_PREFIX}baton-package unencrypted secret key {sk.key_id_hex}"
    return f"{comment}\n{base64.b64encode(raw).decode()}\n"


def _scrypt_params(opslimit: int, memlimit: int) -> tuple[int, int, int]:
    """(N, r, p) from libsodium's crypto_pwhash_scryptsalsa208sha256 limits (its pickparams)."""
    opslimit = max(opslimit, 32768)
    r = 8
    if opslimit < memlimit // 32:
        p = 1
        n_log2 = _smallest_n_log2(opslimit // (r * 4))
    else:
        n_log2 = _smallest_n_log2(memlimit // (r * 128))
        maxrp = min((opslimit // 4) // (1 << n_log2), 0x3FFFFFFF)
        p = maxrp // r
    return 1 << n_log2, r, p


def _smallest_n_log2(max_n: int) -> int:
    n_log2 = 1
    while n_log2 < 63 and (1 << n_log2) <= max_n // 2:
        n_log2 += 1
    return n_log2


def _decrypt_keynum_sk(encrypted: bytes, password: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    n, r, p = _scrypt_params(opslimit, memlimit)
    if p < 1:
        raise SecretKeyError("the secret key's scrypt parameters are invalid")
    # OpenSSL needs 128*r*(N+2) bytes for V plus 128*r*p for B.
    maxmem = 128 * r * (n + 2) + 128 * r * p + (1 << 20)
    if maxmem > _SCRYPT_MAXMEM_LIMIT:
        raise SecretKeyError(
            f"the secret key's scrypt parameters need {maxmem >> 20} MiB, more than this tool supports"
        )
    import hashlib

    try:
        stream = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=len(encrypted))
    except (ValueError, MemoryError) as e:
        raise SecretKeyError(f"cannot derive the key from the password: {e}") from e
    return bytes(a ^ b for a, b in zip(encrypted, stream, strict=True))


def parse_secret_key(text: str, password: str | None = None) -> SecretKey:
    """Parse a minisign secret key file, decrypting it with ``password`` when it is encrypted.

    Raises:
        KeyFormatError: not a minisign Ed25519 secret key.
        SecretKeyError: encrypted and no password given, wrong password, or corrupt.
    """
    lines = [line for line in _lines(text) if line.strip()]
    if len(lines) != 2:
        raise KeyFormatError("expected an 'untrusted comment:' line followed by one base64 key line")
    raw = _b64decode(lines[1])
    if raw is None or len(raw) != _SECKEY_LEN:
        raise KeyFormatError("the key line is not base64 of a 158-byte minisign secret key")
    sig_alg, kdf_alg, chk_alg = raw[0:2], raw[2:4], raw[4:6]
    salt = raw[6:38]
    opslimit, memlimit = struct.unpack("<QQ", raw[38:54])
    keynum_sk = raw[54:]
    if sig_alg != SIGALG:
        raise KeyFormatError(f"unsupported signature algorithm {sig_alg!r} (expected 'Ed')")
    if chk_alg != CHKALG:
        raise KeyFormatError(f"unsupported checksum algorithm {chk_alg!r} (expected 'B2')")
    if kdf_alg == KDF_SCRYPT:
        if password is None:
            raise PasswordRequired("the secret key is encrypted; a password is needed")
        keynum_sk = _decrypt_keynum_sk(keynum_sk, password, salt, opslimit, memlimit)
    elif kdf_alg != KDF_NONE:
        raise KeyFormatError(f"unsupported key derivation function {kdf_alg!r}")
    import hmac

    key_id, sk, chk = keynum_sk[:8], keynum_sk[8:72], keynum_sk[72:]
    expected = _secret_checksum(key_id, sk)
    # minisign -G -W leaves the checksum of an unencrypted key zero.
    zero_ok = kdf_alg == KDF_NONE and chk == bytes(32)
    if not (zero_ok or hmac.compare_digest(chk, expected)):
        if kdf_alg == KDF_SCRYPT:
            raise SecretKeyError("wrong password for this secret key")
        raise SecretKeyError("the secret key's checksum does not match; the file is corrupt")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    derived_pk = Ed25519PrivateKey.from_private_bytes(sk[:32]).public_key().public_bytes_raw()
    if not hmac.compare_digest(derived_pk, sk[32:]):
        raise SecretKeyError("the secret key's public half does not match its seed; the file is corrupt")
    return SecretKey(key_id, sk)


def load_secret_key(path: Path | str, password: str | None = None) -> SecretKey:
    """Read a minisign secret key file (see :func:`parse_secret_key`); errors name the file.

    Raises:
        OSError: the file cannot be read.
        KeyFormatError, SecretKeyError: as :func:`parse_secret_key`.
    """
    try:
        return parse_secret_key(_read_small_text(Path(path), MAX_KEY_FILE_BYTES), password)
    except KeyFormatError as e:
        raise KeyFormatError(f"{path}: {e}") from None
    except SecretKeyError as e:
        raise type(e)(f"{path}: {e}") from None


# --- signatures -------------------------------------------------------------------------------------


def parse_signature(text: str) -> Signature:
    """Parse a ``.minisig`` file's text.

    Raises:
        SignatureFormatError: not four lines of minisign's format, a legacy
            non-prehashed signature, or an unknown algorithm.
    """
    lines = _lines(text)
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != 4:
        raise SignatureFormatError(
            f"expected 4 lines (untrusted comment, signature, trusted comment, comment signature), found {len(lines)}"
        )
    untrusted, sig_line, trusted, global_line = lines
    if not untrusted.startswith(COMMENT_PREFIX):
        raise SignatureFormatError(f"line 1 should start with {COMMENT_PREFIX.strip()!r}")
    if not trusted.startswith(TRUSTED_COMMENT_PREFIX):
        raise SignatureFormatError(f"line 3 should start with {TRUSTED_COMMENT_PREFIX.strip()!r}")
    raw = _b64decode(sig_line)
    if raw is None or len(raw) != _SIG_LEN:
        raise SignatureFormatError("line 2 is not base64 of a 74-byte minisign signature")
    if raw[:2] == SIGALG:
        raise SignatureFormatError(
            "legacy non-prehashed signature ('Ed'); sign again with minisign 0.8 or later "
            "(without -l) or with baton-package, which sign the BLAKE2b-512 prehash ('ED')"
        )
    if raw[:2] != SIGALG_HASHED:
        raise SignatureFormatError(f"unsupported signature algorithm {raw[:2]!r} (expected 'ED')")
    global_sig = _b64decode(global_line)
    if global_sig is None or len(global_sig) != SIGNATURE_BYTES:
        raise SignatureFormatError("line 4 is not base64 of a 64-byte trusted comment signature")
    trusted_comment = trusted[len(TRUSTED_COMMENT_PREFIX) :]
    if len(trusted_comment.encode("utf-8")) > TRUSTED_COMMENT_MAX_BYTES:
        raise SignatureFormatError(f"the trusted comment is longer than {TRUSTED_COMMENT_MAX_BYTES} bytes")
    return Signature(
        algorithm=raw[:2],
        key_id=raw[2:10],
        signature=raw[10:],
        trusted_comment=trusted_comment,
        global_signature=global_sig,
        untrusted_comment=untrusted[len(COMMENT_PREFIX) :],
    )


def _check_comment(name: str, text: str, max_bytes: int) -> None:
    if any(c in text for c in "\r\n\0"):
        raise ValueError(f"the {name} must be one line without NUL characters")
    if len(text.encode("utf-8")) > max_bytes:
        raise ValueError(f"the {name} is longer than {max_bytes} bytes")


def sign_prehash(
    secret: SecretKey,
    blake2b512: bytes,
    trusted_comment: str,
    untrusted_comment: str = DEFAULT_SIGNATURE_COMMENT,
) -> str:
    """The ``.minisig`` text for a file whose BLAKE2b-512 is ``blake2b512``.

    Raises:
        ValueError: the digest is not 64 bytes, or a comment is not one line.
    """
    if len(blake2b512) != BLAKE2B512_BYTES:
        raise ValueError("blake2b512 must be the 64-byte BLAKE2b-512 digest of the file")
    _check_comment("trusted comment", trusted_comment, TRUSTED_COMMENT_MAX_BYTES)
    _check_comment("untrusted comment", untrusted_comment, 1024 - len(COMMENT_PREFIX) - 2)
    private = secret._private()
    sig = private.sign(blake2b512)
    global_sig = private.sign(sig + trusted_comment.encode("utf-8"))
    sig_line = base64.b64encode(SIGALG_HASHED + secret.key_id + sig).decode()
    return (
        f"{COMMENT_PREFIX}{untrusted_comment}\n{sig_line}\n"
        f"{TRUSTED_COMMENT_PREFIX}{trusted_comment}\n{base64.b64encode(global_sig).decode()}\n"
    )


def sign_file(secret: SecretKey, path: Path | str, trusted_comment: str) -> str:
    """The ``.minisig`` text for the file at ``path`` (see :func:`sign_prehash`)."""
    import hashlib

    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=64)).digest()
    return sign_prehash(secret, digest, trusted_comment)


def verify_signature(sig: Signature, blake2b512: bytes, trusted: Sequence[PublicKey]) -> VerifiedSignature:
    """Check the file signature and the trusted comment signature against the trusted keys.

    Raises:
        NoTrustedKeys: ``trusted`` is empty.
        SignatureFormatError: ``sig`` is not a prehashed (``ED``) signature.
        UntrustedKey: no trusted key has the signature's key id.
        BadSignature: the file signature or the trusted comment signature is invalid.
    """
    if not trusted:
        raise NoTrustedKeys()
    if sig.algorithm != SIGALG_HASHED:
        raise SignatureFormatError(f"unsupported signature algorithm {sig.algorithm!r} (expected 'ED')")
    import hmac

    candidates = [k for k in trusted if hmac.compare_digest(k.key_id, sig.key_id)]
    if not candidates:
        raise UntrustedKey(sig.key_id_hex, [k.key_id_hex for k in trusted])
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    for key in candidates:
        public = Ed25519PublicKey.from_public_bytes(key.public_key)
        try:
            public.verify(sig.signature, blake2b512)
        except InvalidSignature:
            continue  # another trusted key may share this key id
        try:
            public.verify(sig.global_signature, sig.signature + sig.trusted_comment.encode("utf-8"))
        except InvalidSignature:
            raise BadSignature(BadSignature.TRUSTED_COMMENT, sig.key_id_hex) from None
        return VerifiedSignature(key.key_id_hex, sig.trusted_comment)
    raise BadSignature(BadSignature.FILE, sig.key_id_hex)


# --- the manifest in the trusted comment ----------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """What a signature authorises: this component, this version, until ``expires``, on ``nodes``."""

    component: str
    version: str
    expires: float | None = None  # Unix seconds; None: never
    nodes: tuple[str, ...] | None = None  # None: any node
    extra: Mapping[str, str] = field(default_factory=dict, hash=False)


MANIFEST_KEYS = ("component", "version", "expires", "nodes")
_UNIX_SECONDS_RE = re.compile(r"^[0-9]+(\.[0-9]+)?$")
_MIN_TIME = datetime(1, 1, 2, tzinfo=UTC).timestamp()
_MAX_TIME = datetime(9999, 12, 31, tzinfo=UTC).timestamp()


def parse_time(text: str) -> float:
    """Unix seconds from RFC 3339 (``2026-12-01T00:00:00Z``) or a number of seconds.

    Raises:
        ValueError: neither form, or an RFC 3339 time without a timezone.
    """
    if _UNIX_SECONDS_RE.match(text):
        t = float(text)
    else:
        when = datetime.fromisoformat(text)
        if when.tzinfo is None:
            raise ValueError(f"{text!r} has no timezone (add Z for UTC)")
        t = when.timestamp()
    if not _MIN_TIME <= t < _MAX_TIME:
        raise ValueError(f"{text!r} is out of range")
    return t


def format_time(t: float) -> str:
    """RFC 3339 in UTC, with fractional seconds only when there are some."""
    when = datetime.fromtimestamp(t, UTC)
    spec = "seconds" if when.microsecond == 0 else "microseconds"
    return when.isoformat(timespec=spec).replace("+00:00", "Z")


def parse_manifest(trusted_comment: str) -> Manifest:
    """Parse whitespace-separated ``key=value`` pairs; unknown keys go to ``extra``.

    Raises:
        ManifestError: a pair without ``=``, a key given twice, a missing or empty
            ``component``/``version``, or an unparsable ``expires``/``nodes``.
    """
    pairs: dict[str, str] = {}
    for token in trusted_comment.split():
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ManifestError(f"trusted comment item {token!r} is not key=value")
        if key in pairs:
            raise ManifestError(f"trusted comment names {key!r} twice")
        pairs[key] = value
    for key in ("component", "version"):
        if not pairs.get(key):
            raise ManifestError(
                f"trusted comment {trusted_comment!r} has no non-empty {key}= "
                "(expected e.g. 'component=web version=1.2.0')"
            )
    expires: float | None = None
    if "expires" in pairs:
        try:
            expires = parse_time(pairs["expires"])
        except ValueError as e:
            raise ManifestError(
                f"expires={pairs['expires']!r} is neither RFC 3339 (2026-12-01T00:00:00Z) nor Unix seconds"
            ) from e
    nodes: tuple[str, ...] | None = None
    if "nodes" in pairs:
        nodes = tuple(n for n in pairs["nodes"].split(",") if n)
        if not nodes:
            raise ManifestError("nodes= names no node")
    return Manifest(
        component=pairs["component"],
        version=pairs["version"],
        expires=expires,
        nodes=nodes,
        extra={k: v for k, v in pairs.items() if k not in MANIFEST_KEYS},
    )


def _check_value(key: str, value: str) -> None:
    if not value or any(c.isspace() or not c.isprintable() for c in value):
        raise ManifestError(f"manifest value for {key} must be non-empty without whitespace: {value!r}")


def format_manifest(
    component: str,
    version: str,
    *,
    expires: float | None = None,
    nodes: Sequence[str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> str:
    """The trusted comment for a package; :func:`parse_manifest` reads it back unchanged.

    Raises:
        ManifestError: a value is empty or contains whitespace, a node contains a
            comma, or an extra key is not a plain name or reuses a known key.
    """
    _check_value("component", component)
    _check_value("version", version)
    parts = [f"component={component}", f"version={version}"]
    if expires is not None:
        parts.append(f"expires={format_time(expires)}")
    if nodes is not None:
        if not nodes:
            raise ManifestError("nodes, when given, must name at least one node")
        for node in nodes:
            _check_value("nodes", node)
            if "," in node:
                raise ManifestError(f"node id {node!r} contains a comma")
        parts.append("nodes=" + ",".join(nodes))
    for key, value in (extra or {}).items():
        if key in MANIFEST_KEYS or not key or "=" in key:
            raise ManifestError(f"extra manifest key {key!r} is not allowed")
        _check_value(key, key)
        _check_value(key, value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


def check_manifest(manifest: Manifest, *, component: str, version: str, node_id: str | None, now: float) -> None:
    """Refuse a package whose authentic manifest does not allow this install.

    Raises:
        ManifestMismatch: the signed component or version is not the requested one.
        PackageExpired: ``now`` is at or past ``expires``.
        WrongNode: ``nodes`` is set and does not name ``node_id`` (or no node id is known).
    """
    if manifest.component != component:
        raise ManifestMismatch("component", manifest.component, component)
    if manifest.version != version:
        raise ManifestMismatch("version", manifest.version, version)
    if manifest.expires is not None and now >= manifest.expires:
        raise PackageExpired(manifest.expires, now)
    if manifest.nodes is not None and (not node_id or node_id not in manifest.nodes):
        raise WrongNode(node_id, manifest.nodes)
