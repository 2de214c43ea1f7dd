"""Specification of helper.download's parts, in-process: the rate meter, the writer's crash points, file safety.

No process and no socket: the workflow takes an in-memory :class:`Fetcher`, the
meter a fake clock. The real transport is specified against a real server in
tests/test_download.py and tests/test_download_attacks.py.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import mmap
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import helper.download.writer
from helper.download import (
    BUSY_BACKOFF_INITIAL_S,
    BUSY_BACKOFF_MAX_S,
    PROGRESS_INTERVAL_S,
    Body,
    ConnectionFailed,
    DownloadError,
    DownloadLimits,
    DownloadProgress,
    DownloadTimeout,
    DownloadTooLarge,
    DownloadTooSlow,
    DownloadTruncated,
    FileIdentity,
    ServerBusy,
    UnsupportedUrl,
    UntrustedDownloadFile,
    download,
)
from helper.download.files import unlink_if_same
from helper.download.rate import Meter, wait_while_busy
from helper.download.transport import fetch_file

URL = "http://packages.invalid/pkg.bin"
CHUNK = 4096  # small buffers: a package of a few KiB crosses several
OTHER_UID = 12345


def limits(**overrides: object) -> DownloadLimits:
    values: dict[str, object] = dict(connect_timeout_s=5.0, read_timeout_s=5.0, total_timeout_s=60.0,
                                     min_rate_bytes_per_s=0, min_rate_window_s=10.0, free_space_reserve_bytes=0,
                                     chunk_bytes=CHUNK)
    values.update(overrides)
    return DownloadLimits(**values)  # type: ignore[arg-type]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemorySource:
    """A package source behind the Fetcher interface: records each offset asked for, fails as told.

    ``break_after``: the first attempt's body fails (as the transport reports a reset) once that many
    bytes of the file are sent. ``ignore_range``: every body starts at 0. ``extra``: bytes past the package.
    """

    def __init__(self, data: bytes, *, break_after: int | None = None, ignore_range: bool = False,
                 extra: bytes = b"", piece: int = 1000) -> None:
        self.data = data
        self.break_after = break_after
        self.ignore_range = ignore_range
        self.extra = extra
        self.piece = piece
        self.offsets: list[int] = []

    @contextlib.contextmanager
    def __call__(self, url: str, offset: int, expected_size: int, limits: DownloadLimits, deadline: float, /
                 ) -> Iterator[Body]:
        self.offsets.append(offset)
        start = 0 if self.ignore_range else offset
        stream = io.BytesIO(self.data[start:] + self.extra)
        break_after, self.break_after = self.break_after, None
        sent = start

        def readinto(b: memoryview) -> int:
            nonlocal sent
            if break_after is not None and sent >= break_after:
                raise DownloadTruncated(url, expected_size, sent, "connection reset by peer")
            room = self.piece if break_after is None else min(self.piece, break_after - sent)
            n = stream.readinto(b[:room])
            sent += n
            return n

        yield Body(start, readinto)


@pytest.fixture
def payload() -> bytes:
    return os.urandom(5 * CHUNK + 123)  # an unaligned tail


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "downloads"
    d.mkdir(mode=0o700)
    return d / "pkg.bin"


def fetch_into(dest: Path, source: MemorySource, size: int, *, owned: FileIdentity | None = None,
               created: list[FileIdentity] | None = None) -> bytes:
    """Download through ``source``; the digest-checked bytes read back from the handle."""
    with download(URL, dest, expected_size=size, limits=limits(), fetch=source, owned=owned,
                  created=None if created is None else created.append) as result:
        data = result.file.read()
        assert result.digests.sha256_hex == hashlib.sha256(data).hexdigest()
        assert result.digests.size == size
        return data


# --------------------------------------------------------------------------- rate


def test_the_rate_floor_is_not_judged_before_a_whole_window_has_passed() -> None:
    clock = FakeClock()
    meter = Meter(URL, limits(min_rate_bytes_per_s=100, min_rate_window_s=10.0), 10_000, None, clock)
    meter.begin(0)
    for second in range(1, 10):  # 1 B/s, a hundredth of the floor, for 9 s: not yet judged
        clock.now += 1
        meter.advance(second, second)
    clock.now += 1.5
    with pytest.raises(DownloadTooSlow):
        meter.advance(10, 10)


def test_an_average_below_the_floor_over_the_window_is_too_slow_and_says_the_rate() -> None:
    clock = FakeClock()
    meter = Meter(URL, limits(min_rate_bytes_per_s=100, min_rate_window_s=10.0), 10_000, None, clock)
    meter.begin(0)
    with pytest.raises(DownloadTooSlow) as caught:
        for second in range(1, 12):  # 50 B/s
            clock.now += 1
            meter.advance(50 * second, 50 * second)
    assert caught.value.rate_bytes_per_s == pytest.approx(50, rel=0.1)
    assert (caught.value.min_rate_bytes_per_s, caught.value.window_s) == (100, 10.0)


def test_a_fast_start_does_not_excuse_a_slow_tail_the_window_slides() -> None:
    clock = FakeClock()
    meter = Meter(URL, limits(min_rate_bytes_per_s=100, min_rate_window_s=10.0), 100_000, None, clock)
    meter.begin(0)
    clock.now += 0.5
    meter.advance(10_000, 10_000)  # 20 kB/s for half a second
    done = 10_000
    with pytest.raises(DownloadTooSlow) as caught:
        for _ in range(30):  # then 1 B/s: the average since the start stays above the floor for 30 s
            clock.now += 1
            done += 1
            meter.advance(done, done)
    assert clock.now - 1000.0 < 15  # caught within the first window after the burst slid out
    assert caught.value.rate_bytes_per_s < 100


def test_a_rate_above_the_floor_never_trips_it() -> None:
    clock = FakeClock()
    reports: list[DownloadProgress] = []
    meter = Meter(URL, limits(min_rate_bytes_per_s=100, min_rate_window_s=10.0, total_timeout_s=1e6), 10**9,
                  reports.append, clock)
    meter.begin(0)
    for tick in range(1, 1000):  # 101 B/s for 100 s in steps of 1/8 s
        clock.now += 1 / 8
        meter.advance(round(101 * tick / 8), 0)
    assert len(reports) > 100
    assert min(r.rate_bytes_per_s for r in reports[80:]) > 100


def test_the_rate_counts_only_this_attempts_bytes_not_the_resumed_ones() -> None:
    clock = FakeClock()
    meter = Meter(URL, limits(min_rate_bytes_per_s=100, min_rate_window_s=10.0), 10**6, None, clock)
    meter.begin(900_000)  # a resume: these bytes arrived in an earlier attempt
    with pytest.raises(DownloadTooSlow) as caught:
        for second in range(1, 12):
            clock.now += 1
            meter.advance(900_000 + 10 * second, 0)
    assert caught.value.rate_bytes_per_s == pytest.approx(10, rel=0.1)


def test_bytes_after_the_whole_download_deadline_are_a_timeout() -> None:
    clock = FakeClock()
    meter = Meter(URL, limits(total_timeout_s=30.0), 10_000, None, clock)
    meter.begin(0)
    clock.now += 30.5
    with pytest.raises(DownloadTimeout) as caught:
        meter.advance(1, 1)
    assert caught.value.limit_s == 30.0


def test_progress_is_reported_at_most_every_interval_and_counts_bytes_on_disk() -> None:
    clock = FakeClock()
    reports: list[DownloadProgress] = []
    meter = Meter(URL, limits(), 1000, reports.append, clock)
    meter.begin(0)
    for step in range(1, 11):  # ten advances 1/32 s apart (exact in binary): due at the 4th and the 8th
        clock.now += 1 / 32
        meter.advance(10 * step, 5 * step)
    assert [r.bytes_done for r in reports] == [20, 40]  # on disk, not received
    assert reports[1].elapsed_s - reports[0].elapsed_s >= PROGRESS_INTERVAL_S
    meter.done(1000)
    assert (reports[-1].bytes_done, reports[-1].bytes_total) == (1000, 1000)


def test_the_busy_backoff_doubles_up_to_its_cap() -> None:
    busy = ServerBusy(URL, retry_after_s=0.0)  # a Retry-After of 0: no real sleep
    deadline = time.monotonic() + 60
    backoffs = [BUSY_BACKOFF_INITIAL_S]
    for _ in range(10):
        backoffs.append(wait_while_busy(busy, backoffs[-1], deadline, 60.0))
    assert backoffs[:3] == [BUSY_BACKOFF_INITIAL_S, 2 * BUSY_BACKOFF_INITIAL_S, 4 * BUSY_BACKOFF_INITIAL_S]
    assert max(backoffs) == backoffs[-1] == BUSY_BACKOFF_MAX_S


def test_a_server_busy_past_the_deadline_is_a_timeout_without_waiting() -> None:
    busy = ServerBusy(URL, retry_after_s=25.0)
    started = time.monotonic()
    with pytest.raises(DownloadTimeout):
        wait_while_busy(busy, BUSY_BACKOFF_INITIAL_S, started - 1, 60.0)
    assert time.monotonic() - started < 5


# --------------------------------------------------------------------------- writer and its crash points


def test_a_package_arrives_whole_with_the_digests_of_its_bytes(payload: bytes, dest: Path) -> None:
    assert fetch_into(dest, MemorySource(payload), len(payload)) == payload
    assert dest.read_bytes() == payload


def test_a_body_broken_midway_leaves_a_prefix_that_the_next_attempt_resumes(payload: bytes, dest: Path) -> None:
    source = MemorySource(payload, break_after=2 * CHUNK + 500)
    created: list[FileIdentity] = []
    with pytest.raises(DownloadTruncated):
        fetch_into(dest, source, len(payload), created=created)
    partial = dest.read_bytes()
    assert 0 < len(partial) <= 2 * CHUNK + 500
    assert payload.startswith(partial)  # a prefix: nothing half-written in the middle
    assert fetch_into(dest, source, len(payload), owned=created[0]) == payload
    assert source.offsets == [0, len(partial)]


def test_a_disk_that_fills_midway_leaves_a_prefix_and_hands_back_no_file(
    payload: bytes, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = [3 * CHUNK]
    real_write_all = helper.download.writer.write_all

    def write_until_full(fd: int, data: bytes | memoryview) -> None:
        room = min(len(data), budget[0])
        real_write_all(fd, memoryview(data)[:room])
        budget[0] -= room
        if room < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(helper.download.writer, "write_all", write_until_full)
    created: list[FileIdentity] = []
    with pytest.raises(DownloadError) as caught:
        fetch_into(dest, MemorySource(payload), len(payload), created=created)
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.ENOSPC
    partial = dest.read_bytes()
    assert len(partial) < len(payload) and payload.startswith(partial)

    monkeypatch.setattr(helper.download.writer, "write_all", real_write_all)  # space freed
    assert fetch_into(dest, MemorySource(payload), len(payload), owned=created[0]) == payload


def test_a_body_that_ends_early_is_truncated_and_never_handed_on_as_finished(payload: bytes, dest: Path) -> None:
    short = MemorySource(payload[: len(payload) - 1])
    with pytest.raises(DownloadTruncated) as caught:
        fetch_into(dest, short, len(payload))
    assert caught.value.received == len(payload) - 1
    assert dest.read_bytes() == payload[:-1]  # kept for a resume


def test_one_byte_past_the_expected_size_is_refused_and_the_file_removed(payload: bytes, dest: Path) -> None:
    with pytest.raises(DownloadTooLarge):
        fetch_into(dest, MemorySource(payload, extra=b"!"), len(payload))
    assert not dest.exists()


def test_a_source_that_ignores_the_offset_starts_the_file_over(payload: bytes, dest: Path) -> None:
    created: list[FileIdentity] = []
    with pytest.raises(DownloadTruncated):
        fetch_into(dest, MemorySource(payload, break_after=CHUNK + 7), len(payload), created=created)
    source = MemorySource(payload, ignore_range=True)
    assert fetch_into(dest, source, len(payload), owned=created[0]) == payload
    assert source.offsets == [CHUNK + 7]
    assert dest.read_bytes() == payload


def test_a_failure_to_record_the_new_files_identity_removes_it_before_a_byte_is_written(
    payload: bytes, dest: Path
) -> None:
    def crash(identity: FileIdentity) -> None:
        raise OSError(errno.EIO, "journal write failed")

    source = MemorySource(payload)
    with pytest.raises(DownloadError):
        download(URL, dest, expected_size=len(payload), limits=limits(), fetch=source, created=crash)
    assert not dest.exists()
    assert source.offsets == []


def test_the_direct_writer_appends_in_order_and_on_disk_is_the_files_length(tmp_path: Path) -> None:
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        writer = helper.download.writer.DirectWriter(fd)
        buf = memoryview(mmap.mmap(-1, CHUNK))  # page-aligned, as a download's buffers are
        written = b""
        for size in (CHUNK, CHUNK, 100, CHUNK - 100, 7):  # aligned, then an unaligned tail and a realignment
            piece = os.urandom(size)
            buf[:size] = piece
            writer(buf[:size])
            written += piece
            assert writer.on_disk == len(written) == os.fstat(fd).st_size
        writer.done()
    finally:
        os.close(fd)
    assert path.read_bytes() == written


# --------------------------------------------------------------------------- file safety


def test_a_symlink_planted_at_dest_is_refused_and_its_target_untouched(payload: bytes, dest: Path,
                                                                         tmp_path: Path) -> None:
    target = tmp_path / "etc-passwd"
    target.write_bytes(b"root:x:0:0\n")
    dest.symlink_to(target)
    with pytest.raises(UntrustedDownloadFile):
        fetch_into(dest, MemorySource(payload), len(payload))
    assert dest.is_symlink()
    assert target.read_bytes() == b"root:x:0:0\n"


def test_a_file_of_another_owner_at_dest_is_refused_not_adopted(payload: bytes, dest: Path) -> None:
    dest.write_bytes(payload[:100])
    os.chmod(dest, 0o600)
    os.chown(dest, OTHER_UID, OTHER_UID)
    with pytest.raises(UntrustedDownloadFile) as caught:
        fetch_into(dest, MemorySource(payload), len(payload), owned=FileIdentity.of(dest.stat()))
    assert str(OTHER_UID) in str(caught.value)
    assert dest.stat().st_uid == OTHER_UID and dest.read_bytes() == payload[:100]


def test_a_directory_at_dest_is_refused(payload: bytes, dest: Path) -> None:
    dest.mkdir()
    with pytest.raises(UntrustedDownloadFile):
        fetch_into(dest, MemorySource(payload), len(payload))


@pytest.mark.parametrize("loosen", ["mode 0644", "a second link"])
def test_our_recorded_file_that_another_could_write_is_discarded_not_resumed(
    payload: bytes, dest: Path, loosen: str
) -> None:
    created: list[FileIdentity] = []
    with pytest.raises(DownloadTruncated):
        fetch_into(dest, MemorySource(payload, break_after=CHUNK), len(payload), created=created)
    if loosen == "mode 0644":
        os.chmod(dest, 0o644)
    else:
        os.link(dest, dest.with_name("other-link"))
    source = MemorySource(payload)
    assert fetch_into(dest, source, len(payload), owned=created[0]) == payload
    assert source.offsets == [0]  # started over in a new file
    st = dest.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_nlink) == (0o600, 1)


def test_a_file_of_ours_other_than_the_recorded_one_is_discarded(payload: bytes, dest: Path) -> None:
    dest.write_bytes(b"x" * 100)
    os.chmod(dest, 0o600)
    source = MemorySource(payload)
    assert fetch_into(dest, source, len(payload), owned=FileIdentity(0, 0)) == payload
    assert source.offsets == [0]


def test_removing_a_download_file_spares_a_replacement_at_its_path(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"ours")
    fd = os.open(path, os.O_RDONLY)
    try:
        path.unlink()
        path.write_bytes(b"someone else's")
        unlink_if_same(path, fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"someone else's"


def test_a_file_url_through_a_symlink_below_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "real" / "pkg.bin").write_bytes(b"12345")
    (root / "link").symlink_to(root / "real")
    lim = limits(file_url_root=root)
    with pytest.raises(ConnectionFailed, match="symbolic link"), \
            fetch_file(f"file://{root}/link/pkg.bin", 0, 5, lim, time.monotonic() + 60):
        pass


def test_a_file_url_naming_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "pkg.bin")
    lim = limits(file_url_root=root)
    with pytest.raises(UnsupportedUrl, match="not a regular file"), \
            fetch_file(f"file://{root}/pkg.bin", 0, 5, lim, time.monotonic() + 60):
        pass
