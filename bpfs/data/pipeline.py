"""The chunk pipeline: from a buffer's bytes to sealed chunks in packs and extents in the index.

Owns a drain (`Pipeline.persist`): cut the run into content-defined chunks, hash them (keyed),
skip chunks the store already holds (dedup) and all-zero chunks (holes), reserve places for
the rest in the open pack of the inode's lane (phase 1, under the buffer's `cut_lock`); then
pad and seal them in place and write them from worker threads, and record the extents in one
atomic index section (phase 2, under its `write_lock`, and the store's apply lock). Work too
small to be worth a thread hop runs on the event loop. A chunk in a local pack that a
replicable file now uses (dedup with an ignored file) is handed to `compaction.Mover`.
"""

from __future__ import annotations

from typing import NamedTuple

import trio

from ..chunker import Chunker
from ..chunkmap import ChunkMap
from ..crypto import NONCE_SIZE, padme, sealed_chunk_size
from ..index import LANE_LOCAL, LANE_NORMAL, ChunkRecord, Index
from ..packs import PackFiles
from . import extents
from .buffers import Buffer
from .extents import ZERO_ID

class Reservation(NamedTuple):
    """Room reserved in a pack for one new chunk: its id, where it is in the data being written
    (`pos`, `length`: plaintext), and where its sealed form goes (`pack_id`, `offset`)."""

    chunk_id: bytes
    pos: int
    length: int
    pack_id: int
    offset: int


INLINE_BYTES = 128 << 10  # less work than this runs on the event loop: a thread hop costs more


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


class Pipeline:
    """Drains of write buffers into the store.

    Attributes:
        index, packs, chunks: the live index, the pack files, the chunk bookkeeping.
        lanes: decides each inode's lane (`lanes.Lanes`).
        mover: takes the chunks of local packs that replicable files use (`compaction.Mover`).
        apply_lock: held while extents are applied (the store's: nothing else changes the
            index's chunks meanwhile).
        written: inodes with data applied since the last commit (the store's set; added to here).
    """

    def __init__(self, index: Index, packs: PackFiles, keys, chunks: ChunkMap, lanes, mover,
                 apply_lock: trio.Lock, written: set[int]):
        self.index = index
        self.packs = packs
        self._keys = keys
        self.chunker = Chunker(keys.chunker_key)
        self.chunks = chunks
        self.lanes = lanes
        self.mover = mover
        self.apply_lock = apply_lock
        self.written = written

    async def persist(self, ino: int, buf: Buffer, final: bool) -> None:
        """Turn the live run into stored chunks; unless `final`, keep the last partial chunk."""
        async with buf.cut_lock:
            if not buf.data:
                return
            item, view = buf.take()
            start = item.start
            reservations = []
            try:
                lengths = await _in_thread(len(view), self.chunker.cut, view)
                if not final and lengths and lengths[-1] < self.chunker.max_size:
                    buf.keep_tail(item, view, lengths.pop())  # an incomplete chunk: back to the live run
                pieces = await self._hash_pieces(view, lengths) if lengths else []
                lane = self.lanes.lane_of(ino)
                placed, reservations = self._place_new_chunks(pieces, lane)
                await buf.write_lock.acquire()  # keep phase 2 in file order
            except BaseException:
                for r in reservations:
                    self.packs.finish(r.pack_id)
                buf.put_back(item, view)  # nothing written yet: all back into the live run
                raise
        try:
            await self._write_and_record(ino, view, start, pieces, placed, reservations, lane)
        finally:
            buf.write_lock.release()
            buf.finish(item, view)

    async def _hash_pieces(self, data: memoryview, lengths: list[int]) -> list[tuple[int, int, bytes]]:
        """(offset in data, length, chunk id) of each chunk; all-zero chunks get ZERO_ID."""
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
                ids.append(ZERO_ID)
            else:
                ids.append(self._keys.chunk_id(piece))
        return ids

    def _place_new_chunks(self, pieces, lane: int = LANE_NORMAL):
        """Reserve space in the lane's pack for the chunks the store does not hold yet (dedup)."""
        placed: dict[bytes, ChunkRecord] = {}
        reservations = []
        for pos, length, cid in pieces:
            if cid != ZERO_ID and cid not in placed and self.index.get_chunk(cid) is None:
                pack_id, offset = self.packs.reserve(self.index, sealed_chunk_size(length), lane)
                placed[cid] = ChunkRecord(pack_id, offset, sealed_chunk_size(length), length, 0,
                                          born=self.index.generation)
                reservations.append(Reservation(cid, pos, length, pack_id, offset))
        return placed, reservations

    async def _write_and_record(self, ino, view, start, pieces, placed, reservations, lane=LANE_NORMAL) -> None:
        try:
            if reservations:
                await _in_threads(self._seal_and_write,
                                  [(view, part) for part in _split(reservations, lambda r: r.length)],
                                  sum(r.length for r in reservations))
        finally:
            for r in reservations:
                self.packs.finish(r.pack_id)
        async with self.apply_lock:
            self._apply(ino, start, pieces, placed, lane)

    def _seal_and_write(self, source: memoryview, reservations) -> None:
        """Pad and seal chunks in place in one buffer per run of a pack, then write the run."""
        runs: list[list[Reservation]] = []
        for r in reservations:
            prev = runs[-1][-1] if runs else None
            if prev and prev.pack_id == r.pack_id and prev.offset + sealed_chunk_size(prev.length) == r.offset:
                runs[-1].append(r)
            else:
                runs.append([r])
        for run in runs:
            pack_id, base = run[0].pack_id, run[0].offset
            out = bytearray(run[-1].offset + sealed_chunk_size(run[-1].length) - base)
            for cid, pos, length, _, offset in run:
                at = offset - base
                out[at + NONCE_SIZE:at + NONCE_SIZE + length] = source[pos:pos + length]
                self._keys.data.seal_in_place(out, at, padme(length), cid)
            self.packs.write(pack_id, base, out)

    def _apply(self, ino: int, start: int, pieces, placed: dict[bytes, ChunkRecord], lane: int = LANE_NORMAL) -> None:
        """Record persisted pieces as extents: all of it or (on an error) none of it."""
        local_ids = self.packs.local_ids
        if local_ids:
            lane = self.lanes.current(ino, lane)  # it may have changed since the pieces were placed
        watch = local_ids if lane != LANE_LOCAL and local_ids else None
        with self.index.atomic():
            for cid, rec in placed.items():
                self.chunks.add(cid, rec)  # unless another writer stored it meanwhile
            used_local = extents.record(self.index, self.chunks, ino, start, pieces, watch)
            if used_local is not None:  # else deleted while we wrote: the new chunks stay unreferenced
                self.written.add(ino)
            for cid in placed:
                self.chunks.release_if_unused(cid)  # stored for a file deleted meanwhile
        self.mover.promote_chunks(used_local or (), lane)  # a replicable file uses them now
