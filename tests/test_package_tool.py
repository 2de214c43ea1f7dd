"""Specification of ``baton-package``, run as a real process: keygen, build, sign.

Each test runs ``python -m manager.build.package_tool`` the way a packager or a CI job
would, then checks the files it left with the library the helper uses.
"""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from baton.digest import digest_stream
from baton.signing import load_public_key, load_secret_key, parse_manifest, parse_signature
from helper.verify import verify_file

pytestmark = pytest.mark.timeout(60)


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "manager.build.package_tool", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def ok(*args: str | Path) -> str:
    result = run(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def printed(stdout: str, label: str) -> str:
    for line in stdout.splitlines():
        if line.startswith(label + ": "):
            return line[len(label) + 2 :]
    raise AssertionError(f"no {label!r} line in {stdout!r}")


def make_tree(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "agent").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "agent").chmod(0o755)
    (root / "etc").mkdir()
    (root / "etc" / "agent.toml").write_text("x = 1\n")
    (root / "empty").mkdir()
    (root / "current-agent").symlink_to("bin/agent")
    return root


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    pub, sec = tmp_path / "keys" / "baton.pub", tmp_path / "keys" / "baton.key"
    pub.parent.mkdir()
    ok("keygen", "-p", pub, "-s", sec)
    return pub, sec


@pytest.mark.e2e
def test_keygen_writes_a_minisign_key_pair_with_a_private_secret_file(tmp_path: Path) -> None:
    pub, sec = tmp_path / "k.pub", tmp_path / "k.key"
    out = ok("keygen", "-p", pub, "-s", sec)
    public = load_public_key(pub)
    assert load_secret_key(sec).public == public
    assert printed(out, "key id") == public.key_id_hex
    assert pub.read_text().startswith(f"untrusted comment: minisign public key {public.key_id_hex}\n")
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600


@pytest.mark.e2e
def test_keygen_never_prints_secret_key_material(tmp_path: Path) -> None:
    pub, sec = tmp_path / "k.pub", tmp_path / "k.key"
    result = run("keygen", "-p", pub, "-s", sec)
    secret = load_secret_key(sec)
    shown = result.stdout + result.stderr
    assert sec.read_text().split("\n")[1] not in shown
    assert base64.b64encode(secret.secret_key).decode() not in shown
    assert secret.secret_key.hex() not in shown


@pytest.mark.e2e
def test_keygen_refuses_to_overwrite_existing_keys(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    pub, sec = keys
    before = (pub.read_bytes(), sec.read_bytes())
    result = run("keygen", "-p", pub, "-s", sec)
    assert result.returncode == 1
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (pub.read_bytes(), sec.read_bytes()) == before


@pytest.mark.e2e
def test_keygen_with_force_replaces_the_key_pair(keys: tuple[Path, Path]) -> None:
    pub, sec = keys
    old = load_public_key(pub)
    ok("keygen", "-p", pub, "-s", sec, "--force")
    assert load_public_key(pub) != old
    assert load_secret_key(sec).public == load_public_key(pub)


@pytest.mark.e2e
def test_keygen_build_sign_round_trip_verifies_like_the_helper(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    pub, sec = keys
    tree = make_tree(tmp_path / "tree")
    pkg = tmp_path / "web-1.2.0.tar.gz"
    built = ok("build", tree, "--component", "web", "--version", "1.2.0", "-o", pkg)
    signed = ok("sign", pkg, "--key", sec, "--component", "web", "--version", "1.2.0")

    with open(pkg, "rb") as f:
        digests = digest_stream(f)
    for out in (built, signed):
        assert printed(out, "sha256") == digests.sha256_hex
        assert printed(out, "size") == str(digests.size)
    sig = Path(str(pkg) + ".minisig")
    vp = verify_file(pkg, sig, [load_public_key(pub)], "web", "1.2.0", "node-1")
    assert vp.key_id_hex == printed(signed, "key id")
    assert parse_signature(sig.read_text()).trusted_comment == "component=web version=1.2.0"


@pytest.mark.e2e
def test_build_writes_members_relative_to_the_root_sorted_and_owned_by_root(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    pkg = tmp_path / "p.tar.gz"
    ok("build", tree, "--component", "web", "--version", "1.2.0", "-o", pkg)
    with tarfile.open(pkg, "r:gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == ["bin", "bin/agent", "current-agent", "empty", "etc", "etc/agent.toml"]
    assert all((m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", 0) for m in members)
    by_name = {m.name: m for m in members}
    assert by_name["bin/agent"].mode == 0o755
    assert by_name["current-agent"].issym() and by_name["current-agent"].linkname == "bin/agent"
    assert by_name["empty"].isdir()


@pytest.mark.e2e
def test_build_is_deterministic_whatever_the_file_times(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    first, second = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    ok("build", tree, "--component", "web", "--version", "1.2.0", "-o", first)
    os.utime(tree / "etc" / "agent.toml", (time.time() + 1000, time.time() + 1000))
    ok("build", tree, "--component", "web", "--version", "1.2.0", "-o", second)
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.e2e
def test_build_writes_plain_tar_unless_the_name_asks_for_gzip(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    ok("build", tree, "--component", "web", "--version", "1", "-o", tmp_path / "p.tar")
    ok("build", tree, "--component", "web", "--version", "1", "-o", tmp_path / "q.tar", "--gzip")
    assert not (tmp_path / "p.tar").read_bytes().startswith(b"\x1f\x8b")
    assert (tmp_path / "q.tar").read_bytes().startswith(b"\x1f\x8b")


@pytest.mark.e2e
def test_build_never_overwrites_an_existing_file_without_force(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    pkg = tmp_path / "web.tar.gz"
    pkg.write_bytes(b"an earlier build")
    r = run("build", tree, "--component", "web", "--version", "1", "-o", pkg)
    assert r.returncode == 1
    assert r.stderr == f"baton-package: error: {pkg} already exists; use --force to overwrite it\n"
    assert pkg.read_bytes() == b"an earlier build"
    ok("build", tree, "--component", "web", "--version", "1", "-o", pkg, "--force")
    assert pkg.read_bytes().startswith(b"\x1f\x8b")


@pytest.mark.e2e
def test_build_refuses_a_symlink_pointing_outside_the_tree(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "etc" / "passwd").symlink_to("../../../etc/passwd")
    pkg = tmp_path / "p.tar.gz"
    result = run("build", tree, "--component", "web", "--version", "1.2.0", "-o", pkg)
    assert result.returncode == 1
    assert "points outside" in result.stderr and "etc/passwd" in result.stderr
    assert not pkg.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.e2e
def test_build_refuses_an_absolute_symlink(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "shell").symlink_to("/bin/sh")
    result = run("build", tree, "--component", "web", "--version", "1.2.0", "-o", tmp_path / "p.tar")
    assert result.returncode == 1
    assert "absolute" in result.stderr


@pytest.mark.e2e
def test_build_refuses_a_symlink_to_the_trees_parent(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    (tree / "up").symlink_to("..")
    result = run("build", tree, "--component", "web", "--version", "1.2.0", "-o", tmp_path / "p.tar")
    assert result.returncode == 1
    assert "points outside" in result.stderr


@pytest.mark.e2e
def test_build_refuses_special_files(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    os.mkfifo(tree / "pipe")
    result = run("build", tree, "--component", "web", "--version", "1.2.0", "-o", tmp_path / "p.tar")
    assert result.returncode == 1
    assert "pipe" in result.stderr and "fifo" in result.stderr


@pytest.mark.e2e
def test_build_refuses_an_output_inside_the_tree(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    result = run("build", tree, "--component", "web", "--version", "1.2.0", "-o", tree / "p.tar")
    assert result.returncode == 1
    assert "inside the tree" in result.stderr


@pytest.mark.e2e
def test_build_refuses_an_unsafe_version_as_a_usage_error(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    result = run("build", tree, "--component", "web", "--version", "../1", "-o", tmp_path / "p.tar")
    assert result.returncode == 2
    assert "invalid version" in result.stderr


@pytest.mark.e2e
def test_sign_writes_expiry_and_nodes_into_the_manifest(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    _, sec = keys
    pkg = tmp_path / "p.tar"
    pkg.write_bytes(os.urandom(1000))
    out_sig = tmp_path / "custom.minisig"
    out = ok(
        "sign", pkg, "--key", sec, "--component", "web", "--version", "2.0.0-rc1",
        "--expires", "2099-01-01T00:00:00Z", "--nodes", "node-1,node-2", "-o", out_sig,
    )  # fmt: skip
    manifest = parse_manifest(parse_signature(out_sig.read_text()).trusted_comment)
    assert (manifest.component, manifest.version) == ("web", "2.0.0-rc1")
    assert manifest.expires == 4070908800.0
    assert manifest.nodes == ("node-1", "node-2")
    assert printed(out, "trusted comment") == parse_signature(out_sig.read_text()).trusted_comment


@pytest.mark.e2e
def test_sign_accepts_an_expiry_relative_to_now(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    _, sec = keys
    pkg = tmp_path / "p.tar"
    pkg.write_bytes(b"x")
    ok("sign", pkg, "--key", sec, "--component", "web", "--version", "1", "--expires", "30d")
    manifest = parse_manifest(parse_signature(Path(str(pkg) + ".minisig").read_text()).trusted_comment)
    assert manifest.expires is not None
    assert abs(manifest.expires - (time.time() + 30 * 86400)) < 60


@pytest.mark.e2e
def test_sign_refuses_an_expiry_in_the_past(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    _, sec = keys
    pkg = tmp_path / "p.tar"
    pkg.write_bytes(b"x")
    result = run("sign", pkg, "--key", sec, "--component", "web", "--version", "1", "--expires", "1000")
    assert result.returncode == 1
    assert "not in the future" in result.stderr
    assert not Path(str(pkg) + ".minisig").exists()


@pytest.mark.e2e
def test_sign_without_component_is_a_usage_error(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    _, sec = keys
    result = run("sign", tmp_path / "p.tar", "--key", sec, "--version", "1")
    assert result.returncode == 2
    assert "--component" in result.stderr


@pytest.mark.e2e
def test_sign_with_a_missing_key_prints_one_clear_line(tmp_path: Path) -> None:
    pkg = tmp_path / "p.tar"
    pkg.write_bytes(b"x")
    result = run("sign", pkg, "--key", tmp_path / "nokey", "--component", "web", "--version", "1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"baton-package: error: {tmp_path / 'nokey'}: No such file or directory"
    ]


@pytest.mark.e2e
def test_sign_with_a_public_key_instead_of_a_secret_key_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    pub, _ = keys
    pkg = tmp_path / "p.tar"
    pkg.write_bytes(b"x")
    result = run("sign", pkg, "--key", pub, "--component", "web", "--version", "1")
    assert result.returncode == 1
    assert "secret key" in result.stderr


def test_main_returns_the_exit_code_in_process(tmp_path: Path) -> None:
    from manager.build.package_tool import main

    assert main(["keygen", "-p", str(tmp_path / "a.pub"), "-s", str(tmp_path / "a.key")]) == 0
    assert main(["keygen", "-p", str(tmp_path / "a.pub"), "-s", str(tmp_path / "a.key")]) == 1
    assert main(["frobnicate"]) == 2
