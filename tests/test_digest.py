"""Specification of baton.digest: one pass, both digests, consumers on their own threads over reused buffers."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import threading

import pytest

from baton.digest import PackageDigest, digest_stream

DATA = os.urandom(3 * 1024 * 1024 + 12345)


def expected() -> tuple[str, bytes]:
    return hashlib.sha256(DATA).hexdigest(), hashlib.blake2b(DATA, digest_size=64).digest()


def digest_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("digest")]


@pytest.mark.parametrize("parallel", [True, False], ids=["threads", "one-thread"])
@pytest.mark.parametrize("buffer_bytes", [4096, 1 << 20])
def test_digest_stream_matches_hashlib_whatever_the_buffer_size(parallel: bool, buffer_bytes: int) -> None:
    d = digest_stream(io.BytesIO(DATA), buffer_bytes, parallel)
    assert (d.size, d.sha256_hex, d.blake2b512) == (len(DATA), *expected())


def test_update_with_odd_sized_pieces_matches_submitted_buffers() -> None:
    d = PackageDigest(buffer_bytes=64 * 1024)
    for i in range(0, len(DATA), 7777):
        d.update(DATA[i : i + 7777])
    got = d.finish()
    assert (got.size, got.sha256_hex, got.blake2b512) == (len(DATA), *expected())


def test_the_writer_sees_every_submitted_byte_in_order_but_not_those_marked_on_disk() -> None:
    written = bytearray()
    d = PackageDigest(write=lambda view: written.extend(view), buffer_bytes=100_000)
    head, rest = DATA[:250_000], DATA[250_000:]
    for part, write in ((head, False), (rest, True)):
        for i in range(0, len(part), 100_000):
            buf = d.buffer()
            piece = part[i : i + 100_000]
            buf[: len(piece)] = piece
            d.submit(buf, len(piece), write=write)
    got = d.finish()
    assert bytes(written) == rest
    assert (got.sha256_hex, got.blake2b512) == expected()


def test_a_failing_writer_is_raised_to_the_producer_and_no_thread_is_left() -> None:
    def full_disk(view: memoryview) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    d = PackageDigest(write=full_disk, buffer_bytes=4096, buffers=2)
    with pytest.raises(OSError) as info:
        for _ in range(100):  # more buffers than there are: the producer must not wait forever
            buf = d.buffer()
            d.submit(buf, 4096)
        d.finish()
    assert info.value.errno == errno.ENOSPC
    d.close()
    assert digest_threads() == []


def test_buffers_start_on_a_page_boundary_for_o_direct() -> None:
    import ctypes

    d = PackageDigest(buffers=3)
    try:
        bufs = [d.buffer() for _ in range(3)]
        for buf in bufs:
            address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            assert address % os.sysconf("SC_PAGE_SIZE") == 0
            d.submit(buf, 0)
    finally:
        d.close()
