"""Deduplication: repeated data must cost (almost) nothing in the store.

Store growth is measured on the packs (apparent size) after umount, so that
everything is flushed.  Full-size versions (1 GiB / 256 MiB) live in bench/.
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from tests.helpers.files import checksums, dir_apparent_size, sha256_bytes, sha256_file

KiB, MiB = 1 << 10, 1 << 20


def packs_size(store: Path) -> int:
    p = store / "packs"
    return dir_apparent_size(p) if p.exists() else 0


def make_mixed_tree(root: Path, seed: int) -> int:
    """~64 MiB of random files of mixed sizes in nested dirs.  Returns total bytes."""
    rng = random.Random(seed)
    sizes = ([rng.randrange(1, 32 * KiB) for _ in range(250)]
             + [rng.randrange(64 * KiB, MiB) for _ in range(60)]
             + [8 * MiB + rng.randrange(MiB) for _ in range(3)])
    rng.shuffle(sizes)
    dirs = [root]
    root.mkdir(parents=True)
    for i in range(20):
        d = rng.choice(dirs) / f"d{i}"
        d.mkdir()
        dirs.append(d)
    total = 0
    for i, size in enumerate(sizes):
        (rng.choice(dirs) / f"file{i}.bin").write_bytes(rng.randbytes(size))
        total += size
    return total


@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_second_copy_of_tree_is_nearly_free(mounted, tmp_path):
    src = tmp_path / "src"
    total = make_mixed_tree(src, seed=201)
    assert 56 * MiB < total < 72 * MiB
    expect = checksums(src)

    mounted.umount()
    p0, s0 = packs_size(mounted.store), dir_apparent_size(mounted.store)
    mounted.mount()
    subprocess.run(["cp", "-a", str(src), str(mounted.mnt / "copy1")], check=True)
    mounted.umount()
    p1, s1 = packs_size(mounted.store), dir_apparent_size(mounted.store)
    mounted.mount()
    subprocess.run(["cp", "-a", str(src), str(mounted.mnt / "copy2")], check=True)
    mounted.umount()
    p2, s2 = packs_size(mounted.store), dir_apparent_size(mounted.store)

    first, second = p1 - p0, p2 - p1
    print(f"data {total}, packs: first copy +{first}, second copy +{second}; store: +{s1 - s0}, +{s2 - s1}")
    assert first > 0.8 * total, f"first copy of {total} bytes grew the packs by only {first}: where is the data?"
    assert second < 0.02 * first, \
        f"second identical copy grew the packs by {second} bytes = {100 * second / first:.1f}% of the first (limit 2%)"
    assert s2 - s1 < 0.05 * total, \
        f"second identical copy grew the whole store by {s2 - s1} bytes = {100 * (s2 - s1) / total:.1f}% (limit 5%)"

    mounted.mount()
    assert checksums(mounted.mnt / "copy1") == expect
    assert checksums(mounted.mnt / "copy2") == expect


@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_one_byte_insert_is_cheap(mounted):
    # the figure is for 256 MiB: with 1 MiB average (4 MiB maximum) chunks, the one
    # or two chunks an insert changes are too large a share of a smaller file to test 3% on
    rng = random.Random(202)
    data = b"".join(rng.randbytes(64 * MiB) for _ in range(4))
    mounted.umount()
    p0 = packs_size(mounted.store)
    mounted.mount()
    (mounted.mnt / "a").write_bytes(data)
    mounted.umount()
    p1 = packs_size(mounted.store)
    assert p1 - p0 > 250 * MiB, f"256 MiB of random data grew the packs by only {p1 - p0}"

    mounted.mount()
    shifted = b"X" + data
    (mounted.mnt / "b").write_bytes(shifted)
    mounted.umount()
    p2 = packs_size(mounted.store)
    grown = p2 - p1
    assert grown < 0.03 * len(data), \
        f"inserting one byte at the start cost {grown} new bytes = {100 * grown / len(data):.1f}% (limit 3%)"

    # overwriting one byte in the middle in place is cheap too
    mounted.mount()
    with open(mounted.mnt / "a", "r+b") as f:
        f.seek(len(data) // 2)
        f.write(b"\x00" if data[len(data) // 2] else b"\x01")
    mounted.umount()
    p3 = packs_size(mounted.store)
    assert p3 - p2 < 0.03 * len(data), f"a one-byte in-place edit cost {p3 - p2} new bytes"

    mounted.mount()
    assert sha256_file(mounted.mnt / "b") == sha256_bytes(shifted)
    edited = bytearray(data)
    edited[len(data) // 2] = 0 if data[len(data) // 2] else 1
    assert sha256_file(mounted.mnt / "a") == sha256_bytes(bytes(edited))
