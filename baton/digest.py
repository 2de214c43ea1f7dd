"""Both digests an update needs, computed in one pass over the bytes.

The request names the package by SHA-256; minisign's prehashed ``ED`` signature
covers its BLAKE2b-512. The bytes pass through a few large buffers that are
reused (no allocation per chunk): whoever produces the bytes (a socket, a file)
reads straight into a free buffer (:meth:`PackageDigest.buffer`), and hands it
over (:meth:`PackageDigest.submit`) to its consumers, each on its own thread:
SHA-256, BLAKE2b-512 and, for a download, the write to disk. hashlib releases
the GIL on large updates, so the producer and the consumers run on separate
cores, none waits for another except when every buffer is in flight, and the
pass costs about as much as its slowest step (BLAKE2b-512 on this hardware)
rather than the sum of them. Each consumer sees the buffers in order; a buffer
is reused only when every consumer is done with it.

BLAKE2b-512 comes from ``cryptography`` (already needed for Ed25519): its
OpenSSL runs it about 8% faster than hashlib's own on this hardware (1030 against
950 MB/s), and like hashlib it lets go of the GIL while it hashes.
"""

from __future__ import annotations

import hashlib
import mmap
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.hazmat.primitives import hashes

BUFFER_BYTES = 1 << 20  # a tuning knob: large enough that a hand-over is rare, small enough to stay in cache
BUFFERS = 8  # in flight at most; memory is BUFFERS * buffer_bytes


@dataclass(frozen=True)
class Digests:
    size: int
    sha256_hex: str
    blake2b512: bytes


Consumer = Callable[[memoryview], object]


class _Fanout:
    """Every submitted buffer to every consumer, in order, each consumer on its own thread.

    A consumer that raises keeps releasing buffers without using them, so the
    producer never waits forever; the first error is raised to the producer at
    its next :meth:`take` or at :meth:`close`.
    """

    def __init__(self, consumers: Sequence[Consumer], buffers: int, buffer_bytes: int) -> None:
        self._free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
        for _ in range(buffers):
            self._free.put(_page_aligned(buffer_bytes))
        self._queues: list[queue.SimpleQueue[tuple[memoryview, int, bool] | None]] = [
            queue.SimpleQueue() for _ in consumers]
        self._lock = threading.Lock()
        self._pending: dict[int, int] = {}  # id(buffer) -> consumers still using it
        self.error: BaseException | None = None
        self._threads = [threading.Thread(target=self._run, args=(i, c, q), name=f"digest-{i}", daemon=True)
                         for i, (c, q) in enumerate(zip(consumers, self._queues, strict=True))]
        for t in self._threads:
            t.start()
        self._closed = False

    def take(self) -> memoryview:
        """A free buffer; blocks while all are in flight."""
        if self.error is not None:
            raise self.error
        return self._free.get()

    def submit(self, buf: memoryview, n: int, skip_first: bool) -> None:
        """Hand ``buf[:n]`` to the consumers (``skip_first``: not to the first one); ``buf`` is theirs now."""
        if n == 0:
            self._free.put(buf)
            return
        users = self._queues[1:] if skip_first else self._queues
        with self._lock:
            self._pending[id(buf)] = len(users)
        for q in users:
            q.put((buf, n, skip_first))

    def close(self) -> None:
        """Let the consumers finish what was submitted; join their threads."""
        if self._closed:
            return
        self._closed = True
        for q in self._queues:
            q.put(None)
        for t in self._threads:
            t.join()

    def _run(self, index: int, consume: Consumer, q: queue.SimpleQueue[tuple[memoryview, int, bool] | None]) -> None:
        while (item := q.get()) is not None:
            buf, n, _ = item
            if self.error is None:
                try:
                    consume(buf[:n])
                except BaseException as e:  # handed to the producer
                    self.error = e
            with self._lock:
                left = self._pending[id(buf)] - 1
                if left:
                    self._pending[id(buf)] = left
                else:
                    del self._pending[id(buf)]
            if not left:
                self._free.put(buf)


def _page_aligned(size: int) -> memoryview:
    """A zeroed buffer that starts on a page boundary, as ``O_DIRECT`` writes need (an anonymous mapping)."""
    return memoryview(mmap.mmap(-1, size))


class PackageDigest:
    """Incremental SHA-256 and BLAKE2b-512 over one stream of bytes, optionally also written somewhere.

    Fill :meth:`buffer` and :meth:`submit` it (no copy), or :meth:`update` with
    bytes (copied into the buffers). Buffers start on a page boundary and what
    is submitted is always a buffer's prefix, so ``write`` may use ``O_DIRECT``. ``write``, if given, receives every
    submitted byte, in order, on its own thread; bytes submitted with
    ``write=False`` (already on disk) are only hashed. Always end with
    :meth:`finish` (digests) or :meth:`close` (abandon); both join the threads.
    ``parallel=False`` does everything on the calling thread.
    """

    def __init__(
        self,
        parallel: bool = True,
        *,
        write: Consumer | None = None,
        buffer_bytes: int = BUFFER_BYTES,
        buffers: int = BUFFERS,
    ) -> None:
        self._sha = hashlib.sha256()
        self._b2 = hashes.Hash(hashes.BLAKE2b(64))
        self._size = 0
        self._write = write
        self._buffer_bytes = buffer_bytes
        self._fill: memoryview | None = None  # update()'s partly filled buffer
        self._filled = 0
        consumers: list[Consumer] = [self._sha.update, self._b2.update]
        if write is not None:
            consumers.insert(0, write)
        self._fanout = _Fanout(consumers, buffers, buffer_bytes) if parallel else None
        self._own = _page_aligned(buffer_bytes) if not parallel else None

    @property
    def size(self) -> int:
        """Bytes submitted so far."""
        return self._size + self._filled

    def buffer(self) -> memoryview:
        """A free buffer of ``buffer_bytes`` to fill; pass it to :meth:`submit` next. Raises a consumer's error."""
        self._flush()
        if self._fanout is None:
            assert self._own is not None
            return self._own
        return self._fanout.take()

    def submit(self, buf: memoryview, n: int, *, write: bool = True) -> None:
        """Digest (and write, unless ``write`` is false) ``buf[:n]``; ``buf`` must not be touched afterwards."""
        self._size += n
        if self._fanout is not None:
            self._fanout.submit(buf, n, skip_first=self._write is not None and not write)
            return
        view = buf[:n]
        if self._write is not None and write:
            self._write(view)
        self._sha.update(view)
        self._b2.update(view)

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        """Digest (and write) a copy of ``chunk``: for callers that already hold the bytes."""
        data = memoryview(chunk).cast("B")
        while data:
            if self._fill is None:
                self._fill = self.buffer()
                self._filled = 0
            k = min(len(data), self._buffer_bytes - self._filled)
            self._fill[self._filled:self._filled + k] = data[:k]
            self._filled += k
            data = data[k:]
            if self._filled == self._buffer_bytes:
                self._flush()

    def finish(self) -> Digests:
        """Wait for every submitted byte to be digested (and written); raise a consumer's error."""
        self._flush()
        if self._fanout is not None:
            self._fanout.close()
            if self._fanout.error is not None:
                raise self._fanout.error
        return Digests(self._size, self._sha.hexdigest(), self._b2.finalize())

    def close(self) -> None:
        """Stop: what was submitted is still written; the threads are joined. Idempotent."""
        if self._fanout is not None:
            self._fanout.close()

    def _flush(self) -> None:
        if self._fill is not None:
            buf, n = self._fill, self._filled
            self._fill, self._filled = None, 0
            self.submit(buf, n)

    def __del__(self) -> None:
        fanout = getattr(self, "_fanout", None)
        if fanout is not None and not fanout._closed:
            fanout._closed = True
            for q in fanout._queues:
                q.put(None)


def digest_stream(f: BinaryIO, chunk_size: int = BUFFER_BYTES, parallel: bool = True) -> Digests:
    """Both digests of everything ``f`` yields from its position, read once into reused buffers."""
    d = PackageDigest(parallel=parallel, buffer_bytes=chunk_size)
    try:
        readinto: Callable[[memoryview], int | None] | None = getattr(f, "readinto", None)
        if readinto is None:
            while chunk := f.read(chunk_size):
                d.update(chunk)
        else:
            while True:
                buf = d.buffer()
                n = readinto(buf) or 0
                d.submit(buf, n)
                if not n:
                    break
        return d.finish()
    finally:
        d.close()
