"""Specification of helper.download against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton.errors import BatonError
from helper.download import (
    MAX_RESPONSE_HEAD_BYTES,
    ConnectionFailed,
    DownloadedFile,
    DownloadError,
    DownloadLimits,
    DownloadProgress,
    DownloadTimeout,
    DownloadTooLarge,
    DownloadTooSlow,
    DownloadTruncated,
    FileIdentity,
    HttpStatusError,
    InsufficientSpace,
    ProtocolViolation,
    UnexpectedResponse,
    UnsupportedUrl,
    UntrustedDownloadFile,
    download,
)
from tests.pkgserver import PackageServer, RawServer

NAME = "pkg.bin"
SIZE = 1024 * 1024 + 123  # not a multiple of any chunk size
NOBODY_UID = 65534
GENEROUS_S = 10.0  # upper bound on anything expected to be quick; never a speed assertion

LIMITS = DownloadLimits(
    connect_timeout_s=5,
    read_timeout_s=5,
    total_timeout_s=60,
    min_rate_bytes_per_s=0,
    min_rate_window_s=1,
    free_space_reserve_bytes=0,
    chunk_bytes=64 * 1024,
)


@pytest.fixture
def payload(tmp_path: Path) -> bytes:
    data = os.urandom(SIZE)
    served = tmp_path / "served"
    served.mkdir()
    (served / NAME).write_bytes(data)
    return data


@pytest.fixture
def server(tmp_path: Path, payload: bytes) -> Iterator[PackageServer]:
    before = set(threading.enumerate())
    with PackageServer(tmp_path / "served") as srv:
        yield srv
    leftover = [t for t in set(threading.enumerate()) - before if not t.name.startswith("digest")]
    assert leftover == [], f"PackageServer.stop() left threads running: {leftover}"


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    downloads = tmp_path / "downloads"
    downloads.mkdir(mode=0o700)
    return downloads / NAME


def with_root(root: Path) -> DownloadLimits:
    return DownloadLimits(**{**LIMITS.__dict__, "file_url_root": root})


def fetch(url: str, dest: Path, limits: DownloadLimits = LIMITS, **kwargs: object) -> DownloadedFile:
    return download(url, dest, expected_size=SIZE, limits=limits, **kwargs)  # type: ignore[arg-type]


def assert_digests_of(result: DownloadedFile, data: bytes) -> None:
    assert result.digests.size == len(data)
    assert result.digests.sha256_hex == hashlib.sha256(data).hexdigest()
    assert result.digests.blake2b512 == hashlib.blake2b(data, digest_size=64).digest()


# ------------------------------------------------------------------ happy paths


def test_download_writes_the_file_with_digests_matching_hashlib(
    server: PackageServer, payload: bytes, dest: Path
) -> None:
    with fetch(server.url(NAME), dest) as result:
        assert_digests_of(result, payload)
        assert result.path == dest
        assert result.resumed_from == 0
        assert dest.read_bytes() == payload


def test_downloaded_file_is_private(server: PackageServer, dest: Path) -> None:
    with fetch(server.url(NAME), dest):
        assert stat.S_IMODE(dest.stat().st_mode) == 0o600


def test_returned_handle_reads_the_hashed_bytes_even_after_the_path_is_replaced(
    server: PackageServer, payload: bytes, dest: Path
) -> None:
    with fetch(server.url(NAME), dest) as result:
        impostor = dest.with_name("impostor")
        impostor.write_bytes(b"not the package")
        os.replace(impostor, dest)
        assert result.file.read() == payload


def test_returned_handle_is_read_only_and_closed_by_the_context_manager(server: PackageServer, dest: Path) -> None:
    with fetch(server.url(NAME), dest) as result:
        with pytest.raises((io.UnsupportedOperation, OSError)):
            result.file.write(b"x")
        assert os.fstat(result.file.fileno()).st_ino == dest.stat().st_ino
    assert result.file.closed


def test_a_file_system_that_refuses_o_direct_gets_every_byte_through_the_cache(
    server: PackageServer, payload: bytes, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import helper.download.writer

    monkeypatch.setattr(helper.download.writer.DirectWriter, "_set_direct", lambda self, on: False)
    with fetch(server.url(NAME), dest) as result:
        assert_digests_of(result, payload)
        assert dest.read_bytes() == payload


def test_file_url_beneath_the_root_is_copied_and_hashed(tmp_path: Path, payload: bytes, dest: Path) -> None:
    source = tmp_path / "served" / NAME
    with fetch(source.as_uri(), dest, with_root(tmp_path / "served")) as result:
        assert_digests_of(result, payload)
        assert result.file.read() == payload


def test_file_url_of_the_wrong_size_is_refused(tmp_path: Path, dest: Path) -> None:
    source = tmp_path / "other.bin"
    source.write_bytes(b"x" * (SIZE + 1))
    with pytest.raises(DownloadTooLarge):
        fetch(source.as_uri(), dest, with_root(tmp_path))


def test_progress_sees_increasing_bytes_and_the_total(server: PackageServer, dest: Path) -> None:
    server.on(NAME).rate_limit(4 * 1024 * 1024)
    seen: list[DownloadProgress] = []
    with fetch(server.url(NAME), dest, progress=seen.append):
        pass
    assert seen, "progress was never reported"
    done = [p.bytes_done for p in seen]
    assert done == sorted(done)
    assert done[-1] == SIZE
    assert all(p.bytes_total == SIZE for p in seen)
    assert all(p.resumed_from == 0 for p in seen)


# ------------------------------------------------------------------ bounded bytes


def test_truncated_body_raises_download_truncated_and_keeps_the_partial_file(server: PackageServer, dest: Path) -> None:
    server.on(NAME).truncate_at(300_000)
    with pytest.raises(DownloadTruncated) as info:
        fetch(server.url(NAME), dest)
    assert info.value.received == 300_000
    assert dest.stat().st_size == 300_000


def test_server_sending_more_than_expected_is_cut_off_at_size_plus_one_and_refused(
    server: PackageServer, dest: Path
) -> None:
    # The server sends past the end, then stalls: reading on to EOF would time out instead.
    server.on(NAME).oversize(1024 * 1024).stall_after(SIZE + 1000, 60)
    started = time.monotonic()
    with pytest.raises(DownloadTooLarge):
        fetch(server.url(NAME), dest)
    assert time.monotonic() - started < LIMITS.read_timeout_s
    assert not dest.exists()


def test_content_length_larger_than_expected_is_refused_before_the_body(server: PackageServer, dest: Path) -> None:
    server.on(NAME).oversize(1000, content_length=SIZE + 1000).stall_after(0, 60)
    with pytest.raises(DownloadTooLarge) as info:
        fetch(server.url(NAME), dest)
    assert info.value.announced == SIZE + 1000


def test_content_length_smaller_than_expected_is_refused_before_the_body(server: PackageServer, dest: Path) -> None:
    server.on(NAME).oversize(0, content_length=SIZE - 10).stall_after(0, 60)
    with pytest.raises(DownloadTruncated) as info:
        fetch(server.url(NAME), dest)
    assert info.value.received == SIZE - 10


# ------------------------------------------------------------------ bounded time and rate


def test_stalled_server_hits_the_read_timeout(server: PackageServer, dest: Path) -> None:
    server.on(NAME).stall_after(1000, 60)
    limits = DownloadLimits(**{**LIMITS.__dict__, "read_timeout_s": 0.5})
    started = time.monotonic()
    with pytest.raises(DownloadTimeout) as info:
        fetch(server.url(NAME), dest, limits)
    assert time.monotonic() - started < GENEROUS_S
    assert info.value.limit_s == 0.5


def test_whole_download_deadline_raises_download_timeout(server: PackageServer, dest: Path) -> None:
    server.on(NAME).rate_limit(100_000)
    limits = DownloadLimits(**{**LIMITS.__dict__, "total_timeout_s": 0.5})
    started = time.monotonic()
    with pytest.raises(DownloadTimeout) as info:
        fetch(server.url(NAME), dest, limits)
    assert time.monotonic() - started < GENEROUS_S
    assert info.value.limit_s == 0.5


def test_rate_below_the_floor_over_the_window_raises_download_too_slow(server: PackageServer, dest: Path) -> None:
    server.on(NAME).rate_limit(20_000)
    limits = DownloadLimits(**{**LIMITS.__dict__, "min_rate_bytes_per_s": 200_000, "min_rate_window_s": 0.3})
    started = time.monotonic()
    with pytest.raises(DownloadTooSlow) as info:
        fetch(server.url(NAME), dest, limits)
    assert time.monotonic() - started < GENEROUS_S
    assert info.value.rate_bytes_per_s < 200_000


# ------------------------------------------------------------------ failures to fetch


def test_http_404_raises_http_status_error(server: PackageServer, dest: Path) -> None:
    with pytest.raises(HttpStatusError) as info:
        fetch(server.url("missing.bin"), dest)
    assert info.value.status == 404
    assert info.value.url == server.url("missing.bin")


def test_http_503_with_retry_after_is_retried_after_that_many_seconds_and_then_downloads(
    server: PackageServer, payload: bytes, dest: Path
) -> None:
    server.on(NAME).busy(2, retry_after="1")
    started = time.monotonic()
    with fetch(server.url(NAME), dest) as result:
        assert_digests_of(result, payload)
    assert time.monotonic() - started >= 2.0, "it waited Retry-After (1 s) after each of the two 503s"
    assert [r.method for r in server.requests_for(NAME)] == ["GET"] * 3


def test_http_503_without_retry_after_is_retried_with_backoff(
    server: PackageServer, payload: bytes, dest: Path
) -> None:
    server.on(NAME).busy(2)
    with fetch(server.url(NAME), dest) as result:
        assert_digests_of(result, payload)
    assert len(server.requests_for(NAME)) == 3


def test_http_503_until_the_deadline_raises_download_timeout_without_sleeping_past_it(
    server: PackageServer, dest: Path
) -> None:
    server.on(NAME).busy(1000, retry_after="30")
    limits = DownloadLimits(**{**LIMITS.__dict__, "total_timeout_s": 1.0})
    started = time.monotonic()
    with pytest.raises(DownloadTimeout) as info:
        fetch(server.url(NAME), dest, limits)
    assert time.monotonic() - started < GENEROUS_S, "Retry-After: 30 was cut at the 1 s deadline"
    assert "busy (HTTP 503)" in str(info.value) and info.value.limit_s == 1.0


def test_other_5xx_statuses_are_not_retried(server: PackageServer, dest: Path) -> None:
    server.on(NAME).status(502)
    with pytest.raises(HttpStatusError) as info:
        fetch(server.url(NAME), dest)
    assert info.value.status == 502
    assert len(server.requests_for(NAME)) == 1


def test_connection_refused_raises_connection_failed(dest: Path) -> None:
    with socket.socket() as bound_not_listening:
        bound_not_listening.bind(("127.0.0.1", 0))
        port = bound_not_listening.getsockname()[1]
        with pytest.raises(ConnectionFailed):
            fetch(f"http://127.0.0.1:{port}/{NAME}", dest)


def test_unsupported_scheme_is_a_download_error(dest: Path) -> None:
    with pytest.raises(UnsupportedUrl) as info:
        fetch("ftp://127.0.0.1/pkg.bin", dest)
    assert isinstance(info.value, DownloadError)
    assert isinstance(info.value, BatonError)


def test_every_refusal_is_a_download_error() -> None:
    for cls in (
        ConnectionFailed,
        DownloadTimeout,
        DownloadTooLarge,
        DownloadTooSlow,
        DownloadTruncated,
        HttpStatusError,
        InsufficientSpace,
        UnsupportedUrl,
    ):
        assert issubclass(cls, DownloadError)


# ------------------------------------------------------------------ resume


def test_interrupted_download_resumes_with_a_range_request(server: PackageServer, payload: bytes, dest: Path) -> None:
    server.on(NAME).truncate_at(300_000)
    made: list[FileIdentity] = []
    with pytest.raises(DownloadTruncated):
        fetch(server.url(NAME), dest, created=made.append)
    server.on(NAME).reset()
    seen: list[DownloadProgress] = []
    with fetch(server.url(NAME), dest, progress=seen.append, owned=made[0]) as result:
        assert result.resumed_from == 300_000
        assert_digests_of(result, payload)
        assert result.file.read() == payload
    assert server.requests_for(NAME)[-1].range == "bytes=300000-"
    assert seen[-1].resumed_from == 300_000


def test_server_without_range_support_restarts_from_zero(server: PackageServer, payload: bytes, dest: Path) -> None:
    server.on(NAME).truncate_at(300_000)
    made: list[FileIdentity] = []
    with pytest.raises(DownloadTruncated):
        fetch(server.url(NAME), dest, created=made.append)
    server.on(NAME).reset().no_range()
    with fetch(server.url(NAME), dest, owned=made[0]) as result:
        assert result.resumed_from == 0
        assert_digests_of(result, payload)
    assert server.requests_for(NAME)[-1].range == "bytes=300000-"
    assert dest.read_bytes() == payload


def test_complete_recorded_file_is_hashed_without_a_request(
    server: PackageServer, payload: bytes, dest: Path
) -> None:
    made: list[FileIdentity] = []
    fetch(server.url(NAME), dest, created=made.append).close()
    server.reset_all()
    with fetch(server.url(NAME), dest, owned=made[0]) as result:
        assert_digests_of(result, payload)
        assert result.resumed_from == SIZE
    assert server.requests == []


def test_a_file_the_helper_did_not_record_is_never_resumed(server: PackageServer, payload: bytes, dest: Path) -> None:
    dest.write_bytes(payload[:1000])  # ours by owner, but not a file download() created and reported
    made: list[FileIdentity] = []
    with fetch(server.url(NAME), dest, created=made.append) as result:
        assert result.resumed_from == 0
        assert_digests_of(result, payload)
    assert server.requests_for(NAME)[-1].range is None
    assert made == [FileIdentity.of(dest.stat())]


def test_file_longer_than_expected_is_discarded_and_fetched_again(
    server: PackageServer, payload: bytes, dest: Path
) -> None:
    dest.write_bytes(payload + b"garbage")
    with fetch(server.url(NAME), dest) as result:
        assert_digests_of(result, payload)
        assert result.resumed_from == 0
    assert server.requests_for(NAME)[-1].range is None


def test_resume_false_starts_over_without_a_range_request(server: PackageServer, payload: bytes, dest: Path) -> None:
    dest.write_bytes(payload[:1000])
    with fetch(server.url(NAME), dest, resume=False) as result:
        assert_digests_of(result, payload)
        assert result.resumed_from == 0
    assert server.requests_for(NAME)[-1].range is None


# ------------------------------------------------------------------ disk space


def test_insufficient_free_space_is_refused_before_any_byte_is_written(server: PackageServer, dest: Path) -> None:
    vfs = os.statvfs(dest.parent)
    free = vfs.f_bavail * vfs.f_frsize
    limits = DownloadLimits(**{**LIMITS.__dict__, "free_space_reserve_bytes": free + 2**30})
    with pytest.raises(InsufficientSpace) as info:
        fetch(server.url(NAME), dest, limits)
    assert info.value.needed_bytes == SIZE + free + 2**30
    assert info.value.free_bytes <= free + 2**30
    assert not dest.exists()
    assert server.requests == []


# ------------------------------------------------------------------ a server that breaks HTTP itself


def test_response_head_dripped_a_byte_at_a_time_hits_the_whole_download_deadline(dest: Path) -> None:
    # Each byte comes well inside the read timeout: only a deadline over the whole request stops it.
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Drip: " + b"a" * 4000 + b"\r\n\r\n"
    limits = DownloadLimits(**{**LIMITS.__dict__, "read_timeout_s": 5, "total_timeout_s": 1.0})
    with RawServer(head, drip_s=0.05) as raw:
        started = time.monotonic()
        with pytest.raises(DownloadTimeout) as info:
            fetch(raw.url(NAME), dest, limits)
        assert time.monotonic() - started < GENEROUS_S
    assert info.value.limit_s == 1.0
    assert "whole download" in str(info.value)


def test_two_different_content_lengths_are_a_protocol_violation_not_a_connection_failure(dest: Path) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Length: 20\r\n\r\n" + b"x" * 20
    with RawServer(answer) as raw, pytest.raises(ProtocolViolation) as info:
        fetch(raw.url(NAME), dest)
    assert "cannot connect" not in str(info.value)
    assert "Content-Length" in str(info.value)


def test_a_2_mib_response_head_is_cut_off_at_the_head_cap(dest: Path) -> None:
    answer = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (2 * 1024 * 1024) + b"\r\n\r\n"
    with RawServer(answer) as raw, pytest.raises(ProtocolViolation) as info:
        fetch(raw.url(NAME), dest)
    assert f"response head longer than {MAX_RESPONSE_HEAD_BYTES} bytes" in str(info.value)


def test_a_malformed_status_line_is_reported_as_such_and_clipped(dest: Path) -> None:
    answer = b"HTTP/1.1 TWO-HUNDRED " + b"A" * 50_000 + b"\r\n\r\n"
    with RawServer(answer) as raw, pytest.raises(ProtocolViolation) as info:
        fetch(raw.url(NAME), dest)
    assert "status line" in str(info.value)
    assert len(str(info.value)) < 1000


def chunked(data: bytes, size: int = 100_000) -> bytes:
    pieces = [data[i : i + size] for i in range(0, len(data), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def test_a_chunked_body_is_decoded_and_hashed(payload: bytes, dest: Path) -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(payload)
    with RawServer(answer) as raw, fetch(raw.url(NAME), dest) as result:
        assert_digests_of(result, payload)
        assert result.file.read() == payload


def test_a_chunked_body_longer_than_expected_is_refused(payload: bytes, dest: Path) -> None:
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(payload + b"extra")
    with RawServer(answer) as raw, pytest.raises(DownloadTooLarge):
        fetch(raw.url(NAME), dest)
    assert not dest.exists()


def test_transfer_encoding_beside_content_length_is_a_protocol_violation(payload: bytes, dest: Path) -> None:
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n" % SIZE
              + chunked(payload))
    with RawServer(answer) as raw, pytest.raises(ProtocolViolation) as info:
        fetch(raw.url(NAME), dest)
    assert "Transfer-Encoding" in str(info.value)


def test_a_redirect_to_the_package_is_followed(server: PackageServer, payload: bytes, dest: Path) -> None:
    answer = f"HTTP/1.1 302 Found\r\nLocation: {server.url(NAME)}\r\nContent-Length: 0\r\n\r\n".encode()
    with RawServer(answer) as raw, fetch(raw.url(NAME), dest) as result:
        assert_digests_of(result, payload)
    assert len(server.requests_for(NAME)) == 1


def test_a_redirect_loop_ends_after_max_redirects(dest: Path) -> None:
    with RawServer(b"") as raw:
        raw.response = f"HTTP/1.1 307 Again\r\nLocation: {raw.url(NAME)}\r\nContent-Length: 0\r\n\r\n".encode()
        with pytest.raises(UnexpectedResponse) as info:
            fetch(raw.url(NAME), dest)
    assert f"more than {LIMITS.max_redirects} redirects" in str(info.value)
    assert raw.connections == LIMITS.max_redirects + 1


def test_a_redirect_to_a_file_url_is_refused(tmp_path: Path, dest: Path) -> None:
    answer = f"HTTP/1.1 302 Found\r\nLocation: {(tmp_path / 'served' / NAME).as_uri()}\r\n\r\n".encode()
    with RawServer(answer) as raw, pytest.raises(UnexpectedResponse) as info:
        fetch(raw.url(NAME), dest, with_root(tmp_path / "served"))
    assert "non-HTTP" in str(info.value)


def test_a_long_url_is_clipped_in_errors(dest: Path) -> None:
    with socket.socket() as bound_not_listening:
        bound_not_listening.bind(("127.0.0.1", 0))
        port = bound_not_listening.getsockname()[1]
        with pytest.raises(DownloadError) as info:
            fetch(f"http://127.0.0.1:{port}/{'p' * 100_000}", dest)
    assert len(str(info.value)) < 1000


# ------------------------------------------------------------------ the download file is the helper's own


def test_a_download_file_someone_else_owns_is_refused_and_left_alone(server: PackageServer, dest: Path) -> None:
    dest.write_bytes(b"planted")
    os.chown(dest, NOBODY_UID, -1)
    dest.chmod(0o600)
    with pytest.raises(UntrustedDownloadFile) as info:
        fetch(server.url(NAME), dest, owned=FileIdentity.of(dest.stat()))
    assert f"owned by uid {NOBODY_UID}" in str(info.value)
    assert dest.read_bytes() == b"planted"
    assert server.requests == []


def test_a_symlink_at_the_download_path_is_refused(server: PackageServer, tmp_path: Path, dest: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"root's file")
    dest.symlink_to(target)
    with pytest.raises(UntrustedDownloadFile):
        fetch(server.url(NAME), dest)
    assert target.read_bytes() == b"root's file"


def test_a_recorded_file_that_gained_a_link_is_not_resumed(server: PackageServer, payload: bytes, dest: Path) -> None:
    server.on(NAME).truncate_at(300_000)
    made: list[FileIdentity] = []
    with pytest.raises(DownloadTruncated):
        fetch(server.url(NAME), dest, created=made.append)
    os.link(dest, dest.with_name("second-link"))
    server.on(NAME).reset()
    with fetch(server.url(NAME), dest, owned=made[0]) as result:
        assert result.resumed_from == 0
        assert_digests_of(result, payload)
    assert dest.with_name("second-link").stat().st_size == 300_000  # the linked inode was left alone


def test_the_download_file_is_created_exclusively_and_private(server: PackageServer, dest: Path) -> None:
    made: list[FileIdentity] = []
    with fetch(server.url(NAME), dest, created=made.append):
        st = dest.lstat()
    assert made == [FileIdentity.of(st)]
    assert (st.st_uid, st.st_nlink, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 1, 0o600)


# ------------------------------------------------------------------ file:// policy


def test_file_urls_are_refused_without_a_configured_root(tmp_path: Path, dest: Path) -> None:
    with pytest.raises(UnsupportedUrl) as info:
        fetch((tmp_path / "served" / NAME).as_uri(), dest)
    assert "update.file_url_root" in str(info.value)


def shadow_size() -> str:
    return str(os.stat("/etc/shadow").st_size)


def test_etc_shadow_outside_the_root_is_refused_without_revealing_its_size(tmp_path: Path, dest: Path) -> None:
    with pytest.raises(UnsupportedUrl) as info:
        fetch("file:///etc/shadow", dest, with_root(tmp_path / "served"))
    assert shadow_size() not in str(info.value).replace(str(SIZE), "")


def test_dot_dot_out_of_the_root_is_refused(tmp_path: Path, dest: Path) -> None:
    with pytest.raises(UnsupportedUrl):
        fetch(f"file://{tmp_path}/served/../../../../etc/shadow", dest, with_root(tmp_path / "served"))


def test_a_symlink_beneath_the_root_to_etc_shadow_is_refused_without_revealing_its_size(
    tmp_path: Path, dest: Path
) -> None:
    (tmp_path / "served").mkdir(exist_ok=True)
    link = tmp_path / "served" / "shadow.pkg"
    link.symlink_to("/etc/shadow")
    with pytest.raises(ConnectionFailed) as info:
        fetch(link.as_uri(), dest, with_root(tmp_path / "served"))
    assert "symbolic link" in str(info.value)
    assert shadow_size() not in str(info.value).replace(str(SIZE), "")


def test_a_fifo_beneath_the_root_is_refused_without_blocking(tmp_path: Path, dest: Path) -> None:
    (tmp_path / "served").mkdir(exist_ok=True)
    fifo = tmp_path / "served" / "pkg.fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(UnsupportedUrl) as info:
        fetch(fifo.as_uri(), dest, with_root(tmp_path / "served"))
    assert time.monotonic() - started < GENEROUS_S
    assert "not a regular file" in str(info.value)


# ------------------------------------------------------------------ limits come from the config


def test_limits_are_built_from_the_validated_config_only() -> None:
    from baton.config import UpdateConfig, config_from_dict

    cfg = config_from_dict({"node": {"id": "n"}, "grpc": {"unix_socket": "/run/b.sock"},
                            "update": {"download_timeout_s": 7.5, "min_rate_window_s": 3.0,
                                       "file_url_root": "/srv/packages"}})
    limits = DownloadLimits.from_config(cfg.update)
    assert (limits.total_timeout_s, limits.min_rate_window_s, limits.file_url_root) == (7.5, 3.0, Path("/srv/packages"))
    defaults = DownloadLimits.from_config(UpdateConfig())
    u = UpdateConfig()
    assert (defaults.connect_timeout_s, defaults.read_timeout_s, defaults.total_timeout_s,
            defaults.min_rate_bytes_per_s, defaults.min_rate_window_s, defaults.free_space_reserve_bytes,
            defaults.file_url_root) == (u.connect_timeout_s, u.read_timeout_s, u.download_timeout_s,
                                        u.min_rate_bytes_per_s, u.min_rate_window_s, u.free_space_reserve_bytes, None)


@pytest.mark.parametrize(("value", "problem"), [
    ("srv/packages", "must be an absolute path"),
    ("/srv/../etc", "without '..'"),
    ("/", "not /"),
])
def test_a_bad_file_url_root_is_refused_by_the_config_naming_the_key(value: str, problem: str) -> None:
    from baton.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError) as info:
        config_from_dict({"node": {"id": "n"}, "grpc": {"unix_socket": "/run/b.sock"},
                          "update": {"file_url_root": value}})
    assert str(info.value).startswith("update.file_url_root: ")
    assert problem in str(info.value)
