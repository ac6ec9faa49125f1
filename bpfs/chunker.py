"""Content-defined chunking over a secret gear table (FastCDC 2020, in our C extension `_gearcdc`).

Boundaries depend on content, so shifted or re-copied data produces the same chunks. The cut
test looks at bits of a gear hash (hash = 2 * hash + table[byte]), and the table is a store
secret: 256 independent 64-bit entries from a PRF keyed with a key derived from the master key
(`gear_table`), not a public table XORed with one 64-bit constant. With the constant, bit j of
the hash depended only on bits 0..j of the constant, so one known file and its cut points gave
the constant away bit by bit (1.4 s for a 48 MiB file; IACR eprint 2025/532), and with it the
cut points of any candidate file. With a whole secret table that search has nothing to grow
from: every table entry is a fresh unknown (tests/mount/test_security_drive.py runs the search
against both). This is defence in depth: the drive no longer shows chunk boundaries (see
`index`, extents), and partners see only sealed, padded packs.

Chunks are 1 MiB on average, 256 KiB to 4 MiB; the metadata chunker of snapshots uses its own
table and smaller sizes (see `snapshot`). Stores chunked before with the seeded public table
stay readable (chunks are named by their content, whatever cut them); new writes are cut with
the secret table, so they do not deduplicate against data written before the change.

The extension releases the GIL for the whole cut and runs at about the speed pyfastcdc did
(`python bench/chunking.py`).
"""

from __future__ import annotations

import hashlib

from . import _gearcdc

AVG_SIZE = 1 << 20
MIN_SIZE = 256 << 10
MAX_SIZE = 4 << 20

# FastCDC's masks (as in pyfastcdc and the Rust `fastcdc` crate): MASKS[n] has n bits set,
# spread over bits 12..47; normalized chunking level 1 uses n = log2(avg) +- 1.
_MASKS = {
    5: 0x0000000001804110, 6: 0x0000000001803110, 7: 0x0000000018035100, 8: 0x0000001800035300,
    9: 0x0000019000353000, 10: 0x0000590003530000, 11: 0x0000d90003530000, 12: 0x0000d90103530000,
    13: 0x0000d90303530000, 14: 0x0000d90313530000, 15: 0x0000d90f03530000, 16: 0x0000d90303537000,
    17: 0x0000d90703537000, 18: 0x0000d90707537000, 19: 0x0000d91707537000, 20: 0x0000d91747537000,
    21: 0x0000d91767537000, 22: 0x0000d93767537000, 23: 0x0000d93777537000, 24: 0x0000d93777577000,
    25: 0x0000db3777577000,
}


def gear_table(key: bytes) -> bytes:
    """The secret gear table of `key`: 256 little-endian 64-bit entries, keyed BLAKE2b in counter
    mode (32 blocks of 64 bytes), personalised for this use only."""
    if len(key) < 16:
        raise ValueError("a gear table key must have at least 16 bytes")
    return b"".join(hashlib.blake2b(i.to_bytes(4, "little"), key=key, digest_size=64, person=b"bpfs.gear.v1").digest()
                    for i in range(32))


class Chunker:
    """Cuts byte strings at content-defined boundaries under one secret gear table."""

    __slots__ = ("max_size", "_args")

    def __init__(self, key: bytes, avg_size: int = AVG_SIZE, min_size: int = MIN_SIZE, max_size: int = MAX_SIZE):
        bits = avg_size.bit_length() - 1
        if avg_size != 1 << bits or bits - 1 not in _MASKS or bits + 1 not in _MASKS:
            raise ValueError("avg_size must be a power of two from 64 B to 8 MiB")
        self.max_size = max_size
        self._args = (gear_table(key), min_size, avg_size, max_size, _MASKS[bits + 1], _MASKS[bits - 1])

    def cut(self, data) -> list[int]:
        """Lengths of the chunks of `data`; the last one ends at the end of `data`."""
        if not len(data):
            return []
        table, min_size, avg_size, max_size, mask_s, mask_l = self._args
        return _gearcdc.cut(table, data, min_size, avg_size, max_size, mask_s, mask_l)
