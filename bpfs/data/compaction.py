"""Moving sealed chunks between packs: compaction, and promotion out of local packs.

Owns `Mover`: compaction copies the live chunks of sparse packs (`chunkmap.ChunkMap.sparse`)
into the open pack of their lane, so the sparse packs can go; promotion moves every chunk a
replicable file uses out of local packs (a chunk shared by dedup with an ignored file, or the
chunks of a file that stopped being ignored; see `lanes`), in the background and in
`FileData.flush_all`. Sealed entries are copied as they are (they are bound to their chunk
id, not to a place), so nothing is decrypted or re-encrypted; the copy happens in a worker
thread and the records move under the store's apply lock (`ChunkMap.move`).
"""

from __future__ import annotations

import logging

import trio

from ..chunkmap import ChunkMap
from ..errors import IntegrityError
from ..index import ChunkRecord, Index
from ..packs import PackFiles
import trio.lowlevel

log = logging.getLogger(__name__)


class Mover:
    """Compaction and promotion of one mounted store.

    Attributes:
        index, packs, chunks: the live index, the pack files, the chunk bookkeeping.
        apply_lock: the store's lock held while records change (see `pipeline.Pipeline`).
        nursery: where background promotion starts (None: only `promote` moves chunks).
    """

    def __init__(self, index: Index, packs: PackFiles, chunks: ChunkMap, apply_lock: trio.Lock):
        self.index = index
        self.packs = packs
        self.chunks = chunks
        self.apply_lock = apply_lock
        self.nursery: trio.Nursery | None = None
        self._promote: dict[bytes, int] = {}  # chunk id in a local pack -> lane to move it to
        self._promote_files: dict[int, int] = {}  # inode no longer local -> its lane (chunks to move)
        self._promoting = False
        self._promote_lock = trio.Lock()

    # ----- compaction ---------------------------------------------------------------------------
    async def compact(self, max_bytes: int = 64 << 20) -> int:
        """Move the live chunks of sparse packs into the open pack of their lane, so the
        sparse packs can go. Returns the bytes moved."""
        moved = 0
        sparse = self.chunks.sparse
        while sparse and moved < max_bytes:
            pack_id = sparse.pop()
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
        async with self.apply_lock:
            with self.index.atomic():
                for cid, old, new_pack, new_offset in entries:
                    if self.chunks.move(cid, old, new_pack, new_offset):
                        moved += old.sealed_length
        return moved

    def _copy_entries(self, entries) -> None:
        for _cid, rec, new_pack, new_offset in entries:
            self.packs.write(new_pack, new_offset, self.packs.read(rec.pack, rec.offset, rec.sealed_length))

    # ----- promotion out of local packs ---------------------------------------------------------
    @property
    def pending(self) -> bool:
        """Whether chunks or files wait for promotion."""
        return bool(self._promote or self._promote_files)

    @property
    def running(self) -> bool:
        """Whether a background promotion runs."""
        return self._promoting

    def queue_file_promotion(self, ino: int, lane: int) -> None:
        """`ino` stopped being local: its chunks in local packs move to `lane`'s packs."""
        if self.packs.local_ids:
            self._promote_files[ino] = lane
            self.start()

    def promote_chunks(self, cids, lane: int) -> None:
        """A replicable file of `lane` now uses these chunks of local packs: move them (in the
        background, with anything else still queued)."""
        for cid in cids:
            self._promote.setdefault(cid, lane)
        if self._promote:
            self.start()

    def start(self) -> None:
        """Start a background promotion unless one runs (or no nursery is open)."""
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
                await trio.lowlevel.checkpoint()
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
