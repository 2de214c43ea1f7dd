"""Both digests an update needs, computed in one pass over the bytes.

The request names the package by SHA-256; minisign's prehashed ``ED`` signature
covers its BLAKE2b-512. hashlib releases the GIL on large buffers, so the two
digests run on two threads in parallel and the pass costs about as much as the
slower of the two.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

PARALLEL_MIN_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Digests:
    size: int
    sha256_hex: str
    blake2b512: bytes


class PackageDigest:
    """Incremental SHA-256 and BLAKE2b-512 over the same stream of bytes."""

    def __init__(self, parallel: bool = True) -> None:
        self._sha = hashlib.sha256()
        self._b2 = hashlib.blake2b(digest_size=64)
        self._size = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="digest") if parallel else None

    def update(self, chunk: bytes | memoryview) -> None:
        self._size += len(chunk)
        if self._pool is not None and len(chunk) >= PARALLEL_MIN_CHUNK:
            fut = self._pool.submit(self._b2.update, chunk)
            self._sha.update(chunk)
            fut.result()
        else:
            self._sha.update(chunk)
            self._b2.update(chunk)

    @property
    def size(self) -> int:
        return self._size

    def finish(self) -> Digests:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        return Digests(self._size, self._sha.hexdigest(), self._b2.digest())

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)  # type: ignore[union-attr]


def digest_stream(f: BinaryIO, chunk_size: int = 1 << 20, parallel: bool = True) -> Digests:
    d = PackageDigest(parallel=parallel)
    while True:
        chunk = f.read(chunk_size)
        if not chunk:
            break
        d.update(chunk)
    return d.finish()
