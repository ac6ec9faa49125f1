"""Pack lanes: what stays on the drive (`.backupignore`) and what replicates first (priority).

Every file's chunks go into packs of one of three lanes, recorded in each pack's record
(`PackRecord.lane`, bit flags in its plain flag byte, see `index`):

  normal    sealed packs go to the outbox (value b"") and replicate to partners;
  priority  packs of files matching the priority patterns (private keys, wallets,
            certificates, password databases; `[replication] priority` in STORE/bpfs.toml,
            gitignore syntax matched against the path from the mount root): in the outbox
            with the value b"\\x01", so the replicator sends them first;
  local     packs of files a `.backupignore` excludes, or larger than `max_file_size`
            (`[replication]` in STORE/bpfs.toml; default: no limit): never put in the outbox,
            never in a snapshot. Local beats priority.

`.backupignore` files use gitignore syntax (pathspec's GitIgnoreSpec) and may sit in any
directory; one in directory D applies to the paths below D, relative to D, and a deeper one
decides before a shallower one. A directory a pattern excludes excludes every file beneath
it (as in git, a file inside cannot be re-included). Only regular files are ever local:
directories and symlinks always replicate. A file with several hard links is local only if
every name is ignored: it becomes local only while it has a single name (at creation,
rename or re-evaluation), and a link or rename to a name that is not ignored makes it
replicable again; removing names never makes a file local.

The lane of an inode is decided from its name when it is created, linked or renamed, and
kept in memory (`lane_of`, no path lookups per write). Which inodes are local is persisted
as a plain marker, the index table `ignored` (inode number -> b""): the snapshot exporter
reads it to leave those files out, and a drive holder learns from it which inode numbers are
kept local (not their names, sizes or contents; extent keys already show approximate sizes
of every file). Priority is not persisted: it is recomputed from the name in each session.

A file's size counts like a name that is ignored, for every name of it: a file is local while it
is larger than `max_file_size`. The size is looked at on every drain (`lane_of`: a file written
past the limit sends its later chunks to local packs and gets the marker) and on every truncate
(`size_changed`: a file cut to the limit or below loses the marker, unless a `.backupignore`
keeps it, and its chunks move out of local packs). The limit the index was last evaluated with
is kept in the index (counter `lanes_max_size`, 0 = none); a mount with another limit
re-evaluates the whole tree.

When a `.backupignore` is written, created, renamed or removed, or a directory is renamed,
the affected subtree is re-evaluated in the background (a few ms later; always before a
flush_all finishes, which every snapshot and unmount runs first): files that became
ignored get the marker (their chunks already replicated stay where they are), files that
stopped being ignored lose it and their chunks move out of local packs. A pending
re-evaluation is remembered in the index (counter `lanes_recheck`), so after a crash the
next mount re-evaluates the whole tree.

A chunk in a local pack that a replicable file uses (by dedup, or because the file stopped
being ignored) is moved, still sealed, into a normal pack (`FileData.promote`), as
compaction does; the snapshot exporter also does this for anything still pending, so a
snapshot never needs a local pack (`prepare_export`).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field

import pathspec
import trio

from . import chunkmap
from .errors import IntegrityError
from .index import LANE_LOCAL, LANE_NORMAL, LANE_PRIORITY, ROOT_INO, ChunkRecord, Index
import trio.lowlevel

log = logging.getLogger(__name__)

IGNORE_NAME = b".backupignore"
IGNORE_FILE_LIMIT = 1 << 20  # bytes of a .backupignore that are read
_RECHECK = "lanes_recheck"  # index counter: a re-evaluation was pending (crash: redo all)
_MAX_SIZE = "lanes_max_size"  # index counter: the max_file_size markers were set for (0 = none)
_MAX_CTX = 50_000  # cached directory contexts (and specs) before the cache is dropped


# ----- patterns -----------------------------------------------------------------------------
def parse_spec(lines) -> pathspec.GitIgnoreSpec | None:
    """A GitIgnoreSpec of the valid patterns among `lines` (bad lines are skipped); None if empty."""
    good = []
    for line in lines:
        try:
            pathspec.GitIgnoreSpec.from_lines([line])
        except Exception:  # GitWildMatchPatternError and friends: skip the line, keep the rest
            log.warning("a .backupignore or priority pattern is invalid and ignored")
            continue
        good.append(line)
    spec = pathspec.GitIgnoreSpec.from_lines(good)
    return spec if any(p.include is not None for p in spec.patterns) else None


class PriorityPatterns:
    """Gitignore-syntax patterns matched against a path from the mount root.

    Without negations every pattern is folded into one regular expression (one match per
    path instead of one per pattern).
    """

    def __init__(self, patterns):
        self.spec = parse_spec(list(patterns))
        self._regex = None
        if self.spec is not None and all(p.include for p in self.spec.patterns if p.include is not None):
            try:
                self._regex = re.compile("|".join(
                    "(?:%s)" % p.regex.pattern.replace("(?P<ps_d>", "(?:")
                    for p in self.spec.patterns if p.include is not None))
            except re.error:  # a pathspec whose expressions do not combine: match one by one
                self._regex = None

    def match(self, path: str) -> bool:
        if self.spec is None:
            return False
        if self._regex is not None:
            return self._regex.match(path) is not None
        return self.spec.match_file(path)


def load_priority_patterns(store_dir: str) -> list[str]:
    """`[replication] priority` of STORE/bpfs.toml, or the defaults (see `config`)."""
    from .config import DEFAULT_PRIORITY, load_config
    from .errors import BpfsError

    try:
        return list(load_config(store_dir).priority)
    except BpfsError as e:
        log.warning("bpfs.toml: %s; using the default priority patterns", e)
        return list(DEFAULT_PRIORITY)


@dataclass(slots=True)
class _Ctx:
    """What decides the lane of a name in one directory."""
    path: str  # from the mount root, "" for the root, else ending in "/"
    excluded: bool  # the directory (or one above it) is ignored: every file below is local
    specs: tuple = ()  # (base path, GitIgnoreSpec) of every .backupignore above, shallowest first


def _ignored(ctx: _Ctx, full: str, is_dir: bool = False) -> bool:
    if ctx.excluded:
        return True
    for base, spec in reversed(ctx.specs):  # the deepest .backupignore with a match decides
        result = spec.check_file(full[len(base):] + ("/" if is_dir else "")).include
        if result is not None:
            return result
    return False


# ----- the mount's side ---------------------------------------------------------------------
class Lanes:
    """Lane decisions of one mounted store: caches, markers, re-evaluation.

    `fs.BpfsOperations` tells it about names (lookups, creations, links, renames, removals);
    `data.FileData` asks `lane_of(ino)` on every drain (a dict lookup once known).
    """

    def __init__(self, index: Index, data, priority_patterns, max_file_size: int | None = None):
        self.index = index
        self.data = data
        self.priority = PriorityPatterns(priority_patterns)
        self.max_file_size = max_file_size  # larger files are local (None: no limit)
        self._big: set[int] = set()  # regular files larger than the limit when last decided
        self._names: dict[int, tuple[int, bytes]] = {}  # ino -> a (parent, name) it is known by
        self._lane: dict[int, int] = {}  # regular files: lane decided this session
        self._ctx: dict[int, _Ctx] = {}  # directory ino -> context
        self._specs: dict[int, object] = {}  # directory ino -> its .backupignore spec or None
        self.ignore_files: dict[int, set[int]] = {}  # ino of a .backupignore -> directories it is in
        self.ignore_dirty: set[int] = set()  # .backupignore inodes written since last looked at
        self._rescans: list[int] = []  # directories whose subtree needs re-evaluation
        self._epoch = 0  # bumped whenever contexts are invalidated
        self._running = False
        self._idle = trio.Event()
        self._idle.set()
        if index.counter(_RECHECK):
            self._queue_rescan(ROOT_INO)
        if index.counter(_MAX_SIZE) != (max_file_size or 0) and not index.readonly:
            self._queue_rescan(ROOT_INO)  # sets _RECHECK first: a crash before it is done redoes it
            if max_file_size:
                index.put_counter(_MAX_SIZE, max_file_size)
            else:
                index.delete_counter(_MAX_SIZE)

    # ----- names the kernel told us ---------------------------------------------------------
    def seen(self, parent: int, name: bytes, ino: int, mode: int) -> None:
        """A lookup or readdir found `name` in `parent` (cheap: no decision here)."""
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            self._names[ino] = (parent, name)
            if name == IGNORE_NAME and stat.S_ISREG(mode):
                self.ignore_files.setdefault(ino, set()).add(parent)

    def forget(self, ino: int) -> None:
        """The kernel forgot the inode: it will look it up again before using it."""
        self._names.pop(ino, None)
        if not self.data.has_buffer(ino):
            self._lane.pop(ino, None)
            self._big.discard(ino)

    # ----- decisions ------------------------------------------------------------------------
    def lane_of(self, ino: int) -> int:
        """The lane new chunks of `ino` go to (called on every drain)."""
        lane = self._lane.get(ino)
        if lane is None or (self.max_file_size is not None and self._size_crossed(ino)):
            lane = self._decide_known(ino)
            self._lane[ino] = lane
        return lane

    def size_changed(self, ino: int) -> None:
        """`ino` was truncated (or extended by truncate): decide again if it crossed the limit (or
        was not decided this session: a marker an earlier session set for its size)."""
        if self.max_file_size is not None and (ino not in self._lane or self._size_crossed(ino)):
            self._lane[ino] = self._decide_known(ino)

    def _too_big(self, attr) -> bool:
        return self.max_file_size is not None and attr.size > self.max_file_size

    def _note_big(self, ino: int, attr) -> bool:
        big = self._too_big(attr)
        if big:
            self._big.add(ino)
        else:
            self._big.discard(ino)
        return big

    def _size_crossed(self, ino: int) -> bool:
        """Whether the file is on the other side of the limit than when its lane was last decided."""
        attr = self.index.get_attr(ino)
        return attr is not None and stat.S_ISREG(attr.mode) and self._too_big(attr) != (ino in self._big)

    def current(self, ino: int, default: int) -> int:
        """The lane decided for `ino` this session, without deciding anything."""
        return self._lane.get(ino, default)

    def _decide_known(self, ino: int) -> int:
        marked = self.index.is_ignored(ino)
        attr = self.index.get_attr(ino)
        hint = self._names.get(ino)
        if attr is None or not stat.S_ISREG(attr.mode):
            return LANE_LOCAL if marked else LANE_NORMAL
        if hint is None:  # no name to judge by: the size alone can make it local
            big = self._note_big(ino, attr)
            if big and not marked:
                self.index.set_ignored(ino, True)
                marked = True
            return LANE_LOCAL if marked else LANE_NORMAL
        try:
            ctx = self.dir_ctx(hint[0])
        except Exception:  # a parent we cannot place: keep what the marker says
            log.exception("cannot place directory inode %d", hint[0])
            return LANE_LOCAL if marked else LANE_NORMAL
        full = ctx.path + os.fsdecode(hint[1])
        return self._reconcile(ino, attr, _ignored(ctx, full), full, marked)

    def _reconcile(self, ino: int, attr, ignored: bool, full: str, marked: bool) -> int:
        """Bring the marker in line with a name of the file and its size; return its lane."""
        big = self._note_big(ino, attr)
        if big and not marked:  # the size concerns every name alike
            self.index.set_ignored(ino, True)
            marked = True
        elif ignored and not marked and attr.nlink <= 1:
            self.index.set_ignored(ino, True)
            marked = True
        elif marked and not ignored and not big:
            self.index.set_ignored(ino, False)
            marked = False
            self.data.queue_file_promotion(ino, LANE_PRIORITY if self.priority.match(full) else LANE_NORMAL)
        if marked:
            return LANE_LOCAL
        return LANE_PRIORITY if self.priority.match(full) else LANE_NORMAL

    def _lane_for_name(self, ino: int, attr, parent: int, name: bytes, marked: bool | None = None) -> None:
        """(Re)decide a regular file's lane from one of its names; marker and cache follow."""
        try:
            ctx = self.dir_ctx(parent)
        except Exception:  # a damaged or unsound tree: keep the marker, never fail the request
            log.exception("cannot place directory inode %d", parent)
            return
        full = ctx.path + os.fsdecode(name)
        if marked is None:
            marked = self.index.is_ignored(ino)
        lane = self._reconcile(ino, attr, _ignored(ctx, full), full, marked)
        if attr.nlink > 1 and lane != LANE_LOCAL and self._lane.get(ino) == LANE_PRIORITY:
            lane = LANE_PRIORITY  # another name matched a priority pattern
        self._lane[ino] = lane

    # ----- directory contexts -----------------------------------------------------------------
    def dir_ctx(self, d: int) -> _Ctx:
        ctx = self._ctx.get(d)
        if ctx is not None:
            return ctx
        chain: list[tuple[int, int, bytes]] = []  # (ino, parent, name) from d up to a directory with a context
        x = d
        while x not in self._ctx and x != ROOT_INO:
            attr = self.index.get_attr(x)
            if attr is None or not stat.S_ISDIR(attr.mode) or len(chain) > 4096:
                raise LookupError(f"directory inode {x} cannot be placed")
            parent = attr.parent or ROOT_INO
            known = self._names.get(x)
            name = known[1] if known is not None and known[0] == parent else self._find_name(parent, x)
            chain.append((x, parent, name))
            x = parent
        if x == ROOT_INO and ROOT_INO not in self._ctx:
            self._cache_ctx(ROOT_INO, _Ctx("", False, self._spec_tuple((), "", ROOT_INO)))
        for ino, parent, name in reversed(chain):
            self._cache_ctx(ino, self.child_ctx(self._ctx[parent], name, ino))
        return self._ctx[d]

    def _cache_ctx(self, d: int, ctx: _Ctx) -> None:
        if len(self._ctx) >= _MAX_CTX:
            self._ctx.clear()
        self._ctx[d] = ctx

    def child_ctx(self, parent: _Ctx, name: bytes, d: int) -> _Ctx:
        path = parent.path + os.fsdecode(name)
        excluded = _ignored(parent, path, is_dir=True)
        return _Ctx(path + "/", excluded, parent.specs if excluded else self._spec_tuple(parent.specs, path + "/", d))

    def _spec_tuple(self, specs: tuple, path: str, d: int) -> tuple:
        spec = self._spec(d)
        return specs + ((path, spec),) if spec is not None else specs

    def _find_name(self, parent: int, child: int) -> bytes:
        for _, name, ino in self.index.list_entries(parent):
            if ino == child:
                return name
        raise LookupError(f"directory inode {child} is not in its parent {parent}")

    def _spec(self, d: int):
        if d in self._specs:
            return self._specs[d]
        spec = None
        ino = self.index.lookup(d, IGNORE_NAME)
        attr = self.index.get_attr(ino) if ino is not None else None
        if ino is not None and attr is not None and stat.S_ISREG(attr.mode):
            self.ignore_files.setdefault(ino, set()).add(d)
            try:
                content = self.data.read_small(ino, min(attr.size, IGNORE_FILE_LIMIT))
                spec = parse_spec(content.decode("utf-8", "surrogateescape").splitlines())
            except IntegrityError as e:
                log.error("a .backupignore cannot be read (%s): ignoring it", e)
        if len(self._specs) >= _MAX_CTX:
            self._specs.clear()  # bounded memory: they are read again when needed
        self._specs[d] = spec
        return spec

    def _invalidate(self) -> None:
        self._ctx.clear()
        self._epoch += 1

    # ----- events from the filesystem -----------------------------------------------------------
    def created(self, parent: int, name: bytes, attr) -> None:
        """A new name and inode (create, mknod, mkdir)."""
        self.seen(parent, name, attr.ino, attr.mode)
        if stat.S_ISREG(attr.mode):
            self._lane_for_name(attr.ino, attr, parent, name, marked=False)

    def linked(self, attr, parent: int, name: bytes) -> None:
        self.seen(parent, name, attr.ino, attr.mode)
        if name == IGNORE_NAME:
            self._ignore_changed_in(parent)
        if stat.S_ISREG(attr.mode):
            self._lane_for_name(attr.ino, attr, parent, name)

    def unlinked(self, parent: int, name: bytes, attr) -> None:
        if self._names.get(attr.ino) == (parent, name):
            del self._names[attr.ino]
        if name == IGNORE_NAME:
            dirs = self.ignore_files.get(attr.ino)
            if dirs is not None:
                dirs.discard(parent)
            self._ignore_changed_in(parent)
        if stat.S_ISDIR(attr.mode):
            self._ctx.pop(attr.ino, None)
            self._specs.pop(attr.ino, None)

    def renamed(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, attr) -> None:
        """`attr` now has the name `new_name` in `new_parent` instead of `old_name` in `old_parent`."""
        if self._names.get(attr.ino) == (old_parent, old_name) or stat.S_ISDIR(attr.mode):
            self._names[attr.ino] = (new_parent, new_name)
        if old_name == IGNORE_NAME and stat.S_ISREG(attr.mode):
            dirs = self.ignore_files.get(attr.ino)
            if dirs is not None:
                dirs.discard(old_parent)
            self._ignore_changed_in(old_parent)
        if new_name == IGNORE_NAME and stat.S_ISREG(attr.mode):
            self.ignore_files.setdefault(attr.ino, set()).add(new_parent)
            self._ignore_changed_in(new_parent)
        if stat.S_ISDIR(attr.mode):
            if old_parent != new_parent or old_name != new_name:
                self._invalidate()
                self._queue_rescan(attr.ino)
        elif stat.S_ISREG(attr.mode):
            self._lane_for_name(attr.ino, attr, new_parent, new_name)

    def destroyed(self, ino: int) -> None:
        self.index.set_ignored(ino, False)
        self._lane.pop(ino, None)
        self._big.discard(ino)
        self._names.pop(ino, None)
        self.ignore_dirty.discard(ino)
        self.ignore_files.pop(ino, None)  # its directories were told when its names went

    def ignore_file_written(self, ino: int) -> None:
        """Bytes of a .backupignore changed (write, truncate): re-read it at the next close."""
        self.ignore_dirty.add(ino)

    def ignore_file_closed(self, ino: int) -> None:
        if ino in self.ignore_dirty:
            self.ignore_dirty.discard(ino)
            for d in list(self.ignore_files.get(ino, ())):
                self._ignore_changed_in(d)

    def _ignore_changed_in(self, d: int) -> None:
        self._specs.pop(d, None)
        self._invalidate()
        self._queue_rescan(d)

    # ----- re-evaluation ----------------------------------------------------------------------
    def _queue_rescan(self, d: int) -> None:
        if d not in self._rescans:
            if not self._rescans and not self.index.readonly:
                self.index.put_counter(_RECHECK, 1)  # a crash before it is done: redo all at the next mount
            self._rescans.append(d)
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self.kick()

    def kick(self) -> None:
        nursery = self.data.nursery
        if self._rescans and not self._running and nursery is not None:
            self._running = True
            nursery.start_soon(self._run_rescans)

    @property
    def pending(self) -> bool:
        return bool(self._rescans) or bool(self.ignore_dirty)

    def tick(self) -> None:
        """Every second: .backupignore files written but not closed are read once their
        buffers are persisted; queued re-evaluations start."""
        for ino in list(self.ignore_dirty):
            if not self.data.has_buffer(ino):
                self.ignore_file_closed(ino)
        self.kick()

    async def settle(self) -> None:
        """Finish every queued re-evaluation (flush_all runs this before snapshots and unmount)."""
        for ino in list(self.ignore_dirty):
            self.ignore_file_closed(ino)
        if self._rescans and not self._running:
            self._running = True
            await self._run_rescans()
        while self._rescans or self._running:
            await self._idle.wait()

    async def _run_rescans(self) -> None:
        try:
            while self._rescans:
                d = self._rescans.pop(0)  # a change while it runs queues it again
                try:
                    await self._rescan(d)
                except Exception:  # keep going: a broken subtree must not stop the others
                    log.exception("re-evaluating the lanes below directory inode %d failed", d)
            if not self.index.readonly:
                self.index.delete_counter(_RECHECK)
        finally:
            self._running = False
            self._idle.set()

    async def _rescan(self, top: int) -> None:
        attr = self.index.get_attr(top)
        if attr is None or not stat.S_ISDIR(attr.mode):
            return
        stack = [(top, self.dir_ctx(top), self._epoch)]
        done = 0
        while stack:
            d, ctx, epoch = stack.pop()
            if epoch != self._epoch:  # something moved meanwhile: place the directory again
                try:
                    ctx = self.dir_ctx(d)
                except LookupError:
                    continue  # gone
            if self.index.get_attr(d) is None:
                continue
            for _, name, ino in list(self.index.list_entries(d)):
                a = self.index.get_attr(ino)
                if a is None:
                    continue
                if stat.S_ISDIR(a.mode):
                    stack.append((ino, self.child_ctx(ctx, name, ino), self._epoch))
                elif stat.S_ISREG(a.mode):
                    full = ctx.path + os.fsdecode(name)
                    lane = self._reconcile(ino, a, _ignored(ctx, full), full, self.index.is_ignored(ino))
                    if ino in self._lane:
                        self._lane[ino] = lane
                done += 1
            if done > 2000:  # let FUSE requests in now and then
                done = 0
                await trio.lowlevel.checkpoint()
                self.data.checkpoint_if_large()


# ----- the snapshot exporter's side ------------------------------------------------------------
@dataclass
class ExportFilter:
    """What a snapshot leaves out (ignored files, local packs) and the records it adjusts."""
    ignored: set[int] = field(default_factory=set)  # inodes left out
    skip_packs: set[int] = field(default_factory=set)  # local packs, and packs left with no chunk
    skip_chunks: set[bytes] = field(default_factory=set)  # chunks only ignored files use
    refs: dict[bytes, int] = field(default_factory=dict)  # chunk id -> references left (some ignored)
    pack_loss: dict[int, tuple[int, int]] = field(default_factory=dict)  # pack -> (chunks, bytes) left out

    @property
    def active(self) -> bool:
        return bool(self.ignored or self.skip_packs)


def prepare_export(index: Index, packs) -> tuple[ExportFilter, list[int]]:
    """Decide what a snapshot leaves out; first move out of local packs every chunk that a
    replicable file uses (blocking). Returns the filter and the packs emptied by the moves
    (to delete after the next commit). Runs on the write transaction, before its commit."""
    flt = ExportFilter(ignored=set(index.ignored_inodes()))
    local = {pack_id for pack_id, rec in index.all_packs() if rec.lane == LANE_LOCAL}
    if not flt.ignored and not local:
        return flt, []
    used_by_ignored: Counter = Counter()
    for ino in flt.ignored:
        for e in index.extents(ino):
            used_by_ignored[e.chunk_id] += 1
    dead = []
    for pack_id in sorted(local):
        for cid in index.chunks_in_pack(pack_id):
            rec = index.get_chunk(cid)
            if rec is None or rec.pack != pack_id:
                continue
            if rec.refs > used_by_ignored.get(cid, 0):  # a replicable file uses it: move it out
                if move_chunk_now(index, packs, cid, rec, LANE_NORMAL):
                    dead.append(pack_id)
            else:
                flt.skip_chunks.add(cid)
    local = {pack_id for pack_id, rec in index.all_packs() if rec.lane == LANE_LOCAL}
    flt.skip_packs |= local
    for cid, n in used_by_ignored.items():
        if cid in flt.skip_chunks:
            continue
        rec = index.get_chunk(cid)
        if rec is None or rec.pack in local:
            continue
        if rec.refs <= n:  # in a replicable pack, but only ignored files use it
            flt.skip_chunks.add(cid)
            chunks, nbytes = flt.pack_loss.get(rec.pack, (0, 0))
            flt.pack_loss[rec.pack] = (chunks + 1, nbytes + rec.sealed_length)
        else:
            flt.refs[cid] = rec.refs - n
    for pack_id, (chunks, _) in flt.pack_loss.items():
        if chunks >= len(index.chunks_in_pack(pack_id)):
            flt.skip_packs.add(pack_id)
    return flt, dead


def move_chunk_now(index: Index, packs, cid: bytes, rec: ChunkRecord, lane: int) -> bool:
    """Copy one sealed entry into the open pack of `lane` and point its record there (blocking).
    Returns whether its old pack became empty (its record is then deleted: delete the file
    after the next commit)."""
    new_pack, new_offset = packs.reserve(index, rec.sealed_length, lane)
    try:
        packs.write(new_pack, new_offset, packs.read(rec.pack, rec.offset, rec.sealed_length))
    finally:
        packs.finish(new_pack)
    return chunkmap.move_chunk(index, cid, rec, new_pack, new_offset) == chunkmap.DEAD
