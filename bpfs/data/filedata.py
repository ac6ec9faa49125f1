"""`FileData`: the file-data layer as the mount sees it, and its durability.

Owns the wiring of the data package (who holds which lock, set and nursery), the calls the
mount makes (write, read, truncate, forget_inode, flush, sync, flush_all, ...), and the two
levels of durability: `flush()` (close) persists the inode's buffer into the packs and saves
the index changes to the redo log, which survives a killed daemon at the cost of a write();
`sync()` (fsync, and every second from the committer) fdatasyncs the packs and then
checkpoints the index, so a checkpoint never points at pack bytes that are not on stable
storage. Background work (drains, prefetches, promotion, checkpoints, lane re-evaluation) runs
only inside `background()`.

Also the data layer's work on a clock (`Committer`): every COMMIT_INTERVAL it persists buffers
idle for IDLE_FLUSH_SECONDS, lets `lanes` read written `.backupignore` files and start queued
re-evaluations, restarts promotion out of local packs, compacts sparse packs and checkpoints
(`FileData.sync`) whatever changed; and it starts a checkpoint at once when the index's open
transaction grows past MAX_PENDING_OPS (`checkpoint_if_large`, from long-running operations).
"""

from __future__ import annotations

import errno
import logging
import time
from contextlib import asynccontextmanager

import trio

from ..chunkmap import ChunkMap
from ..errors import IntegrityError
from ..index import Index
from ..lanes import Lanes
from ..packs import PackFiles
from . import extents
from .buffers import Buffers
from .compaction import Mover
from .pipeline import Pipeline
from .reads import CACHE_BYTES, ChunkCache, Reader

log = logging.getLogger(__name__)


class FileData:
    """File contents of a mounted store.

    Attributes:
        index, packs: the live index and the pack files.
        lanes: the lane decisions (`lanes.Lanes`, built here; the mount tells it about names).
        chunks: chunk bookkeeping (`chunkmap.ChunkMap`).
        buffers: the write buffers (`buffers.Buffers`).
        mover: compaction and promotion out of local packs (`compaction.Mover`).
        reader: reads and the chunk cache (`reads.Reader`).
        nursery: where background work starts, while `background()` runs (else None).
    """

    def __init__(self, index: Index, packs: PackFiles, keys, space_reserve: int = 0, priority_patterns=(),
                 max_file_size: int | None = None):
        self.index = index
        self.packs = packs
        self.nursery: trio.Nursery | None = None
        self._apply_lock = trio.Lock()  # held while this layer changes chunks and extents, and by sync
        self._written: set[int] = set()  # inodes with data applied since the last commit
        cache = ChunkCache(CACHE_BYTES)
        self.chunks = ChunkMap(index, packs.local_ids, on_free=cache.drop)
        self.mover = Mover(index, packs, self.chunks, self._apply_lock)
        self.lanes = Lanes(index, self, priority_patterns, max_file_size)
        self._pipeline = Pipeline(index, packs, keys, self.chunks, self.lanes, self.mover, self._apply_lock,
                                  self._written)
        self.buffers = Buffers(self._pipeline.persist, packs.dir, space_reserve)
        self.reader = Reader(index, packs, keys, cache, self.buffers)
        self._committer = Committer(self)

    @asynccontextmanager
    async def background(self):
        """Run this layer's background work in a nursery open for the block, and yield it (the
        caller may start its own tasks there). Without it every drain runs in the writer's
        task, and nothing is prefetched, promoted or checkpointed on its own."""
        try:
            async with trio.open_nursery() as nursery:
                self._set_nursery(nursery)
                yield nursery
        finally:
            self._set_nursery(None)

    def _set_nursery(self, nursery: trio.Nursery | None) -> None:
        self.nursery = self.buffers.nursery = self.reader.nursery = self.mover.nursery = nursery

    @asynccontextmanager
    async def quiet(self):
        """Hold off, for the block, everything by which this layer changes the index (drains
        applying extents, chunk moves, checkpoints): for the snapshot exporter, which reads
        and changes the index in one piece."""
        async with self._apply_lock:
            yield

    def mark_written(self, ino: int) -> None:
        """The next flush of `ino` must commit (its creation, say, is not durable yet)."""
        self._written.add(ino)

    def has_buffer(self, ino: int) -> bool:
        return ino in self.buffers

    # ----- writing -------------------------------------------------------------------------
    def check_space(self, nbytes: int) -> None:
        """Refuse (ENOSPC) writes that the drive could not hold with the index's reserve."""
        self.buffers.check_space(nbytes)

    async def write(self, ino: int, offset: int, data: bytes) -> None:
        await self.buffers.write(ino, offset, data)

    async def truncate(self, ino: int, size: int) -> None:
        """Drop stored content past `size` (the caller updates the inode's size)."""
        await self.flush_buffer(ino)
        with self.index.atomic():
            attr = self.index.get_attr(ino)
            removed = extents.punch(self.index, self.chunks, ino, size, extents.END)
            if attr is not None and removed:
                attr.stored -= removed
                self.index.put_attr(attr)
        self._written.add(ino)

    def forget_inode(self, ino: int) -> None:
        """Release all content of a deleted inode (synchronous)."""
        self.buffers.forget(ino)
        extents.punch(self.index, self.chunks, ino, 0, extents.END)

    # ----- reading -------------------------------------------------------------------------
    async def read(self, ino: int, offset: int, size: int, file_size: int) -> bytes | memoryview:
        return await self.reader.read(ino, offset, size, file_size)

    def read_small(self, ino: int, size: int) -> bytes:
        """The first `size` bytes of `ino` as a reader would see them, read synchronously."""
        return self.reader.read_small(ino, size)

    # ----- packs and lanes -------------------------------------------------------------------
    def note_packs(self, dead=(), sparse=()) -> None:
        """Packs whose chunks went elsewhere (`chunkmap`): dead ones are deleted after the next
        commit, sparse ones compacted."""
        self.chunks.note_packs(dead, sparse)

    async def compact(self, max_bytes: int = 64 << 20) -> int:
        """Compact sparse packs (see `compaction`); returns the bytes moved."""
        return await self.mover.compact(max_bytes)

    def queue_file_promotion(self, ino: int, lane: int) -> None:
        """`ino` stopped being local: its chunks in local packs move to `lane`'s packs."""
        self.mover.queue_file_promotion(ino, lane)

    async def promote(self, batch_bytes: int = 64 << 20) -> int:
        """Move every chunk a replicable file uses out of local packs; returns the bytes moved."""
        return await self.mover.promote(batch_bytes)

    # ----- durability ----------------------------------------------------------------------
    async def flush_buffer(self, ino: int) -> None:
        """Persist everything buffered for `ino` (not yet durable: see `sync`)."""
        await self.buffers.flush(ino)

    async def flush(self, ino: int) -> None:
        """What close() waits for: the inode's data and metadata safe from a killed daemon.

        The data is in the packs (written, in the kernel's hands) and the index changes are
        in the redo log; a power loss needs fsync (`sync`) on top.
        """
        await self.buffers.flush(ino)
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
            dead = self.chunks.take_dead()
        for pack_id in dead:
            self.packs.delete(pack_id)

    async def flush_all(self) -> None:
        """Persist every buffer, settle lane changes, then checkpoint (before a snapshot or a stop)."""
        for ino in list(self.buffers):
            try:
                await self.buffers.flush(ino)
            except OSError as e:
                log.error("could not persist buffered data of inode %d: %s", ino, e)
        await self.lanes.settle()
        try:
            await self.mover.promote()
        except (OSError, IntegrityError) as e:
            log.error("moving chunks out of local packs failed: %s", e)
        await self.sync()

    async def run_committer(self) -> None:
        """Checkpoint every second, persist idle buffers, compact sparse packs (`committer`)."""
        await self._committer.run()

    def checkpoint_if_large(self) -> None:
        """Start a checkpoint (once) when the open transaction has grown large."""
        self._committer.checkpoint_if_large()


COMMIT_INTERVAL = 1.0
IDLE_FLUSH_SECONDS = 5.0
MAX_PENDING_OPS = 20_000


class Committer:
    """The periodic and the size-triggered checkpoints of one `FileData`."""

    def __init__(self, data: FileData):
        self.data = data
        self._checkpoint_queued = False

    async def run(self) -> None:
        """Checkpoint every second, persist idle buffers, compact sparse packs."""
        while True:
            await trio.sleep(COMMIT_INTERVAL)
            try:
                await self.round()
            except Exception:  # a background task must never take the mount down
                log.exception("background commit failed")

    async def round(self) -> None:
        data = self.data
        now = time.monotonic()
        for ino, buf in list(data.buffers.items()):
            if buf.data and not buf.inflight and now - buf.touched > IDLE_FLUSH_SECONDS:
                try:
                    await data.flush_buffer(ino)
                except OSError as e:
                    buf.error = e
        if data.lanes.pending:
            data.lanes.tick()
        if data.mover.pending:
            data.mover.start()
        if data.chunks.sparse:
            try:
                await data.compact()
            except (OSError, IntegrityError) as e:
                log.error("compaction failed: %s", e)
        if data.index.dirty or data.chunks.dead:
            try:
                await data.sync()
            except OSError as e:
                log.error("periodic commit failed: %s", e)

    def checkpoint_if_large(self) -> None:
        """Start a checkpoint (once) when the open transaction has grown large."""
        nursery = self.data.nursery
        if self.data.index.pending_ops > MAX_PENDING_OPS and not self._checkpoint_queued and nursery is not None:
            self._checkpoint_queued = True
            nursery.start_soon(self._queued_checkpoint)

    async def _queued_checkpoint(self) -> None:
        try:
            await self.data.sync()
        except OSError as e:
            log.error("checkpoint failed: %s", e)
        finally:
            self._checkpoint_queued = False
