"""Write buffers: the accepted bytes of each inode that are not persisted yet.

Owns the per-inode buffers (`Buffers`): where a write lands, when a buffer is handed to the
pipeline (`pipeline.Pipeline.persist`: in the background from DRAIN_AT on, up to MAX_DRAINS of
one buffer at once; past BUFFER_LIMIT or TOTAL_BUFFER_LIMIT, which bound memory, a writer waits
for one of its buffer's drains to end, or drains in its own task), waiting for drains in flight,
and refusing writes the drive could not hold (ENOSPC). A buffer (`Buffer`) is a live run that
writes extend plus the runs drains have taken and not yet applied; readers see all of them
(`Buffer.runs`). A drain takes the live run in two phases, handed over in order, so the next
drain cuts and hashes while the previous one seals and writes (see `Buffer`).
"""

from __future__ import annotations

import errno
import logging
import os
import time

import trio

log = logging.getLogger(__name__)

DRAIN_AT = 8 << 20  # start cutting a buffer into chunks at this size
BUFFER_LIMIT = 2 * DRAIN_AT  # a writer waits when its live run grows past this (a pooled run)
# Background drains of one buffer at once: one cutting and hashing while the other seals and
# writes, and the writer filling the live run meanwhile (with one, a writer reaching
# BUFFER_LIMIT drained in its own task and stalled until its own bytes were written).
MAX_DRAINS = 2
TOTAL_BUFFER_LIMIT = 64 << 20  # and when all buffers together pass this
# The drive's free space is asked at most every 50 ms while there is plenty; with less than this
# above the reserve, at every write: bytes persisted since the last look are no longer buffered,
# so a stale figure let a fast writer fill the room kept for the index's last commit.
LOW_SPACE = 256 << 20


class Run:
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


class Inflight:
    """Bytes taken from a buffer by a drain, readable until the drain has applied them."""

    __slots__ = ("start", "run", "length")

    def __init__(self, start: int, run: Run, length: int):
        self.start, self.run, self.length = start, run, length


class Buffer:
    """Accepted but not yet persisted bytes of one inode: a live run, and runs in flight.

    Drains take the live run in two phases: phase 1 (cut, hash, dedup, reserve) under
    `cut_lock`, phase 2 (seal, write, record) under `write_lock`, handed over in order, so
    the next drain cuts and hashes while the previous one seals and writes. A drain `take`s
    the live run, may `keep_tail` (an incomplete last chunk) or `put_back` all of it (nothing
    written), and `finish`es once its extents are applied.
    """

    __slots__ = ("start", "data", "inflight", "cut_lock", "write_lock", "drained", "error", "touched",
                 "drains", "drain_ended")

    def __init__(self, start: int):
        self.start = start
        self.data = Run()
        self.inflight: list[Inflight] = []  # in file order, all before `start`
        self.cut_lock = trio.Lock()
        self.write_lock = trio.Lock()
        self.drained = trio.Event()  # set while nothing is in flight
        self.drained.set()
        self.error: OSError | None = None
        self.touched = time.monotonic()
        self.drains = 0  # background drains started and not ended
        self.drain_ended = trio.Event()  # set (and replaced) whenever one ends

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

    # ----- a drain's side (under cut_lock) ------------------------------------------------------
    def take(self) -> tuple[Inflight, memoryview]:
        """Put the live run in flight (it must not be empty); returns it and a view of its bytes."""
        run, start = self.data, self.start
        item = Inflight(start, run, len(run))
        self.data, self.start = Run(), start + len(run)
        if not self.inflight:
            self.drained = trio.Event()
        self.inflight.append(item)
        return item, run.view()

    def keep_tail(self, item: Inflight, view: memoryview, kept: int) -> None:
        """The last `kept` bytes in flight are an incomplete chunk: back to the front of the live run."""
        with self.data.view() as live:
            self.data, self.start = Run(view[len(view) - kept:], live), self.start - kept
        item.length -= kept

    def put_back(self, item: Inflight, view: memoryview) -> None:
        """Nothing of `item` was written: all of it goes back to the front of the live run."""
        with self.data.view() as live:
            self.data, self.start = Run(view[:item.length], live), item.start
        self.finish(item, view)

    def finish(self, item: Inflight, view: memoryview) -> None:
        """`item` is applied (or back in the live run): readers no longer need it."""
        self.inflight.remove(item)
        view.release()
        item.run.recycle()
        if not self.inflight:
            self.drained.set()


class Buffers:
    """The write buffers of a mounted store.

    Attributes:
        persist: `async persist(ino, buffer, final)`, the pipeline's drain of a buffer's live run.
        nursery: where background drains start (None: every drain runs in the writer's task).
    """

    def __init__(self, persist, packs_dir: str, space_reserve: int = 0):
        self.persist = persist
        self.nursery: trio.Nursery | None = None
        self._buffers: dict[int, Buffer] = {}
        self._packs_dir = packs_dir
        self._space_reserve = space_reserve
        self._free_checked = 0.0
        self._free_bytes = 1 << 62

    def get(self, ino: int) -> Buffer | None:
        return self._buffers.get(ino)

    def __contains__(self, ino: int) -> bool:
        return ino in self._buffers

    def __iter__(self):
        return iter(self._buffers)

    def items(self):
        return self._buffers.items()

    # ----- space ---------------------------------------------------------------------------
    def buffered_bytes(self) -> int:
        return sum(b.buffered() for b in self._buffers.values())

    def free_bytes(self) -> int:
        now = time.monotonic()
        if now - self._free_checked > 0.05 or self._free_bytes < self._space_reserve + LOW_SPACE:
            st = os.statvfs(self._packs_dir)
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
            buf = self._buffers[ino] = Buffer(offset)
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
            await self.persist(ino, buf, final=True)
        buf.data.write(offset - buf.start, data)
        buf.touched = time.monotonic()
        while True:
            if len(buf.data) >= DRAIN_AT and buf.drains < MAX_DRAINS and self.nursery is not None:
                buf.drains += 1
                self.nursery.start_soon(self._drain_in_background, ino, buf)
            if len(buf.data) < BUFFER_LIMIT and self.buffered_bytes() < TOTAL_BUFFER_LIMIT:
                break
            if not buf.drains:
                await self.persist(ino, buf, final=False)
                break
            await buf.drain_ended.wait()  # memory comes back as this buffer's drains end
            if buf.error is not None:  # one failed (its bytes are back in the live run): say so now,
                err, buf.error = buf.error, None  # as a drain in this task would have, not drain again and again
                raise err

    async def _drain_in_background(self, ino: int, buf: Buffer) -> None:
        try:
            await self.persist(ino, buf, final=False)
        except OSError as e:
            buf.error = e  # reported to the next write, flush or fsync of this inode
            log.warning("writing inode %d failed: %s", ino, os.strerror(e.errno or errno.EIO))
        except Exception:  # a background task must never take the mount down
            log.exception("writing inode %d failed", ino)
            buf.error = OSError(errno.EIO, "write failed")
        finally:
            buf.drains -= 1
            buf.drain_ended.set()
            buf.drain_ended = trio.Event()

    async def flush(self, ino: int) -> None:
        """Persist everything buffered for `ino` (not yet durable: see `FileData.sync`)."""
        buf = self._buffers.get(ino)
        if buf is None:
            return
        while buf.data or buf.inflight:
            if buf.data:
                await self.persist(ino, buf, final=True)
            else:
                await buf.drained.wait()
        if buf.error is not None:
            err, buf.error = buf.error, None
            raise err
        if self._buffers.get(ino) is buf and not buf.data and not buf.inflight:
            del self._buffers[ino]

    def forget(self, ino: int) -> None:
        """Drop the buffered bytes of a deleted inode."""
        buf = self._buffers.pop(ino, None)
        if buf is not None:
            buf.data = Run()
