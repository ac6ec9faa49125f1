"""Chunk-to-pack bookkeeping shared by everything that frees or moves chunks.

Owns what happens to a pack's live counts when a chunk leaves it: the pack record's counts go
down, and an empty sealed pack is deleted from the index (its file goes after the next
commit, by the caller), or a pack less than half alive is reported for compaction. Used by the
file data layer (freeing, compaction), `lanes` (moving chunks between lanes) and `history`
(freeing chunks no retained snapshot holds any more). Pure index work: no trio, no FUSE.
"""

from __future__ import annotations

from .index import Index

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
