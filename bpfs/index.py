"""The store's index: one LMDB environment holding all filesystem metadata.

Tables (LMDB named databases) and what they map:
  meta      counter name           -> integer (plain: next inode, next pack, generation, format);
                                      b"state" -> the sealed authenticator (format 4 on, below)
  inodes    ino                    -> sealed attributes (mode, owner, size, times, ...; `Attr`: times
                                      as 64-bit seconds and nanoseconds, any time Linux allows;
                                      records of older stores, times as 64-bit nanoseconds, read too)
  dirents   parent ino + name tag  -> sealed list of (name, child ino) sharing that hash
  extents   ino + 1 MiB block no.  -> sealed, padded list of the extents overlapping that block
                                      (offset, chunk id, offset in chunk, length); format 1 and 2
                                      indexes: ino + file offset -> one extent (upgraded on open)
  chunks    chunk id               -> sealed (pack, offset, sealed length, plain length, refcount, born:
                                      the generation counter when it was first stored)
  packs     pack id                -> plain (live chunks, live bytes, size, flags: sealed, lane)
  packchunks pack id + chunk id    -> nothing: which chunks live in a pack (for compaction)
  symlinks  ino                    -> sealed target
  xattrs    ino + name tag         -> sealed (name, value)
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
Name tags are keyed hashes of the directory (or inode) and the name, so one name has a
different tag in every directory. What the drive still shows in the clear: how many inodes,
directory membership by inode number, how many 1 MiB blocks each file spans (its size to
1 MiB; not where chunks start or end), which inode numbers are kept local
(`ignored`) and which packs are local or priority — see README "Security model".

What the drive cannot change unseen (format 4 on): the whole index is authenticated, plain
tables included. Every record (table, key, value) has a keyed hash h = BLAKE2b-256 under
`keys.index_state` of table name, 0, u32 key length, key, value; the index's *state* is the
sum of h over every record of every table mod 2^256 (a keyed multiset hash, AdHash), kept in
memory and updated with each change (a put adds the new value's h and subtracts the old one's,
a delete subtracts; the hashes of values written since the open are kept, so rewriting a
record does not read and hash its old value again). It is stored, with the format, as meta b"state" (the one record not in the
sum), sealed like any record, at every `save()` and `commit()` through the logged path: every
batch of the redo log ends with the state it leads to, so a replay after a crash restores a
matching pair. Every open (read-write or read-only, after replay and upgrade) recomputes the
sum by a full scan and refuses an index whose sum differs from the sealed one: a record added,
removed, changed, or put back from an older image of the drive (a rolled-back extent block, a
local pack's id added to `outbox`) is refused with one line (exit code 2); recovering from
partners (`bpfs recover`) is the way out. Without the key nobody can compute h, so no other
set of records has the sealed sum.
What it cannot tell: a whole older image of the drive (index and redo log, state included) put
back as a unit is consistent, and is locally indistinguishable from the real one; partners'
signed roots (whose generation only grows) can tell it. And trust on first use: a format 1 to 3
index has no state, so the open that upgrades it computes the state from the records as found
(the daemon's log says so); someone who can write the drive can strip the state and set the
format back to 3 to have one set of changes accepted that way. A format 4 index without a
state record is refused. A new (format 0) index must be empty.
Snapshots (`read_view`) carry the records without the state and say format 3, which is what
they are without it: an index rebuilt or materialized from one is format 3, and is upgraded
(trusted on first use: it was just built from a signed, authenticated root) when first opened
to write; read-only opens of a format 1 to 3 index read it as found (there is nothing to check
it against). Why snapshots leave the state out (the first design kept it in meta with the rest):
a snapshot's meta values must be 8-byte counters, so no snapshot could have been taken, and a
rebuilt index (new counters, records left out by `.backupignore`) would not have matched it;
and why they say format 3: an index rebuilt from a format 4 snapshot without its state would
otherwise have to be trusted on first use as format 4, which would let anyone strip the state
of any index.

One write transaction is kept open and shared by all operations (reads see uncommitted
writes). `commit()` is a durable checkpoint (LMDB fsyncs); `save()` makes the changes since
then survive a killed daemon at the cost of one write() to the redo log (see `redolog`).
A crash leaves the state as of the last checkpoint plus every saved batch, never a mix.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import logging
import stat
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import lmdb

from .errors import BpfsError, IntegrityError
from .fsutil import compact_lmdb
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
FORMAT = 4  # the index format this code writes (see the module docstring)
_STATE_KEY = b"state"  # meta: the sealed authenticator (format 4 on)
_STATE = struct.Struct(">Q32s")  # the format, the state (the sum of the records' hashes, little-endian)
_STATE_MASK = (1 << 256) - 1
_SNAPSHOT_FORMAT = 3  # what a snapshot's records are: the index without its state
_U32 = struct.Struct(">I")
MISMATCH = ("the index on the drive does not match its authenticator: records were changed or put back outside "
            "bpfs; refusing to use it (recover the store from partners with `bpfs recover`)")
log = logging.getLogger(__name__)


def u64(n: int) -> bytes:
    return _U64.pack(n)


def record_aad(table: str, key: bytes) -> bytes:
    """What a sealed record of `table` at `key` is bound to (its associated data)."""
    return table.encode() + b"\0" + key


@dataclass(slots=True)
class Attr:
    """An inode's attributes (the sealed value of `inodes`): mode, owner, link count, device
    number, size and bytes stored, and times in nanoseconds."""

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
    """A run of a file's bytes: `length` bytes at file `offset` are the bytes at `chunk_offset` of
    chunk `chunk_id`."""

    offset: int  # in the file
    chunk_id: bytes
    chunk_offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


BLOCK_SHIFT = 20  # extents are kept per 1 MiB block of a file (format 3 on)
_BLOCK_ENTRY = struct.Struct("<I32sII")  # offset in the block (from its start), chunk id, offset in chunk, length
_BLOCK_COUNT = struct.Struct("<I")
_BLOCK_SLOTS = 8  # a block record is padded to room for this many extents, or the next power of two
_BLOCK_CACHE = 4096  # decoded blocks kept in memory


def _encode_block(block: int, extents: tuple[Extent, ...]) -> bytes:
    """A block's extents (in file order), padded: its size tells only that the block holds no more
    than _BLOCK_SLOTS extents (or which power of two above), not where chunks end. An extent
    starting in an earlier block gets a negative offset, stored modulo 2^32 (extents are < 4 GiB)."""
    base = block << BLOCK_SHIFT
    slots = max(_BLOCK_SLOTS, 1 << (len(extents) - 1).bit_length())
    body = b"".join(_BLOCK_ENTRY.pack((e.offset - base) % (1 << 32), e.chunk_id, e.chunk_offset, e.length)
                    for e in extents)
    return _BLOCK_COUNT.pack(len(extents)) + body + bytes(_BLOCK_ENTRY.size * (slots - len(extents)))


def _decode_block(key: bytes, plain) -> tuple[Extent, ...]:
    (n,) = _BLOCK_COUNT.unpack_from(plain)
    if _BLOCK_COUNT.size + n * _BLOCK_ENTRY.size > len(plain):
        raise IntegrityError("an extent block record is damaged")
    base = _U64.unpack(key[8:16])[0] << BLOCK_SHIFT
    out = []
    for rel, cid, coff, length in _BLOCK_ENTRY.iter_unpack(plain[_BLOCK_COUNT.size:_BLOCK_COUNT.size
                                                                 + n * _BLOCK_ENTRY.size]):
        offset = base + rel if rel < 1 << 31 else base + rel - (1 << 32)
        out.append(Extent(offset, cid, coff, length))
    return tuple(out)


@dataclass(slots=True)
class ChunkRecord:
    """Where a chunk is (`pack`, `offset`, `sealed_length` on the drive), its plaintext `length`,
    how many extents refer to it (`refs`) and the generation it was first stored in (`born`)."""

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
    """A pack's bookkeeping (the plain value of `packs`): live chunks and bytes (what compaction
    weighs), its size on the drive, whether it is sealed, and its lane."""

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
        self._name_hash = keys.name_hash  # format 1
        self._dirent_tag = keys.dirent_tag
        self._xattr_tag = keys.xattr_tag
        self._record_hash = hashlib.blake2b(key=keys.index_state, digest_size=32, person=b"bpfs.index.st")
        self._state = 0  # the sum of every record's hash, mod 2^256 (see the module docstring)
        self._state_dirty = False  # changed since last written to meta
        self._hashes: dict[tuple[str, bytes], int] = {}  # hash of the current value of records written here
        # inside `atomic`: (db, key, value before or None) of each write, to undo them on failure
        self._undo: list[tuple[object, bytes, bytes | None]] | None = None
        self.readonly = readonly
        self.path = path
        self._open_env()
        self._txn: lmdb.Transaction | None = None
        self._attrs: dict[int, Attr] = {}
        self._blocks: dict[bytes, tuple[Extent, ...]] = {}  # decoded extent blocks (format 3)
        self.pending_ops = 0
        self._log: RedoLog | None = None
        self.upgraded_from: int | None = None  # the format this open upgraded the index from
        try:
            self.format = self._read_format()
            if not readonly:
                self._log = RedoLog(path.rstrip("/") + ".redo", TABLES)
                self.replayed = self._replay()
                if self.replayed:  # the log may have brought the format (a new index's first batch)
                    self.format = self._read_format()
            self._check_state()
            if not readonly:
                self._upgrade()
        except BaseException:
            self.close()
            raise

    def _open_env(self) -> None:
        self.env = lmdb.open(self.path, map_size=MAP_SIZE, max_dbs=len(TABLES) + 2, subdir=True,
                             readonly=self.readonly, metasync=False, sync=True, readahead=False,
                             mode=0o600, max_readers=32, lock=True)
        if self.readonly:
            self._db: dict[str, Any] = {}  # a table the store does not have yet: None
            for name in TABLES:
                try:
                    self._db[name] = self.env.open_db(name.encode(), create=False)
                except lmdb.NotFoundError:  # a table newer than the store: read as empty
                    self._db[name] = None
        else:
            with self.env.begin(write=True) as txn:
                self._db = {name: self.env.open_db(name.encode(), txn=txn) for name in TABLES}

    # ----- transactions -----------------------------------------------------------------
    @property
    def _redo(self) -> RedoLog:
        """The redo log: only a read-write index has one (and only it writes)."""
        if self._log is None:
            raise RuntimeError("a read-only index has no redo log")
        return self._log

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
        if self._redo.is_empty():
            return 0
        n = self._apply_records(self._redo.saved_records())
        self.commit()
        return n

    def _apply_records(self, records) -> int:
        """Put records as logged (the running state is not touched: see `_check_state`)."""
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
            if self._state_dirty:
                self._write_state()  # the batch ends with the state it leads to
            self._log.save()

    def commit(self) -> None:
        """Checkpoint: make every change so far durable (LMDB fsyncs on commit)."""
        if self._txn is None:
            return
        if self.pending_ops and not self.readonly:
            self._bump("generation")
        if self._state_dirty and not self.readonly:
            self._write_state()
        if self._log is not None:
            # the log then holds every change of this checkpoint: killed between the commit and
            # the log's truncation, the replay puts back exactly the committed records (without
            # this, the saved batches alone would undo the unsaved changes after them, and the
            # records would no longer match the last state in the log)
            self._log.save()
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
        so the daemon's view stays what the kernel was told (the running state too: the same
        records, the last of them the state as written)."""
        self._attrs.clear()
        self._blocks.clear()
        self._hashes.clear()
        if self._log is None:
            return
        pending = list(self._log.pending_records())
        self._apply_records(self._log.saved_records())
        self._apply_records(pending)

    @contextmanager
    def atomic(self):
        """All changes inside happen, or (on an exception) none do.

        Only for synchronous sections: while it is open, nothing else may use the index. Each
        write inside remembers the record's value before it, and a failure puts those back (an
        LMDB nested transaction did this before: its commit cost about 28 us per request, a
        quarter of a file's create). Sections may nest: an inner failure undoes only its own.
        """
        if self.readonly:
            yield
            return
        outer = self._undo is None
        undo = self._undo = [] if outer else self._undo
        assert undo is not None
        start = len(undo)
        ops = self.pending_ops
        state, state_dirty = self._state, self._state_dirty
        mark = self._log.mark() if self._log is not None else 0
        try:
            yield
        except BaseException:
            txn = self.txn
            for db, key, old in reversed(undo[start:]):
                if old is None:
                    txn.delete(key, db=db)
                else:
                    txn.put(key, old, db=db)
            del undo[start:]
            if outer:
                self._undo = None
            self._attrs.clear()  # cached attributes may hold undone in-place changes
            self._blocks.clear()
            self.pending_ops = ops
            self._state, self._state_dirty = state, state_dirty
            self._hashes.clear()
            if self._log is not None:
                self._log.rollback(mark)
            raise
        if outer:
            self._undo = None

    def _remember(self, db, key: bytes) -> None:
        """Inside `atomic`: note the record's value before a write, to put it back on failure."""
        if self._undo is not None:
            old = self.txn.get(key, db=db)
            self._undo.append((db, bytes(key), None if old is None else bytes(old)))

    def close(self) -> None:
        """Close without committing (callers commit first); the redo log keeps saved changes."""
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        self._attrs.clear()
        self._blocks.clear()
        self._hashes.clear()
        self.env.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    # ----- formats -------------------------------------------------------------------------
    def _read_format(self) -> int:
        """The index's format (meta `format`; before it was recorded: 1), or 0 for a new, empty one."""
        raw = self.txn.get(b"format", db=self._db["meta"])
        if raw is not None:
            fmt = _U64.unpack(raw)[0]
        elif self.txn.get(u64(ROOT_INO), db=self._db["inodes"]) is not None or self.counter("generation"):
            fmt = 1
        else:
            return 0
        if not 1 <= fmt <= FORMAT:
            raise BpfsError(f"the index is in format {fmt}, which this bpfs does not know (it reads formats 1 to "
                            f"{FORMAT}): use a newer bpfs", exit_code=2)
        return fmt

    def _upgrade(self) -> None:
        """Bring an index of an older format to the current one, in one LMDB transaction: all of
        it, or (on an error, or a crash) none of it."""
        if self.format == FORMAT:
            return
        if self.format == 0:  # a new index
            self.format = FORMAT
            self.put_counter("format", FORMAT)
            return
        old = self.format
        log.info("index %s: upgrading from format %d to %d; its authenticator is computed from the records as "
                 "found (trust on first use)", self.path, old, FORMAT)
        try:
            for step in range(old, FORMAT):
                _UPGRADES[step](self)
                self.format = step + 1
            self.put_counter("format", FORMAT)
        except IntegrityError as e:
            raise BpfsError(f"the index (format {old}) cannot be upgraded to format {FORMAT}: {e}", exit_code=2) \
                from None
        self.commit()
        self.upgraded_from = old
        if old < 3:
            # the records' old forms (keys that showed what this format hides) are still in freed
            # pages: copy the live ones to a new file (format 4 rewrites no record)
            compact_lmdb(self.env, self.path)
            self.env.close()
            self._open_env()

    # ----- the authenticator (format 4 on; see the module docstring) --------------------------
    def _hash(self, table: str, key: bytes, value: bytes) -> int:
        h = self._record_hash.copy()
        h.update(b"%s\0%s%s%s" % (table.encode(), _U32.pack(len(key)), key, value))
        return int.from_bytes(h.digest(), "little")

    def _account(self, table: str, key: bytes, new: bytes | None) -> bool:
        """The running state follows one record's change to `new` (None: deleted); whether the
        record was there before. Called before the change is made."""
        if table == "meta" and key == _STATE_KEY:
            raise ValueError("meta b'state' is the index's authenticator, not a counter")
        slot = (table, bytes(key))
        old = self._hashes.pop(slot, None)
        existed = old is not None
        if old is None:
            raw = self.txn.get(key, db=self._db[table])
            existed = raw is not None
            old = self._hash(table, key, bytes(raw)) if raw is not None else 0
        delta = -old
        if new is not None:
            h = self._hash(table, key, new)
            delta += h
            if len(self._hashes) >= 1 << 16:
                self._hashes.clear()
            self._hashes[slot] = h
        self._state = (self._state + delta) & _STATE_MASK
        self._state_dirty = True
        return existed

    def scan_state(self) -> int:
        """The state of the index as it is now, from a full scan of every table."""
        total, txn, base = 0, self.txn, self._record_hash
        for table in TABLES:
            db = self._db[table]
            if db is None:
                continue
            head = table.encode() + b"\0"
            for key, value in txn.cursor(db=db).iternext():
                if table == "meta" and key == _STATE_KEY:
                    continue
                h = base.copy()
                h.update(b"%s%s%s%s" % (head, _U32.pack(len(key)), key, value))
                total += int.from_bytes(h.digest(), "little")
        return total & _STATE_MASK

    def _stored_state(self) -> tuple[int, int] | None:
        """(format, state) as sealed in meta, or None when there is none."""
        raw = self._get("meta", _STATE_KEY)
        if raw is None:
            return None
        if len(raw) != _STATE.size:
            raise IntegrityError("bad state record")
        fmt, state = _STATE.unpack(raw)
        return fmt, int.from_bytes(state, "little")

    def _write_state(self) -> None:
        """Store the running state (sealed, bound to meta/state) through the logged path."""
        value = self._sealer.seal(_STATE.pack(self.format, self._state.to_bytes(32, "little")),
                                  self._aad("meta", _STATE_KEY))
        self._remember(self._db["meta"], _STATE_KEY)
        self.txn.put(_STATE_KEY, value, db=self._db["meta"])
        self._redo.put("meta", _STATE_KEY, value)
        self._state_dirty = False

    def _check_state(self) -> None:
        """Refuse an index whose records do not sum to its sealed state; set the running state."""
        try:
            stored = self._stored_state()
        except IntegrityError:
            raise BpfsError(MISMATCH, exit_code=2) from None
        if self.format == 0:  # new: nothing may be in it yet
            if any(self._db[t] is not None and next(self.txn.cursor(db=self._db[t]).iternext(), None) is not None
                   for t in TABLES):
                raise BpfsError(MISMATCH, exit_code=2)
            self._state = 0
            return
        if self.format < FORMAT:
            if stored is not None:  # a format 4 index said to be older: its state was kept
                raise BpfsError(MISMATCH, exit_code=2)
            if not self.readonly:
                self._state = self.scan_state()  # trust on first use; `_upgrade` follows
            return
        scanned = self.scan_state()
        if stored is None or stored[0] != self.format or not hmac.compare_digest(
                stored[1].to_bytes(32, "little"), scanned.to_bytes(32, "little")):
            raise BpfsError(MISMATCH, exit_code=2)
        self._state, self._state_dirty = scanned, False

    def _regroup(self, table: str, rewrite) -> None:
        """Rewrite the records of `table` inode by inode (keys start with the inode):
        `rewrite(ino, [(key, opened value)])` returns the inode's new [(key, value)]."""
        start = b""
        while True:
            cur = self.txn.cursor(db=self._db[table])
            if not cur.set_range(start):
                return
            prefix = bytes(cur.key()[:8])
            group = [(bytes(k), self._sealer.open(v, self._aad(table, k)))
                     for k, v in list(self._scan_prefix(table, prefix))]
            for key, _ in group:
                self._delete(table, key)
            for key, value in rewrite(_U64.unpack(prefix)[0], group):
                self._put(table, key, value)
            start = u64(_U64.unpack(prefix)[0] + 1)

    def _upgrade_to_2(self) -> None:
        """Format 2: directory entry and xattr tags are keyed with their directory (inode)."""
        def dirents(parent, group):
            buckets: dict[bytes, list] = {}
            for _, plain in group:
                for name, ino in self._decode_bucket(plain):
                    buckets.setdefault(self._dirent_key(parent, name, 2), []).append((name, ino))
            return [(key, self._encode_bucket(entries)) for key, entries in buckets.items()]

        def xattrs(ino, group):
            out = []
            for _, plain in group:
                n = struct.unpack_from("<H", plain)[0]
                out.append((self._xattr_key(ino, bytes(plain[2:2 + n]), 2), plain))
            return out

        self._regroup("dirents", dirents)
        self._regroup("xattrs", xattrs)

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
        """Every change goes through _put_plain or _delete: both feed the redo log and the
        running state."""
        self._account(table, key, value)
        self._remember(self._db[table], key)
        self.txn.put(key, value, db=self._db[table])
        self._redo.put(table, key, value)
        self.pending_ops += 1

    def _delete(self, table: str, key: bytes) -> bool:
        self.pending_ops += 1
        self._redo.delete(table, key)
        if not self._account(table, key, None):
            return False
        self._remember(self._db[table], key)
        return self.txn.delete(key, db=self._db[table])

    def _scan_prefix(self, table: str, prefix: bytes, start: bytes = b""):
        """Yield (key, raw value) of keys starting with `prefix`, from prefix+start on."""
        cur = self.txn.cursor(db=self._db[table])
        if not cur.set_range(prefix + start):
            return
        for key, raw in cur:
            if not bytes(key).startswith(prefix):
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
    def _dirent_key(self, parent: int, name: bytes, fmt: int | None = None) -> bytes:
        if (fmt or self.format) >= 2:
            return u64(parent) + self._dirent_tag(u64(parent) + name)[:_NAME_HASH_LEN]
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

    def _xattr_key(self, ino: int, name: bytes, fmt: int | None = None) -> bytes:
        if (fmt or self.format) >= 2:
            return u64(ino) + self._xattr_tag(u64(ino) + name)
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
    # Format 3 on: one sealed record per inode and 1 MiB block of the file, listing every extent
    # that overlaps the block (an extent over several blocks is in each), padded (see the module
    # docstring). Formats 1 and 2 (read-only opens of older indexes): one record per extent,
    # keyed by its file offset.
    def _block(self, key: bytes) -> tuple[Extent, ...]:
        """The extents of one block record (cached: reads of one block come in runs)."""
        found = self._blocks.get(key)
        if found is None:
            raw = self._get("extents", key)
            found = () if raw is None else _decode_block(key, raw)
            if len(self._blocks) >= _BLOCK_CACHE:
                self._blocks.clear()
            self._blocks[key] = found
        return found

    def _put_block(self, key: bytes, extents: tuple[Extent, ...]) -> None:
        self._blocks[key] = extents
        if extents:
            self._put("extents", key, _encode_block(_U64.unpack(key[8:])[0], extents))
        else:
            self._delete("extents", key)

    def extents(self, ino: int, start: int = 0, end: int | None = None) -> list[Extent]:
        """Extents of `ino` overlapping [start, end), in file order."""
        if self.format < 3:
            return self._extents_v1(ino, start, end)
        prefix = u64(ino)
        out = []
        first = start >> BLOCK_SHIFT
        cur = self.txn.cursor(db=self._db["extents"])
        ok = cur.set_range(prefix + u64(first))
        while ok:
            key = bytes(cur.key())
            block = _U64.unpack(key[8:])[0]
            if key[:8] != prefix or (end is not None and block << BLOCK_SHIFT >= end):
                break
            for e in self._block(key):
                # an extent over several blocks is listed in each: take it where the range starts
                if e.end > start and (end is None or e.offset < end) and (block == first or e.offset >> BLOCK_SHIFT
                                                                          == block):
                    out.append(e)
            ok = cur.next()
        return out

    def _extents_v1(self, ino: int, start: int, end: int | None) -> list[Extent]:
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
        for k, v in cur:
            key, raw = bytes(k), bytes(v)  # bytes already (no `buffers`): no copy
            if key < prefix:
                continue
            if not key.startswith(prefix):
                break
            e = self._decode_extent_v1(key, raw)
            if e.end <= start:
                continue
            if end is not None and e.offset >= end:
                break
            out.append(e)
        return out

    def _decode_extent_v1(self, key: bytes, raw: bytes) -> Extent:
        cid, coff, length = _EXTENT.unpack(self._sealer.open(raw, self._aad("extents", key)))
        return Extent(_U64.unpack(key[8:])[0], cid, coff, length)

    def put_extent(self, ino: int, e: Extent) -> None:
        """Record `e` (an extent starting there already is replaced)."""
        prefix = u64(ino)
        for block in range(e.offset >> BLOCK_SHIFT, ((e.end - 1) >> BLOCK_SHIFT) + 1):
            key = prefix + u64(block)
            kept = [x for x in self._block(key) if x.offset != e.offset]
            bisect.insort(kept, e, key=lambda x: x.offset)
            self._put_block(key, tuple(kept))

    def delete_extent(self, ino: int, offset: int) -> None:
        """Remove the extent that starts at `offset`."""
        prefix = u64(ino)
        start_key = prefix + u64(offset >> BLOCK_SHIFT)
        e = next((x for x in self._block(start_key) if x.offset == offset), None)
        if e is None:
            return
        for block in range(offset >> BLOCK_SHIFT, ((e.end - 1) >> BLOCK_SHIFT) + 1):
            key = prefix + u64(block)
            self._put_block(key, tuple(x for x in self._block(key) if x.offset != offset))

    def _upgrade_to_3(self) -> None:
        """Format 3: extents in sealed, padded 1 MiB blocks instead of one record per extent
        keyed by its offset (which showed every chunk boundary)."""
        def blocks(ino, group):
            by_block: dict[int, list[Extent]] = {}
            for key, plain in group:
                cid, coff, length = _EXTENT.unpack(plain)
                e = Extent(_U64.unpack(key[8:])[0], cid, coff, length)
                for block in range(e.offset >> BLOCK_SHIFT, ((e.end - 1) >> BLOCK_SHIFT) + 1):
                    by_block.setdefault(block, []).append(e)
            return [(u64(ino) + u64(b), _encode_block(b, tuple(es))) for b, es in sorted(by_block.items())]

        self._regroup("extents", blocks)

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
        """(ino, extent) of every extent, in inode and file order."""
        for key, raw in self._scan_prefix("extents", b""):
            ino = _U64.unpack(key[:8])[0]
            if self.format < 3:
                yield ino, self._decode_extent_v1(key, raw)
                continue
            block = _U64.unpack(key[8:])[0]
            for e in _decode_block(bytes(key), self._sealer.open(raw, self._aad("extents", key))):
                if e.offset >> BLOCK_SHIFT == block:
                    yield ino, e

    def get_pack(self, pack_id: int) -> PackRecord | None:
        raw = self.txn.get(u64(pack_id), db=self._db["packs"])
        return None if raw is None else PackRecord.unpack(bytes(raw))

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
                        plain = sealer.open(ext[1], record_aad("extents", ext[0]))
                        cids = ([_EXTENT.unpack(plain)[0]] if self.format < 3
                                else [e.chunk_id for e in _decode_block(ext[0], plain)])
                        packs.update(pack_of[cid] for cid in cids if cid in pack_of)
                    ext = next(extents, None)
                if stat.S_ISREG(attr.mode):
                    yield attr, packs, ino in ignored

    @contextmanager
    def read_view(self):
        """A read-only view of the last checkpoint that later writes do not change (LMDB MVCC).

        Yields `records(table)`: an iterator of (key, value) exactly as stored (sealed values
        stay sealed), in key order. Commit first to include the latest changes. The one
        exception is meta, which shows what a snapshot carries: no state record, and format 3
        for 4 (the records without their authenticator; see the module docstring).
        """
        txn = self.env.begin(write=False)

        def records(table: str):
            if self._db[table] is None:
                return
            for key, value in txn.cursor(db=self._db[table]):
                if table == "meta":
                    if key == _STATE_KEY:
                        continue
                    if key == b"format" and _U64.unpack(value)[0] == FORMAT:
                        value = u64(_SNAPSHOT_FORMAT)
                yield bytes(key), bytes(value)

        try:
            yield records
        finally:
            txn.abort()


def _upgrade_to_4(index: Index) -> None:
    """Format 4: the authenticator. Its state, computed when the upgrade began, is written with
    the upgrade's commit; no record changes."""


_UPGRADES = {1: Index._upgrade_to_2, 2: Index._upgrade_to_3, 3: _upgrade_to_4}  # format n -> n + 1

__all__ = ["Attr", "ChunkRecord", "Extent", "Index", "IntegrityError", "LANE_LOCAL", "LANE_NORMAL", "LANE_PRIORITY",
           "OUTBOX_NORMAL", "OUTBOX_PRIORITY", "PackRecord", "ROOT_INO", "TABLES", "record_aad", "u64"]
