"""Chunk bookkeeping: reference counts, where each chunk lives, and its packs' live counts.

Owns every change to chunk records (`chunks`, `packchunks`, `retired`) and to the live counts of
pack records, so the layers above never edit those records field by field:

- a new chunk is recorded (`ChunkMap.add`) and counted in its pack;
- references come and go (`ref`, `unref`); when the last one goes the chunk is *retired* while a
  retained snapshot holds it (kept with refcount 0 and a `retired` record; a chunk stored after
  the newest snapshot, or in a local pack, which no snapshot contains, is freed at once; see
  `history`), else freed: its record goes and its pack loses it;
- a chunk moves to another pack (`move`, `move_chunk`: compaction, promotion out of local packs,
  the snapshot exporter's `lanes.move_chunk_now`);
- a pack that loses a chunk (`pack_lost`) is deleted from the index when it is sealed and empty
  (DEAD: its file goes after the next commit, by the caller) or reported for compaction when it
  is sealed and less than half alive (SPARSE).

The module functions are the primitives (`history` and `lanes` use them on their own); the
`ChunkMap` class is the mounted store's view, which also remembers the packs found dead or
sparse. Pure index work: no trio, no FUSE, no pack files.
"""

from __future__ import annotations

from .index import LANE_LOCAL, ChunkRecord, Index

DEAD, SPARSE = "dead", "sparse"


def pack_lost(index: Index, pack_id: int, sealed_length: int) -> str | None:
    """One chunk of `sealed_length` bytes left `pack_id`. Returns DEAD when the pack record was
    deleted (delete its file after the commit), SPARSE when it is sealed and less than half
    alive (compact it), else None."""
    pack = index.get_pack(pack_id)
    if pack is None:
        return None
    pack.live_chunks -= 1
    pack.live_bytes -= sealed_length
    if pack.live_chunks <= 0 and pack.sealed:
        index.delete_pack(pack_id)
        return DEAD
    index.put_pack(pack_id, pack)
    if pack.sealed and pack.live_bytes * 2 < pack.size:
        return SPARSE
    return None


def pack_gained(index: Index, pack_id: int, sealed_length: int) -> None:
    """One chunk of `sealed_length` bytes now lives in `pack_id` (a reserved place in it)."""
    pack = index.get_pack(pack_id)
    assert pack is not None  # the place reserved for it is in a pack the index has
    pack.live_chunks += 1
    pack.live_bytes += sealed_length
    index.put_pack(pack_id, pack)


def move_chunk(index: Index, cid: bytes, rec: ChunkRecord, new_pack: int, new_offset: int) -> str | None:
    """Point chunk `cid` (its current record `rec`, updated in place) at its copy in `new_pack`
    and count it there; returns what became of its old pack (see `pack_lost`)."""
    old_pack = rec.pack
    rec.pack, rec.offset = new_pack, new_offset
    index.put_chunk(cid, rec, old_pack)
    pack_gained(index, new_pack, rec.sealed_length)
    return pack_lost(index, old_pack, rec.sealed_length)


class ChunkMap:
    """The chunks of a mounted store: their references, places and packs.

    Attributes:
        index: the live index (every method changes it in its current transaction).
        local_packs: ids of local-lane packs; shared with `packs.PackFiles.local_ids`, which adds
            the packs it starts (the constructor adds the older ones). Their chunks are never in
            a snapshot, so they are freed, never retired.
        on_free: called with the id of every chunk freed (the reader drops it from its cache).
        dead: packs whose records went: delete their files after the next commit (`take_dead`).
        sparse: sealed packs less than half alive: compact them.
    """

    def __init__(self, index: Index, local_packs: set[int], on_free=None):
        self.index = index
        self.local_packs = local_packs
        self.on_free = on_free
        self.dead: list[int] = []
        self.sparse: set[int] = set()
        for pack_id, rec in index.all_packs():
            if rec.sealed and rec.live_bytes * 2 < rec.size:
                self.sparse.add(pack_id)
            if rec.lane == LANE_LOCAL:
                local_packs.add(pack_id)

    # ----- new chunks and references -------------------------------------------------------------
    def add(self, cid: bytes, rec: ChunkRecord) -> bool:
        """Record a chunk just stored at `rec`'s place and count it in its pack, unless the store
        holds it already (another writer stored it meanwhile: the new copy is garbage)."""
        if self.index.get_chunk(cid) is not None:
            return False
        self.index.put_chunk(cid, rec, None)
        pack_gained(self.index, rec.pack, rec.sealed_length)
        return True

    def ref(self, cid: bytes) -> ChunkRecord:
        """One more reference to `cid` (which must exist); a retired chunk is in use again."""
        rec = self.index.get_chunk(cid)
        assert rec is not None  # (see the docstring)
        if rec.refs == 0:  # kept only for retained snapshots until now: in use again
            self.index.delete_retired(cid)
        rec.refs += 1
        self.index.put_chunk(cid, rec, rec.pack)
        return rec

    def unref(self, cid: bytes) -> None:
        """One reference to `cid` fewer; the last one retires or frees it (`release`)."""
        rec = self.index.get_chunk(cid)
        if rec is None:
            return
        rec.refs -= 1
        if rec.refs > 0:
            self.index.put_chunk(cid, rec, rec.pack)
        else:
            self.release(cid, rec)

    def release_if_unused(self, cid: bytes) -> None:
        """Release a chunk just added that nothing references (its file was deleted meanwhile)."""
        rec = self.index.get_chunk(cid)
        if rec is not None and rec.refs == 0 and self.index.get_retired(cid) is None:
            self.release(cid, rec)

    def release(self, cid: bytes, rec: ChunkRecord) -> None:
        """The chunk's last reference went: retire it while a retained snapshot holds it (one
        made after it was stored; see `history`), else free it."""
        if rec.born < self.index.last_snapshot_generation() and rec.pack not in self.local_packs:
            rec.refs = 0
            self.index.put_chunk(cid, rec, rec.pack)
            self.index.put_retired(cid, self.index.generation)
            return
        self.free(cid, rec)

    def free(self, cid: bytes, rec: ChunkRecord) -> None:
        """Delete the chunk's record; its pack loses it."""
        self.index.delete_chunk(cid, rec.pack)
        if self.on_free is not None:
            self.on_free(cid)
        self._pack_change(rec.pack, pack_lost(self.index, rec.pack, rec.sealed_length))

    # ----- places -------------------------------------------------------------------------------
    def move(self, cid: bytes, old: ChunkRecord, new_pack: int, new_offset: int) -> bool:
        """Point `cid` at its copy in `new_pack` if it is still where `old` says; returns whether
        it moved (a chunk freed or moved meanwhile keeps its place: the copy is garbage)."""
        rec = self.index.get_chunk(cid)
        if rec is None or (rec.pack, rec.offset) != (old.pack, old.offset):
            return False
        self._pack_change(old.pack, move_chunk(self.index, cid, rec, new_pack, new_offset))
        return True

    # ----- packs ---------------------------------------------------------------------------------
    def _pack_change(self, pack_id: int, change: str | None) -> None:
        if change == DEAD:
            self.note_packs(dead=[pack_id])
        elif change == SPARSE:
            self.note_packs(sparse=[pack_id])

    def note_packs(self, dead=(), sparse=()) -> None:
        """Packs found dead or sparse elsewhere (`history`, `lanes`, or here)."""
        for pack_id in dead:
            self.dead.append(pack_id)
            self.sparse.discard(pack_id)
        self.sparse.update(sparse)

    def take_dead(self) -> list[int]:
        """The dead packs noted so far, forgotten here (the caller deletes their files)."""
        dead, self.dead = self.dead, []
        return dead
