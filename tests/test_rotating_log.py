"""baton/rotating_log.py's reads for ``supervisor tail``: the file as it was when asked, read by aiofiles."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from baton.rotating_log import RotatingLog


def test_a_tail_is_the_file_as_it_was_when_asked_even_if_it_rotates_before_the_read(tmp_path: Path) -> None:
    """TailLog sends later output from its queue: the head must not hold it too, nor lose what came before."""
    log = RotatingLog(tmp_path / "web.log", max_bytes=1 << 20, backups=2)
    log.write(b"one\ntwo\nthree\n")
    head = log.last_lines(2)
    log.write(b"four\n")
    log.rotate()
    log.write(b"five\n")
    assert asyncio.run(head) == b"two\nthree\n"
    assert asyncio.run(log.last_lines(5)) == b"five\n"
    log.close()


def test_a_tail_keeps_to_its_byte_limit_and_line_count(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "web.log", max_bytes=1 << 20, backups=0)
    log.write(b"".join(b"line %03d\n" % i for i in range(100)))
    assert asyncio.run(log.last_lines(3)) == b"line 097\nline 098\nline 099\n"
    assert asyncio.run(log.last_lines(50, max_bytes=27)) == b"line 097\nline 098\nline 099\n"
    assert asyncio.run(log.last_lines(0)) == b""
    log.close()


def test_a_link_planted_at_the_log_path_is_not_followed_by_a_tail(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's secret\n")
    log = RotatingLog(tmp_path / "web.log", max_bytes=1 << 20, backups=0)
    log.write(b"ours\n")
    os.unlink(log.path)
    os.symlink(secret, log.path)
    assert asyncio.run(log.last_lines(10)) == b""
    assert secret.read_bytes() == b"root's secret\n"
    log.close()


def test_a_missing_log_has_an_empty_tail_and_leaves_no_descriptor_open(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "web.log", max_bytes=1 << 20, backups=0)
    log.write(b"x\n")
    before = len(os.listdir("/proc/self/fd"))
    os.unlink(log.path)
    assert asyncio.run(log.last_lines(10)) == b""
    log2 = RotatingLog(tmp_path / "db.log", max_bytes=1 << 20, backups=0)
    log2.write(b"y\n")
    assert asyncio.run(log2.last_lines(10)) == b"y\n"
    log2.close()
    assert len(os.listdir("/proc/self/fd")) == before
    log.close()
