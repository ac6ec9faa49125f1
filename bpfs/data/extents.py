"""The extent map of files: which chunk holds each byte range of an inode.

Owns the `extents` records and the `stored` byte count of inodes: punching a range out (an
overwrite, a truncate, a deletion) and recording the pieces a drain persisted. Every extent
holds one reference to its chunk, counted in `chunkmap`. Pure index work: no trio, no FUSE,
no pack files; callers hold the index (inside `Index.atomic` where all-or-nothing matters).
"""

from __future__ import annotations

from ..chunkmap import ChunkMap
from ..index import Extent, Index

ZERO_ID = b"\0" * 32  # marks an all-zero piece: stored as a hole
END = 1 << 63  # past the end of every file


def punch(index: Index, chunks: ChunkMap, ino: int, start: int, end: int) -> int:
    """Remove [start, end) from the extent map of `ino`; return the stored bytes removed."""
    removed = 0
    for e in index.extents(ino, start, end):
        index.delete_extent(ino, e.offset)
        if e.offset < start:  # keep the part before the range
            index.put_extent(ino, Extent(e.offset, e.chunk_id, e.chunk_offset, start - e.offset))
            chunks.ref(e.chunk_id)
        if e.end > end:  # keep the part after the range
            index.put_extent(ino, Extent(end, e.chunk_id, e.chunk_offset + end - e.offset, e.end - end))
            chunks.ref(e.chunk_id)
        removed += min(e.end, end) - max(e.offset, start)
        chunks.unref(e.chunk_id)
    return removed


def record(index: Index, chunks: ChunkMap, ino: int, start: int, pieces, local_packs=None) -> list[bytes] | None:
    """Record `pieces` (offset from `start`, length, chunk id or ZERO_ID for a hole) as the
    content of `ino` from file offset `start`; their chunks must be in the index. Returns the
    ids of the chunks in `local_packs` it now uses (None: watch none), or None when the inode
    is gone (deleted while its data was written: nothing is recorded)."""
    attr = index.get_attr(ino)
    if attr is None:
        return None
    used_local = []
    stored_delta = 0
    for pos, length, cid in pieces:
        offset = start + pos
        if cid != ZERO_ID:
            rec = chunks.ref(cid)  # before the punch, which may drop the last old reference
            if local_packs is not None and rec.pack in local_packs:
                used_local.append(cid)
        stored_delta -= punch(index, chunks, ino, offset, offset + length)
        if cid != ZERO_ID:
            index.put_extent(ino, Extent(offset, cid, 0, length))
            stored_delta += length
    attr.stored += stored_delta
    index.put_attr(attr)
    return used_local
