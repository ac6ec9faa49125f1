"""The store's index: one LMDB environment holding all filesystem metadata.

Tables (LMDB named databases) and what they map:
  meta      counter name           -> integer (plain: next inode, next pack, generation)
  inodes    ino                    -> sealed attributes (mode, owner, size, times, ...; `Attr`: times
                                      as 64-bit seconds and nanoseconds, any time Linux allows;
                                      records of older stores, times as 64-bit nanoseconds, read too)
  dirents   parent ino + name hash -> sealed list of (name, child ino) sharing that hash
  extents   ino + file offset      -> sealed (chunk id, offset in chunk, length)
  chunks    chunk id               -> sealed (pack, offset, sealed length, plain length, refcount, born:
                                      the generation counter when it was first stored)
  packs     pack id                -> plain (live chunks, live bytes, size, flags: sealed, lane)
  packchunks pack id + chunk id    -> nothing: which chunks live in a pack (for compaction)
  symlinks  ino                    -> sealed target
  xattrs    ino + name hash        -> sealed (name, value)
  orphans   ino                    -> unlinked inodes still open, deleted when released
  outbox    pack id                -> sealed packs to replicate: b"" normal, b"\x01" priority (sent
                                      first); local packs never; gone with the pack
  tombstones pack id               -> generation when a replicable pack was deleted: partners are
                                      told to release it once they hold a newer root (see peering)
  snapshots snapshot bookkeeping   -> sealed: metadata chunks, their packs, signed roots (see snapshot)
  ignored   ino                    -> nothing: regular files a .backupignore keeps local (see lanes)
  packroots pack id                -> plain: the pack's tree root (32 bytes, `packtree`) and its size
                                      (u64): what storage audits check partners' copies against
  retired   chunk id               -> plain: the generation counter when the chunk's last reference
                                      went (u64); it stays (refcount 0) while a retained snapshot
                                      holds it (see `history`)

A pack's flag byte: bit 0 sealed, bit 1 local lane, bit 2 priority lane (none: normal lane).

Every value that could reveal a name, a size, a time or content is sealed with the store's
record key and bound (associated data) to its table and key, so records cannot be swapped.
What the drive still shows in the clear: how many inodes, directory membership by inode
number, where extents start (approximate file sizes), which inode numbers are kept local
(`ignored`) and which packs are local or priority — see README "Security model".

One write transaction is kept open and shared by all operations (reads see uncommitted
writes). `commit()` is a durable checkpoint (LMDB fsyncs); `save()` makes the changes since
then survive a killed daemon at the cost of one write() to the redo log (see `redolog`).
A crash leaves the state as of the last checkpoint plus every saved batch, never a mix.
"""

from __future__ import annotations

import stat
import struct
from contextlib import contextmanager
from dataclasses import dataclass

import lmdb

from .errors import IntegrityError
from .redolog import PUT, RedoLog

_U64 = struct.Struct(">Q")
_ATTR = struct.Struct("<IIIIQQQqIqIqIQ")  # times as (s64 seconds, u32 nanoseconds): the whole range of Linux
_ATTR_V0 = struct.Struct("<IIIIQQQqqqQ")  # before: times as s64 nanoseconds (1677-2262 only); read, never written
_NS = 10**9
_EXTENT = struct.Struct("<32sII")
_CHUNK = struct.Struct("<QQIIIQ")
_CHUNK_V0 = struct.Struct("<QQIII")  # before chunks knew when they were born
_PACK = struct.Struct("<IQQB")
_NAME_HASH_LEN = 6  # ids (hash << 8 | position) must fit a signed 64-bit readdir offset
TABLES = ("meta", "inodes", "dirents", "extents", "chunks", "packs", "packchunks", "symlinks", "xattrs", "orphans",
          "outbox", "snapshots", "tombstones", "ignored", "packroots", "retired")
_PACKROOT = struct.Struct("<32sQ")
LANE_NORMAL, LANE_LOCAL, LANE_PRIORITY = 0, 1, 2  # a pack's lane: its flag bit is 1 << lane (see lanes)
PACK_SEALED = 1
OUTBOX_NORMAL, OUTBOX_PRIORITY = b"", b"\x01"
ROOT_INO = 1
MAP_SIZE = 1 << 40  # address space only; the file grows as needed


def u64(n: int) -> bytes:
    return _U64.pack(n)


def record_aad(table: str, key: bytes) -> bytes:
    """What a sealed record of `table` at `key` is bound to (its associated data)."""
    return table.encode() + b"\0" + key


@dataclass(slots=True)
class Attr:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    rdev: int = 0
    size: int = 0
    stored: int = 0  # bytes of file content actually stored (holes excluded)
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    parent: int = 0  # directories only: the containing directory

    def pack(self) -> bytes:
        """The record (always the current format; struct.error for a time of over 64-bit seconds)."""
        a_s, a_ns = divmod(self.atime_ns, _NS)
        m_s, m_ns = divmod(self.mtime_ns, _NS)
        c_s, c_ns = divmod(self.ctime_ns, _NS)
        return _ATTR.pack(self.mode, self.uid, self.gid, self.nlink, self.rdev, self.size, self.stored,
                          a_s, a_ns, m_s, m_ns, c_s, c_ns, self.parent)

    @classmethod
    def unpack(cls, ino: int, raw: bytes) -> "Attr":
        """A record of either format, told apart by its length (records are sealed whole)."""
        if len(raw) == _ATTR_V0.size:
            return cls(ino, *_ATTR_V0.unpack(raw))
        (mode, uid, gid, nlink, rdev, size, stored, a_s, a_ns, m_s, m_ns, c_s, c_ns,
         parent) = _ATTR.unpack(raw)
        return cls(ino, mode, uid, gid, nlink, rdev, size, stored, a_s * _NS + a_ns, m_s * _NS + m_ns,
                   c_s * _NS + c_ns, parent)


@dataclass(slots=True, frozen=True)
class Extent:
    offset: int  # in the file
    chunk_id: bytes
    chunk_offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(slots=True)
class ChunkRecord:
    pack: int
    offset: int
    sealed_length: int
    length: int
    refs: int
    born: int = 0  # the generation counter when first stored: in every snapshot of a later generation

    def pack_bytes(self) -> bytes:
        return _CHUNK.pack(self.pack, self.offset, self.sealed_length, self.length, self.refs, self.born)

    @classmethod
    def unpack(cls, raw: bytes) -> "ChunkRecord":
        if len(raw) == _CHUNK_V0.size:
            return cls(*_CHUNK_V0.unpack(raw))
        return cls(*_CHUNK.unpack(raw))


@dataclass(slots=True)
class PackRecord:
    live_chunks: int
    live_bytes: int
    size: int
    sealed: bool
    lane: int = LANE_NORMAL

    @property
    def local(self) -> bool:
        return self.lane == LANE_LOCAL

    @property
    def priority(self) -> bool:
        return self.lane == LANE_PRIORITY

    def pack(self) -> bytes:
        flags = (PACK_SEALED if self.sealed else 0) | ((1 << self.lane) if self.lane else 0)
        return _PACK.pack(self.live_chunks, self.live_bytes, self.size, flags)

    @classmethod
    def unpack(cls, raw: bytes) -> "PackRecord":
        live, live_bytes, size, flags = _PACK.unpack(raw)
        lane = (LANE_LOCAL if flags & (1 << LANE_LOCAL)
                else LANE_PRIORITY if flags & (1 << LANE_PRIORITY) else LANE_NORMAL)
        return cls(live, live_bytes, size, bool(flags & PACK_SEALED), lane)


class Index:
    """Typed access to the LMDB tables through one shared write transaction."""

    def __init__(self, path: str, keys, readonly: bool = False):
        self._sealer = keys.records
        self._name_hash = keys.name_hash
        self.readonly = readonly
        self.env = lmdb.open(path, map_size=MAP_SIZE, max_dbs=len(TABLES) + 2, subdir=True,
                             readonly=readonly, metasync=False, sync=True, readahead=False,
                             mode=0o600, max_readers=32, lock=True)
        if readonly:
            self._db = {}
            for name in TABLES:
                try:
                    self._db[name] = self.env.open_db(name.encode(), create=False)
                except lmdb.NotFoundError:  # a table newer than the store: read as empty
                    self._db[name] = None
        else:
            with self.env.begin(write=True) as txn:
                self._db = {name: self.env.open_db(name.encode(), txn=txn) for name in TABLES}
        self._txn: lmdb.Transaction | None = None
        self._attrs: dict[int, Attr] = {}
        self.pending_ops = 0
        self._log: RedoLog | None = None
        if not readonly:
            self._log = RedoLog(path.rstrip("/") + ".redo", TABLES)
            self.replayed = self._replay()

    # ----- transactions -----------------------------------------------------------------
    @property
    def txn(self) -> lmdb.Transaction:
        if self._txn is None:
            self._txn = self.env.begin(write=not self.readonly)
        return self._txn

    @property
    def dirty(self) -> bool:
        return self.pending_ops > 0

    def _replay(self) -> int:
        """Apply the redo log left by a crash and checkpoint; return the records replayed."""
        if self._log.is_empty():
            return 0
        n = self._apply_records(self._log.saved_records())
        self.commit()
        return n

    def _apply_records(self, records) -> int:
        n = 0
        for table, op, key, value in records:
            if op == PUT:
                self.txn.put(key, value, db=self._db[table])
            else:
                self.txn.delete(key, db=self._db[table])
            n += 1
        return n

    def save(self) -> None:
        """Make every change so far survive a killed daemon (not a power loss): one write()."""
        if self._log is not None:
            self._log.save()

    def commit(self) -> None:
        """Checkpoint: make every change so far durable (LMDB fsyncs on commit)."""
        if self._txn is None:
            return
        if self.pending_ops and not self.readonly:
            self._bump("generation")
        txn, self._txn = self._txn, None
        try:
            txn.commit()
        except lmdb.Error:
            self._recover_from_failed_commit()
            raise
        self.pending_ops = 0
        if self._log is not None:
            self._log.checkpointed()

    def _recover_from_failed_commit(self) -> None:
        """LMDB dropped the transaction: rebuild it from the redo log and the unsaved records,
        so the daemon's view stays what the kernel was told."""
        self._attrs.clear()
        if self._log is None:
            return
        pending = list(self._log.pending_records())
        self._apply_records(self._log.saved_records())
        self._apply_records(pending)

    @contextmanager
    def atomic(self):
        """All changes inside happen, or (on an exception) none do: a nested transaction.

        Only for synchronous sections: while it is open, nothing else may use the index.
        """
        if self.readonly:
            yield
            return
        parent = self.txn
        child = self.env.begin(write=True, parent=parent)
        self._txn = child
        ops = self.pending_ops
        mark = self._log.mark()
        try:
            yield
        except BaseException:
            child.abort()
            self._txn = parent
            self._attrs.clear()  # cached attributes may hold undone in-place changes
            self.pending_ops = ops
            self._log.rollback(mark)
            raise
        else:
            child.commit()
            self._txn = parent

    def close(self) -> None:
        """Close without committing (callers commit first); the redo log keeps saved changes."""
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        self._attrs.clear()
        self.env.close()
        if self._log is not None:
            self._log.close()

    # ----- sealed records -----------------------------------------------------------------
    def _aad(self, table: str, key: bytes) -> bytes:
        return record_aad(table, key)

    def _get(self, table: str, key: bytes) -> bytes | None:
        raw = self.txn.get(key, db=self._db[table])
        if raw is None:
            return None
        return self._sealer.open(raw, self._aad(table, key))

    def _put(self, table: str, key: bytes, value: bytes) -> None:
        self._put_plain(table, key, self._sealer.seal(value, self._aad(table, key)))

    def _put_plain(self, table: str, key: bytes, value: bytes) -> None:
        """Every change goes through _put_plain or _delete: both feed the redo log."""
        self.txn.put(key, value, db=self._db[table])
        self._log.put(table, key, value)
        self.pending_ops += 1

    def _delete(self, table: str, key: bytes) -> bool:
        self.pending_ops += 1
        self._log.delete(table, key)
        return self.txn.delete(key, db=self._db[table])

    def _scan_prefix(self, table: str, prefix: bytes, start: bytes = b""):
        """Yield (key, raw value) of keys starting with `prefix`, from prefix+start on."""
        cur = self.txn.cursor(db=self._db[table])
        if not cur.set_range(prefix + start):
            return
        for key, raw in cur:
            if not key.startswith(prefix):
                return
            yield key, raw

    # ----- counters -----------------------------------------------------------------------
    def counter(self, name: str) -> int:
        raw = self.txn.get(name.encode(), db=self._db["meta"])
        return _U64.unpack(raw)[0] if raw else 0

    def _bump(self, name: str) -> int:
        value = self.counter(name) + 1
        self._put_plain("meta", name.encode(), u64(value))
        return value

    def put_counter(self, name: str, value: int) -> None:
        self._put_plain("meta", name.encode(), u64(value))

    def delete_counter(self, name: str) -> None:
        if self.txn.get(name.encode(), db=self._db["meta"]) is not None:
            self._delete("meta", name.encode())

    def allocate_ino(self) -> int:
        ino = self._bump("last_ino")
        return ino if ino > ROOT_INO else self._bump("last_ino")

    def allocate_pack_id(self) -> int:
        return self._bump("last_pack")

    @property
    def generation(self) -> int:
        return self.counter("generation")

    # ----- inodes -------------------------------------------------------------------------
    def get_attr(self, ino: int) -> Attr | None:
        attr = self._attrs.get(ino)
        if attr is None:
            raw = self._get("inodes", u64(ino))
            if raw is None:
                return None
            attr = Attr.unpack(ino, raw)
            if len(self._attrs) > 200_000:
                self._attrs.clear()
            self._attrs[ino] = attr
        return attr

    def put_attr(self, attr: Attr) -> None:
        self._attrs[attr.ino] = attr
        self._put("inodes", u64(attr.ino), attr.pack())

    def delete_attr(self, ino: int) -> None:
        self._attrs.pop(ino, None)
        self._delete("inodes", u64(ino))

    def all_inodes(self):
        for key, raw in self._scan_prefix("inodes", b""):
            ino = _U64.unpack(key)[0]
            yield Attr.unpack(ino, self._sealer.open(raw, self._aad("inodes", key)))

    # ----- directory entries --------------------------------------------------------------
    def _dirent_key(self, parent: int, name: bytes) -> bytes:
        return u64(parent) + self._name_hash(name)[:_NAME_HASH_LEN]

    @staticmethod
    def _decode_bucket(raw: bytes) -> list[tuple[bytes, int]]:
        out, pos = [], 0
        while pos < len(raw):
            ino, n = struct.unpack_from("<QH", raw, pos)
            pos += 10
            out.append((bytes(raw[pos:pos + n]), ino))
            pos += n
        return out

    @staticmethod
    def _encode_bucket(entries: list[tuple[bytes, int]]) -> bytes:
        return b"".join(struct.pack("<QH", ino, len(name)) + name for name, ino in entries)

    def _bucket(self, key: bytes) -> list[tuple[bytes, int]]:
        raw = self._get("dirents", key)
        return self._decode_bucket(raw) if raw else []

    def lookup(self, parent: int, name: bytes) -> int | None:
        for entry_name, ino in self._bucket(self._dirent_key(parent, name)):
            if entry_name == name:
                return ino
        return None

    def add_entry(self, parent: int, name: bytes, ino: int) -> None:
        key = self._dirent_key(parent, name)
        bucket = [e for e in self._bucket(key) if e[0] != name]
        bucket.append((name, ino))
        self._put("dirents", key, self._encode_bucket(bucket))

    def remove_entry(self, parent: int, name: bytes) -> None:
        key = self._dirent_key(parent, name)
        bucket = [e for e in self._bucket(key) if e[0] != name]
        if bucket:
            self._put("dirents", key, self._encode_bucket(bucket))
        else:
            self._delete("dirents", key)

    def list_entries(self, parent: int, start_id: int = 0):
        """Yield (next_id, name, ino) in a stable order; `start_id` resumes after a yielded id.

        An id is the 48-bit name hash and the position inside its (almost always
        one-entry) bucket, so listing a directory of any size never loads it whole.
        """
        prefix = u64(parent)
        start_hash, skip = divmod(start_id, 256)
        start = start_hash.to_bytes(_NAME_HASH_LEN, "big")
        for key, raw in self._scan_prefix("dirents", prefix, start):
            h = int.from_bytes(key[8:], "big")
            entries = self._decode_bucket(self._sealer.open(raw, self._aad("dirents", key)))
            first = skip if h == start_hash else 0
            for i in range(first, len(entries)):
                name, ino = entries[i]
                yield h * 256 + i + 1, name, ino

    def has_entries(self, parent: int) -> bool:
        return next(self._scan_prefix("dirents", u64(parent)), None) is not None

    # ----- symlinks and xattrs ------------------------------------------------------------
    def get_symlink(self, ino: int) -> bytes | None:
        return self._get("symlinks", u64(ino))

    def put_symlink(self, ino: int, target: bytes) -> None:
        self._put("symlinks", u64(ino), target)

    def delete_symlink(self, ino: int) -> None:
        self._delete("symlinks", u64(ino))

    def _xattr_key(self, ino: int, name: bytes) -> bytes:
        return u64(ino) + self._name_hash(name)

    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        raw = self._get("xattrs", self._xattr_key(ino, name))
        if raw is None:
            return None
        n = struct.unpack_from("<H", raw)[0]
        return raw[2 + n:] if raw[2:2 + n] == name else None

    def put_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._put("xattrs", self._xattr_key(ino, name), struct.pack("<H", len(name)) + name + value)

    def delete_xattr(self, ino: int, name: bytes) -> bool:
        if self.get_xattr(ino, name) is None:
            return False
        return self._delete("xattrs", self._xattr_key(ino, name))

    def list_xattrs(self, ino: int) -> list[bytes]:
        names = []
        for key, raw in list(self._scan_prefix("xattrs", u64(ino))):
            plain = self._sealer.open(raw, self._aad("xattrs", key))
            n = struct.unpack_from("<H", plain)[0]
            names.append(plain[2:2 + n])
        return names

    def delete_all_xattrs(self, ino: int) -> None:
        for key in [k for k, _ in self._scan_prefix("xattrs", u64(ino))]:
            self._delete("xattrs", key)

    # ----- extents ------------------------------------------------------------------------
    def _decode_extent(self, key: bytes, raw: bytes) -> Extent:
        cid, coff, length = _EXTENT.unpack(self._sealer.open(raw, self._aad("extents", key)))
        return Extent(_U64.unpack(key[8:])[0], cid, coff, length)

    def extents(self, ino: int, start: int = 0, end: int | None = None) -> list[Extent]:
        """Extents of `ino` overlapping [start, end), in file order."""
        prefix = u64(ino)
        first_key = prefix + u64(start)
        cur = self.txn.cursor(db=self._db["extents"])
        # step back once: the extent that starts before `start` may still reach into the range
        if cur.set_range(first_key):
            if cur.key() != first_key and not cur.prev():
                cur.set_range(first_key)
        elif not cur.last():
            return []
        out = []
        for key, raw in cur:
            if key < prefix:
                continue
            if not key.startswith(prefix):
                break
            e = self._decode_extent(key, raw)
            if e.end <= start:
                continue
            if end is not None and e.offset >= end:
                break
            out.append(e)
        return out

    def put_extent(self, ino: int, e: Extent) -> None:
        self._put("extents", u64(ino) + u64(e.offset), _EXTENT.pack(e.chunk_id, e.chunk_offset, e.length))

    def delete_extent(self, ino: int, offset: int) -> None:
        self._delete("extents", u64(ino) + u64(offset))

    # ----- chunks and packs ---------------------------------------------------------------
    def get_chunk(self, cid: bytes) -> ChunkRecord | None:
        raw = self._get("chunks", cid)
        return ChunkRecord.unpack(raw) if raw else None

    def put_chunk(self, cid: bytes, rec: ChunkRecord, old_pack: int | None = None) -> None:
        """Store a chunk record; `old_pack` is where it lived before (None: a new chunk)."""
        if old_pack != rec.pack:
            if old_pack is not None:
                self._delete("packchunks", u64(old_pack) + cid)
            self._put_plain("packchunks", u64(rec.pack) + cid, b"")
        self._put("chunks", cid, rec.pack_bytes())

    def delete_chunk(self, cid: bytes, pack: int) -> None:
        self._delete("chunks", cid)
        self._delete("packchunks", u64(pack) + cid)

    def chunks_in_pack(self, pack_id: int) -> list[bytes]:
        return [bytes(k[8:]) for k, _ in self._scan_prefix("packchunks", u64(pack_id))]

    def all_chunks(self):
        for key, raw in self._scan_prefix("chunks", b""):
            yield bytes(key), ChunkRecord.unpack(self._sealer.open(raw, self._aad("chunks", key)))

    def all_extents(self):
        for key, raw in self._scan_prefix("extents", b""):
            yield _U64.unpack(key[:8])[0], self._decode_extent(key, raw)

    def get_pack(self, pack_id: int) -> PackRecord | None:
        raw = self.txn.get(u64(pack_id), db=self._db["packs"])
        return None if raw is None else PackRecord.unpack(raw)

    def put_pack(self, pack_id: int, rec: PackRecord) -> None:
        self._put_plain("packs", u64(pack_id), rec.pack())

    def is_local_pack(self, pack_id: int) -> bool:
        """Whether the pack is in the local lane (kept on this drive, never replicated)."""
        raw = self.txn.get(u64(pack_id), db=self._db["packs"])
        return raw is not None and bool(raw[_PACK.size - 1] & (1 << LANE_LOCAL))

    def seal_pack(self, pack_id: int, rec: PackRecord) -> None:
        """Mark a pack sealed (immutable) and queue it for replication unless it is local."""
        rec.sealed = True
        self.put_pack(pack_id, rec)
        if rec.lane != LANE_LOCAL:
            self.queue_outbox(pack_id, priority=rec.lane == LANE_PRIORITY)

    def delete_pack(self, pack_id: int) -> None:
        self._delete("packs", u64(pack_id))
        if self.get_pack_root(pack_id) is not None:
            self._delete("packroots", u64(pack_id))
        if self._delete("outbox", u64(pack_id)):  # partners may hold it: remember to release it
            self._put_plain("tombstones", u64(pack_id), u64(self.generation))

    # ----- chunks kept for retained snapshots (see history) --------------------------------------
    def get_retired(self, cid: bytes) -> int | None:
        """The generation counter when this chunk lost its last reference, if it is retired."""
        db = self._db["retired"]
        raw = self.txn.get(cid, db=db) if db is not None else None
        return None if raw is None else _U64.unpack(raw)[0]

    def put_retired(self, cid: bytes, died: int) -> None:
        self._put_plain("retired", cid, u64(died))

    def delete_retired(self, cid: bytes) -> None:
        if self.get_retired(cid) is not None:
            self._delete("retired", cid)

    def all_retired(self) -> list[tuple[bytes, int]]:
        if self._db["retired"] is None:
            return []
        return [(bytes(k), _U64.unpack(v)[0]) for k, v in self._scan_prefix("retired", b"")]

    def last_snapshot_generation(self) -> int:
        """The generation of the newest retained snapshot (0: none), from the keys alone."""
        cur = self.txn.cursor(db=self._db["snapshots"])
        if not cur.set_range(b"s"):
            if not cur.last():
                return 0
        elif not cur.prev():
            return 0
        key = bytes(cur.key())
        return _U64.unpack(key[1:])[0] if key[:1] == b"r" and len(key) == 9 else 0

    def get_pack_root(self, pack_id: int) -> tuple[bytes, int] | None:
        """(tree root, size) of a sealed pack, once known (see `packs.PackFiles.record_roots`)."""
        db = self._db["packroots"]
        raw = self.txn.get(u64(pack_id), db=db) if db is not None else None
        return None if raw is None else _PACKROOT.unpack(raw)

    def put_pack_root(self, pack_id: int, root: bytes, size: int) -> None:
        self._put_plain("packroots", u64(pack_id), _PACKROOT.pack(root, size))

    def put_tombstone(self, pack_id: int, generation: int) -> None:
        """Partners may hold this pack though we do not: release it there once nothing retained
        needs it (a recovered store's history, see `snapshot.adopt_root`)."""
        self._put_plain("tombstones", u64(pack_id), u64(generation))

    def delete_tombstone(self, pack_id: int) -> None:
        self._delete("tombstones", u64(pack_id))

    def all_packs(self):
        for key, raw in self._scan_prefix("packs", b""):
            yield _U64.unpack(key)[0], PackRecord.unpack(raw)

    def queue_outbox(self, pack_id: int, priority: bool = False) -> None:
        """Queue a sealed pack for the replicator: b"\x01" (priority, sent first) or b""."""
        self._put_plain("outbox", u64(pack_id), OUTBOX_PRIORITY if priority else OUTBOX_NORMAL)

    # ----- files kept local (.backupignore; see lanes) ---------------------------------------
    def is_ignored(self, ino: int) -> bool:
        db = self._db["ignored"]
        return db is not None and self.txn.get(u64(ino), db=db) is not None

    def set_ignored(self, ino: int, ignored: bool) -> None:
        if ignored == self.is_ignored(ino) or self.readonly:
            return
        if ignored:
            self._put_plain("ignored", u64(ino), b"")
        else:
            self._delete("ignored", u64(ino))

    def ignored_inodes(self) -> list[int]:
        if self._db["ignored"] is None:
            return []
        return [_U64.unpack(k)[0] for k, _ in self._scan_prefix("ignored", b"")]

    # ----- orphans (unlinked but still open) ------------------------------------------------
    def add_orphan(self, ino: int) -> None:
        self._put_plain("orphans", u64(ino), b"")

    def remove_orphan(self, ino: int) -> None:
        if self.txn.get(u64(ino), db=self._db["orphans"]) is not None:
            self._delete("orphans", u64(ino))

    def orphans(self) -> list[int]:
        return [_U64.unpack(k)[0] for k, _ in self._scan_prefix("orphans", b"")]

    # ----- snapshots (record formats belong to the snapshot module) --------------------------
    def get_snapshot_record(self, key: bytes) -> bytes | None:
        return self._get("snapshots", key)

    def put_snapshot_record(self, key: bytes, value: bytes) -> None:
        self._put("snapshots", key, value)

    def delete_snapshot_record(self, key: bytes) -> None:
        self._delete("snapshots", key)

    def snapshot_keys(self, prefix: bytes) -> list[bytes]:
        """Keys of the snapshot records that start with `prefix` (nothing is opened)."""
        return [bytes(key) for key, _ in self._scan_prefix("snapshots", prefix)]

    def snapshot_records(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """(key, opened value) of the snapshot records whose key starts with `prefix`."""
        return [(bytes(key), self._sealer.open(raw, self._aad("snapshots", key)))
                for key, raw in list(self._scan_prefix("snapshots", prefix))]

    def committed_files(self):
        """Yield (attributes, pack ids its data lives in, kept local) of every regular file as of
        the last checkpoint. Its own read transaction: any thread may run it (it blocks: every
        inode, extent and chunk record is read and opened)."""
        sealer = self._sealer
        with self.read_view() as records:
            ignored = {_U64.unpack(k)[0] for k, _ in records("ignored")}
            pack_of = {key: ChunkRecord.unpack(sealer.open(raw, record_aad("chunks", key))).pack
                       for key, raw in records("chunks")}
            extents = records("extents")
            ext = next(extents, None)
            for key, raw in records("inodes"):
                ino = _U64.unpack(key)[0]
                attr = Attr.unpack(ino, sealer.open(raw, record_aad("inodes", key)))
                packs = set()
                while ext is not None and _U64.unpack(ext[0][:8])[0] <= ino:
                    if _U64.unpack(ext[0][:8])[0] == ino:
                        cid = _EXTENT.unpack(sealer.open(ext[1], record_aad("extents", ext[0])))[0]
                        if cid in pack_of:
                            packs.add(pack_of[cid])
                    ext = next(extents, None)
                if stat.S_ISREG(attr.mode):
                    yield attr, packs, ino in ignored

    @contextmanager
    def read_view(self):
        """A read-only view of the last checkpoint that later writes do not change (LMDB MVCC).

        Yields `records(table)`: an iterator of (key, value) exactly as stored (sealed values
        stay sealed), in key order. Commit first to include the latest changes.
        """
        txn = self.env.begin(write=False)

        def records(table: str):
            if self._db[table] is None:
                return
            for key, value in txn.cursor(db=self._db[table]):
                yield bytes(key), bytes(value)

        try:
            yield records
        finally:
            txn.abort()


__all__ = ["Attr", "ChunkRecord", "Extent", "Index", "IntegrityError", "LANE_LOCAL", "LANE_NORMAL", "LANE_PRIORITY",
           "OUTBOX_NORMAL", "OUTBOX_PRIORITY", "PackRecord", "ROOT_INO", "TABLES", "record_aad", "u64"]
