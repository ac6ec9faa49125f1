"""The mount's read-only `.snapshots/` folder: every retained snapshot as a browsable tree.

This module owns:
  - snapshot names: a snapshot is named by its UTC creation time, "2026-12-07T08-05-23Z"
    (`snapshot_name`); when several retained snapshots fall in the same second, all but the
    oldest (lowest generation) get "-g<generation>" (`snapshot_names`), so names are unique;
  - virtual inode numbers: the `.snapshots` folder is `SNAPSHOTS_INO`; inode `i` of the
    snapshot in slot `s` is `VIRTUAL_BASE | s << 40 | i` (a snapshot's folder is its own root,
    `i` = 1). Slots are handed out per generation for the daemon's life and never reused, so a
    number the kernel still holds never comes to mean another file; live inode numbers stay
    below `VIRTUAL_BASE` (1 << 62), snapshot ones below 1 << 40;
  - the cache of materialized snapshot indexes: a snapshot's index is rebuilt, exactly as it
    was, from this store's own metadata chunks (`snapshot.materialize`) on first use, into
    `STORE/snapviews/<generation>/` (a worker thread; one build at a time; concurrent first
    uses wait for the same build), then opened read-only. At most `MAX_VIEWS` (4) are kept,
    least recently used evicted and deleted (a view with open files is kept until they close);
    views of snapshots no longer retained are deleted; the folder is emptied at start and stop;
  - answering the read-side requests (lookup, getattr, readdir, readlink, xattrs, open, read)
    for virtual inodes, for `fs.BpfsOperations`, which refuses every change (EROFS) itself.

What a snapshot file shows is what the snapshot recorded: mode, owner, times, size, nlink (hard
links keep their shared inode, so `cp -a`/`rsync -aH` keep them), xattrs, symlink targets.
The modes are the real ones, not stripped of write bits: the kernel checks permissions
(default_permissions) against them, and the request that reaches us fails with EROFS, which
says what is wrong, where stripped modes would give EACCES; copies made with `cp -a` or
`rsync -a` get the original modes back. The `.snapshots` folder itself is 0555, owned by the
owner of the mount's root folder (whoever owns the tree, not root: it is their history, and
`ls -l` shows no stranger). A snapshot folder's attributes are those of the snapshot's root
folder; they are read from the first metadata chunk of the snapshot, so listing `.snapshots`
materializes nothing.

Reading a file: its extents come from the snapshot's index; each chunk is read where the LIVE
index says it is now (compaction may have moved it), else where the snapshot recorded it
(a chunk deleted or overwritten since stays "retired" while a retained snapshot holds it:
see `history`). Chunks are authenticated and decrypted in worker threads and kept in a small
cache of their own (bounded bytes); holes read as zeros; nothing buffers a whole file.

Concurrency: every index (the live one, the views) is used on the trio thread only, and never
across an `await`: a view may be evicted (closed) whenever a request awaits.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NoReturn

import pyfuse3
import trio

from . import snapshot
from .data import ChunkCache, ChunkLoads, load_chunk
from .errors import IntegrityError
from .history import snapshot_names
from .index import ROOT_INO, Attr, Index, record_aad, u64

log = logging.getLogger(__name__)

DIR_NAME = b".snapshots"  # in the mount's root folder
VIRTUAL_BASE = 1 << 62
SNAPSHOTS_INO = VIRTUAL_BASE  # slot 0, inode 0: the `.snapshots` folder
_INO_BITS = 40
_INO_MASK = (1 << _INO_BITS) - 1
_SLOT_MASK = (1 << (62 - _INO_BITS)) - 1
MAX_VIEWS = 4
CACHE_BYTES = 16 << 20  # decrypted chunks (4 MiB at most each)
SNAPSHOT_TIMEOUT = 60.0  # a snapshot's contents never change
LIST_TIMEOUT = 1.0  # the `.snapshots` folder and its names do, when snapshots come and go
BLKSIZE = 1 << 17  # as fs.BLKSIZE
VIEWS_DIR = "snapviews"
_ROOT_SEARCH_CHUNKS = 4  # the root folder's record is in the first metadata chunk; a margin
READ_ONLY_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC
# readdir offsets (here and in `fs`): `.` and `..` come first, at 1 and 2; every other entry's offset is
# shifted past them (`Index.list_entries` ids, which start at 1, and snapshot generations, plus 2)
DOT_OFFSET, DOTDOT_OFFSET = 1, 2
ENTRY_OFFSET_BASE = DOTDOT_OFFSET


# ----- inode numbers --------------------------------------------------------------------------
def is_virtual(ino: int) -> bool:
    """Whether an inode number is one of `.snapshots` (not of the live tree)."""
    return ino >= VIRTUAL_BASE


def virtual_ino(slot: int, ino: int) -> int:
    if not 1 <= slot <= _SLOT_MASK or not 0 < ino <= _INO_MASK:
        raise ValueError(f"no virtual inode for slot {slot}, inode {ino}")
    return VIRTUAL_BASE | slot << _INO_BITS | ino


def split_ino(vino: int) -> tuple[int, int]:
    """(slot, snapshot inode) of a virtual inode number; (0, 0) for `.snapshots` itself."""
    return (vino >> _INO_BITS) & _SLOT_MASK, vino & _INO_MASK


def _fail(code: int) -> NoReturn:
    raise pyfuse3.FUSEError(code)


# ----- records --------------------------------------------------------------------------------
@dataclass
class _Snapshot:
    """A retained snapshot as the mount knows it."""

    generation: int
    created_ns: int
    slot: int
    name: str = ""
    root: Attr | None = None  # its root folder's attributes, once read


@dataclass
class _View:
    """A materialized snapshot index, opened read-only."""

    index: Index
    path: str


@dataclass
class _Build:
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


def _read_root_attr(keys, packs, blob: bytes) -> Attr:
    """The root folder's attributes in a retained snapshot, from the first metadata chunk(s)
    of its record stream (the `inodes` table starts right after a few counters, with the root
    folder's record), without materializing the whole index (blocking)."""
    manifest = snapshot.open_manifest(keys, blob)
    reader = snapshot._StreamReader()
    root_key = u64(ROOT_INO)
    for chunk in manifest.chunks[:_ROOT_SEARCH_CHUNKS]:
        sealed = packs.read(chunk.pack, chunk.offset, chunk.sealed_length)
        for table, key, value in reader.feed(snapshot.open_meta_chunk(keys, chunk, sealed)):
            if table == "meta":
                continue
            if table == "inodes" and key == root_key:
                return Attr.unpack(ROOT_INO, keys.records.open(value, record_aad("inodes", key)))
            raise snapshot.SnapshotError("the snapshot's record stream does not start with its root folder")
    raise snapshot.SnapshotError("the snapshot's root folder is not in its first metadata chunks")


class SnapshotViews:
    """The `.snapshots` folder of a mount: retained snapshots as read-only trees.

    Attributes:
        dir: STORE/snapviews, where materialized snapshot indexes live (a cache).
        index: the live index (read here only: which snapshots are retained, where chunks are).
        packs, keys: the store's pack files and keys (reading metadata and data chunks).
        max_views: how many materialized indexes are kept (least recently used go first).
    """

    def __init__(self, store_dir: str, index: Index, packs, keys, *, max_views: int = MAX_VIEWS):
        self.dir = os.path.join(store_dir, VIEWS_DIR)
        self.index = index
        self.packs = packs
        self.keys = keys
        self.max_views = max_views
        self._started_ns = time.time_ns()
        self._newest: int | None = None  # the newest retained generation when last refreshed
        self._snapshots: dict[int, _Snapshot] = {}  # generation -> retained snapshot
        self._by_name: dict[str, int] = {}
        self._slots: dict[int, int] = {}  # generation -> slot, for the daemon's life
        self._by_slot: dict[int, int] = {}
        self._views: OrderedDict[int, _View] = OrderedDict()  # generation -> view, LRU first
        self._building: dict[int, _Build] = {}
        self._pins: dict[int, int] = {}  # generation -> open files
        self._builder = trio.CapacityLimiter(1)
        self._loads = ChunkLoads(ChunkCache(CACHE_BYTES, largest=CACHE_BYTES // 2))
        self._trash = 0
        shutil.rmtree(self.dir, ignore_errors=True)  # left by an earlier daemon

    def close(self) -> None:
        """Close every view and delete the cache folder (at unmount)."""
        for view in self._views.values():
            try:
                view.index.close()
            except Exception:
                log.exception("closing a snapshot view failed")
        self._views.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ----- which snapshots there are -----------------------------------------------------------
    async def _refresh(self) -> None:
        """Follow the live index's retained snapshots (cheap when nothing changed: snapshots
        are only added and released together, when a new one is made)."""
        newest = self.index.last_snapshot_generation()
        if newest == self._newest:
            return
        gens = snapshot.retained_generations(self.index)
        gone = [g for g in self._snapshots if g not in gens]
        for gen in gens:
            if gen not in self._snapshots:
                slot = self._slots.get(gen)
                if slot is None:
                    slot = len(self._slots) + 1
                    if slot > _SLOT_MASK:
                        log.error("out of snapshot slots: snapshot %d is not shown", gen)
                        continue
                    self._slots[gen], self._by_slot[slot] = slot, gen
                try:
                    created = snapshot.root_created(self.index, self.keys, gen)
                except Exception as e:
                    log.error("snapshot %d cannot be read: %s", gen, e)
                    continue
                self._snapshots[gen] = _Snapshot(gen, created, slot)
        for gen in gone:
            del self._snapshots[gen]
        names = snapshot_names((s.generation, s.created_ns) for s in self._snapshots.values())
        self._by_name = {}
        for gen, name in names.items():
            self._snapshots[gen].name = name
            self._by_name[name] = gen
        self._newest = newest
        for gen in gone:
            await self._drop_view(gen)

    async def _snapshot_of(self, vino: int) -> tuple[_Snapshot, int]:
        """(retained snapshot, snapshot inode) of a virtual inode inside a snapshot."""
        slot, ino = split_ino(vino)
        await self._refresh()
        gen = self._by_slot.get(slot)
        snap = self._snapshots.get(gen) if gen is not None else None
        if snap is None or ino == 0:
            _fail(errno.ESTALE)  # a snapshot released since the kernel learned the number
        return snap, ino

    def _listed(self) -> list[_Snapshot]:
        return sorted(self._snapshots.values(), key=lambda s: s.generation)

    # ----- materialized indexes ----------------------------------------------------------------
    async def _index(self, snap: _Snapshot) -> Index:
        """The snapshot's index, materialized on first use. Use it before the next await."""
        gen = snap.generation
        while True:
            view = self._views.get(gen)
            if view is not None:
                self._views.move_to_end(gen)
                return view.index
            build = self._building.get(gen)
            if build is None:
                break
            await build.done.wait()
            if build.error is not None:
                _fail(errno.EIO)
            if gen not in self._snapshots:
                _fail(errno.ESTALE)
        blob = snapshot.retained_root(self.index, gen)
        if blob is None:
            _fail(errno.ESTALE)
        path = os.path.join(self.dir, str(gen))
        build = self._building[gen] = _Build()
        try:
            async with self._builder:
                started = time.monotonic()
                await trio.to_thread.run_sync(self._materialize, blob, gen, path)
            index = Index(path, self.keys, readonly=True)
            log.info("snapshot %d (%s) opened for .snapshots in %.2f s", gen, snap.name, time.monotonic() - started)
        except BaseException as e:
            build.error = e
            if isinstance(e, (snapshot.SnapshotError, IntegrityError)):
                log.error("snapshot %d cannot be shown: %s", gen, e)
                raise pyfuse3.FUSEError(errno.EIO) from None
            raise
        finally:
            del self._building[gen]
            build.done.set()
        if gen not in self._snapshots:  # released while it was being built
            index.close()
            await self._remove_dir(path)
            _fail(errno.ESTALE)
        self._views[gen] = _View(index, path)
        await self._evict(keep=gen)
        return index

    def _materialize(self, blob: bytes, gen: int, path: str) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        snapshot.materialize(self.keys, self.packs, blob, path)

    async def _evict(self, keep: int) -> None:
        while len(self._views) > self.max_views:
            victim = next((g for g in self._views if g != keep and not self._pins.get(g)), None)
            if victim is None:
                return  # every other view has open files: they go once those close
            await self._drop_view(victim)

    async def _drop_view(self, gen: int) -> None:
        view = self._views.pop(gen, None)
        if view is None:
            return
        view.index.close()
        await self._remove_dir(view.path)

    async def _remove_dir(self, path: str) -> None:
        self._trash += 1
        trash = f"{path}.old{self._trash}"
        try:
            os.rename(path, trash)  # the name is free at once for a new build of the same snapshot
        except OSError:
            return
        await trio.to_thread.run_sync(shutil.rmtree, trash, True)

    # ----- attributes --------------------------------------------------------------------------
    def _entry(self, vino: int, attr: Attr, timeout: float = SNAPSHOT_TIMEOUT,
               entry_timeout: float | None = None) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = vino
        e.generation = 0
        e.entry_timeout = timeout if entry_timeout is None else entry_timeout
        e.attr_timeout = timeout
        e.st_mode = attr.mode
        e.st_nlink = attr.nlink
        e.st_uid = attr.uid
        e.st_gid = attr.gid
        e.st_rdev = attr.rdev
        e.st_size = attr.size
        e.st_blksize = BLKSIZE
        e.st_blocks = (attr.stored + 511) // 512
        e.st_atime_ns = attr.atime_ns
        e.st_mtime_ns = attr.mtime_ns
        e.st_ctime_ns = attr.ctime_ns
        return e

    def _snap_entry(self, snap: _Snapshot, attr: Attr) -> pyfuse3.EntryAttributes:
        if attr.ino > _INO_MASK:
            log.error("snapshot %d: inode %d is too large to show", snap.generation, attr.ino)
            _fail(errno.EOVERFLOW)
        if attr.ino == ROOT_INO:  # its name in `.snapshots` may go when the snapshot is released
            return self._entry(virtual_ino(snap.slot, attr.ino), attr, entry_timeout=LIST_TIMEOUT)
        return self._entry(virtual_ino(snap.slot, attr.ino), attr)

    async def folder_entry(self) -> pyfuse3.EntryAttributes:
        """The `.snapshots` folder: 0555, owned like the mount's root, as new as its newest snapshot."""
        await self._refresh()
        root = self.index.get_attr(ROOT_INO)
        snaps = self._listed()
        when = snaps[-1].created_ns if snaps else self._started_ns
        attr = Attr(SNAPSHOTS_INO, stat.S_IFDIR | 0o555, root.uid if root else 0, root.gid if root else 0,
                    2 + len(snaps), 0, 0, 0, when, when, when)
        return self._entry(SNAPSHOTS_INO, attr, LIST_TIMEOUT)

    async def _root_attr(self, snap: _Snapshot) -> Attr:
        """The snapshot's root folder attributes (read once)."""
        if snap.root is not None:
            return snap.root
        blob = snapshot.retained_root(self.index, snap.generation)
        if blob is None:
            _fail(errno.ESTALE)
        attr: Attr | None
        try:
            attr = await trio.to_thread.run_sync(_read_root_attr, self.keys, self.packs, blob)
        except Exception as e:
            log.warning("snapshot %d: root folder not found in its first metadata chunks (%s): "
                        "materializing it", snap.generation, e)
            attr = (await self._index(snap)).get_attr(ROOT_INO)
            if attr is None:
                log.error("snapshot %d has no root folder", snap.generation)
                _fail(errno.EIO)
        snap.root = attr
        return attr

    async def _attr(self, snap: _Snapshot, ino: int) -> Attr:
        if ino == ROOT_INO:
            return await self._root_attr(snap)
        attr = (await self._index(snap)).get_attr(ino)
        if attr is None:
            _fail(errno.ENOENT)
        return attr

    # ----- requests ----------------------------------------------------------------------------
    async def getattr(self, vino: int) -> pyfuse3.EntryAttributes:
        if vino == SNAPSHOTS_INO:
            return await self.folder_entry()
        snap, ino = await self._snapshot_of(vino)
        return self._snap_entry(snap, await self._attr(snap, ino))

    async def lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        """A name in `.snapshots` or in a snapshot folder (".." of a snapshot's root is
        `.snapshots`; ".." of `.snapshots` is the caller's: the live root)."""
        if parent == SNAPSHOTS_INO:
            if name == b".":
                return await self.folder_entry()
            await self._refresh()
            gen = self._by_name.get(os.fsdecode(name))
            if gen is None:
                _fail(errno.ENOENT)
            snap = self._snapshots[gen]
            return self._snap_entry(snap, await self._root_attr(snap))
        snap, ino = await self._snapshot_of(parent)
        if name == b"..":
            if ino == ROOT_INO:
                return await self.folder_entry()
            here = await self._attr(snap, ino)
            return self._snap_entry(snap, await self._attr(snap, here.parent or ROOT_INO))
        index = await self._index(snap)
        attr = index.get_attr(ino)
        if attr is None:
            _fail(errno.ENOENT)
        if not stat.S_ISDIR(attr.mode):
            _fail(errno.ENOTDIR)
        if name == b".":
            return self._snap_entry(snap, attr)
        child = index.lookup(ino, name)
        if child is None:
            _fail(errno.ENOENT)
        child_attr = index.get_attr(child)
        if child_attr is None:
            log.error("snapshot %d: a directory entry points to a missing inode", snap.generation)
            _fail(errno.EIO)
        return self._snap_entry(snap, child_attr)

    async def opendir(self, vino: int) -> None:
        if vino == SNAPSHOTS_INO:
            return
        snap, ino = await self._snapshot_of(vino)
        if not stat.S_ISDIR((await self._attr(snap, ino)).mode):
            _fail(errno.ENOTDIR)

    def _dots(self, token, start_id: int, here: pyfuse3.EntryAttributes, up: pyfuse3.EntryAttributes) -> bool:
        """Reply `.` and `..` where the listing starts before them; False when the buffer is full."""
        if start_id < DOT_OFFSET and not pyfuse3.readdir_reply(token, b".", here, DOT_OFFSET):
            return False
        return start_id >= DOTDOT_OFFSET or pyfuse3.readdir_reply(token, b"..", up, DOTDOT_OFFSET)

    async def readdir(self, vino: int, start_id: int, token) -> None:
        if vino == SNAPSHOTS_INO:
            await self._refresh()
            snaps = [s for s in self._listed() if s.generation + ENTRY_OFFSET_BASE > start_id]
            for snap in snaps:  # read before replying: nothing may await between replies
                try:
                    await self._root_attr(snap)
                except pyfuse3.FUSEError:
                    pass
            if start_id < DOTDOT_OFFSET:
                here = await self.folder_entry()
                root = self.index.get_attr(ROOT_INO)  # `..` is the live root folder
                up = self._entry(ROOT_INO, root) if root is not None else here
                if not self._dots(token, start_id, here, up):
                    return
            for snap in snaps:  # the generation is the offset: stable while others come and go
                attr = snap.root or Attr(ROOT_INO, stat.S_IFDIR | 0o555, 0, 0, 2, 0, 0, 0, snap.created_ns,
                                         snap.created_ns, snap.created_ns)
                if not pyfuse3.readdir_reply(token, os.fsencode(snap.name), self._snap_entry(snap, attr),
                                             snap.generation + ENTRY_OFFSET_BASE):
                    break
            return
        snap, ino = await self._snapshot_of(vino)
        dots = None
        if start_id < DOTDOT_OFFSET:
            attr = await self._attr(snap, ino)
            if ino == ROOT_INO:  # a snapshot's folder: `..` is `.snapshots`
                up = await self.folder_entry()
            else:
                up = self._snap_entry(snap, await self._attr(snap, attr.parent or ROOT_INO))
            dots = (self._snap_entry(snap, attr), up)
        index = await self._index(snap)
        if dots is not None and not self._dots(token, start_id, *dots):
            return
        for next_id, name, child in index.list_entries(ino, max(start_id - ENTRY_OFFSET_BASE, 0)):
            child_attr = index.get_attr(child)
            if child_attr is None:
                log.error("snapshot %d: a directory entry points to a missing inode", snap.generation)
                continue
            if not pyfuse3.readdir_reply(token, name, self._snap_entry(snap, child_attr),
                                         next_id + ENTRY_OFFSET_BASE):
                break

    async def readlink(self, vino: int) -> bytes:
        if vino == SNAPSHOTS_INO:
            _fail(errno.EINVAL)
        snap, ino = await self._snapshot_of(vino)
        target = (await self._index(snap)).get_symlink(ino)
        if target is None:
            _fail(errno.EINVAL)
        return target

    async def getxattr(self, vino: int, name: bytes) -> bytes:
        if vino != SNAPSHOTS_INO:
            snap, ino = await self._snapshot_of(vino)
            await self._attr(snap, ino)
            value = (await self._index(snap)).get_xattr(ino, name)
            if value is not None:
                return value
        _fail(pyfuse3.ENOATTR)

    async def listxattr(self, vino: int) -> list[bytes]:
        if vino == SNAPSHOTS_INO:
            return []
        snap, ino = await self._snapshot_of(vino)
        await self._attr(snap, ino)
        return (await self._index(snap)).list_xattrs(ino)

    async def open(self, vino: int, flags: int) -> None:
        """Check that a snapshot file may be opened (read only) and keep its view while open."""
        if vino == SNAPSHOTS_INO:
            _fail(errno.EISDIR)
        snap, ino = await self._snapshot_of(vino)
        attr = await self._attr(snap, ino)
        if stat.S_ISDIR(attr.mode):
            _fail(errno.EISDIR)
        if flags & READ_ONLY_FLAGS:
            _fail(errno.EROFS)
        await self._index(snap)  # materialized now: an error shows at open, not at the first read
        self._pins[snap.generation] = self._pins.get(snap.generation, 0) + 1

    def release(self, vino: int) -> None:
        gen = self._by_slot.get(split_ino(vino)[0])
        if gen is None:  # an unknown slot: nothing to unpin (as `pop` did with a None key)
            return
        left = self._pins.get(gen, 0) - 1
        if left > 0:
            self._pins[gen] = left
        else:
            self._pins.pop(gen, None)

    async def read(self, vino: int, offset: int, size: int):
        snap, ino = await self._snapshot_of(vino)
        index = await self._index(snap)
        attr = index.get_attr(ino)
        if attr is None:
            _fail(errno.ESTALE)
        end = min(offset + size, attr.size)
        if offset >= end:
            return b""
        located = []
        for e in index.extents(ino, offset, end):  # all index reads before the first await
            located.append((e, index.get_chunk(e.chunk_id)))
        out = bytearray(end - offset)  # holes stay zeros
        for e, then in located:
            plain = await self._chunk(e.chunk_id, then)
            a, b = max(offset, e.offset), min(end, e.end)
            lo = e.chunk_offset + a - e.offset
            if lo + b - a > len(plain):
                raise IntegrityError("an extent reaches past the end of its chunk")
            out[a - offset:b - offset] = memoryview(plain)[lo:lo + b - a]
        return out

    async def _chunk(self, cid: bytes, then):
        """A chunk's plaintext: from the cache, or read where the live index says it is now
        (else where the snapshot recorded it), authenticated; loaded once for all who want it."""
        return await self._loads.get(cid, lambda: self._load_where_it_is(cid, then))

    async def _load_where_it_is(self, cid: bytes, then):
        tried: set[tuple[int, int]] = set()
        error: Exception | None = None
        for attempt in range(3):
            # where the chunk is now, asked again after a failure (compaction may have just
            # moved it); the snapshot's own record last
            rec = self.index.get_chunk(cid) if attempt < 2 else then
            if rec is None or (rec.pack, rec.offset) in tried:
                continue
            tried.add((rec.pack, rec.offset))
            try:
                return await load_chunk(self.packs, self.keys, cid, rec)
            except IntegrityError as e:
                error = e
        raise error or IntegrityError("a chunk of this snapshot is no longer stored")
