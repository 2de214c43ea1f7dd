"""Specification of helper.archive: what a package may unpack to, and what is refused.

Malicious archives are built here member by member with TarInfo. After every
refusal the parent directory must hold exactly what it held before.
"""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import time
from pathlib import Path

import pytest

from helper.archive import (
    ArchiveError,
    ArchiveTooLarge,
    ExtractLimits,
    UnsafeArchive,
    extract_package,
)

LIMITS = ExtractLimits(max_files=100, max_unpacked_bytes=10 * 1024 * 1024)
MiB = 1024 * 1024
GENEROUS_S = 10.0

Member = tuple[tarfile.TarInfo, bytes | None]


def regular(name: str, data: bytes = b"", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def directory(name: str, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    return info, None


def special(name: str, kind: bytes, linkname: str = "") -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o777 if kind == tarfile.SYMTYPE else 0o644
    return info, None


def symlink(name: str, target: str) -> Member:
    return special(name, tarfile.SYMTYPE, target)


def tar_of(members: list[Member], *, gz: bool = False, fmt: int = tarfile.GNU_FORMAT) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


class Zeros(io.RawIOBase):
    """An endless source of zero bytes, to build bombs without holding them in memory."""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = len(b)
        b[:n] = bytes(n)
        return n


class CountingReader(io.BytesIO):
    """A real in-memory file that counts the (compressed) bytes the extractor reads from it."""

    bytes_read = 0

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def gz_bomb(member_bytes: int, members: int) -> bytes:
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for i in range(members):
            info = tarfile.TarInfo(f"zeros-{i}")
            info.size = member_bytes
            tar.addfile(info, Zeros())
    return buf.getvalue()


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "keep").write_bytes(b"known good")
    return versions


def assert_untouched(parent: Path) -> None:
    assert sorted(os.listdir(parent)) == ["keep"]
    assert (parent / "keep").read_bytes() == b"known good"


def refuse(parent: Path, members: list[Member], limits: ExtractLimits = LIMITS) -> ArchiveError:
    with pytest.raises(ArchiveError) as info:
        extract_package(tar_of(members), parent, limits)
    assert_untouched(parent)
    return info.value


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


GOOD: list[Member] = [
    directory("bin", mode=0o700),
    regular("bin/tool", b"#!/bin/sh\necho hi\n", mode=0o4777),
    regular("README", b"read me", mode=0o600),
    regular("lib/data.txt", b"data", mode=0o666),
    symlink("current", "bin/tool"),
]


# ------------------------------------------------------------------ what is accepted


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_good_package_extracts_into_a_private_staging_directory_with_normal_modes(parent: Path, gz: bool) -> None:
    staging = extract_package(tar_of(GOOD, gz=gz), parent, LIMITS)
    assert staging.parent == parent
    assert staging.name.startswith(".staging-")
    assert mode_of(staging) == 0o700
    assert mode_of(staging / "bin") == 0o755
    assert mode_of(staging / "bin/tool") == 0o755
    assert mode_of(staging / "README") == 0o644
    assert mode_of(staging / "lib") == 0o755
    assert mode_of(staging / "lib/data.txt") == 0o644
    assert (staging / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.readlink(staging / "current") == "bin/tool"
    assert sorted(os.listdir(parent)) == sorted(["keep", staging.name])


def test_dot_slash_names_from_tar_c_dir_are_accepted(parent: Path) -> None:
    staging = extract_package(tar_of([directory("./"), regular("./a", b"x")]), parent, LIMITS)
    assert (staging / "a").read_bytes() == b"x"
    assert mode_of(staging) == 0o700


def test_symlink_to_the_root_from_a_subdirectory_is_accepted(parent: Path) -> None:
    staging = extract_package(tar_of([directory("d"), symlink("d/up", "..")]), parent, LIMITS)
    assert os.readlink(staging / "d/up") == ".."


def test_extraction_reads_from_the_start_of_the_file(parent: Path) -> None:
    package = tar_of(GOOD)
    package.seek(100)
    staging = extract_package(package, parent, LIMITS)
    assert (staging / "README").read_bytes() == b"read me"


# ------------------------------------------------------------------ paths


def test_dotdot_path_is_refused(parent: Path) -> None:
    err = refuse(parent, [regular("../x", b"evil")])
    assert isinstance(err, UnsafeArchive)
    assert err.member == "../x"
    assert not (parent.parent / "x").exists()


def test_dotdot_component_inside_a_path_is_refused(parent: Path) -> None:
    err = refuse(parent, [directory("a"), regular("a/../b", b"x")])
    assert isinstance(err, UnsafeArchive)
    assert err.member == "a/../b"


def test_absolute_path_is_refused(parent: Path) -> None:
    err = refuse(parent, [regular("/abs", b"evil")])
    assert isinstance(err, UnsafeArchive)
    assert "absolute" in err.reason


def test_path_longer_than_the_limit_is_refused(parent: Path) -> None:
    err = refuse(parent, [regular("a" * 300, b"x")], ExtractLimits(100, MiB, max_path_length=200))
    assert isinstance(err, UnsafeArchive)
    assert "longer" in err.reason


def test_duplicate_member_names_are_refused(parent: Path) -> None:
    err = refuse(parent, [regular("a", b"first"), regular("a", b"second")])
    assert isinstance(err, UnsafeArchive)
    assert "duplicate" in err.reason


def test_names_equal_after_normalisation_are_duplicates(parent: Path) -> None:
    err = refuse(parent, [regular("a/b", b"first"), regular("./a//b", b"second")])
    assert isinstance(err, UnsafeArchive)
    assert "duplicate" in err.reason


# ------------------------------------------------------------------ links


def test_symlink_escaping_the_root_is_refused(parent: Path) -> None:
    err = refuse(parent, [symlink("link", "../outside")])
    assert isinstance(err, UnsafeArchive)
    assert err.member == "link"


def test_absolute_symlink_is_refused(parent: Path) -> None:
    err = refuse(parent, [symlink("link", "/etc")])
    assert isinstance(err, UnsafeArchive)
    assert "absolute" in err.reason


def test_symlink_escaping_through_another_symlink_is_refused(parent: Path) -> None:
    # d/a -> .. is the root itself; d/b -> a/.. looks like "d" but really is the root's parent.
    err = refuse(parent, [directory("d"), symlink("d/a", ".."), symlink("d/b", "a/..")])
    assert isinstance(err, UnsafeArchive)
    assert err.member == "d/b"


def test_symlink_loop_is_refused(parent: Path) -> None:
    err = refuse(parent, [symlink("a", "b"), symlink("b", "a")])
    assert isinstance(err, UnsafeArchive)
    assert "loop" in err.reason


def test_hard_link_is_refused(parent: Path) -> None:
    err = refuse(parent, [regular("a", b"x"), special("b", tarfile.LNKTYPE, "a")])
    assert isinstance(err, UnsafeArchive)
    assert err.reason == "hard link"


def test_file_under_a_symlinked_directory_is_refused(parent: Path) -> None:
    err = refuse(parent, [symlink("link", "."), regular("link/x", b"x")])
    assert isinstance(err, UnsafeArchive)
    assert err.member == "link/x"


def test_file_under_a_symlink_declared_later_is_refused(parent: Path) -> None:
    err = refuse(parent, [regular("link/x", b"x"), symlink("link", ".")])
    assert isinstance(err, UnsafeArchive)
    assert err.member == "link/x"


def test_file_under_a_regular_file_is_refused(parent: Path) -> None:
    err = refuse(parent, [regular("f", b"x"), regular("f/x", b"x")])
    assert isinstance(err, UnsafeArchive)
    assert err.member == "f/x"


# ------------------------------------------------------------------ special files


def test_character_device_is_refused(parent: Path) -> None:
    err = refuse(parent, [special("null", tarfile.CHRTYPE)])
    assert isinstance(err, UnsafeArchive)
    assert err.reason == "character device"


def test_block_device_is_refused(parent: Path) -> None:
    err = refuse(parent, [special("disk", tarfile.BLKTYPE)])
    assert isinstance(err, UnsafeArchive)
    assert err.reason == "block device"


def test_fifo_is_refused(parent: Path) -> None:
    err = refuse(parent, [special("pipe", tarfile.FIFOTYPE)])
    assert isinstance(err, UnsafeArchive)
    assert err.reason == "FIFO"


def test_unknown_member_type_is_refused(parent: Path) -> None:
    err = refuse(parent, [special("odd", b"Z")])
    assert isinstance(err, UnsafeArchive)
    assert "unsupported" in err.reason


# ------------------------------------------------------------------ sizes and bombs


def test_too_many_members_is_refused(parent: Path) -> None:
    err = refuse(parent, [regular(f"f{i}", b"x") for i in range(4)], ExtractLimits(3, MiB))
    assert isinstance(err, ArchiveTooLarge)
    assert err.limit == 3


def test_too_many_unpacked_bytes_is_refused(parent: Path) -> None:
    members = [regular(f"f{i}", b"x" * 1000) for i in range(3)]
    err = refuse(parent, members, ExtractLimits(100, 2500))
    assert isinstance(err, ArchiveTooLarge)
    assert err.limit == 2500


def test_oversized_tar_header_is_refused(parent: Path) -> None:
    info, data = regular("a", b"x")
    info.pax_headers = {"comment": "x" * (2 * MiB)}
    with pytest.raises(ArchiveTooLarge):
        extract_package(tar_of([(info, data)], fmt=tarfile.PAX_FORMAT), parent, LIMITS)
    assert_untouched(parent)


def test_gzip_bomb_is_stopped_by_the_unpacked_size_limit_before_inflating_it(parent: Path) -> None:
    bomb = gz_bomb(200 * MiB, members=1)
    package = CountingReader(bomb)
    started = time.monotonic()
    with pytest.raises(ArchiveTooLarge):
        extract_package(package, parent, LIMITS)
    assert time.monotonic() - started < GENEROUS_S
    assert 0 < package.bytes_read < len(bomb) // 4
    assert_untouched(parent)


def test_gzip_bomb_spread_over_many_members_stops_at_the_limit(parent: Path) -> None:
    bomb = gz_bomb(4 * MiB, members=50)
    package = CountingReader(bomb)
    with pytest.raises(ArchiveTooLarge):
        extract_package(package, parent, LIMITS)
    assert 0 < package.bytes_read < len(bomb) // 4
    assert_untouched(parent)


def test_bomb_of_headers_stops_at_the_member_limit(parent: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(20_000):
            tar.addfile(tarfile.TarInfo(f"f{i}"))
    package = CountingReader(buf.getvalue())
    with pytest.raises(ArchiveTooLarge) as info:
        extract_package(package, parent, ExtractLimits(max_files=100, max_unpacked_bytes=MiB))
    assert info.value.limit == 100
    assert 0 < package.bytes_read < len(buf.getvalue()) // 4
    assert_untouched(parent)


# ------------------------------------------------------------------ corrupt input


def test_truncated_tar_gz_is_an_archive_error(parent: Path) -> None:
    whole = tar_of([regular("a", os.urandom(100_000))], gz=True).getvalue()
    with pytest.raises(ArchiveError):
        extract_package(io.BytesIO(whole[: len(whole) // 2]), parent, LIMITS)
    assert_untouched(parent)


def test_tar_gz_written_as_several_gzip_members_unpacks_whole(parent: Path) -> None:
    data = os.urandom(300_000)
    whole = tar_of([regular("a", data), regular("b", b"tail")]).getvalue()
    cut = len(whole) // 3  # the second gzip member starts inside a's data
    package = gzip.compress(whole[:cut]) + gzip.compress(whole[cut:])
    staging = extract_package(io.BytesIO(package), parent, LIMITS)
    assert (staging / "a").read_bytes() == data
    assert (staging / "b").read_bytes() == b"tail"


def test_truncated_tar_is_an_archive_error(parent: Path) -> None:
    whole = tar_of([regular("a", os.urandom(100_000))]).getvalue()
    with pytest.raises(ArchiveError):
        extract_package(io.BytesIO(whole[:50_000]), parent, LIMITS)
    assert_untouched(parent)


def test_garbage_is_an_archive_error(parent: Path) -> None:
    with pytest.raises(ArchiveError):
        extract_package(io.BytesIO(os.urandom(10_000)), parent, LIMITS)
    assert_untouched(parent)


def test_archive_without_members_is_an_archive_error(parent: Path) -> None:
    with pytest.raises(ArchiveError):
        extract_package(tar_of([directory("./")]), parent, LIMITS)
    assert_untouched(parent)
