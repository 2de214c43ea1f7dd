"""Signed-but-hostile package archives: each a way out of the staging directory, or past the unpack limits
(``max_files=50``, ``max_unpacked_bytes=200_000`` in the tests that use them)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

Member = tuple[tarfile.TarInfo, bytes | None]


def _file(name: str, data: bytes = b"x") -> Member:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def _special(name: str, kind: bytes, **kw: Any) -> Member:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, None


EVIL: dict[str, Callable[[], list[Member]]] = {
    "dotdot": lambda: [_file("bin/agent"), _file("../escape")],
    "absolute": lambda: [_file("bin/agent"), _file("/tmp/baton-evil-abs")],
    "escaping_symlink": lambda: [_file("bin/agent"), _special("link", tarfile.SYMTYPE, linkname="../../..")],
    "hard_link": lambda: [_file("bin/agent"), _special("hl", tarfile.LNKTYPE, linkname="bin/agent")],
    "device": lambda: [_file("bin/agent"), _special("dev", tarfile.CHRTYPE, devmajor=1, devminor=3)],
    "fifo": lambda: [_file("bin/agent"), _special("fifo", tarfile.FIFOTYPE)],
    "too_many_files": lambda: [_file(f"f{i}") for i in range(60)],
    "too_many_bytes": lambda: [_file("big", b"\0" * 300_000)],
}


def write_hostile_archive(path: Path, kind: str) -> None:
    """The tar of ``EVIL[kind]`` at ``path`` (unsigned: sign it with the release's key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for info, data in EVIL[kind]():
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
