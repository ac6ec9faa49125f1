"""Snapshots of a store's index, and rebuilding a store from one: recovery without networking.

This module owns:
  - the record stream: the index tables that rebuild the filesystem, serialized canonically
    (values copied exactly as stored: sealed records stay sealed under the records key, which
    the recovery secret derives again), cut by a keyed content-defined chunker of its own, so
    an unchanged part of the index gives the same metadata chunks next time (dedup);
  - metadata chunks: sealed exactly like data chunks (id = keys.chunk_id(plaintext), Padmé,
    XChaCha20-Poly1305 under keys.data with the id as associated data) and written to packs of
    their own, which go to the outbox and replicate like data packs;
  - the manifest (which metadata chunks, which data packs), sealed under a key only the owner
    holds, and the signed root: the sealed manifest signed by the store's Ed25519 identity
    with a generation that only grows, which a partner checks without being able to read it;
  - the `snapshots` index table: which metadata chunks and packs the retained snapshots hold
    (reference counted), and their signed roots;
  - rebuilding a fresh store's index from a root and its metadata chunks (`rebuild_index`).

What stays local stays out (see `lanes`): files a `.backupignore` keeps local (the index's
`ignored` table) are left out entirely — their inode, directory entries, extents, xattrs —
and so are local packs with their `chunks`/`packchunks` records; the manifest never lists a
local pack. Before exporting, every chunk in a local pack that a replicable file uses is
moved into a normal pack (`lanes.prepare_export`). Records that change because of this are
re-sealed deterministically (`Sealer.reseal`): a directory entry bucket without its ignored
names, a chunk's reference count without the ignored files' references (a chunk only
ignored files use is left out, and its pack's live counts shrink; a pack left with no
chunk is left out). A rebuilt store simply lacks the ignored files; directories stay.

Why metadata chunks live in packs of their own, counted in the `snapshots` table and not in
`chunks`: `chunks` reference counts are the number of extents using a chunk (verify checks
exactly that), and compaction and pack deletion only touch chunks listed in `packchunks`.
Metadata packs have no `packchunks` entries, so compaction never moves or drops them; their
`packs` record counts their live metadata chunks, so nothing deletes them as empty; only
releasing the last snapshot that uses a chunk frees it here, and a metadata pack whose chunks
are all freed is deleted by this module. The metadata packs' own `packs` records are left out
of the record stream: a rebuilt store does not need them.

Record stream (plaintext, before chunking; integers little-endian):
  b"BPSNAPS1"
  per record:  u8 table, u16 key length, u32 value length, key, value
               tables numbered as in SNAPSHOT_TABLES, in that order; keys strictly increasing
               (bytewise, LMDB's order) within a table; key 1..511 bytes, value <= 1 MiB, and
               the key and value lengths each table allows (see _check_shape)
  end:         u8 0xFF, u64 number of records; nothing after it

Manifest (plaintext; sealed before it leaves the owner):
  b"BPSNAPM2", u64 generation, u64 creation time (ns since the epoch), u64 stream length,
  u64 records, 32-byte BLAKE2b of the whole record stream,
  u32 n, then n metadata chunks in stream order: 32-byte chunk id, u32 plaintext length,
      u64 pack, u64 offset in the pack, u32 sealed length (= sealed_chunk_size(length)),
  u32 m, then m ranges of data pack ids the snapshot needs: u64 first, u32 count
      (ascending, neither overlapping nor touching, count >= 1),
  u64 regular files, u64 their bytes (what `bpfs snapshots` lists),
  u32 length, then the partner list (UTF-8 JSON, at most MAX_PARTNER_LIST bytes: the partners'
      ids, public keys, last addresses, quotas and pair keys, so a recovered store knows them all),
  32-byte BLAKE2b (person "bpfs.manifest") of everything before it.
  (b"BPSNAPM1" manifests end after the pack ranges: no counts, no partner list.)
  Sealed with Sealer(keys.derive("snapshot-manifest")), associated data
  b"bpfs snapshot manifest v1\\0" + peer id (20 bytes) + u64 generation.

Signed root (what partners keep; at most MAX_ROOT_SIZE bytes):
  b"BPFSROOT", u8 version 2, 20-byte peer id, u64 generation, u64 creation time (ns since the
  epoch; the manifest's), u32 sealed manifest length, sealed manifest, 64-byte Ed25519 signature
  by the store's identity over b"bpfs snapshot root v1\\0" + every byte of the root before the
  signature. Version 1 had no creation time (read as 0). Partners see the generation and the
  creation time, and refuse a root from the future or one whose generation jumps absurdly.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
import shutil
import stat
import struct
import time
from dataclasses import dataclass, field

import lmdb

from .checked import VALUE_SIZE as PEER_ID_SIZE
from .chunker import Chunker
from .crypto import CHUNK_ID_SIZE, NONCE_SIZE, SEAL_OVERHEAD, Sealer, padme, sealed_chunk_size
from .errors import BpfsError, IntegrityError
from .fsutil import fsync_dir, make_private_dir
from .identity import peer_id_bytes, verify_signature
from .index import (_NAME_HASH_LEN, _PACK, _PACKROOT, MAP_SIZE, ROOT_INO, TABLES, Attr, ChunkRecord, Index,
                    PackRecord, record_aad, u64)
from .history import RetentionPolicy, thin
from .history import keep as keep_snapshots
from .lanes import ExportFilter, prepare_export
from .keyfile import KeyRing, read_public
from .packs import PackFiles
from .store import StoreLock, create_store, key_path, require_store

# ----- sizes and bounds ------------------------------------------------------------------------
META_AVG_SIZE = 64 << 10
META_MIN_SIZE = 16 << 10
META_MAX_SIZE = 256 << 10
_FEED_BYTES = 1 << 20  # the stream is cut this much at a time
MAX_KEY = 511  # LMDB's default maximum key size
MAX_VALUE = 1 << 20
MAX_META_CHUNKS = 1 << 18  # 16 GiB of index at the average chunk size
MAX_PACK_RANGES = 1 << 18

SNAPSHOT_TABLES = ("meta", "inodes", "dirents", "extents", "chunks", "packs", "packchunks", "symlinks", "xattrs",
                   "orphans", "packroots", "retired")
_SEALED_TABLES = frozenset({"inodes", "dirents", "extents", "chunks", "symlinks", "xattrs"})
_KEY_LENGTHS = {"inodes": 8, "dirents": 8 + _NAME_HASH_LEN, "extents": 16, "chunks": CHUNK_ID_SIZE, "packs": 8,
                "packchunks": 8 + CHUNK_ID_SIZE, "symlinks": 8, "xattrs": 8 + 16, "orphans": 8, "packroots": 8,
                "retired": CHUNK_ID_SIZE}
_PLAIN_VALUE_LENGTHS = {"meta": 8, "packs": _PACK.size, "packchunks": 0, "orphans": 0, "packroots": _PACKROOT.size,
                        "retired": 8}
_MAX_META_KEY = 64

STREAM_MAGIC = b"BPSNAPS1"
_END = 0xFF
_REC = struct.Struct("<BHI")
_END_COUNT = struct.Struct("<Q")

MANIFEST_MAGIC = b"BPSNAPM2"
MANIFEST_MAGIC_V1 = b"BPSNAPM1"
MAX_PARTNER_LIST = 64 << 10  # far more than 64 partners (an announcement lists at most 64) take
_MAN_TAIL = struct.Struct("<QQI")
_MAN_HEAD = struct.Struct("<8sQQQQ32sI")
_MAN_CHUNK = struct.Struct("<32sIQQI")
_MAN_COUNT = struct.Struct("<I")
_MAN_RANGE = struct.Struct("<QI")
_HASH_SIZE = 32
_MAN_MIN = _MAN_HEAD.size + _MAN_CHUNK.size + _MAN_COUNT.size + _HASH_SIZE
MAX_MANIFEST_SIZE = (_MAN_HEAD.size + _MAN_CHUNK.size * MAX_META_CHUNKS + _MAN_COUNT.size
                     + _MAN_RANGE.size * MAX_PACK_RANGES + _MAN_TAIL.size + MAX_PARTNER_LIST + _HASH_SIZE)
_MANIFEST_AAD = b"bpfs snapshot manifest v1\0"

ROOT_MAGIC = b"BPFSROOT"
ROOT_VERSION = 2
_ROOT_HEAD = struct.Struct(f"<8sB{PEER_ID_SIZE}sQQI")
_ROOT_HEAD_V1 = struct.Struct(f"<8sB{PEER_ID_SIZE}sQI")
_SIG_SIZE = 64
_SIGN_DOMAIN = b"bpfs snapshot root v1\0"
MAX_ROOT_SIZE = 18 << 20
_ROOT_MIN = _ROOT_HEAD.size + SEAL_OVERHEAD + _MAN_MIN + _SIG_SIZE
assert _ROOT_HEAD.size + SEAL_OVERHEAD + MAX_MANIFEST_SIZE + _SIG_SIZE <= MAX_ROOT_SIZE

# `snapshots` table keys: b"c" + chunk id -> metadata chunk (pack, offset, sealed length,
# length, snapshots using it); b"p" + pack -> b"" (a pack of metadata chunks);
# b"r" + generation -> the signed root of a retained snapshot.
_SNAPCHUNK = struct.Struct("<QQIII")


class SnapshotError(BpfsError):
    """A snapshot could not be made, read, or rebuilt into a store."""


class RootRejected(SnapshotError):
    """A signed root is malformed, not signed by the expected store, or older than allowed."""


# ----- the signed root --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SignedRoot:
    """A signed root (format in the module docstring): the sealed manifest with the store's peer id,
    generation and creation time, signed by its identity. `verify_root` checks who signed it."""

    peer_id: bytes
    generation: int
    sealed_manifest: bytes
    signature: bytes
    created_ns: int = 0
    version: int = ROOT_VERSION

    def body(self) -> bytes:
        if self.version == 1:
            head = _ROOT_HEAD_V1.pack(ROOT_MAGIC, 1, self.peer_id, self.generation, len(self.sealed_manifest))
        else:
            head = _ROOT_HEAD.pack(ROOT_MAGIC, self.version, self.peer_id, self.generation, self.created_ns,
                                   len(self.sealed_manifest))
        return head + self.sealed_manifest

    def signed_message(self) -> bytes:
        return _SIGN_DOMAIN + self.body()

    def encode(self) -> bytes:
        return self.body() + self.signature

    @staticmethod
    def decode_head(data) -> tuple[int, int] | None:
        """(generation, created ns) from the first bytes of a root, None if there are too few
        (RootRejected if they are not a root's)."""
        data = bytes(data[:_ROOT_HEAD.size])
        if len(data) < len(ROOT_MAGIC) + 1:
            return None
        if data[:len(ROOT_MAGIC)] != ROOT_MAGIC:
            raise RootRejected("snapshot root: not a bpfs snapshot root")
        version = data[len(ROOT_MAGIC)]
        if version == 1:
            return (_ROOT_HEAD_V1.unpack_from(data)[3], 0) if len(data) >= _ROOT_HEAD_V1.size else None
        if version != ROOT_VERSION:
            raise RootRejected(f"snapshot root: unknown version {version}")
        if len(data) < _ROOT_HEAD.size:
            return None
        _, _, _, generation, created, _ = _ROOT_HEAD.unpack_from(data)
        return generation, created

    @classmethod
    def decode(cls, blob) -> "SignedRoot":
        """Parse a root strictly (structure only: `verify_root` checks who signed it)."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise RootRejected("snapshot root: not bytes")
        blob = bytes(blob)
        if len(blob) > MAX_ROOT_SIZE:
            raise RootRejected(f"snapshot root: {len(blob)} bytes, more than the {MAX_ROOT_SIZE} allowed")
        if len(blob) < _ROOT_MIN:
            raise RootRejected(f"snapshot root: {len(blob)} bytes, too short")
        if blob[:len(ROOT_MAGIC)] != ROOT_MAGIC:
            raise RootRejected("snapshot root: not a bpfs snapshot root")
        version = blob[len(ROOT_MAGIC)]
        if version == 1:
            head = _ROOT_HEAD_V1
            _, _, peer, generation, sealed_len = head.unpack_from(blob)
            created = 0
        elif version == ROOT_VERSION:
            head = _ROOT_HEAD
            _, _, peer, generation, created, sealed_len = head.unpack_from(blob)
        else:
            raise RootRejected(f"snapshot root: unknown version {version}")
        if sealed_len != len(blob) - head.size - _SIG_SIZE:
            raise RootRejected("snapshot root: its length field does not match its size")
        if generation < 1:
            raise RootRejected("snapshot root: generation 0")
        end = head.size + sealed_len
        return cls(peer, generation, blob[head.size:end], blob[end:], created, version)


def verify_root(public_key: bytes, blob, min_generation: int = 0) -> SignedRoot:
    """Check a root as a partner can: well formed, signed by the store owning `public_key`, and
    of generation `min_generation` or later (a partner passes the last generation it accepted,
    plus one to insist on a newer root). Raises RootRejected; returns the parsed root."""
    root = SignedRoot.decode(blob)
    if root.peer_id != peer_id_bytes(public_key):
        raise RootRejected("snapshot root: made by another store (peer id does not match the key)")
    if not verify_signature(public_key, root.signed_message(), root.signature):
        raise RootRejected("snapshot root: bad signature")
    if root.generation < min_generation:
        raise RootRejected(f"snapshot root: generation {root.generation} is older than {min_generation} "
                           "(a rollback)")
    return root


# ----- the manifest -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MetaChunk:
    """Where one metadata chunk of the record stream is (a manifest entry): its id, plaintext length,
    pack, offset in the pack and sealed length."""

    chunk_id: bytes
    length: int  # plaintext bytes of the record stream
    pack: int
    offset: int
    sealed_length: int


@dataclass(slots=True)
class SnapshotManifest:
    """One snapshot's manifest (format in the module docstring): the record stream's metadata chunks,
    the data packs it needs, file counts and the partner list; `root` and `stats` are not encoded."""

    generation: int
    created_ns: int
    stream_length: int
    records: int
    stream_digest: bytes
    chunks: list[MetaChunk]
    pack_ranges: list[tuple[int, int]]  # (first, count): the data packs the snapshot needs
    files: int = 0  # regular files in the snapshot
    file_bytes: int = 0  # their sizes added up
    partners: bytes = b""  # JSON list of the store's partners when it was made (see the module docstring)
    root: bytes = b""  # the signed root carrying this manifest (not part of the encoding)
    stats: dict = field(default_factory=dict)  # what export/rebuild did (not part of the encoding)

    @property
    def packs(self) -> list[int]:
        return [p for first, count in self.pack_ranges for p in range(first, first + count)]

    @property
    def pack_count(self) -> int:
        return sum(count for _, count in self.pack_ranges)

    def needs_pack(self, pack_id: int) -> bool:
        i = bisect.bisect_right(self.pack_ranges, (pack_id, 1 << 32)) - 1
        return i >= 0 and self.pack_ranges[i][0] <= pack_id < self.pack_ranges[i][0] + self.pack_ranges[i][1]

    def encode(self) -> bytes:
        parts = [_MAN_HEAD.pack(MANIFEST_MAGIC, self.generation, self.created_ns, self.stream_length, self.records,
                                self.stream_digest, len(self.chunks))]
        parts += [_MAN_CHUNK.pack(c.chunk_id, c.length, c.pack, c.offset, c.sealed_length) for c in self.chunks]
        parts.append(_MAN_COUNT.pack(len(self.pack_ranges)))
        parts += [_MAN_RANGE.pack(first, count) for first, count in self.pack_ranges]
        if len(self.partners) > MAX_PARTNER_LIST:
            raise SnapshotError("the partner list is too large for a snapshot")
        parts.append(_MAN_TAIL.pack(self.files, self.file_bytes, len(self.partners)) + self.partners)
        body = b"".join(parts)
        return body + _manifest_hash(body)

    @classmethod
    def decode(cls, data: bytes) -> "SnapshotManifest":
        def bad(why):
            return SnapshotError(f"snapshot manifest: {why}")

        if not _MAN_MIN <= len(data) <= MAX_MANIFEST_SIZE:
            raise bad(f"{len(data)} bytes, outside [{_MAN_MIN}, {MAX_MANIFEST_SIZE}]")
        if _manifest_hash(data[:-_HASH_SIZE]) != data[-_HASH_SIZE:]:
            raise bad("hash mismatch")
        magic, generation, created, stream_length, records, digest, n = _MAN_HEAD.unpack_from(data)
        if magic not in (MANIFEST_MAGIC, MANIFEST_MAGIC_V1):
            raise bad("unknown format")
        if not 1 <= n <= MAX_META_CHUNKS:
            raise bad(f"{n} metadata chunks")
        pos = _MAN_HEAD.size
        if len(data) < pos + n * _MAN_CHUNK.size + _MAN_COUNT.size + _HASH_SIZE:
            raise bad("truncated chunk list")
        chunks, total = [], 0
        for _ in range(n):
            cid, length, pack, offset, sealed_length = _MAN_CHUNK.unpack_from(data, pos)
            pos += _MAN_CHUNK.size
            if not 1 <= length <= META_MAX_SIZE or sealed_length != sealed_chunk_size(length) or pack < 1:
                raise bad("a metadata chunk entry is out of bounds")
            chunks.append(MetaChunk(cid, length, pack, offset, sealed_length))
            total += length
        if total != stream_length:
            raise bad("chunk lengths do not add up to the stream length")
        (m,) = _MAN_COUNT.unpack_from(data, pos)
        pos += _MAN_COUNT.size
        tail = 0
        if magic == MANIFEST_MAGIC:
            at = pos + m * _MAN_RANGE.size
            if m > MAX_PACK_RANGES or len(data) < at + _MAN_TAIL.size + _HASH_SIZE:
                raise bad("pack list has the wrong size")
            files, file_bytes, plen = _MAN_TAIL.unpack_from(data, at)
            tail = _MAN_TAIL.size + plen
            if plen > MAX_PARTNER_LIST:
                raise bad("the partner list is too large")
        if m > MAX_PACK_RANGES or len(data) != pos + m * _MAN_RANGE.size + tail + _HASH_SIZE:
            raise bad("pack list has the wrong size")
        ranges, end = [], 0
        for _ in range(m):
            first, count = _MAN_RANGE.unpack_from(data, pos)
            pos += _MAN_RANGE.size
            if count < 1 or first < 1 or first <= end or first + count >= 1 << 63:
                raise bad("pack ranges are not ascending, disjoint and apart")
            ranges.append((first, count))
            end = first + count
        if generation < 1:
            raise bad("generation 0")
        man = cls(generation, created, stream_length, records, digest, chunks, ranges)
        if tail:
            man.files, man.file_bytes = files, file_bytes
            man.partners = bytes(data[pos + _MAN_TAIL.size:pos + tail])
        return man


def _manifest_hash(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=_HASH_SIZE, person=b"bpfs.manifest").digest()


def _manifest_sealer(keys: KeyRing) -> Sealer:
    return Sealer(keys.derive("snapshot-manifest"))


def _manifest_aad(peer: bytes, generation: int) -> bytes:
    return _MANIFEST_AAD + peer + struct.pack("<Q", generation)


def _sign_root(keys: KeyRing, manifest: SnapshotManifest) -> bytes:
    peer = peer_id_bytes(keys.identity.public_key)
    sealed = _manifest_sealer(keys).seal(manifest.encode(), _manifest_aad(peer, manifest.generation))
    unsigned = SignedRoot(peer, manifest.generation, sealed, b"", manifest.created_ns)
    blob = SignedRoot(peer, manifest.generation, sealed, keys.identity.sign(unsigned.signed_message()),
                      manifest.created_ns).encode()
    if len(blob) > MAX_ROOT_SIZE:
        raise SnapshotError("the snapshot manifest is too large for a root")
    return blob


def open_manifest(keys: KeyRing, blob, min_generation: int = 0) -> SnapshotManifest:
    """The owner's side: verify a root with the store's own key and open its manifest."""
    root = verify_root(keys.identity.public_key, blob, min_generation)
    try:
        plain = _manifest_sealer(keys).open(root.sealed_manifest, _manifest_aad(root.peer_id, root.generation))
    except IntegrityError:
        raise SnapshotError("snapshot manifest does not open with this store's keys") from None
    manifest = SnapshotManifest.decode(plain)
    if manifest.generation != root.generation:
        raise SnapshotError("snapshot manifest belongs to another generation than its root")
    if root.version > 1 and manifest.created_ns != root.created_ns:
        raise SnapshotError("snapshot manifest and its root disagree on when it was made")
    manifest.root = bytes(blob)
    return manifest


# ----- the record stream ------------------------------------------------------------------------
def _check_shape(table: str, key: bytes, value: bytes) -> str | None:
    """Why a record cannot be in a snapshot, or None when it can."""
    if table == "meta":
        if not 1 <= len(key) <= _MAX_META_KEY or not all(0x21 <= b <= 0x7E for b in key):
            return "a counter name is not 1-64 printable characters"
    elif len(key) != _KEY_LENGTHS[table]:
        return f"a {table} key has {len(key)} bytes, expected {_KEY_LENGTHS[table]}"
    if table in _SEALED_TABLES:
        if not SEAL_OVERHEAD <= len(value) <= MAX_VALUE:
            return f"a sealed {table} value has {len(value)} bytes"
    elif len(value) != _PLAIN_VALUE_LENGTHS[table]:
        return f"a {table} value has {len(value)} bytes, expected {_PLAIN_VALUE_LENGTHS[table]}"
    return None


class _RangeBuilder:
    """Ascending pack ids (repeats allowed) into canonical (first, count) ranges."""

    def __init__(self):
        self.ranges: list[tuple[int, int]] = []

    def add(self, pack_id: int) -> None:
        if self.ranges:
            first, count = self.ranges[-1]
            if pack_id < first + count - 1:
                raise SnapshotError("pack ids out of order in the index")
            if pack_id == first + count - 1:
                return
            if pack_id == first + count:
                self.ranges[-1] = (first, count + 1)
                return
        self.ranges.append((pack_id, 1))


_BY_INODE = frozenset({"inodes", "extents", "xattrs", "symlinks", "orphans"})  # keys start with the ino


def _filtered(table: str, key: bytes, value: bytes, flt: ExportFilter, sealer) -> bytes | None:
    """The value of a record as the snapshot holds it, or None to leave the record out."""
    if table in _BY_INODE:
        return None if int.from_bytes(key[:8], "big") in flt.ignored else value
    if table == "dirents":
        if not flt.ignored:
            return value
        aad = record_aad(table, key)
        entries = Index._decode_bucket(sealer.open(value, aad))
        kept = [e for e in entries if e[1] not in flt.ignored]
        if len(kept) == len(entries):
            return value
        return sealer.reseal(Index._encode_bucket(kept), aad, value) if kept else None
    if table == "chunks":
        if key in flt.skip_chunks:
            return None
        refs = flt.refs.get(key)
        if refs is None:
            return value
        aad = record_aad(table, key)
        rec = ChunkRecord.unpack(sealer.open(value, aad))
        rec.refs = refs
        return sealer.reseal(rec.pack_bytes(), aad, value)
    if table == "packroots":
        return None if int.from_bytes(key, "big") in flt.skip_packs else value
    if table == "retired":
        return None if key in flt.skip_chunks else value
    if table == "packs":
        pack_id = int.from_bytes(key, "big")
        if pack_id in flt.skip_packs:
            return None
        loss = flt.pack_loss.get(pack_id)
        if loss is None:
            return value
        pack_rec = PackRecord.unpack(value)
        pack_rec.live_chunks -= loss[0]
        pack_rec.live_bytes -= loss[1]
        return pack_rec.pack()
    if table == "packchunks":
        if int.from_bytes(key[:8], "big") in flt.skip_packs or key[8:] in flt.skip_chunks:
            return None
    return value


def _stream(records, skip_packs: set[int], needed: _RangeBuilder, counts: list[int],
            flt: ExportFilter | None = None, sealer=None):
    """Yield the record stream of a read view, piece by piece; `counts` gets the records, and
    (given the records sealer) the regular files and their bytes. `flt` (with the records
    sealer) leaves out what stays local."""
    yield STREAM_MAGIC
    n = 0
    filtering = flt is not None and flt.active
    for t, table in enumerate(SNAPSHOT_TABLES):
        for key, value in records(table):
            if table in ("packs", "packroots") and int.from_bytes(key, "big") in skip_packs:
                continue  # a pack of metadata chunks: not needed to rebuild
            if filtering and flt is not None:
                value = _filtered(table, key, value, flt, sealer)
                if value is None:
                    continue
            if table == "packchunks":
                pack_id = int.from_bytes(key[:8], "big")
                if pack_id in skip_packs:
                    raise SnapshotError("a data chunk is recorded in a metadata pack")
                needed.add(pack_id)
            elif table == "inodes" and sealer is not None and len(counts) > 2:
                attr = Attr.unpack(0, sealer.open(value, record_aad(table, key)))
                if stat.S_ISREG(attr.mode):
                    counts[1] += 1
                    counts[2] += attr.size
            why = _check_shape(table, key, value)
            if why:
                raise SnapshotError(f"the index cannot be snapshotted: {why}")
            yield _REC.pack(t, len(key), len(value)) + key + value
            n += 1
    counts[0] = n
    yield bytes([_END]) + _END_COUNT.pack(n)


def _cut(pieces, chunker: Chunker):
    """Cut a stream of byte pieces into content-defined chunks, holding ~1 MiB at a time.

    Gives the same chunks as cutting the whole stream at once: a boundary found before the
    end of the buffer does not depend on what follows, so only the last chunk is cut again.
    """
    buf = bytearray()
    for piece in pieces:
        buf += piece
        if len(buf) >= _FEED_BYTES:
            data = bytes(buf)
            lengths = chunker.cut(data)
            if lengths[-1] < chunker.max_size:
                lengths.pop()
            pos = 0
            for n in lengths:
                yield data[pos:pos + n]
                pos += n
            del buf[:pos]
    if buf:
        data, pos = bytes(buf), 0
        for n in chunker.cut(data):
            yield data[pos:pos + n]
            pos += n


class _StreamReader:
    """Strict incremental parser of the record stream: bounded buffer, every length checked."""

    def __init__(self):
        self._buf = bytearray()
        self._consumed = 0  # stream bytes before _buf
        self._started = False
        self._ended = False
        self._table = -1
        self._last_key = b""
        self.records = 0

    def _error(self, at: int, why: str) -> SnapshotError:
        return SnapshotError(f"snapshot record stream is damaged at byte {self._consumed + at}: {why}")

    def feed(self, data) -> list[tuple[str, bytes, bytes]]:
        if self._ended and data:
            raise self._error(len(self._buf), "data after the end marker")
        buf = self._buf
        buf += data
        out: list[tuple[str, bytes, bytes]] = []
        pos = 0
        if not self._started:
            if len(buf) < len(STREAM_MAGIC):
                return out
            if buf[:len(STREAM_MAGIC)] != STREAM_MAGIC:
                raise self._error(0, "not a bpfs record stream")
            self._started, pos = True, len(STREAM_MAGIC)
        while pos < len(buf):
            if self._ended:
                raise self._error(pos, "data after the end marker")
            if buf[pos] == _END:
                if len(buf) - pos < 1 + _END_COUNT.size:
                    break
                (count,) = _END_COUNT.unpack_from(buf, pos + 1)
                if count != self.records:
                    raise self._error(pos, f"the end marker counts {count} records, the stream has {self.records}")
                self._ended = True
                pos += 1 + _END_COUNT.size
                continue
            if len(buf) - pos < _REC.size:
                break
            t, klen, vlen = _REC.unpack_from(buf, pos)
            if t >= len(SNAPSHOT_TABLES):
                raise self._error(pos, f"unknown table {t}")
            if not 1 <= klen <= MAX_KEY or vlen > MAX_VALUE:
                raise self._error(pos, f"record lengths out of bounds (key {klen}, value {vlen})")
            end = pos + _REC.size + klen + vlen
            if len(buf) < end:
                break
            key = bytes(buf[pos + _REC.size:pos + _REC.size + klen])
            value = bytes(buf[pos + _REC.size + klen:end])
            if t < self._table or (t == self._table and key <= self._last_key):
                raise self._error(pos, "records out of order or repeated")
            table = SNAPSHOT_TABLES[t]
            why = _check_shape(table, key, value)
            if why:
                raise self._error(pos, why)
            self._table, self._last_key = t, key
            self.records += 1
            out.append((table, key, value))
            pos = end
        del buf[:pos]
        self._consumed += pos
        return out

    def finish(self) -> None:
        if not self._ended:
            raise self._error(len(self._buf), "the stream ends before its end marker (truncated)")


# ----- metadata chunks --------------------------------------------------------------------------
def _chunker(keys: KeyRing) -> Chunker:
    """The metadata chunker: its own secret gear table (see `chunker`), smaller chunks."""
    return Chunker(keys.derive("metadata-chunker-gear-table"), META_AVG_SIZE, META_MIN_SIZE, META_MAX_SIZE)


def _seal_chunk(keys: KeyRing, cid: bytes, plain: bytes) -> bytearray:
    out = bytearray(sealed_chunk_size(len(plain)))
    out[NONCE_SIZE:NONCE_SIZE + len(plain)] = plain
    keys.data.seal_in_place(out, 0, padme(len(plain)), cid)
    return out


def open_meta_chunk(keys: KeyRing, chunk: MetaChunk, sealed) -> bytes:
    """Authenticate a fetched metadata chunk: AEAD bound to its id, padding, and the id itself."""
    where = f"metadata chunk {chunk.chunk_id[:6].hex()} (pack {chunk.pack:012x})"
    if not isinstance(sealed, (bytes, bytearray, memoryview)):
        raise SnapshotError(f"{where}: fetched {type(sealed).__name__}, not bytes")
    if len(sealed) != chunk.sealed_length:
        raise SnapshotError(f"{where}: {len(sealed)} bytes fetched, expected {chunk.sealed_length}")
    try:
        plain = keys.data.open(sealed, chunk.chunk_id)
    except IntegrityError:
        raise SnapshotError(f"{where} does not authenticate (damaged, swapped or forged)") from None
    if len(plain) != padme(chunk.length) or any(plain[chunk.length:]):
        raise SnapshotError(f"{where} has the wrong length")
    del plain[chunk.length:]
    data = bytes(plain)
    if keys.chunk_id(data) != chunk.chunk_id:
        raise SnapshotError(f"{where} does not match its id")
    return data


def _chunk_key(cid: bytes) -> bytes:
    return b"c" + cid


def _pack_key(pack_id: int) -> bytes:
    return b"p" + u64(pack_id)


def _root_key(generation: int) -> bytes:
    return b"r" + u64(generation)


def retained_generations(index: Index) -> list[int]:
    """Generations of the snapshots this store keeps, oldest first."""
    return [int.from_bytes(key[1:], "big") for key in index.snapshot_keys(b"r")]


def retained_root(index: Index, generation: int) -> bytes | None:
    """The signed root of a retained snapshot."""
    return index.get_snapshot_record(_root_key(generation))


def root_created(index: Index, keys: KeyRing, generation: int) -> int:
    """When a retained snapshot was made (ns), from its root (its manifest for a version 1 root)."""
    blob = index.get_snapshot_record(_root_key(generation))
    if blob is None:
        return 0
    root = SignedRoot.decode(blob)
    return root.created_ns if root.version > 1 else open_manifest(keys, blob).created_ns


def retained_roots(index: Index) -> list[tuple[int, bytes]]:
    """(generation, signed root) of every retained snapshot, oldest first."""
    return [(int.from_bytes(key[1:], "big"), blob) for key, blob in index.snapshot_records(b"r")]


def latest_root(index: Index) -> bytes | None:
    """The signed root of the newest retained snapshot (what partners should hold), if any."""
    gens = retained_generations(index)
    return retained_root(index, gens[-1]) if gens else None


def metadata_packs(index: Index) -> set[int]:
    return {int.from_bytes(key[1:], "big") for key, _ in index.snapshot_records(b"p")}


def needed_packs(index: Index, keys: KeyRing) -> set[int]:
    """Every pack some retained snapshot needs (its data packs and its metadata packs): the
    packs partners must keep until a newer snapshot no longer needs them."""
    out: set[int] = set()
    for _, blob in index.snapshot_records(b"r"):
        manifest = open_manifest(keys, blob)
        out.update(manifest.packs)
        out.update(c.pack for c in manifest.chunks)
    return out


def _release(index: Index, keys: KeyRing, generation: int) -> list[int]:
    """Drop one retained snapshot; return the metadata packs that became empty (to delete)."""
    blob = index.get_snapshot_record(_root_key(generation))
    if blob is None:
        return []
    manifest = open_manifest(keys, blob)
    dead = []
    for cid in dict.fromkeys(c.chunk_id for c in manifest.chunks):
        raw = index.get_snapshot_record(_chunk_key(cid))
        if raw is None:
            continue
        pack_id, offset, sealed_length, length, refs = _SNAPCHUNK.unpack(raw)
        if refs > 1:
            index.put_snapshot_record(_chunk_key(cid),
                                      _SNAPCHUNK.pack(pack_id, offset, sealed_length, length, refs - 1))
            continue
        index.delete_snapshot_record(_chunk_key(cid))
        pack = index.get_pack(pack_id)
        if pack is None:
            continue
        pack.live_chunks -= 1
        pack.live_bytes -= sealed_length
        if pack.live_chunks <= 0:
            index.delete_pack(pack_id)
            index.delete_snapshot_record(_pack_key(pack_id))
            dead.append(pack_id)
        else:
            index.put_pack(pack_id, pack)
    index.delete_snapshot_record(_root_key(generation))
    return dead


# ----- export -----------------------------------------------------------------------------------
def export_snapshot(index: Index, keys: KeyRing, packs: PackFiles, *, policy: RetentionPolicy | None = None,
                    partners: bytes = b"", clock=time.time_ns) -> SnapshotManifest:
    """Snapshot the index as of now: write its new metadata chunks, sign a root, retain it.

    Blocking, and nothing else may use the index meanwhile (an offline store, or a caller that
    holds the daemon's apply lock). Returns the manifest; `.root` is the signed root to hand
    to partners. Retained snapshots the `policy` (`history`) no longer keeps are released, and
    the retired chunks only they held are freed; `.stats` names the packs that became empty
    (deleted here, after the commit) and sparse (for the caller's compaction). `partners` (the
    partner list, JSON) travels sealed in the manifest.
    """
    policy = policy or RetentionPolicy()
    try:
        flt, emptied = prepare_export(index, packs)  # what stays local; no local pack is needed
    except IntegrityError as e:
        raise SnapshotError(f"a chunk that a replicated file uses cannot leave its local pack: {e}") from None
    packs.seal_open(index)  # metadata chunks go to packs of their own; sealed packs get their roots
    packs.sync()  # a checkpoint never points at pack bytes that are not on stable storage
    skip = metadata_packs(index)
    _record_pack_roots(index, packs, skip)
    index.commit()
    for pack_id in emptied:
        packs.delete(pack_id)
    retained = retained_generations(index)
    chunker = _chunker(keys)
    digest = hashlib.blake2b(digest_size=_HASH_SIZE)
    needed, counts = _RangeBuilder(), [0, 0, 0]
    listed: list[MetaChunk] = []
    placed: dict[bytes, MetaChunk] = {}
    new_packs: list[int] = []
    stream_length = new_bytes = 0
    try:
        with index.atomic():
            with index.read_view() as records:
                generation = int.from_bytes(dict(records("meta")).get(b"generation", bytes(8)), "big")
                if retained and generation <= retained[-1]:
                    raise SnapshotError(f"the index generation {generation} has not moved past the last "
                                        f"snapshot's {retained[-1]}")
                if generation < 1:
                    raise SnapshotError("the index has never been committed")
                for plain in _cut(_stream(records, skip, needed, counts, flt, keys.records), chunker):
                    digest.update(plain)
                    stream_length += len(plain)
                    cid = keys.chunk_id(plain)
                    chunk = placed.get(cid)
                    if chunk is None:
                        raw = index.get_snapshot_record(_chunk_key(cid))
                        if raw is not None:
                            pack_id, offset, sealed_length, length, _ = _SNAPCHUNK.unpack(raw)
                            chunk = MetaChunk(cid, length, pack_id, offset, sealed_length)
                        else:
                            chunk = placed[cid] = _write_chunk(index, keys, packs, cid, plain, new_packs)
                            new_bytes += chunk.sealed_length
                    if len(listed) >= MAX_META_CHUNKS:
                        raise SnapshotError("the index is too large for one snapshot")
                    listed.append(chunk)
            packs.seal_open(index)
            if placed:
                packs.sync()  # the chunks are on stable storage before the index records them
                packs.record_roots(index)  # of the new metadata packs
            _record_chunks(index, listed, placed)
            manifest = SnapshotManifest(generation, clock(), stream_length, counts[0], digest.digest(), listed,
                                        needed.ranges, counts[1], counts[2], partners)
            manifest.root = _sign_root(keys, manifest)
            index.put_snapshot_record(_root_key(generation), manifest.root)
            created = {g: root_created(index, keys, g) for g in retained}
            created[generation] = manifest.created_ns
            kept = keep_snapshots(list(created.items()), policy) | {generation}
            dead, released = [], [g for g in created if g not in kept]
            for old in released:
                dead += _release(index, keys, old)
            freed, sparse = thin(index, sorted(kept))
            dead += freed
    except BaseException:
        packs.seal_open(index)  # forget the pack being filled: its record was rolled back
        for pack_id in new_packs:
            packs.delete(pack_id)
        raise
    index.commit()
    for pack_id in dead:
        packs.delete(pack_id)
    manifest.stats = {"chunks": len(listed), "new_chunks": len(placed), "new_bytes": new_bytes,
                      "reused_chunks": sum(1 for c in listed if c.chunk_id not in placed),
                      "stream_bytes": stream_length, "records": counts[0], "released_packs": len(dead),
                      "released_snapshots": released, "dead_packs": dead, "sparse_packs": sorted(sparse - set(dead)),
                      "left_out_files": len(flt.ignored), "left_out_packs": len(flt.skip_packs)}
    return manifest


_ROOTS_READ_PER_EXPORT = 256 << 20  # bytes of packs an export reads at most to hash missing roots


def _record_pack_roots(index: Index, packs: PackFiles, skip: set[int]) -> None:
    """Sealed replicable data packs get their tree root in the index before a snapshot carries
    the `packroots` table (so a recovered store can audit its partners): the roots built while
    writing, and for a pack written before a crash, one hashed from its file (at most
    _ROOTS_READ_PER_EXPORT bytes of them per export; the replicator hashes the rest as it
    sends them, and the next snapshot carries them)."""
    packs.record_roots(index)
    budget = _ROOTS_READ_PER_EXPORT
    for pack_id, rec in list(index.all_packs()):
        if budget <= 0:
            break
        if rec.sealed and not rec.local and pack_id not in skip and index.get_pack_root(pack_id) is None:
            try:
                root, size = packs.root_of(pack_id)
            except IntegrityError:
                continue  # missing: verify names it; there is nothing to prove
            index.put_pack_root(pack_id, root, size)
            budget -= size


def _write_chunk(index: Index, keys: KeyRing, packs: PackFiles, cid: bytes, plain: bytes,
                 new_packs: list[int]) -> MetaChunk:
    sealed = _seal_chunk(keys, cid, plain)
    pack_id, offset = packs.reserve(index, len(sealed))
    if not new_packs or new_packs[-1] != pack_id:
        new_packs.append(pack_id)
    try:
        packs.write(pack_id, offset, sealed)
    finally:
        packs.finish(pack_id)
    return MetaChunk(cid, len(plain), pack_id, offset, len(sealed))


def _record_chunks(index: Index, listed: list[MetaChunk], placed: dict[bytes, MetaChunk]) -> None:
    """One reference per snapshot on each distinct chunk; new chunks count in their pack."""
    for cid, chunk in dict((c.chunk_id, c) for c in listed).items():
        raw = index.get_snapshot_record(_chunk_key(cid))
        refs = _SNAPCHUNK.unpack(raw)[4] if raw is not None else 0
        index.put_snapshot_record(_chunk_key(cid), _SNAPCHUNK.pack(chunk.pack, chunk.offset, chunk.sealed_length,
                                                                   chunk.length, refs + 1))
        if cid in placed:
            pack = index.get_pack(chunk.pack)
            assert pack is not None  # `placed`: the chunk was just placed in that pack
            pack.live_chunks += 1
            pack.live_bytes += chunk.sealed_length
            index.put_pack(chunk.pack, pack)
            index.put_snapshot_record(_pack_key(chunk.pack), b"")


def adopt_root(index: Index, keys: KeyRing, packs: PackFiles, blob) -> SnapshotManifest:
    """Retain a snapshot this store made before (a recovered store taking back its history from
    a partner): check the root, then record it and its metadata chunks as export does. Every
    metadata pack it names must be in the packs folder already; each becomes a sealed pack of the
    store (with its tree root, queued for replication: the partners hold it already). Blocking;
    the caller commits. Returns the manifest; a snapshot already retained is left as it is."""
    manifest = open_manifest(keys, blob)
    if index.get_snapshot_record(_root_key(manifest.generation)) is not None:
        return manifest
    for pack_id in sorted({c.pack for c in manifest.chunks}):
        if index.get_pack(pack_id) is None:
            try:
                root, size = packs.root_of(pack_id)
            except IntegrityError:
                raise SnapshotError(f"metadata pack {pack_id:012x} of snapshot {manifest.generation} is not here") \
                    from None
            index.put_pack(pack_id, PackRecord(0, 0, size, False))
            put = index.get_pack(pack_id)
            assert put is not None  # just put
            index.seal_pack(pack_id, put)
            index.put_pack_root(pack_id, root, size)
    fresh: dict[bytes, MetaChunk] = {}
    for chunk in manifest.chunks:
        if index.get_snapshot_record(_chunk_key(chunk.chunk_id)) is None:
            fresh.setdefault(chunk.chunk_id, chunk)
    _record_chunks(index, manifest.chunks, fresh)
    index.put_snapshot_record(_root_key(manifest.generation), bytes(blob))
    return manifest


# ----- rebuild ----------------------------------------------------------------------------------
def create_store_from_recovery_secret(store_dir: str, recovery_secret: str, passphrase: bytes,
                                      profile: str = "moderate") -> KeyRing:
    """A fresh, empty store with the keys (and identity) the recovery secret derives."""
    keys = KeyRing.from_recovery_secret(recovery_secret)
    return create_store(store_dir, passphrase, profile, root=keys._root)  # the key file wraps this root


def local_fetcher(packs: PackFiles):
    """fetch_chunk for `rebuild_index` reading another store's pack files on this machine."""
    def fetch(chunk_id: bytes, pack_id: int, offset: int, length: int) -> bytes:
        return packs.read(pack_id, offset, length)
    return fetch


_BATCH_BYTES = 32 << 20  # records written per LMDB transaction while rebuilding


class _IndexWriter:
    """A new LMDB environment with the index's tables, written in key order in batches."""

    def __init__(self, path: str):
        make_private_dir(path)
        self.env = lmdb.open(path, map_size=MAP_SIZE, max_dbs=len(TABLES) + 2, subdir=True, sync=True,
                             metasync=True, readahead=False, mode=0o600, max_readers=4, lock=True)
        with self.env.begin(write=True) as txn:
            self.dbs = {name: self.env.open_db(name.encode(), txn=txn) for name in TABLES}
        self.txn: lmdb.Transaction | None = self.env.begin(write=True)  # None once finished or closed
        self.pending = 0

    @property
    def _txn(self) -> lmdb.Transaction:
        if self.txn is None:
            raise RuntimeError("the index writer is finished")
        return self.txn

    def put(self, table: str, key: bytes, value: bytes) -> None:
        if not self._txn.put(key, value, db=self.dbs[table], append=True):
            raise SnapshotError(f"snapshot record stream: {table} keys out of order")
        self.pending += len(key) + len(value) + 16
        if self.pending >= _BATCH_BYTES:
            self._txn.commit()
            self.txn = self.env.begin(write=True)
            self.pending = 0

    def finish(self) -> None:
        self._txn.commit()
        self.txn = None
        self.env.sync(True)

    def close(self) -> None:
        if self.txn is not None:
            self.txn.abort()
            self.txn = None
        self.env.close()


def _require_fresh(index_dir: str, keys: KeyRing) -> None:
    index = Index(index_dir, keys)
    try:
        with index.read_view() as records:
            inodes = list(itertools.islice((k for k, _ in records("inodes")), 2))
            busy = [t for t in TABLES if t not in ("meta", "inodes") and next(records(t), None) is not None]
        if inodes != [u64(ROOT_INO)] or busy:
            raise SnapshotError("the store to rebuild is not freshly created (it holds files): refusing to "
                                "overwrite it")
    finally:
        index.close()


def rebuild_index(new_store_dir: str, keys: KeyRing, root_blob, fetch_chunk, *, min_generation: int = 0,
                  pack_id_floor: int = 0) -> SnapshotManifest:
    """Rebuild the index of a freshly created store (same root secret) from a signed root.

    `fetch_chunk(chunk_id, pack_id, offset, length)` returns the sealed bytes of one metadata
    chunk. Every chunk is authenticated and the record stream parsed strictly; the records go
    to a staging LMDB environment, written in batches (bounded memory), whose data file then
    replaces the fresh store's in one rename. On any error the store is left exactly as it was
    given (fresh and empty) and SnapshotError says why. Afterwards, putting the manifest's
    data packs (`.packs`) into the store's packs folder makes the store complete.
    `pack_id_floor`: new pack ids start above it (the highest id partners hold for us).
    """
    store_dir = require_store(new_store_dir)
    if read_public(key_path(store_dir)).get("public_key") != keys.identity.public_key.hex():
        raise SnapshotError(f"{store_dir} was not created from this recovery secret")
    manifest = open_manifest(keys, root_blob, min_generation)
    lock = StoreLock(store_dir)
    try:
        index_dir = os.path.join(store_dir, "index")
        _require_fresh(index_dir, keys)
        staging = index_dir + ".rebuild"
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted attempt
        try:
            manifest.stats = _build(staging, keys, manifest, fetch_chunk, pack_id_floor)
            os.replace(os.path.join(staging, "data.mdb"), os.path.join(index_dir, "data.mdb"))
            fsync_dir(index_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        lock.release()
    return manifest


def materialize(keys: KeyRing, packs: PackFiles, blob: bytes, path: str) -> SnapshotManifest:
    """Write the index of the snapshot whose signed root is `blob` (`retained_root`), as it
    was, into a new LMDB environment at `path` (which must not exist), from this store's own
    metadata chunks (blocking; it touches no index, so any thread may run it). Open it with
    `Index(path, keys, readonly=True)`: its records are the snapshot's, sealed as they were.
    Its chunk records give where each chunk was then; a chunk moved since (compaction) is where
    the live index says."""
    manifest = open_manifest(keys, blob)
    staging = path + ".part"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        manifest.stats = _build(staging, keys, manifest, local_fetcher(packs), 0, restore_counters=False)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _build(path: str, keys: KeyRing, manifest: SnapshotManifest, fetch_chunk, pack_id_floor: int, *,
           restore_counters: bool = True) -> dict:
    reader = _StreamReader()
    digest = hashlib.blake2b(digest_size=_HASH_SIZE)
    meta: dict[bytes, bytes] = {}
    packs_seen = packs_recorded = 0
    last_chunk_pack = last_pack_record = 0
    recorded: set[int] = set()
    max_ino = ROOT_INO
    writer = _IndexWriter(path)
    try:
        for i, chunk in enumerate(manifest.chunks):
            try:
                sealed = fetch_chunk(chunk.chunk_id, chunk.pack, chunk.offset, chunk.sealed_length)
            except Exception as e:  # a missing pack, a partner that went away, ...
                raise SnapshotError(f"metadata chunk {i + 1} of {len(manifest.chunks)} "
                                    f"({chunk.chunk_id[:6].hex()}) could not be fetched: {e}") from None
            plain = open_meta_chunk(keys, chunk, sealed)
            digest.update(plain)
            for table, key, value in reader.feed(plain):
                if table in _SEALED_TABLES:
                    try:
                        keys.records.open(value, record_aad(table, key))
                    except IntegrityError:
                        raise SnapshotError(f"snapshot record stream: a {table} record does not authenticate "
                                            "with this store's keys") from None
                if table == "meta":
                    meta[key] = value
                    continue
                if table == "inodes":
                    max_ino = max(max_ino, int.from_bytes(key, "big"))
                elif table == "packs":
                    pack_id = int.from_bytes(key, "big")
                    if manifest.needs_pack(pack_id):
                        packs_recorded += 1
                    last_pack_record = max(last_pack_record, pack_id)
                    recorded.add(pack_id)
                elif table == "packroots" and int.from_bytes(key, "big") not in recorded:
                    raise SnapshotError("snapshot record stream: a tree root for a pack it does not record")
                elif table == "packchunks":
                    pack_id = int.from_bytes(key[:8], "big")
                    if pack_id != last_chunk_pack:
                        if not manifest.needs_pack(pack_id):
                            raise SnapshotError(f"snapshot record stream: chunks in pack {pack_id:012x}, which the "
                                                "manifest does not list")
                        packs_seen += 1
                        last_chunk_pack = pack_id
                writer.put(table, key, value)
        reader.finish()
        if digest.digest() != manifest.stream_digest or reader.records != manifest.records:
            raise SnapshotError("snapshot record stream does not match its manifest")
        if packs_seen != manifest.pack_count or packs_recorded != manifest.pack_count:
            raise SnapshotError("snapshot record stream and manifest disagree on the packs needed")
        generation = int.from_bytes(meta.get(b"generation", bytes(8)), "big")
        if generation != manifest.generation:
            raise SnapshotError("snapshot record stream is of another generation than its manifest")

        def counter(name: bytes) -> int:
            return int.from_bytes(meta.get(name, bytes(8)), "big")

        if not restore_counters:  # a view of the snapshot as it was
            for key in sorted(meta):
                writer.put("meta", key, meta[key])
            writer.finish()
            return {"records": reader.records, "chunks": len(manifest.chunks), "stream_bytes": manifest.stream_length,
                    "packs": manifest.pack_count}
        # the next snapshot must outrank the root we came from, and no pack id may be reused
        meta[b"generation"] = u64(manifest.generation + 1)
        top_pack = max([counter(b"last_pack"), pack_id_floor, last_pack_record]
                       + [c.pack for c in manifest.chunks] + [f + n - 1 for f, n in manifest.pack_ranges])
        meta[b"last_pack"] = u64(top_pack)
        meta[b"last_ino"] = u64(max(counter(b"last_ino"), max_ino))
        for key in sorted(meta):
            writer.put("meta", key, meta[key])
        writer.finish()
    finally:
        writer.close()
    return {"records": reader.records, "chunks": len(manifest.chunks), "stream_bytes": manifest.stream_length,
            "packs": manifest.pack_count}
