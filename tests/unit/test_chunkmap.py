"""Chunk bookkeeping (`bpfs.chunkmap`) and the extent map (`bpfs.data.extents`) against a real
index: reference counts, retire or free, packs' live counts, dead and sparse packs, moves.
No trio, no FUSE, no pack files."""

from __future__ import annotations

import os
import stat

import pytest

from bpfs import chunkmap
from bpfs.chunkmap import ChunkMap
from bpfs.data import extents
from bpfs.data.extents import ZERO_ID
from bpfs.index import LANE_LOCAL, LANE_NORMAL, Attr, ChunkRecord, Extent, Index, PackRecord, u64
from bpfs.keyfile import KeyRing

SEALED = 100  # sealed length of every chunk here


@pytest.fixture
def index(tmp_path):
    idx = Index(str(tmp_path / "index"), KeyRing(os.urandom(20)))
    yield idx
    idx.close()


def cid(n: int) -> bytes:
    return n.to_bytes(32, "big")


def add_pack(index: Index, pack_id: int, size: int = 1000, sealed: bool = True, lane: int = LANE_NORMAL) -> None:
    index.put_pack(pack_id, PackRecord(0, 0, size, sealed, lane))


def record(pack: int, offset: int = 0, refs: int = 0, born: int = 0) -> ChunkRecord:
    return ChunkRecord(pack, offset, SEALED, SEALED - 40, refs, born=born)


def retain_snapshot(index: Index, generation: int) -> None:
    index.put_snapshot_record(b"r" + u64(generation), b"manifest")


def live(index: Index, pack_id: int) -> tuple[int, int] | None:
    rec = index.get_pack(pack_id)
    return None if rec is None else (rec.live_chunks, rec.live_bytes)


class Recorder:
    def __init__(self):
        self.freed: list[bytes] = []

    def __call__(self, chunk_id: bytes) -> None:
        self.freed.append(chunk_id)


@pytest.fixture
def freed():
    return Recorder()


@pytest.fixture
def chunks(index, freed):
    cm = ChunkMap(index, set(), on_free=freed)
    add_pack(index, 1)  # after the map read the packs: not found sparse, as if filled meanwhile
    add_pack(index, 2)
    return cm


# ----- new chunks and references ---------------------------------------------------------------
def test_add_counts_the_chunk_in_its_pack_once(index, chunks):
    assert chunks.add(cid(1), record(1))
    assert not chunks.add(cid(1), record(2, 500))  # stored meanwhile by another writer: kept where it is
    assert index.get_chunk(cid(1)).pack == 1
    assert live(index, 1) == (1, SEALED)
    assert live(index, 2) == (0, 0)
    assert index.chunks_in_pack(1) == [cid(1)]
    assert index.chunks_in_pack(2) == []


def test_refs_count_up_and_down(index, chunks, freed):
    chunks.add(cid(1), record(1))
    chunks.add(cid(2), record(1, 100))
    assert chunks.ref(cid(1)).refs == 1
    assert chunks.ref(cid(1)).refs == 2
    chunks.unref(cid(1))
    assert index.get_chunk(cid(1)).refs == 1
    assert freed.freed == []
    chunks.unref(cid(1))
    assert index.get_chunk(cid(1)) is None  # no snapshot: freed at once
    assert freed.freed == [cid(1)]
    assert index.get_retired(cid(1)) is None
    assert live(index, 1) == (1, SEALED)
    assert index.chunks_in_pack(1) == [cid(2)]
    chunks.unref(cid(9))  # unknown: nothing happens


def test_last_reference_retires_a_chunk_a_retained_snapshot_holds(index, chunks, freed):
    chunks.add(cid(1), record(1, born=2))
    chunks.ref(cid(1))
    retain_snapshot(index, 3)  # made after the chunk was stored: it holds the chunk
    index.put_counter("generation", 5)
    chunks.unref(cid(1))
    rec = index.get_chunk(cid(1))
    assert rec is not None and rec.refs == 0
    assert index.get_retired(cid(1)) == 5
    assert freed.freed == []
    assert live(index, 1) == (1, SEALED)  # still in its pack
    assert chunks.ref(cid(1)).refs == 1  # in use again: no longer retired
    assert index.get_retired(cid(1)) is None


def test_chunk_stored_after_the_newest_snapshot_is_freed(index, chunks, freed):
    retain_snapshot(index, 3)
    chunks.add(cid(1), record(1, born=3))  # stored in a transaction after generation 3 was committed
    chunks.ref(cid(1))
    chunks.unref(cid(1))
    assert index.get_chunk(cid(1)) is None
    assert index.get_retired(cid(1)) is None
    assert freed.freed == [cid(1)]


def test_chunk_in_a_local_pack_is_never_retired(index, freed):
    add_pack(index, 7, lane=LANE_LOCAL)
    local: set[int] = set()
    chunks = ChunkMap(index, local, on_free=freed)
    assert local == {7}  # the older local packs are added to the shared set
    chunks.add(cid(1), record(7, born=1))
    chunks.ref(cid(1))
    retain_snapshot(index, 4)
    chunks.unref(cid(1))
    assert index.get_chunk(cid(1)) is None
    assert index.get_retired(cid(1)) is None


def test_release_if_unused(index, chunks, freed):
    chunks.add(cid(1), record(1, born=1))
    chunks.add(cid(2), record(1, 100, born=1))
    chunks.add(cid(3), record(1, 200, born=1))
    chunks.ref(cid(2))
    retain_snapshot(index, 2)
    chunks.ref(cid(3))
    chunks.unref(cid(3))  # retired
    for c in (cid(1), cid(2), cid(3), cid(4)):
        chunks.release_if_unused(c)
    assert index.get_chunk(cid(1)) is not None and index.get_retired(cid(1)) is not None  # unused: retired
    assert index.get_chunk(cid(2)).refs == 1
    assert index.get_retired(cid(3)) is not None
    assert freed.freed == []


# ----- packs -------------------------------------------------------------------------------------
def test_sealed_pack_goes_when_its_last_chunk_does(index, chunks):
    chunks.add(cid(1), record(1))
    chunks.add(cid(2), record(2))
    index.put_pack(2, PackRecord(1, SEALED, 1000, False))  # the open pack: stays, even empty
    for c in (cid(1), cid(2)):
        chunks.ref(c)
        chunks.unref(c)
    assert index.get_pack(1) is None
    assert live(index, 2) == (0, 0)
    assert chunks.dead == [1]
    assert chunks.take_dead() == [1]
    assert chunks.dead == []


def test_pack_less_than_half_alive_is_sparse(index, chunks):
    for n in range(1, 6):
        chunks.add(cid(n), record(1, (n - 1) * SEALED))
        chunks.ref(cid(n))
    chunks.unref(cid(1))  # 400 of 1000 bytes alive: sparse
    assert chunks.sparse == {1}
    assert live(index, 1) == (4, 4 * SEALED)
    for n in range(2, 6):
        chunks.unref(cid(n))
    assert chunks.dead == [1] and chunks.sparse == set()  # dead is no longer to be compacted


def test_constructor_finds_sparse_packs(index):
    index.put_pack(1, PackRecord(1, 100, 1000, True))
    index.put_pack(2, PackRecord(1, 100, 1000, False))  # open: never compacted
    index.put_pack(3, PackRecord(6, 600, 1000, True))
    assert ChunkMap(index, set()).sparse == {1}


def test_note_packs(chunks):
    chunks.note_packs(sparse=[3, 4])
    chunks.note_packs(dead=[4])
    assert chunks.sparse == {3}
    assert chunks.dead == [4]


def test_pack_lost_and_gained(index):
    add_pack(index, 1, size=300)
    chunkmap.pack_gained(index, 1, 100)
    chunkmap.pack_gained(index, 1, 100)
    assert live(index, 1) == (2, 200)
    assert chunkmap.pack_lost(index, 1, 100) == chunkmap.SPARSE
    assert chunkmap.pack_lost(index, 1, 100) == chunkmap.DEAD
    assert index.get_pack(1) is None
    assert chunkmap.pack_lost(index, 1, 100) is None  # gone already


# ----- moves -------------------------------------------------------------------------------------
def test_move_points_the_chunk_at_its_copy(index, chunks):
    chunks.add(cid(1), record(1))
    chunks.ref(cid(1))
    old = index.get_chunk(cid(1))
    assert chunks.move(cid(1), old, 2, 300)
    rec = index.get_chunk(cid(1))
    assert (rec.pack, rec.offset, rec.refs) == (2, 300, 1)
    assert index.chunks_in_pack(1) == [] and index.chunks_in_pack(2) == [cid(1)]
    assert live(index, 2) == (1, SEALED)
    assert index.get_pack(1) is None and chunks.dead == [1]


def test_move_leaves_a_chunk_moved_or_freed_meanwhile(index, chunks):
    chunks.add(cid(1), record(1))
    chunks.add(cid(2), record(1, 100))
    stale = index.get_chunk(cid(1))
    assert chunks.move(cid(1), stale, 2, 0)
    assert not chunks.move(cid(1), stale, 2, 500)  # moved meanwhile: the second copy is garbage
    assert index.get_chunk(cid(1)).offset == 0
    gone = index.get_chunk(cid(2))
    chunks.release(cid(2), gone)
    assert not chunks.move(cid(2), gone, 2, 600)
    assert live(index, 2) == (1, SEALED)


def test_move_chunk_reports_the_old_pack(index):
    add_pack(index, 1, size=SEALED)
    add_pack(index, 2, sealed=False)
    rec = record(1)
    index.put_chunk(cid(1), rec, None)
    chunkmap.pack_gained(index, 1, SEALED)
    assert chunkmap.move_chunk(index, cid(1), rec, 2, 0) == chunkmap.DEAD
    assert index.get_chunk(cid(1)).pack == 2
    assert live(index, 2) == (1, SEALED)


# ----- the extent map ----------------------------------------------------------------------------
def test_extents_record_and_punch(index, chunks, freed):
    index.put_attr(Attr(5, stat.S_IFREG | 0o644, 0, 0, 1))
    for n in (1, 2):
        chunks.add(cid(n), record(1, (n - 1) * SEALED))
    pieces = [(0, 60, cid(1)), (60, 60, ZERO_ID), (120, 60, cid(2))]
    assert extents.record(index, chunks, 5, 1000, pieces) == []
    assert index.get_attr(5).stored == 120  # the hole is not stored
    assert [(e.offset, e.length) for e in index.extents(5)] == [(1000, 60), (1120, 60)]
    assert index.get_chunk(cid(1)).refs == 1 and index.get_chunk(cid(2)).refs == 1
    # punch the middle of the first extent: two pieces of it remain, one reference each
    assert extents.punch(index, chunks, 5, 1010, 1020) == 10
    assert index.get_attr(5).stored == 120  # the caller accounts for what a punch removed
    assert index.extents(5, 0, 1100) == [Extent(1000, cid(1), 0, 10), Extent(1020, cid(1), 20, 40)]
    assert index.get_chunk(cid(1)).refs == 2
    # overwrite everything with chunk 1 again, then drop it all
    extents.record(index, chunks, 5, 1000, [(0, 180, cid(1))])
    assert index.get_chunk(cid(2)) is None and freed.freed == [cid(2)]
    assert index.get_chunk(cid(1)).refs == 1
    assert index.get_attr(5).stored == 120 - 110 + 180
    assert extents.punch(index, chunks, 5, 0, extents.END) == 180
    assert index.get_chunk(cid(1)) is None
    assert index.get_pack(1) is None and chunks.dead == [1]


def test_extents_record_reports_local_chunks_and_missing_inodes(index, chunks):
    add_pack(index, 7, lane=LANE_LOCAL)
    index.put_attr(Attr(5, stat.S_IFREG | 0o644, 0, 0, 1))
    chunks.add(cid(1), record(7))
    chunks.add(cid(2), record(1))
    pieces = [(0, 60, cid(1)), (60, 60, cid(2))]
    assert extents.record(index, chunks, 5, 0, pieces, local_packs={7}) == [cid(1)]
    assert extents.record(index, chunks, 6, 0, pieces, local_packs={7}) is None  # deleted meanwhile
    assert index.get_chunk(cid(1)).refs == 1
