"""Space on the drive: deleted and overwritten data is given back.

Packs hold many chunks; when files are deleted the packs that become empty are deleted,
and packs that are less than half alive are compacted (their live chunks moved, the pack
deleted). These tests measure the store on disk, so they can only pass if space is
really reclaimed, and check that every surviving byte is still intact.
"""

from __future__ import annotations

import hashlib
import os
import random

from tests.helpers.files import dir_apparent_size, sha256_file
from tests.helpers.procs import wait_until

MiB = 1 << 20


def _packs_size(store) -> int:
    return dir_apparent_size(store / "packs")


def test_deleted_files_free_their_packs(mounted):
    rng = random.Random(7)
    keep = mounted.mnt / "keep"
    keep.write_bytes(rng.randbytes(3 * MiB))
    keep_sha = sha256_file(keep)
    for i in range(4):
        (mounted.mnt / f"big{i}").write_bytes(rng.randbytes(24 * MiB))
    full = _packs_size(mounted.store)
    assert full > 90 * MiB, f"96 MiB of random data stored in only {full} bytes"
    for i in range(4):
        os.unlink(mounted.mnt / f"big{i}")
    # emptied packs go at the next commit, sparse ones are compacted by the daemon
    assert wait_until(lambda: _packs_size(mounted.store) < 40 * MiB, timeout=20), \
        f"packs still hold {_packs_size(mounted.store)} bytes after deleting 96 of 99 MiB"
    mounted.remount()  # the pack that was open is sealed now, and compacted after mounting
    assert wait_until(lambda: _packs_size(mounted.store) < 8 * MiB, timeout=20), \
        f"packs still hold {_packs_size(mounted.store)} bytes for 3 MiB of live data"
    assert sha256_file(mounted.mnt / "keep") == keep_sha
    mounted.umount()
    cp = mounted.verify("--read-data")
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_overwritten_ranges_are_reclaimed(mounted):
    """A file rewritten in place many times (a database) does not grow the store forever."""
    rng = random.Random(8)
    path = mounted.mnt / "db"
    data = bytearray(rng.randbytes(16 * MiB))
    path.write_bytes(data)
    with open(path, "r+b") as f:
        for _ in range(12):  # rewrite the whole file, in 64 KiB pieces at random offsets
            offsets = list(range(0, len(data), 64 * 1024))
            rng.shuffle(offsets)
            for off in offsets:
                piece = rng.randbytes(64 * 1024)
                data[off:off + len(piece)] = piece
                f.seek(off)
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
    mounted.remount()
    assert wait_until(lambda: _packs_size(mounted.store) < 48 * MiB, timeout=30), \
        f"16 MiB file rewritten 12 times occupies {_packs_size(mounted.store)} bytes of packs"
    assert sha256_file(path) == hashlib.sha256(bytes(data)).hexdigest()
    mounted.umount()
    cp = mounted.verify("--read-data")
    assert cp.returncode == 0, cp.stdout + cp.stderr
