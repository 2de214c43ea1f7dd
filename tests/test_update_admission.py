"""What a push is refused for before anything is downloaded or journaled, and how the refusal reads.

Each refusal is checked against a real supervisor: the client gets a short,
clear reason, nothing was fetched from the package server, no journal record
was written, and the running agent was not touched.
"""

from __future__ import annotations

import grpc
import pytest

from tests.conftest import UpdateHost

pytestmark = pytest.mark.e2e  # every test here starts a process


def _refused_at_push(host: UpdateHost, request, pkgserver, name: str) -> grpc.RpcError:
    before = host.sup.agent("app")
    with pytest.raises(grpc.RpcError) as e:
        host.sup.stub.PushUpdate(request, timeout=10)
    assert pkgserver.requests_for(name) == []
    updates = host.sup.state_dir / "updates"
    assert not updates.exists() or not any(updates.iterdir())
    assert host.sup.agent("app").pid == before.pid
    return e.value


def _served(host: UpdateHost, pkgserver, version: str = "1.1.0"):
    pkg = host.release.build(version)
    (pkgserver.root / pkg.path.name).write_bytes(pkg.path.read_bytes())
    return pkg, pkgserver.url(pkg.path.name)


def test_100_kib_version_string_is_refused_with_a_short_clear_reason(update_host, pkgserver):
    pkg, url = _served(update_host, pkgserver)
    err = _refused_at_push(update_host, pkg.request(version="1" * 100 * 1024, download_url=url), pkgserver,
                           pkg.path.name)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len(err.details()) < 400, len(err.details())
    assert "invalid version" in err.details() and "longer than 64 characters" in err.details()
    assert "(102400 characters)" in err.details()


def test_100_kib_download_url_is_refused_with_a_short_clear_reason(update_host, pkgserver):
    pkg, url = _served(update_host, pkgserver)
    err = _refused_at_push(update_host, pkg.request(download_url=url + "?" + "a" * 100 * 1024), pkgserver,
                           pkg.path.name)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert len(err.details()) < 400, len(err.details())
    assert "download_url is longer than" in err.details()


def test_3_mib_signature_is_refused_at_push_before_any_download(update_host, pkgserver):
    pkg, url = _served(update_host, pkgserver)
    huge = pkg.signature.replace("untrusted comment: ", "untrusted comment: " + "x" * 3 * 1024 * 1024, 1)
    err = _refused_at_push(update_host, pkg.request(download_url=url, signature=huge), pkgserver, pkg.path.name)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "signature is longer than 10240 bytes" in err.details()


def test_signature_that_does_not_parse_is_refused_at_push_before_any_download(update_host, pkgserver):
    pkg, url = _served(update_host, pkgserver)
    err = _refused_at_push(update_host, pkg.request(download_url=url, signature="not\na\nsignature\n"), pkgserver,
                           pkg.path.name)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "signature: expected 4 lines" in err.details()
