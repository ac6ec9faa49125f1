"""File contents: write buffers, chunk persistence, the extent map, reads and durability.

Writes land in a per-inode buffer and return at once; a background drain cuts the buffer
into content-defined chunks, hashes them (keyed), skips chunks the store already holds
(dedup) and all-zero chunks (holes), seals the rest into the open pack from a worker
thread, and then records extents in the index. Reads combine the index's extents with
whatever is still buffered, so a reader always sees every accepted write.

Each inode's new chunks go to the packs of its lane (normal, priority, local; `lanes` decides
per inode, once). A replicable file must never depend on a local pack: a chunk it uses that
lives in one (dedup with an ignored file, or a file that stopped being ignored) is moved,
still sealed, into a replicable pack (`promote`, in the background and in `flush_all`).

Durability, two levels: `flush()` (close) persists the inode's buffer into the packs and
saves the index changes to the redo log, which survives a killed daemon at the cost of a
write(); `sync()` (fsync, and every second) fdatasyncs the packs and then checkpoints the
index, so a checkpoint never points at pack bytes that are not on stable storage.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import OrderedDict

import trio

from .chunker import Chunker
from .crypto import NONCE_SIZE, padme, sealed_chunk_size
from .errors import IntegrityError
from . import chunkmap
from .index import LANE_LOCAL, LANE_NORMAL, ChunkRecord, Extent, Index
from .packs import PackStore

log = logging.getLogger(__name__)

DRAIN_AT = 8 << 20  # start cutting a buffer into chunks at this size
BUFFER_LIMIT = 2 * DRAIN_AT  # a writer waits when its live run grows past this (a pooled run)
TOTAL_BUFFER_LIMIT = 64 << 20  # and when all buffers together pass this
CACHE_BYTES = 32 << 20
COMMIT_INTERVAL = 1.0
IDLE_FLUSH_SECONDS = 5.0
MAX_PENDING_OPS = 20_000


class _Run:
    """A growable byte run that copies each write once.

    Plain bytearray growth would copy the run again and again (CPython over-allocates by
    1/8), and fresh large buffers cost page faults or a memset; so a run starts small (most
    files are small) and jumps to a pooled buffer with room for a whole drain.
    """

    __slots__ = ("_buf", "_len")
    SMALL = 64 << 10
    CAPACITY = 2 * DRAIN_AT
    _pool: list[bytearray] = []

    def __init__(self, *parts):
        self._buf = self._allocate(sum(map(len, parts)))
        self._len = 0
        for part in parts:
            self.write(self._len, part)

    @classmethod
    def _allocate(cls, need: int) -> bytearray:
        if need <= cls.SMALL:
            return bytearray(cls.SMALL)
        if need <= cls.CAPACITY and cls._pool:
            return cls._pool.pop()
        return bytearray(max(need, cls.CAPACITY))

    def __len__(self) -> int:
        return self._len

    def write(self, at: int, data) -> None:
        end = at + len(data)
        if end > len(self._buf):
            bigger = self._allocate(max(end, 2 * len(self._buf)))
            bigger[:self._len] = memoryview(self._buf)[:self._len]
            self.recycle()
            self._buf = bigger
        self._buf[at:end] = data
        self._len = max(self._len, end)

    def view(self, start: int = 0, end: int | None = None) -> memoryview:
        """Read-only window; release it before the next write that may grow the run."""
        return memoryview(self._buf)[start:self._len if end is None else min(end, self._len)].toreadonly()

    def recycle(self) -> None:
        """Give the memory back for the next run (no views of it may remain)."""
        if len(self._buf) == self.CAPACITY and len(self._pool) < 3:
            self._pool.append(self._buf)
        self._buf, self._len = bytearray(), 0


class _Inflight:
    """Bytes taken from a buffer by a drain, readable until the drain has applied them."""

    __slots__ = ("start", "run", "length")

    def __init__(self, start: int, run: _Run, length: int):
        self.start, self.run, self.length = start, run, length


class _Buffer:
    """Accepted but not yet persisted bytes of one inode: a live run, and runs in flight.

    Drains take the live run in two phases: phase 1 (cut, hash, dedup, reserve) under
    `cut_lock`, phase 2 (seal, write, record) under `write_lock`, handed over in order, so
    the next drain cuts and hashes while the previous one seals and writes.
    """

    __slots__ = ("start", "data", "inflight", "cut_lock", "write_lock", "drained", "error", "touched",
                 "drain_queued")

    def __init__(self, start: int):
        self.start = start
        self.data = _Run()
        self.inflight: list[_Inflight] = []  # in file order, all before `start`
        self.cut_lock = trio.Lock()
        self.write_lock = trio.Lock()
        self.drained = trio.Event()  # set while nothing is in flight
        self.drained.set()
        self.error: OSError | None = None
        self.touched = time.monotonic()
        self.drain_queued = False

    @property
    def end(self) -> int:
        return self.start + len(self.data)

    def buffered(self) -> int:
        return len(self.data) + sum(item.length for item in self.inflight)

    def runs(self):
        """(file offset, run, length) of every buffered byte range, oldest first."""
        for item in self.inflight:
            yield item.start, item.run, item.length
        yield self.start, self.data, len(self.data)


class _ChunkCache:
    """Decrypted chunks, least recently used dropped first, bounded in bytes."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.size = 0
        self._items: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, cid: bytes) -> bytes | None:
        data = self._items.get(cid)
        if data is not None:
            self._items.move_to_end(cid)
        return data

    def put(self, cid: bytes, data: bytes) -> None:
        if cid in self._items or len(data) > self.capacity // 4:
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


def _split(items: list, weight) -> list[list]:
    """Split `items` in order into at most two parts of about equal weight."""
    if len(items) < 2:
        return [items] if items else []
    total, acc = sum(map(weight, items)), 0
    for i, item in enumerate(items):
        acc += weight(item)
        if acc * 2 >= total:
            return [items[:i + 1], items[i + 1:]] if i + 1 < len(items) else [items]
    return [items]


INLINE_BYTES = 128 << 10  # less work than this runs on the event loop: a thread hop costs more


async def _in_thread(nbytes: int, fn, *args):
    """fn(*args) in a worker thread, or inline when it is too little work to hand over."""
    if nbytes < INLINE_BYTES:
        return fn(*args)
    return await trio.to_thread.run_sync(fn, *args)


async def _in_threads(fn, calls: list[tuple], nbytes: int) -> list:
    """Run fn(*args) for each args in worker threads at once; results in order."""
    if len(calls) == 1 or nbytes < INLINE_BYTES:
        return [await _in_thread(nbytes, fn, *args) for args in calls]
    results = [None] * len(calls)
    errors: list[Exception] = []

    async def one(i, args):
        try:
            results[i] = await trio.to_thread.run_sync(fn, *args)
        except Exception as e:  # keep OSError(ENOSPC) an OSError, not an ExceptionGroup
            errors.append(e)

    async with trio.open_nursery() as nursery:
        for i, args in enumerate(calls):
            nursery.start_soon(one, i, args)
    if errors:
        raise errors[0]
    return results


def read_chunk(packs: PackStore, keys, cid: bytes, rec: ChunkRecord) -> bytes:
    """Read, authenticate and unpad one chunk (blocking)."""
    sealed = packs.read(rec.pack, rec.offset, rec.sealed_length)
    plain = keys.data.open(sealed, cid)
    if len(plain) != padme(rec.length) or any(plain[rec.length:rec.length + 64]):
        raise IntegrityError("chunk has the wrong length")
    del plain[rec.length:]  # the padding
    return bytes(plain) if len(plain) < 65536 else plain


_ZERO_ID = b"\0" * 32  # marks an all-zero piece: stored as a hole


class DataStore:
    def __init__(self, index: Index, packs: PackStore, keys, space_reserve: int = 0):
        self.index = index
        self.packs = packs
        self._keys = keys
        self.chunker = Chunker(keys.chunker_seed)
        self._buffers: dict[int, _Buffer] = {}
        self._cache = _ChunkCache(CACHE_BYTES)
        self._loading: dict[bytes, trio.Event] = {}
        self._apply_lock = trio.Lock()
        self._written: set[int] = set()  # inodes with data applied since the last commit
        self._dead_packs: list[int] = []
        self._sparse_packs: set[int] = set()  # sealed packs less than half alive: to compact
        for pack_id, rec in index.all_packs():
            if rec.sealed and rec.live_bytes * 2 < rec.size:
                self._sparse_packs.add(pack_id)
            if rec.lane == LANE_LOCAL:
                packs.local_ids.add(pack_id)
        self.lanes = None  # a lanes.Lanes once the filesystem is set up; None: everything normal
        self._promote: dict[bytes, int] = {}  # chunk id in a local pack -> lane to move it to
        self._promote_files: dict[int, int] = {}  # inode no longer local -> its lane (chunks to move)
        self._promoting = False
        self._promote_lock = trio.Lock()
        self._space_reserve = space_reserve
        self._checkpoint_queued = False
        self._free_checked = 0.0
        self._free_bytes = 1 << 62
        self.nursery: trio.Nursery | None = None

    def mark_written(self, ino: int) -> None:
        """The next flush of `ino` must commit (its creation, say, is not durable yet)."""
        self._written.add(ino)

    def has_buffer(self, ino: int) -> bool:
        return ino in self._buffers

    # ----- space ---------------------------------------------------------------------------
    def buffered_bytes(self) -> int:
        return sum(b.buffered() for b in self._buffers.values())

    def free_bytes(self) -> int:
        now = time.monotonic()
        if now - self._free_checked > 0.05:
            st = os.statvfs(self.packs.dir)
            self._free_bytes = st.f_bavail * st.f_frsize
            self._free_checked = now
        return self._free_bytes

    def check_space(self, nbytes: int) -> None:
        """Refuse (ENOSPC) writes that the drive could not hold with the index's reserve.

        Buffered and incoming bytes count with Padmé's worst case (+12%) and sealing.
        """
        if self._space_needed(nbytes) > self.free_bytes() - self._space_reserve:
            self._free_checked = 0.0
            if self._space_needed(nbytes) > self.free_bytes() - self._space_reserve:
                raise OSError(errno.ENOSPC, "store drive is full")

    def _space_needed(self, nbytes: int) -> int:
        return (self.buffered_bytes() + nbytes) * 9 // 8 + 4096

    # ----- writing -------------------------------------------------------------------------
    async def write(self, ino: int, offset: int, data: bytes) -> None:
        self.check_space(len(data))
        buf = self._buffers.get(ino)
        if buf is None:
            buf = self._buffers[ino] = _Buffer(offset)
        if buf.error is not None:
            err, buf.error = buf.error, None
            raise err
        while True:
            if buf.inflight:
                # while drains run only the live run (after the bytes in flight) may change
                if buf.start <= offset <= buf.end and (buf.data or offset == buf.start):
                    break
                await buf.drained.wait()
                continue
            if not buf.data:
                buf.start = offset
                break
            if buf.start <= offset <= buf.end:
                break
            await self._persist(ino, buf, final=True)
        buf.data.write(offset - buf.start, data)
        buf.touched = time.monotonic()
        if len(buf.data) >= DRAIN_AT and not buf.drain_queued and self.nursery is not None:
            buf.drain_queued = True
            self.nursery.start_soon(self._drain_in_background, ino, buf)
        if len(buf.data) >= BUFFER_LIMIT or self.buffered_bytes() >= TOTAL_BUFFER_LIMIT:
            await self._persist(ino, buf, final=False)

    async def _drain_in_background(self, ino: int, buf: _Buffer) -> None:
        try:
            await self._persist(ino, buf, final=False)
        except OSError as e:
            buf.error = e  # reported to the next write, flush or fsync of this inode
            log.warning("writing inode %d failed: %s", ino, os.strerror(e.errno or errno.EIO))
        except Exception:  # a background task must never take the mount down
            log.exception("writing inode %d failed", ino)
            buf.error = OSError(errno.EIO, "write failed")
        finally:
            buf.drain_queued = False

    async def _persist(self, ino: int, buf: _Buffer, final: bool) -> None:
        """Turn the live run into stored chunks; unless `final`, keep the last partial chunk."""
        async with buf.cut_lock:
            if not buf.data:
                return
            run, start = buf.data, buf.start
            item = _Inflight(start, run, len(run))
            buf.data, buf.start = _Run(), start + len(run)
            if not buf.inflight:
                buf.drained = trio.Event()
            buf.inflight.append(item)
            view = run.view()
            reservations = []
            try:
                lengths = await _in_thread(len(view), self.chunker.cut, view)
                if not final and lengths and lengths[-1] < self.chunker.max_size:
                    kept = lengths.pop()  # an incomplete chunk: back to the front of the live run
                    with buf.data.view() as live:
                        buf.data, buf.start = _Run(view[len(view) - kept:], live), buf.start - kept
                    item.length -= kept
                pieces = await self._hash_pieces(view, lengths) if lengths else []
                lane = self.lanes.lane_of(ino) if self.lanes is not None else LANE_NORMAL
                placed, reservations = self._place_new_chunks(pieces, lane)
                await buf.write_lock.acquire()  # keep phase 2 in file order
            except BaseException:
                for r in reservations:
                    self.packs.finish(r[3])
                with buf.data.view() as live:  # nothing written yet: all back into the live run
                    buf.data, buf.start = _Run(view[:item.length], live), start
                self._finish_inflight(buf, item, view)
                raise
        try:
            await self._write_and_record(ino, view, start, pieces, placed, reservations, lane)
        finally:
            buf.write_lock.release()
            self._finish_inflight(buf, item, view)

    @staticmethod
    def _finish_inflight(buf: _Buffer, item: _Inflight, view: memoryview) -> None:
        buf.inflight.remove(item)
        view.release()
        item.run.recycle()
        if not buf.inflight:
            buf.drained.set()

    async def _hash_pieces(self, data: memoryview, lengths: list[int]) -> list[tuple[int, int, bytes]]:
        """(offset in data, length, chunk id) of each chunk; all-zero chunks get _ZERO_ID."""
        pieces, pos = [], 0
        for length in lengths:
            pieces.append((pos, length))
            pos += length
        ids = await _in_threads(self._hash_some, [(data, part) for part in _split(pieces, lambda p: p[1])],
                                sum(lengths))
        return [(pos, length, cid) for (pos, length), cid in zip(pieces, [c for part in ids for c in part], strict=True)]

    def _hash_some(self, data: memoryview, pieces) -> list[bytes]:
        ids = []
        for pos, length in pieces:
            piece = data[pos:pos + length]
            if piece[0] == 0 and piece.tobytes() == bytes(length):
                ids.append(_ZERO_ID)
            else:
                ids.append(self._keys.chunk_id(piece))
        return ids

    def _place_new_chunks(self, pieces, lane: int = LANE_NORMAL):
        """Reserve space in the lane's pack for the chunks the store does not hold yet (dedup)."""
        placed: dict[bytes, ChunkRecord] = {}
        reservations = []
        for pos, length, cid in pieces:
            if cid != _ZERO_ID and cid not in placed and self.index.get_chunk(cid) is None:
                pack_id, offset = self.packs.reserve(self.index, sealed_chunk_size(length), lane)
                placed[cid] = ChunkRecord(pack_id, offset, sealed_chunk_size(length), length, 0,
                                          born=self.index.generation)
                reservations.append((cid, pos, length, pack_id, offset))
        return placed, reservations

    async def _write_and_record(self, ino, view, start, pieces, placed, reservations, lane=LANE_NORMAL) -> None:
        try:
            if reservations:
                await _in_threads(self._seal_and_write,
                                  [(view, part) for part in _split(reservations, lambda r: r[2])],
                                  sum(r[2] for r in reservations))
        finally:
            for r in reservations:
                self.packs.finish(r[3])
        async with self._apply_lock:
            self._apply(ino, start, pieces, placed, lane)

    def _seal_and_write(self, source: memoryview, reservations) -> None:
        """Pad and seal chunks in place in one buffer per run of a pack, then write the run."""
        runs: list[list] = []
        for r in reservations:
            prev = runs[-1][-1] if runs else None
            if prev and prev[3] == r[3] and prev[4] + sealed_chunk_size(prev[2]) == r[4]:
                runs[-1].append(r)
            else:
                runs.append([r])
        for run in runs:
            pack_id, base = run[0][3], run[0][4]
            out = bytearray(run[-1][4] + sealed_chunk_size(run[-1][2]) - base)
            for cid, pos, length, _, offset in run:
                at = offset - base
                out[at + NONCE_SIZE:at + NONCE_SIZE + length] = source[pos:pos + length]
                self._keys.data.seal_in_place(out, at, padme(length), cid)
            self.packs.write(pack_id, base, out)

    def _apply(self, ino: int, start: int, pieces, placed: dict[bytes, ChunkRecord], lane: int = LANE_NORMAL) -> None:
        """Record persisted pieces as extents: all of it or (on an error) none of it."""
        if self.lanes is not None and self.packs.local_ids:
            lane = self.lanes.current(ino, lane)  # it may have changed since the pieces were placed
        watch_local = lane != LANE_LOCAL and bool(self.packs.local_ids)
        with self.index.atomic():
            for cid, rec in placed.items():
                if self.index.get_chunk(cid) is None:  # another writer may have stored it meanwhile
                    self.index.put_chunk(cid, rec, None)
                    pack = self.index.get_pack(rec.pack)
                    pack.live_chunks += 1
                    pack.live_bytes += rec.sealed_length
                    self.index.put_pack(rec.pack, pack)
            attr = self.index.get_attr(ino)
            if attr is not None:  # else deleted while we wrote: the new chunks stay unreferenced
                stored_delta = 0
                for pos, length, cid in pieces:
                    offset = start + pos
                    if cid != _ZERO_ID:
                        rec = self._ref(cid)  # before the punch, which may drop the last old reference
                        if watch_local and rec.pack in self.packs.local_ids:
                            self._promote.setdefault(cid, lane)  # a replicable file uses it now
                    stored_delta -= self._punch(ino, offset, offset + length)
                    if cid != _ZERO_ID:
                        self.index.put_extent(ino, Extent(offset, cid, 0, length))
                        stored_delta += length
                attr.stored += stored_delta
                self.index.put_attr(attr)
                self._written.add(ino)
            for cid in placed:
                rec = self.index.get_chunk(cid)
                if rec is not None and rec.refs == 0 and self.index.get_retired(cid) is None:
                    self._free_chunk(cid, rec)  # stored for a file deleted meanwhile
        if self._promote:
            self._start_promoting()

    # ----- the extent map ------------------------------------------------------------------
    def _ref(self, cid: bytes) -> ChunkRecord:
        rec = self.index.get_chunk(cid)
        if rec.refs == 0:  # kept only for retained snapshots until now: in use again
            self.index.delete_retired(cid)
        rec.refs += 1
        self.index.put_chunk(cid, rec, rec.pack)
        return rec

    def _unref(self, cid: bytes) -> None:
        rec = self.index.get_chunk(cid)
        if rec is None:
            return
        rec.refs -= 1
        if rec.refs > 0:
            self.index.put_chunk(cid, rec, rec.pack)
        else:
            self._free_chunk(cid, rec)

    def _free_chunk(self, cid: bytes, rec: ChunkRecord) -> None:
        """The chunk's last reference went: free it, or keep it while a retained snapshot holds
        it (one made after it was stored; see `history`)."""
        if rec.born < self.index.last_snapshot_generation() and rec.pack not in self.packs.local_ids:
            rec.refs = 0
            self.index.put_chunk(cid, rec, rec.pack)
            self.index.put_retired(cid, self.index.generation)
            return
        self.index.delete_chunk(cid, rec.pack)
        self._cache.drop(cid)
        self._pack_lost(rec.pack, rec.sealed_length)

    def _pack_lost(self, pack_id: int, sealed_length: int) -> None:
        """One chunk left `pack_id`: delete the pack when empty, mark it for compaction when sparse."""
        change = chunkmap.pack_lost(self.index, pack_id, sealed_length)
        if change == chunkmap.DEAD:
            self.note_packs(dead=[pack_id])
        elif change == chunkmap.SPARSE:
            self.note_packs(sparse=[pack_id])

    def note_packs(self, dead=(), sparse=()) -> None:
        """Packs whose chunks went elsewhere (`chunkmap`): dead ones are deleted after the next
        commit, sparse ones compacted."""
        for pack_id in dead:
            self._dead_packs.append(pack_id)
            self._sparse_packs.discard(pack_id)
        self._sparse_packs.update(sparse)

    def _punch(self, ino: int, start: int, end: int) -> int:
        """Remove [start, end) from the extent map of `ino`; return the stored bytes removed."""
        removed = 0
        for e in self.index.extents(ino, start, end):
            self.index.delete_extent(ino, e.offset)
            if e.offset < start:  # keep the part before the range
                self.index.put_extent(ino, Extent(e.offset, e.chunk_id, e.chunk_offset, start - e.offset))
                self._ref(e.chunk_id)
            if e.end > end:  # keep the part after the range
                self.index.put_extent(ino, Extent(end, e.chunk_id, e.chunk_offset + end - e.offset, e.end - end))
                self._ref(e.chunk_id)
            removed += min(e.end, end) - max(e.offset, start)
            self._unref(e.chunk_id)
        return removed

    async def truncate(self, ino: int, size: int) -> None:
        """Drop stored content past `size` (the caller updates the inode's size)."""
        await self.flush_buffer(ino)
        with self.index.atomic():
            attr = self.index.get_attr(ino)
            removed = self._punch(ino, size, 1 << 63)
            if attr is not None and removed:
                attr.stored -= removed
                self.index.put_attr(attr)
        self._written.add(ino)

    def forget_inode(self, ino: int) -> None:
        """Release all content of a deleted inode (synchronous)."""
        buf = self._buffers.pop(ino, None)
        if buf is not None:
            buf.data = _Run()
        self._punch(ino, 0, 1 << 63)

    # ----- reading -------------------------------------------------------------------------
    async def read(self, ino: int, offset: int, size: int, file_size: int) -> bytes:
        end = min(offset + size, file_size)
        if offset >= end:
            return b""
        overlays = []
        buf = self._buffers.get(ino)
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
        if self._cache.get(nxt.chunk_id) is not None or nxt.chunk_id in self._loading:
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
        while True:
            data = self._cache.get(cid)
            if data is not None:
                return data
            loading = self._loading.get(cid)
            if loading is None:
                break
            await loading.wait()
        self._loading[cid] = event = trio.Event()
        try:
            try:
                data = await trio.to_thread.run_sync(self.read_chunk, cid, rec)
            except IntegrityError:
                current = self.index.get_chunk(cid)  # compaction may have moved it meanwhile
                if current is None or (current.pack, current.offset) == (rec.pack, rec.offset):
                    raise
                data = await trio.to_thread.run_sync(self.read_chunk, cid, current)
            self._cache.put(cid, data)
            return data
        finally:
            del self._loading[cid]
            event.set()

    def read_chunk(self, cid: bytes, rec: ChunkRecord) -> bytes:
        return read_chunk(self.packs, self._keys, cid, rec)

    # ----- compaction and lane changes ----------------------------------------------------
    async def compact(self, max_bytes: int = 64 << 20) -> int:
        """Move the live chunks of sparse packs into the open pack of their lane, so the
        sparse packs can go.

        Sealed entries are copied as they are (they are bound to their chunk id, not to a
        place), so nothing is decrypted or re-encrypted. Returns the bytes moved.
        """
        moved = 0
        while self._sparse_packs and moved < max_bytes:
            pack_id = self._sparse_packs.pop()
            pack = self.index.get_pack(pack_id)
            if pack is None or not pack.sealed:
                continue
            moves = []
            for cid in self.index.chunks_in_pack(pack_id):
                rec = self.index.get_chunk(cid)
                if rec is not None and rec.pack == pack_id:
                    moves.append((cid, rec, pack.lane))
            moved += await self._move_chunks(moves)
            log.debug("compacted pack %d: moved %d chunks", pack_id, len(moves))
        return moved

    async def _move_chunks(self, moves: list[tuple[bytes, ChunkRecord, int]]) -> int:
        """Copy sealed entries (chunk id, current record, target lane) into the open packs of
        their target lanes and point the chunks there; returns the bytes moved. A chunk freed
        or moved meanwhile keeps its place (the copy is garbage in the new pack)."""
        entries = []
        for cid, rec, lane in moves:
            new_pack, new_offset = self.packs.reserve(self.index, rec.sealed_length, lane)
            entries.append((cid, rec, new_pack, new_offset))
        try:
            await trio.to_thread.run_sync(self._copy_entries, entries)
        finally:
            for e in entries:
                self.packs.finish(e[2])
        moved = 0
        async with self._apply_lock:
            with self.index.atomic():
                for cid, old, new_pack, new_offset in entries:
                    rec = self.index.get_chunk(cid)
                    if rec is None or (rec.pack, rec.offset) != (old.pack, old.offset):
                        continue
                    rec.pack, rec.offset = new_pack, new_offset
                    self.index.put_chunk(cid, rec, old.pack)
                    target = self.index.get_pack(new_pack)
                    target.live_chunks += 1
                    target.live_bytes += rec.sealed_length
                    self.index.put_pack(new_pack, target)
                    self._pack_lost(old.pack, rec.sealed_length)
                    moved += rec.sealed_length
        return moved

    def _copy_entries(self, entries) -> None:
        for _cid, rec, new_pack, new_offset in entries:
            self.packs.write(new_pack, new_offset, self.packs.read(rec.pack, rec.offset, rec.sealed_length))

    def queue_file_promotion(self, ino: int, lane: int) -> None:
        """`ino` stopped being local: its chunks in local packs move to `lane`'s packs."""
        if self.packs.local_ids:
            self._promote_files[ino] = lane
            self._start_promoting()

    def _start_promoting(self) -> None:
        if not self._promoting and self.nursery is not None:
            self._promoting = True
            self.nursery.start_soon(self._promote_in_background)

    async def _promote_in_background(self) -> None:
        try:
            await self.promote()
        except (OSError, IntegrityError) as e:
            log.error("moving chunks out of local packs failed: %s", e)
        except Exception:  # a background task must never take the mount down
            log.exception("moving chunks out of local packs failed")
        finally:
            self._promoting = False

    async def promote(self, batch_bytes: int = 64 << 20) -> int:
        """Move every chunk a replicable file uses out of local packs; returns the bytes moved."""
        async with self._promote_lock:
            return await self._promote_queued(batch_bytes)

    async def _promote_queued(self, batch_bytes: int) -> int:
        moved = 0
        while self._promote or self._promote_files:
            while self._promote_files:
                ino, lane = self._promote_files.popitem()
                if self.index.is_ignored(ino):
                    continue
                for e in self.index.extents(ino):
                    self._promote.setdefault(e.chunk_id, lane)
                await trio.sleep(0)
            moves, nbytes = [], 0
            while self._promote and nbytes < batch_bytes:
                cid, lane = self._promote.popitem()
                rec = self.index.get_chunk(cid)
                if rec is not None and rec.pack in self.packs.local_ids:
                    moves.append((cid, rec, lane))
                    nbytes += rec.sealed_length
            if moves:
                moved += await self._move_chunks(moves)
        return moved

    # ----- small reads on the event loop ----------------------------------------------------
    def read_small(self, ino: int, size: int) -> bytes:
        """The first `size` bytes of `ino` as a reader would see them, read synchronously
        (for `.backupignore` files: small, and needed inside synchronous handlers)."""
        out = bytearray(size)
        for e in self.index.extents(ino, 0, size):
            rec = self.index.get_chunk(e.chunk_id)
            if rec is None:
                raise IntegrityError("extent refers to a missing chunk")
            plain = self._cache.get(e.chunk_id)
            if plain is None:
                plain = self.read_chunk(e.chunk_id, rec)
            a, b = e.offset, min(size, e.end)
            out[a:b] = memoryview(plain)[e.chunk_offset:e.chunk_offset + b - a]
        buf = self._buffers.get(ino)
        if buf is not None:
            for run_start, run, length in buf.runs():
                a, b = max(0, run_start), min(size, run_start + length)
                if a < b:
                    with run.view(a - run_start, b - run_start) as window:
                        out[a:b] = window
        return bytes(out)

    # ----- durability ----------------------------------------------------------------------
    async def flush_buffer(self, ino: int) -> None:
        """Persist everything buffered for `ino` (not yet durable: see `sync`)."""
        buf = self._buffers.get(ino)
        if buf is None:
            return
        while buf.data or buf.inflight:
            if buf.data:
                await self._persist(ino, buf, final=True)
            else:
                await buf.drained.wait()
        if buf.error is not None:
            err, buf.error = buf.error, None
            raise err
        if self._buffers.get(ino) is buf and not buf.data and not buf.inflight:
            del self._buffers[ino]

    async def flush(self, ino: int) -> None:
        """What close() waits for: the inode's data and metadata safe from a killed daemon.

        The data is in the packs (written, in the kernel's hands) and the index changes are
        in the redo log; a power loss needs fsync (`sync`) on top.
        """
        await self.flush_buffer(ino)
        if ino in self._written:
            self.index.save()

    async def sync(self) -> None:
        """Checkpoint: make every applied change durable, packs first, then the index."""
        async with self._apply_lock:
            if self.packs.has_unsynced:
                await trio.to_thread.run_sync(self.packs.sync)
            self.packs.record_roots(self.index)
            try:
                self.index.commit()
            except Exception as e:  # lmdb.Error: the drive refused the commit
                log.error("index commit failed: %s", e)
                raise OSError(errno.ENOSPC if "space" in str(e).lower() else errno.EIO, "index commit failed") from None
            self._written.clear()
            dead, self._dead_packs = self._dead_packs, []
        for pack_id in dead:
            self.packs.delete(pack_id)

    async def flush_all(self) -> None:
        """Persist every buffer, settle lane changes, then checkpoint (before a snapshot or a stop)."""
        for ino in list(self._buffers):
            try:
                await self.flush_buffer(ino)
            except OSError as e:
                log.error("could not persist buffered data of inode %d: %s", ino, e)
        if self.lanes is not None:
            await self.lanes.settle()
        try:
            await self.promote()
        except (OSError, IntegrityError) as e:
            log.error("moving chunks out of local packs failed: %s", e)
        await self.sync()

    async def run_committer(self) -> None:
        """Checkpoint every second, persist idle buffers, compact sparse packs."""
        while True:
            await trio.sleep(COMMIT_INTERVAL)
            try:
                await self._committer_round()
            except Exception:  # a background task must never take the mount down
                log.exception("background commit failed")

    async def _committer_round(self) -> None:
        now = time.monotonic()
        for ino, buf in list(self._buffers.items()):
            if buf.data and not buf.inflight and now - buf.touched > IDLE_FLUSH_SECONDS:
                try:
                    await self.flush_buffer(ino)
                except OSError as e:
                    buf.error = e
        if self.lanes is not None and self.lanes.pending:
            self.lanes.tick()
        if (self._promote or self._promote_files) and not self._promoting:
            self._start_promoting()
        if self._sparse_packs:
            try:
                await self.compact()
            except (OSError, IntegrityError) as e:
                log.error("compaction failed: %s", e)
        if self.index.dirty or self._dead_packs:
            try:
                await self.sync()
            except OSError as e:
                log.error("periodic commit failed: %s", e)

    def checkpoint_if_large(self) -> None:
        """Start a checkpoint (once) when the open transaction has grown large."""
        if self.index.pending_ops > MAX_PENDING_OPS and not self._checkpoint_queued and self.nursery is not None:
            self._checkpoint_queued = True
            self.nursery.start_soon(self._queued_checkpoint)

    async def _queued_checkpoint(self) -> None:
        try:
            await self.sync()
        except OSError as e:
            log.error("checkpoint failed: %s", e)
        finally:
            self._checkpoint_queued = False
