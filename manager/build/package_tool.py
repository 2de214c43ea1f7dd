"""``baton-package``: make keys, build and sign packages the helper will accept.

Three steps, each usable alone and interchangeable with the stock ``minisign``
tool (see docs/package-format.md):

* ``keygen -p PUB -s SEC`` writes a minisign key pair (secret key unencrypted, mode 0600);
* ``build DIR --component NAME --version VERSION -o FILE`` writes a deterministic
  tar (or tar.gz) of DIR's tree: the same tree always gives the same bytes, so a
  package can be rebuilt and compared;
* ``sign FILE --key SEC --component NAME --version VERSION`` writes ``FILE.minisig``
  whose trusted comment is the manifest, and prints the size and SHA-256 a push needs;
* ``release --version V -o DIR_OR_FILE`` builds a self-contained supervisor release
  (manager/build/release.py, docs/releases.md).

Errors print one line to stderr and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import gzip
import os
import re
import stat
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from baton.digest import Digests, digest_stream
from baton.durable import fsync_dir, write_bytes
from baton.errors import BatonError
from baton.tree_links import check_link_inside, walk_tree
from baton.signing import (
    PasswordRequired,
    format_manifest,
    format_public_key,
    format_secret_key,
    generate_keypair,
    load_secret_key,
    parse_time,
    sign_prehash,
)
from baton.versions import parse_version

PROG = "baton-package"
PACKAGE_MTIME = 0  # every member's mtime, so a tree always builds to the same bytes
_COMPONENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RELATIVE_RE = re.compile(r"^([0-9]+)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class PackageToolError(BatonError):
    """A packaging step cannot be done; the message says what to change."""


# --- argument types --------------------------------------------------------------------------------


def _component_arg(s: str) -> str:
    if not _COMPONENT_RE.match(s):
        raise argparse.ArgumentTypeError(
            f"invalid component {s!r}: use letters, digits, '_', '.', '-' (at most 64, no leading punctuation)"
        )
    return s


def _version_arg(s: str) -> str:
    try:
        parse_version(s)
    except BatonError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s


def _expires_arg(s: str) -> float:
    """An absolute time (RFC 3339 or Unix seconds) or a duration from now (``30d``, ``12h``)."""
    m = _RELATIVE_RE.match(s)
    if m:
        return float(int(time.time()) + int(m.group(1)) * _UNIT_SECONDS[m.group(2)])
    try:
        return parse_time(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {s!r}: use RFC 3339 (2026-12-01T00:00:00Z), Unix seconds, or a duration like 30d"
        ) from None


def _nodes_arg(s: str) -> tuple[str, ...]:
    nodes = tuple(n.strip() for n in s.split(",") if n.strip())
    if not nodes or any(c.isspace() for n in nodes for c in n):
        raise argparse.ArgumentTypeError(f"invalid node list {s!r}: use comma-separated node ids")
    return nodes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Make keys, build and sign Baton packages.")
    sub = parser.add_subparsers(dest="command", required=True)

    keygen = sub.add_parser("keygen", help="write a minisign key pair (unencrypted secret key)")
    keygen.add_argument("-p", "--public", required=True, type=Path, help="public key file to write")
    keygen.add_argument("-s", "--secret", required=True, type=Path, help="secret key file to write (0600)")
    keygen.add_argument("--force", action="store_true", help="overwrite existing key files")

    build = sub.add_parser("build", help="write a deterministic tar of a version's tree")
    build.add_argument("dir", type=Path, help="the version's tree (becomes the package root)")
    build.add_argument("--component", required=True, type=_component_arg)
    build.add_argument("--version", required=True, type=_version_arg)
    build.add_argument("-o", "--output", required=True, type=Path, help="package file to write")
    build.add_argument("--force", action="store_true", help="overwrite an existing package file")
    build.add_argument(
        "--gzip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gzip the tar (default: only when the output ends in .gz or .tgz)",
    )

    sign = sub.add_parser("sign", help="sign a package; its manifest goes in the trusted comment")
    sign.add_argument("file", type=Path, help="the package file")
    sign.add_argument("--key", required=True, type=Path, help="minisign secret key file")
    sign.add_argument("--password-file", type=Path, help="file whose first line is the key's password")
    sign.add_argument("--component", required=True, type=_component_arg)
    sign.add_argument("--version", required=True, type=_version_arg)
    sign.add_argument("--expires", type=_expires_arg, help="RFC 3339 time, Unix seconds, or a duration like 30d, 12h")
    sign.add_argument("--nodes", type=_nodes_arg, help="comma-separated node ids allowed to install it")
    sign.add_argument("-o", "--output", type=Path, help="signature file (default: FILE.minisig)")
    _add_release_parser(sub)
    return parser


def _add_release_parser(sub: argparse._SubParsersAction) -> None:
    from manager.build.release import DEFAULT_PYTHON

    release = sub.add_parser("release", help="build a self-contained supervisor release (docs/releases.md)")
    release.add_argument("--version", required=True, type=_version_arg)
    release.add_argument("-o", "--output", required=True,
                         help="tarball to write, or a directory (existing, or ending with /: created) for "
                              "baton-V-<python tag>-<platform>.tar.gz")
    release.add_argument("--force", action="store_true", help="overwrite an existing tarball")
    release.add_argument("--lock", type=Path, help="hashed lock file (default: requirements/runtime.lock)")
    release.add_argument("--python", default=DEFAULT_PYTHON,
                         help=f"the interpreter the launchers run (default: {DEFAULT_PYTHON})")


# --- keygen -----------------------------------------------------------------------------------------


def keygen(public_path: Path, secret_path: Path, force: bool) -> str:
    """Write a new key pair; returns its key id.

    Raises:
        PackageToolError: a key file exists and ``force`` is false.
    """
    if not force:
        for path in (public_path, secret_path):
            if os.path.lexists(path):
                raise PackageToolError(f"{path} already exists; use --force to overwrite it")
    secret, public = generate_keypair()
    write_bytes(secret_path, format_secret_key(secret).encode("ascii"), 0o600)
    write_bytes(public_path, format_public_key(public).encode("ascii"), 0o644)
    return public.key_id_hex


# --- build ------------------------------------------------------------------------------------------


def _tarinfo(root: Path, rel: str) -> tuple[tarfile.TarInfo, BinaryIO | None]:
    path = root / rel
    st = os.lstat(path)
    info = tarfile.TarInfo(rel)
    info.mode = stat.S_IMODE(st.st_mode) & 0o777
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = PACKAGE_MTIME
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
        return info, None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        check_link_inside(root, rel, target)
        info.type = tarfile.SYMTYPE
        info.linkname = target
        return info, None
    if stat.S_ISREG(st.st_mode):
        f = open(path, "rb")  # noqa: SIM115 - closed by the caller after addfile
        info.type = tarfile.REGTYPE
        info.size = os.fstat(f.fileno()).st_size
        return info, f
    raise PackageToolError(f"{path}: not a regular file, directory or symlink (device, fifo or socket)")


def build_package(root: Path, output: Path, use_gzip: bool) -> Digests:
    """Write the tar of ``root``'s tree to ``output`` atomically; returns its digests.

    Raises:
        PackageToolError: ``root`` is not a directory, ``output`` is inside it, or the
            tree holds a special file.
        LinkOutsideTree: the tree holds a symlink pointing outside it.
    """
    if not root.is_dir():
        raise PackageToolError(f"{root} is not a directory")
    out_abs = output.resolve()
    if out_abs.is_relative_to(root.resolve()):
        raise PackageToolError(f"the output {output} must not be inside the tree {root}")
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=out_abs.parent)
    try:
        with os.fdopen(fd, "w+b") as raw:
            with contextlib.ExitStack() as stack:
                sink: BinaryIO | gzip.GzipFile = raw
                if use_gzip:
                    # filename="" and mtime=0 keep the gzip header free of the temp name and the time.
                    sink = stack.enter_context(gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0))
                tar = stack.enter_context(tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT))
                for rel in walk_tree(root):
                    info, content = _tarinfo(root, rel)
                    if content is None:
                        tar.addfile(info)
                    else:
                        with content:
                            tar.addfile(info, content)
            raw.flush()
            os.fchmod(raw.fileno(), 0o644)
            os.fsync(raw.fileno())
            raw.seek(0)
            digests = digest_stream(raw)
        os.replace(tmp, out_abs)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(out_abs.parent)
    return digests


# --- sign -------------------------------------------------------------------------------------------


def _read_password(path: Path) -> str:
    with open(path, encoding="utf-8") as f:
        return f.readline().rstrip("\r\n")


def sign_package(
    file: Path,
    key_path: Path,
    *,
    component: str,
    version: str,
    password: str | None,
    expires: float | None,
    nodes: tuple[str, ...] | None,
    output: Path,
    now: float,
) -> tuple[str, str, Digests]:
    """Sign ``file`` with its manifest; returns (key id, trusted comment, digests).

    Raises:
        PackageToolError: ``expires`` is not in the future.
        KeyFormatError, SecretKeyError: the secret key cannot be used.
    """
    if expires is not None and expires <= now:
        raise PackageToolError("--expires is not in the future; the package would be refused at once")
    secret = load_secret_key(key_path, password)
    manifest = format_manifest(component, version, expires=expires, nodes=nodes)
    with open(file, "rb") as f:
        digests = digest_stream(f)
    text = sign_prehash(secret, digests.blake2b512, manifest)
    write_bytes(output, text.encode("utf-8"), 0o644)
    return secret.key_id_hex, manifest, digests


def _sign(args: argparse.Namespace) -> None:
    output = args.output or args.file.with_name(args.file.name + ".minisig")
    password = _read_password(args.password_file) if args.password_file is not None else None

    def attempt(password: str | None) -> tuple[str, str, Digests]:
        return sign_package(
            args.file,
            args.key,
            component=args.component,
            version=args.version,
            password=password,
            expires=args.expires,
            nodes=args.nodes,
            output=output,
            now=time.time(),
        )

    try:
        key_id, manifest, digests = attempt(password)
    except PasswordRequired:
        if not sys.stdin.isatty():
            raise PackageToolError(f"{args.key} is encrypted: give its password with --password-file") from None
        key_id, manifest, digests = attempt(getpass.getpass(f"Password for {args.key}: "))
    print(f"wrote {output}")
    print(f"trusted comment: {manifest}")
    print(f"key id: {key_id}")
    print(f"size: {digests.size}")
    print(f"sha256: {digests.sha256_hex}")


def _build(args: argparse.Namespace) -> None:
    use_gzip = args.gzip
    if use_gzip is None:
        use_gzip = args.output.name.endswith((".gz", ".tgz"))
    if os.path.lexists(args.output) and not args.force:
        raise PackageToolError(f"{args.output} already exists; use --force to overwrite it")
    digests = build_package(args.dir, args.output, use_gzip)
    print(f"wrote {args.output} ({args.component} {args.version}, {'tar.gz' if use_gzip else 'tar'})")
    print(f"size: {digests.size}")
    print(f"sha256: {digests.sha256_hex}")


def _release(args: argparse.Namespace) -> None:
    from manager.build.release import CHECKOUT, RUNTIME_LOCK, build_release

    source = CHECKOUT
    lock = args.lock or RUNTIME_LOCK
    started = time.monotonic()
    dest, manifest, digests = build_release(args.version, args.output, lock=lock, python=args.python,
                                            source=source, force=args.force)
    print(f"wrote {dest} (supervisor release {manifest.version} for {manifest.target}, "
          f"{len(manifest.dependencies)} dependencies, {time.monotonic() - started:.1f}s)")
    print(f"size: {digests.size}")
    print(f"sha256: {digests.sha256_hex}")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "keygen":
            key_id = keygen(args.public, args.secret, args.force)
            print(f"wrote secret key {args.secret} (unencrypted, mode 0600: keep it secret)")
            print(f"wrote public key {args.public}")
            print(f"key id: {key_id}")
        elif args.command == "build":
            _build(args)
        elif args.command == "release":
            _release(args)
        else:
            _sign(args)
    except BatonError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
