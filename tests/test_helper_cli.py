"""``helper verify`` checks a package offline exactly as an update would, for operators."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import PY, ROOT

pytestmark = pytest.mark.e2e  # every test here starts a process


def helper(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "helper", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def sig_file(pkg) -> str:
    p = pkg.path.with_name(pkg.path.name + ".minisig")
    p.write_text(pkg.signature)
    return str(p)


def test_verify_accepts_a_good_package_and_prints_its_manifest_and_key(release):
    pkg = release.build("1.1.0", nodes=["node-1"])
    res = helper("verify", str(pkg.path), "--signature", sig_file(pkg), "--component", "app", "--version", "1.1.0",
                 "--key", str(release.public_key), "--node", "node-1")
    assert res.returncode == 0, res.stderr
    assert release.secret.key_id_hex in res.stdout
    assert "1.1.0" in res.stdout and "app" in res.stdout
    assert pkg.sha256 in res.stdout


def test_verify_refuses_a_flipped_byte(release):
    pkg = release.build("1.1.0")
    sig = sig_file(pkg)
    data = bytearray(pkg.path.read_bytes())
    data[200] ^= 1
    pkg.path.write_bytes(bytes(data))
    res = helper("verify", str(pkg.path), "--signature", sig, "--component", "app", "--version", "1.1.0",
                 "--key", str(release.public_key))
    assert res.returncode != 0
    assert "REFUSED" in res.stderr and "signature" in res.stderr


def test_verify_refuses_another_component(release):
    pkg = release.build("1.1.0")
    res = helper("verify", str(pkg.path), "--signature", sig_file(pkg), "--component", "db", "--version", "1.1.0",
                 "--key", str(release.public_key))
    assert res.returncode != 0
    assert "component" in res.stderr


def test_verify_refuses_an_untrusted_key(release, tmp_path):
    from baton.signing import format_public_key, generate_keypair

    _, other = generate_keypair()
    other_pub = tmp_path / "other.pub"
    other_pub.write_text(format_public_key(other))
    pkg = release.build("1.1.0")
    res = helper("verify", str(pkg.path), "--signature", sig_file(pkg), "--component", "app", "--version", "1.1.0",
                 "--key", str(other_pub))
    assert res.returncode != 0
    assert release.secret.key_id_hex in res.stderr


def test_verify_refuses_another_node(release):
    pkg = release.build("1.1.0", nodes=["node-9"])
    res = helper("verify", str(pkg.path), "--signature", sig_file(pkg), "--component", "app", "--version", "1.1.0",
                 "--key", str(release.public_key), "--node", "node-1")
    assert res.returncode != 0
    assert "node-1" in res.stderr


def test_verify_without_any_key_fails_closed(release):
    pkg = release.build("1.1.0")
    res = helper("verify", str(pkg.path), "--signature", sig_file(pkg), "--component", "app", "--version", "1.1.0")
    assert res.returncode != 0
    assert "REFUSED" in res.stderr


def test_package_signed_with_the_minisign_tool_is_installed_by_an_update(update_host, tmp_path):
    """A release engineer signs with stock minisign; the helper installs it."""
    pub, sec = tmp_path / "m.pub", tmp_path / "m.sec"
    subprocess.run(["minisign", "-G", "-W", "-p", str(pub), "-s", str(sec)], check=True, capture_output=True,
                   timeout=60)
    from manager.build.package_tool import build_package

    out = tmp_path / "app-1.1.0.tar.gz"
    digests = build_package(update_host.release.tree("1.1.0"), out, True)
    subprocess.run(["minisign", "-S", "-s", str(sec), "-m", str(out), "-t", "component=app version=1.1.0"],
                   check=True, capture_output=True, timeout=60)
    # trust the minisign key as well (key rotation: several keys, matched by id)
    cfg = update_host.sup.cfg
    cfg["update"]["trusted_keys"] = [str(update_host.release.public_key), str(pub)]
    update_host.sup.terminate()
    update_host.sup.start()
    from baton.pb import daemon_pb2

    req = daemon_pb2.UpdateRequest(component="app", version="1.1.0", download_url=out.as_uri(),
                                   sha256=digests.sha256_hex, size=digests.size,
                                   signature=out.with_name(out.name + ".minisig").read_text())
    uid = update_host.sup.stub.PushUpdate(req, timeout=10).update_id
    st = update_host.wait_final(uid)
    assert st.success, st.error
    assert update_host.sup.agent("app").version == "1.1.0"


def verify_within(package: str, signature: str, key: str) -> subprocess.CompletedProcess[str]:
    """``helper verify`` with a timeout well past what a refusal needs: a hang fails the test, not the run."""
    return subprocess.run([PY, "-m", "helper", "verify", package, "--signature", signature, "--component", "app",
                           "--version", "1.1.0", "--key", key], capture_output=True, text=True, cwd=ROOT, timeout=30)


def test_verify_refuses_dev_zero_as_the_package_without_reading_it(release):
    pkg = release.build("1.1.0")
    res = verify_within("/dev/zero", sig_file(pkg), str(release.public_key))
    assert res.returncode != 0
    assert "REFUSED" in res.stderr and "a device, not a regular file" in res.stderr


def test_verify_refuses_a_fifo_as_the_package_without_blocking(release, tmp_path):
    pkg = release.build("1.1.0")
    fifo = tmp_path / "pkg.fifo"
    os.mkfifo(fifo)
    res = verify_within(str(fifo), sig_file(pkg), str(release.public_key))
    assert res.returncode != 0
    assert "a FIFO, not a regular file" in res.stderr


def test_verify_refuses_a_fifo_as_the_signature_without_blocking(release, tmp_path):
    pkg = release.build("1.1.0")
    fifo = tmp_path / "sig.fifo"
    os.mkfifo(fifo)
    res = verify_within(str(pkg.path), str(fifo), str(release.public_key))
    assert res.returncode != 0
    assert "signature file" in res.stderr and "a FIFO, not a regular file" in res.stderr


def test_the_update_paths_imports_leave_the_cycle_collector_on_even_when_one_fails():
    """`helper apply` loads its modules with the collector off (start-up CPU, baton/startup.py); a long update
    still collects."""
    code = ("import gc, baton.startup\n"
            "try:\n"
            "    with baton.startup.loading():\n"
            "        import helper.machine\n"
            "        raise ImportError('a broken module')\n"
            "except ImportError:\n"
            "    pass\n"
            "print(gc.isenabled(), gc.get_freeze_count() > 1000)\n")
    res = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["True", "True"]
