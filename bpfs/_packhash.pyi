"""Type stub of the C extension `bpfs/_packhash.c` (type checkers cannot read a compiled module)."""

from typing_extensions import Buffer

def leaf_hashes(data: Buffer, first_index: int, leaf_size: int, person: Buffer, /) -> bytes:
    """The 32-byte hashes of `data`'s whole leaves, back to back (see `packtree.hash_leaf`)."""

LANES: int
"""Leaves hashed side by side per compression call: 4 with AVX2, else 1 (1 with BPFS_PACKHASH_SCALAR=1)."""
