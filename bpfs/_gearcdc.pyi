"""Type stub of the C extension `bpfs/_gearcdc.c` (type checkers cannot read a compiled module)."""

from typing_extensions import Buffer

def cut(table: Buffer, data: Buffer, min_size: int, avg_size: int, max_size: int, mask_s: int, mask_l: int,
        /) -> list[int]:
    """Lengths of the content-defined chunks of `data` (the last one ends at the end of `data`)."""
