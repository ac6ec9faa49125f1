"""Pack files on the drive: append-only containers of sealed chunks.

A pack is `STORE/packs/XX/NNNNNNNNNNNN.pack`: sealed chunk entries one after another, no
header, no plaintext. Many small files share a pack; each entry is padded (Padmé) before
sealing, and a pack that replicates is padded with random bytes to one of a few sizes when it
is sealed (`padded_pack_size`), so neither the drive nor a partner sees exact chunk, file or
pack-content sizes. Each lane
(normal, priority, local: see `lanes`) fills packs of its own, one open pack per lane; the
lane is in the pack's index record, and sealing queues normal and priority packs in the
outbox, never local ones. A pack is
written by one writer at a time at offsets handed out by `reserve` (on the event loop),
with the bytes themselves written from worker threads. Packs are never modified once
written; a pack whose chunks are all dead is deleted whole after the commit that freed it.
The index (not the pack) knows where each chunk is.

Each pack's tree root (`packtree`: what storage audits check partners against) is built while
the pack is written, from the bytes handed to `write`, so no byte is read back for it; once a
pack is sealed and its last write is synced, `record_roots` puts the root in the index. A pack
whose root could not be built that way (written before a crash) gets it from `root_of` later.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import OrderedDict

from .errors import IntegrityError
from .fsutil import fsync_dir, make_private_dir
from .index import LANE_LOCAL, LANE_NORMAL, Index, PackRecord
from .packtree import TreeBuilder, root_of_file

log = logging.getLogger(__name__)

PACK_TARGET = 16 << 20
_MAX_READ_FDS = 64
PAD_MIN = 64 << 10  # the smallest size a replicated pack is padded to
ADVISE_BYTES = 4 << 20  # written bytes of a pack handed to writeback (and out of the page cache) at once


def padded_pack_size(size: int) -> int:
    """The size a replicated pack of `size` bytes is padded to when it is sealed: at least
    PAD_MIN, else the next size of the form m * 2^k with m in 4..7 (four sizes per doubling:
    at most 25% more bytes, about 7% for full packs). A partner (or a thief of the drive) sees
    which of these few sizes a pack has, not how many bytes of chunks it holds."""
    if size <= PAD_MIN:
        return PAD_MIN
    shift = max(0, size.bit_length() - 3)  # keep the top three bits: 4..7 times 2^shift
    step = 1 << shift
    return -(-size // step) * step


class _OpenPack:
    __slots__ = ("id", "fd", "size")

    def __init__(self, pack_id: int, fd: int):
        self.id, self.fd, self.size = pack_id, fd, 0


class _ReadFd:
    """A cached read descriptor and how many threads are reading through it."""

    __slots__ = ("fd", "users", "retired")

    def __init__(self, fd: int):
        self.fd, self.users, self.retired = fd, 0, False


class PackFiles:
    """The pack files of one store (STORE/packs): the open pack of each lane, handing out and writing
    space in it, sealing and syncing, reading chunks back, each pack's tree root, and deleting packs."""

    def __init__(self, store_dir: str, target_size: int = PACK_TARGET):
        self.dir = os.path.join(store_dir, "packs")
        self.target_size = target_size
        self._open: dict[int, _OpenPack] = {}  # lane -> the pack being filled in that lane
        self._open_ids: frozenset[int] = frozenset()
        self._lock = threading.Lock()
        self._unsynced: dict[int, int] = {}  # pack id -> write fd with data not yet fdatasync'ed
        self._dirs_to_sync: set[str] = set()
        self._read_fds: OrderedDict[int, _ReadFd] = OrderedDict()
        self._writers: dict[int, int] = {}  # pack id -> reservations not yet finished
        self._dirty: set[int] = set()  # packs written since their last fdatasync
        self._unadvised: dict[int, tuple[int, int]] = {}  # pack id -> range written, not yet fadvised
        self.local_ids: set[int] = set()  # local-lane packs started here (FileData adds the older ones)
        self.replicable_reserved = 0  # bytes handed out in lanes that replicate, since this process began
        self._trees: dict[int, TreeBuilder] = {}  # pack id -> its tree, while bytes are written into it
        self._sizes: dict[int, int] = {}  # sealed pack id -> its final size, until its tree is finished
        self._roots: dict[int, tuple[bytes, int]] = {}  # finished trees not yet in the index

    def path(self, pack_id: int) -> str:
        return os.path.join(self.dir, f"{pack_id & 0xFF:02x}", f"{pack_id:012x}.pack")

    # ----- writing (reserve on the event loop, write in a thread) ---------------------------
    def reserve(self, index: Index, nbytes: int, lane: int = LANE_NORMAL) -> tuple[int, int]:
        """Hand out `nbytes` at the end of the lane's open pack, starting a new pack when it is full.

        Each lane (normal, priority, local: see `lanes`) fills packs of its own.
        """
        cur = self._open.get(lane)
        if cur is None or (cur.size and cur.size + nbytes > self.target_size):
            self._seal_lane(index, lane)
            cur = self._start_pack(index, lane)
        offset = cur.size
        cur.size += nbytes
        if lane != LANE_LOCAL:
            self.replicable_reserved += nbytes
        with self._lock:
            self._writers[cur.id] = self._writers.get(cur.id, 0) + 1
        rec = index.get_pack(cur.id)
        assert rec is not None  # the lane's current pack: `_start_pack` put it in the index
        rec.size = cur.size
        index.put_pack(cur.id, rec)
        return cur.id, offset

    def _start_pack(self, index: Index, lane: int) -> _OpenPack:
        while True:
            pack_id = index.allocate_pack_id()
            path = self.path(pack_id)
            parent = os.path.dirname(path)
            if not os.path.isdir(parent):
                make_private_dir(parent)
                self._dirs_to_sync.add(self.dir)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:  # left by a crash before its id was committed: skip it
                continue
        self._dirs_to_sync.add(parent)
        cur = self._open[lane] = _OpenPack(pack_id, fd)
        if lane == LANE_LOCAL:
            self.local_ids.add(pack_id)
        with self._lock:
            self._unsynced[pack_id] = fd
            self._trees[pack_id] = TreeBuilder()
            self._open_ids = frozenset(p.id for p in self._open.values())
        index.put_pack(pack_id, PackRecord(0, 0, 0, False, lane))
        return cur

    def open_bytes(self, lane: int) -> int:
        """Bytes in the open pack of `lane` (0 when none is open)."""
        cur = self._open.get(lane)
        return cur.size if cur is not None else 0

    def seal_open(self, index: Index) -> None:
        """Close the open packs of every lane for writing; they become immutable, and those
        that replicate go to the outbox (priority ones marked so)."""
        for lane in list(self._open):
            self._seal_lane(index, lane)

    def _seal_lane(self, index: Index, lane: int) -> None:
        cur = self._open.pop(lane, None)
        if cur is None:
            return
        rec = index.get_pack(cur.id)
        if rec is not None:
            index.seal_pack(cur.id, rec)
        size = cur.size
        if lane != LANE_LOCAL and size:
            size = self._pad(cur)
        with self._lock:
            self._sizes[cur.id] = size
            self._open_ids = frozenset(p.id for p in self._open.values())
        # its fd is closed (and its tree finished) after its next fdatasync

    def _pad(self, cur: _OpenPack) -> int:
        """Fill a replicated pack up to its padded size with random bytes (no reader ever asks
        for them: the index records where each chunk ends), so that it looks like any other pack
        of that size; its new size. The index keeps the size of its chunks (`PackRecord.size`,
        what compaction weighs); the file, its tree root and what partners hold are the padded
        size."""
        size = padded_pack_size(cur.size)
        if size > cur.size:
            with self._lock:
                self._writers[cur.id] = self._writers.get(cur.id, 0) + 1
            try:
                self._allocate(cur.id, cur.size, size - cur.size)
                self.write(cur.id, cur.size, os.urandom(size - cur.size))
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                # A full disk must not fail a seal (at unmount it would lose the clean stop):
                # the pack keeps its exact size, which is all a partner learns of it.
                self._truncate(cur.id, cur.size)
                log.warning("pack %d sealed without padding: the disk is full (a partner will see its exact "
                            "size)", cur.id)
                size = cur.size
            finally:
                self.finish(cur.id)
        return size

    def _allocate(self, pack_id: int, offset: int, length: int) -> None:
        """Make sure the disk has room for `length` bytes at `offset` (ENOSPC if not)."""
        with self._lock:
            fd = self._unsynced.get(pack_id)
        if fd is None:
            raise RuntimeError(f"pack {pack_id} is not open for writing")
        try:
            os.posix_fallocate(fd, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise  # a file system without fallocate: the write tells

    def _truncate(self, pack_id: int, size: int) -> None:
        with self._lock:
            fd = self._unsynced.get(pack_id)
        if fd is not None:
            os.ftruncate(fd, size)

    def write(self, pack_id: int, offset: int, data: bytes | bytearray) -> None:
        """Write reserved bytes (blocking; call from a worker thread)."""
        with self._lock:
            fd = self._unsynced.get(pack_id)
        if fd is None:
            raise RuntimeError(f"pack {pack_id} is not open for writing")
        start, view = offset, memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            if n == 0:
                raise OSError(errno.EIO, "short write to pack")
            view, offset = view[n:], offset + n
        tree = self._trees.get(pack_id)
        if tree is not None:
            tree.add(start, data)
        with self._lock:
            self._dirty.add(pack_id)
            lo, hi = self._unadvised.get(pack_id, (start, offset))
            lo, hi = min(lo, start), max(hi, offset)
            advise = hi - lo >= ADVISE_BYTES
            if advise:
                self._unadvised.pop(pack_id, None)
            else:
                self._unadvised[pack_id] = (lo, hi)
        if advise:
            # Start writeback now and keep sealed bytes out of the page cache: pwrite runs 5x
            # faster here, and the fdatasync that close/fsync wait for finds little left to do.
            # Per ADVISE_BYTES, not per write: a small file's chunk would start a small I/O each
            # (an extract of many small files spent a quarter of its flush time there).
            os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)

    def finish(self, pack_id: int) -> None:
        """The writer of a reservation is done with it (written or failed)."""
        with self._lock:
            left = self._writers[pack_id] - 1
            if left:
                self._writers[pack_id] = left
            else:
                del self._writers[pack_id]

    def sync(self) -> None:
        """fdatasync every pack written since the last sync, and new directory entries."""
        with self._lock:
            pending = list(self._unsynced.items())
            dirty, self._dirty = self._dirty, set()
            dirs, self._dirs_to_sync = self._dirs_to_sync, set()
            unadvised = {pack_id: self._unadvised.pop(pack_id) for pack_id in dirty if pack_id in self._unadvised}
        for pack_id, fd in pending:
            if pack_id in dirty:
                os.fdatasync(fd)
                if pack_id in unadvised:  # clean now: dropping them from the page cache is cheap
                    lo, hi = unadvised[pack_id]
                    os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        for d in sorted(dirs, key=len, reverse=True):
            fsync_dir(d)
        finished = []
        with self._lock:
            for pack_id, fd in pending:
                if pack_id not in self._open_ids and pack_id not in self._writers and pack_id not in self._dirty:
                    self._unsynced.pop(pack_id, None)
                    os.close(fd)
                    tree, size = self._trees.pop(pack_id, None), self._sizes.pop(pack_id, None)
                    if tree is not None and size is not None:
                        finished.append((pack_id, tree, size))
        for pack_id, tree, size in finished:
            root = tree.root(size)
            if root is not None:
                with self._lock:
                    self._roots[pack_id] = (root, size)

    def record_roots(self, index: Index) -> int:
        """Put the roots of packs finished since the last call into the index (on the index's
        thread, after `sync`); the number recorded."""
        with self._lock:
            roots, self._roots = self._roots, {}
        n = 0
        for pack_id, (root, size) in roots.items():
            if index.get_pack(pack_id) is not None:
                index.put_pack_root(pack_id, root, size)
                n += 1
        return n

    def root_of(self, pack_id: int) -> tuple[bytes, int]:
        """(tree root, size) of a sealed pack, hashed from its file (blocking). For packs whose
        root was not built while they were written."""
        try:
            return root_of_file(self.path(pack_id))
        except FileNotFoundError:
            raise IntegrityError(f"pack {pack_id:012x} is missing") from None

    def busy(self, pack_id: int) -> bool:
        """Whether bytes may still be written into the pack (open, or a writer not finished)."""
        with self._lock:
            return pack_id in self._open_ids or pack_id in self._writers

    @property
    def has_unsynced(self) -> bool:
        """Whether `sync` has work: bytes or directory entries to flush, or sealed packs to finish."""
        return bool(self._dirty) or bool(self._dirs_to_sync) or bool(self._sizes)

    # ----- reading -------------------------------------------------------------------------
    def _take_fd(self, pack_id: int) -> _ReadFd:
        """An open read descriptor of the pack, in use until `_give_fd`: one evicted from the
        cache (at most _MAX_READ_FDS stay open) or deleted meanwhile is closed only when its
        last reader is done with it, never under a pread of another thread."""
        with self._lock:
            entry = self._read_fds.get(pack_id)
            if entry is not None:
                self._read_fds.move_to_end(pack_id)
                entry.users += 1
                return entry
        fd = os.open(self.path(pack_id), os.O_RDONLY | os.O_CLOEXEC)
        with self._lock:
            entry = self._read_fds.get(pack_id)
            if entry is not None:  # another thread opened it meanwhile: use that one
                os.close(fd)
            else:
                entry = self._read_fds[pack_id] = _ReadFd(fd)
                while len(self._read_fds) > _MAX_READ_FDS:
                    _, old = self._read_fds.popitem(last=False)
                    self._retire_fd(old)
            entry.users += 1
            return entry

    def _give_fd(self, entry: _ReadFd) -> None:
        with self._lock:
            entry.users -= 1
            if entry.retired and entry.users == 0:
                os.close(entry.fd)

    def _retire_fd(self, entry: _ReadFd) -> None:
        """(lock held) Out of the cache: closed now if nobody reads through it, else by its last reader."""
        entry.retired = True
        if entry.users == 0:
            os.close(entry.fd)

    def read(self, pack_id: int, offset: int, length: int) -> bytes:
        """Read one entry (blocking). A missing or short pack is an IntegrityError."""
        try:
            entry = self._take_fd(pack_id)
        except FileNotFoundError:
            raise IntegrityError(f"pack {pack_id:012x} is missing") from None
        try:
            data = os.pread(entry.fd, length, offset)
        finally:
            self._give_fd(entry)
        if len(data) != length:
            raise IntegrityError(f"pack {pack_id:012x} is truncated")
        return data

    def ids_on_disk(self) -> set[int]:
        """Ids of every pack file in the packs folder."""
        ids = set()
        for _root, _dirs, files in os.walk(self.dir):
            for name in files:
                if name.endswith(".pack"):
                    try:
                        ids.add(int(name[:-5], 16))
                    except ValueError:
                        pass
        return ids

    def delete(self, pack_id: int) -> None:
        with self._lock:
            self._roots.pop(pack_id, None)
            entry = self._read_fds.pop(pack_id, None)
            if entry is not None:
                self._retire_fd(entry)
        try:
            os.unlink(self.path(pack_id))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        with self._lock:
            for entry in self._read_fds.values():
                self._retire_fd(entry)
            for fd in self._unsynced.values():
                os.close(fd)
            self._read_fds.clear()
            self._unsynced.clear()
            self._trees.clear()
            self._sizes.clear()
        self._open.clear()
        self._open_ids = frozenset()
