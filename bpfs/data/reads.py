"""Reading file contents: extents, chunks from the packs, the chunk cache, the buffers' bytes.

Owns `read_chunk` (read, authenticate and unpad one chunk; also used by `verify`) and
`load_chunk` (the same for a request handler: small chunks inline, large ones in a thread; also
used by `snapview`), the cache of decrypted chunks (`ChunkCache`), loading each chunk once however
many want it (`ChunkLoads`; also used by `snapview`), and `Reader`: a read combines the
index's extents with whatever is still buffered (so a reader always sees every accepted
write), loads each chunk once however many readers want it, and starts decrypting the next
chunk of a file while the kernel copies this one (sequential reads).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Awaitable, Callable

import trio

from ..crypto import padme
from ..errors import IntegrityError
from ..index import ChunkRecord, Extent, Index
from ..packs import PackFiles
from .buffers import Buffers

CACHE_BYTES = 32 << 20
SMALL_CHUNK = 64 << 10  # sealed chunks up to this size are read on the event loop's thread


def read_chunk(packs: PackFiles, keys, cid: bytes, rec: ChunkRecord) -> bytes:
    """Read, authenticate and unpad one chunk (blocking)."""
    sealed = packs.read(rec.pack, rec.offset, rec.sealed_length)
    plain = keys.data.open(sealed, cid)
    if len(plain) != padme(rec.length) or any(plain[rec.length:rec.length + 64]):
        raise IntegrityError("chunk has the wrong length")
    del plain[rec.length:]  # the padding
    return bytes(plain) if len(plain) < 65536 else plain


async def load_chunk(packs: PackFiles, keys, cid: bytes, rec: ChunkRecord) -> bytes:
    """`read_chunk` for a request handler: a small chunk is read and opened on the loop's thread
    (handing it to a worker thread cost more than the work: a cold `md5sum` of 4,000 small files
    took 2.5x as long), a large one in a worker thread, so the loop serves other requests meanwhile."""
    if rec.sealed_length <= SMALL_CHUNK:
        return read_chunk(packs, keys, cid, rec)
    return await trio.to_thread.run_sync(read_chunk, packs, keys, cid, rec)


class ChunkCache:
    """Decrypted chunks, least recently used dropped first, bounded in bytes; a chunk larger than
    `largest` (a quarter of the capacity unless told) is not kept."""

    def __init__(self, capacity: int, largest: int | None = None):
        self.capacity = capacity
        self.largest = capacity // 4 if largest is None else largest
        self.size = 0
        self._items: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, cid: bytes) -> bytes | None:
        data = self._items.get(cid)
        if data is not None:
            self._items.move_to_end(cid)
        return data

    def put(self, cid: bytes, data: bytes) -> None:
        if cid in self._items or len(data) > self.largest:
            return
        self._items[cid] = data
        self.size += len(data)
        while self.size > self.capacity:
            _, old = self._items.popitem(last=False)
            self.size -= len(old)

    def drop(self, cid: bytes) -> None:
        data = self._items.pop(cid, None)
        if data is not None:
            self.size -= len(data)


class ChunkLoads:
    """Loads each chunk once however many readers want it at the same time: from the cache, else
    by waiting for the load under way, else by loading it (and caching what it gives)."""

    def __init__(self, cache: ChunkCache):
        self.cache = cache
        self._loading: dict[bytes, trio.Event] = {}

    def loading(self, cid: bytes) -> bool:
        return cid in self._loading

    async def get(self, cid: bytes, load: Callable[[], Awaitable[bytes]]) -> bytes:
        while True:
            data = self.cache.get(cid)
            if data is not None:
                return data
            loading = self._loading.get(cid)
            if loading is None:
                break
            await loading.wait()
        self._loading[cid] = event = trio.Event()
        try:
            data = await load()
            self.cache.put(cid, data)
            return data
        finally:
            del self._loading[cid]
            event.set()


class Reader:
    """The reads of a mounted store.

    Attributes:
        index, packs: the live index and the pack files.
        cache: decrypted chunks (the chunk bookkeeping drops freed ones).
        buffers: the write buffers, whose bytes overlay the stored ones.
        nursery: where prefetches start (None: no prefetch).
    """

    def __init__(self, index: Index, packs: PackFiles, keys, cache: ChunkCache, buffers: Buffers):
        self.index = index
        self.packs = packs
        self._keys = keys
        self.cache = cache
        self.buffers = buffers
        self.nursery: trio.Nursery | None = None
        self._loads = ChunkLoads(cache)

    async def read(self, ino: int, offset: int, size: int, file_size: int) -> bytes | memoryview:
        end = min(offset + size, file_size)
        if offset >= end:
            return b""
        overlays = []
        buf = self.buffers.get(ino)
        if buf is not None:  # snapshot buffered bytes now: a drain may finish while we wait
            for run_start, run, length in buf.runs():
                a, b = max(offset, run_start), min(end, run_start + length)
                if a < b:
                    with run.view(a - run_start, b - run_start) as window:
                        overlays.append((a, bytes(window)))
        located = []
        for e in self.index.extents(ino, offset, end):
            rec = self.index.get_chunk(e.chunk_id)
            if rec is None:
                raise IntegrityError("extent refers to a missing chunk")
            located.append((e, rec))
        if located:
            self._prefetch_after(ino, located[-1][0], file_size)
        if len(located) == 1 and not overlays:
            e, rec = located[0]
            if e.offset <= offset and e.end >= end:
                plain = await self._load_chunk(e.chunk_id, rec)
                lo = e.chunk_offset + offset - e.offset
                return memoryview(plain)[lo:lo + end - offset]  # pyfuse3 takes any buffer: no copy
        out = bytearray(end - offset)
        for e, rec in located:
            plain = await self._load_chunk(e.chunk_id, rec)
            a, b = max(offset, e.offset), min(end, e.end)
            lo = e.chunk_offset + a - e.offset
            out[a - offset:b - offset] = memoryview(plain)[lo:lo + b - a]
        for a, data in overlays:
            out[a - offset:a - offset + len(data)] = data
        return bytes(out)

    def _prefetch_after(self, ino: int, last: Extent, file_size: int) -> None:
        """Sequential reads: start decrypting the next chunk while the kernel copies this one."""
        if self.nursery is None or last.end >= file_size:
            return
        following = self.index.extents(ino, last.end, last.end + 1)
        if not following:
            return
        nxt = following[0]
        if self.cache.get(nxt.chunk_id) is not None or self._loads.loading(nxt.chunk_id):
            return
        rec = self.index.get_chunk(nxt.chunk_id)
        if rec is not None:
            self.nursery.start_soon(self._prefetch, nxt.chunk_id, rec)

    async def _prefetch(self, cid: bytes, rec: ChunkRecord) -> None:
        try:
            await self._load_chunk(cid, rec)
        except Exception:
            pass  # the read that needs it will report the error

    async def _load_chunk(self, cid: bytes, rec: ChunkRecord) -> bytes:
        return await self._loads.get(cid, lambda: self._load_where_it_is(cid, rec))

    async def _load_where_it_is(self, cid: bytes, rec: ChunkRecord) -> bytes:
        try:
            return await load_chunk(self.packs, self._keys, cid, rec)
        except IntegrityError:
            current = self.index.get_chunk(cid)  # compaction may have moved it meanwhile
            if current is None or (current.pack, current.offset) == (rec.pack, rec.offset):
                raise
            return await load_chunk(self.packs, self._keys, cid, current)

    def read_chunk(self, cid: bytes, rec: ChunkRecord) -> bytes:
        return read_chunk(self.packs, self._keys, cid, rec)

    def read_small(self, ino: int, size: int) -> bytes:
        """The first `size` bytes of `ino` as a reader would see them, read synchronously
        (for `.backupignore` files: small, and needed inside synchronous handlers)."""
        out = bytearray(size)
        for e in self.index.extents(ino, 0, size):
            rec = self.index.get_chunk(e.chunk_id)
            if rec is None:
                raise IntegrityError("extent refers to a missing chunk")
            plain = self.cache.get(e.chunk_id)
            if plain is None:
                plain = self.read_chunk(e.chunk_id, rec)
            a, b = e.offset, min(size, e.end)
            out[a:b] = memoryview(plain)[e.chunk_offset:e.chunk_offset + b - a]
        buf = self.buffers.get(ino)
        if buf is not None:
            for run_start, run, length in buf.runs():
                a, b = max(0, run_start), min(size, run_start + length)
                if a < b:
                    with run.view(a - run_start, b - run_start) as window:
                        out[a:b] = window
        return bytes(out)
