"""Pack trees (bpfs.packtree): roots, the holder's sidecar, proofs and their verification.

Pure computation, no FUSE or network: every way of computing a root (in memory, from a file,
incrementally from out-of-order writes, from a sidecar) must agree, every honest proof must
verify, and every tampered one (a flipped byte, another leaf, another object, a shortened
path, a different size) must not.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from bpfs import packtree as T

SIZES = [0, 1, T.LEAF_SIZE - 1, T.LEAF_SIZE, T.LEAF_SIZE + 1, T.BLOCK_SIZE - 5, T.BLOCK_SIZE,
         T.BLOCK_SIZE * 3 + T.LEAF_SIZE * 5 + 17, 1 << 20, (1 << 20) + 3]


def _naive_root(data: bytes) -> bytes:
    """The tree exactly as the module docstring defines it, level by level."""
    level = [T.hash_leaf(i, data[p:p + T.LEAF_SIZE]) for i, p in enumerate(range(0, len(data), T.LEAF_SIZE))]
    level = level or [T.hash_leaf(0, b"")]
    while len(level) > 1:
        nxt = [T.hash_node(level[j], level[j + 1]) for j in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return T.finish_root(len(data), level[0])


@pytest.mark.parametrize("size", SIZES)
def test_every_way_of_computing_a_root_agrees(tmp_path, size):
    data = random.Random(size).randbytes(size)
    path = tmp_path / "obj"
    path.write_bytes(data)
    root = _naive_root(data)
    assert T.root_of_bytes(data) == root
    assert T.root_of_file(str(path)) == (root, size)
    side = T.Sidecar.of_file(str(path))
    assert side.root == root and side.size == size
    assert T.Sidecar.decode(side.encode()).blocks == side.blocks
    # written in random pieces, in random order (as worker threads write a pack)
    cuts = sorted(random.Random(size + 1).sample(range(1, size), min(size - 1, 40))) if size > 1 else []
    spans = list(zip([0] + cuts, cuts + [size]))
    random.Random(size + 2).shuffle(spans)
    builder = T.TreeBuilder()
    for a, b in spans:
        builder.add(a, data[a:b])
    assert builder.root(size) == root
    # received in order, in pieces of any size (a holder receiving a pack): the same blocks as the file's
    hasher = T.InOrderHasher()
    for a, b in sorted(spans):
        hasher.add(memoryview(data)[a:b])
    assert hasher.size == size
    assert hasher.blocks() == side.blocks
    assert hasher.sidecar().root == root


def test_roots_bind_size_position_and_content():
    data = os.urandom(3 * T.LEAF_SIZE)
    root = T.root_of_bytes(data)
    assert T.root_of_bytes(data[:-1]) != root  # truncated
    assert T.root_of_bytes(data + b"\0") != root  # extended
    swapped = data[T.LEAF_SIZE:2 * T.LEAF_SIZE] + data[:T.LEAF_SIZE] + data[2 * T.LEAF_SIZE:]
    assert T.root_of_bytes(swapped) != root  # leaves moved
    flipped = bytearray(data)
    flipped[100] ^= 1
    assert T.root_of_bytes(bytes(flipped)) != root


def test_builder_with_a_missing_piece_gives_no_root():
    data = os.urandom(T.LEAF_SIZE * 3)
    b = T.TreeBuilder()
    b.add(0, data[:T.LEAF_SIZE + 10])
    b.add(T.LEAF_SIZE * 2, data[T.LEAF_SIZE * 2:])
    assert b.root(len(data)) is None  # bytes [LEAF+10, 2*LEAF) never written: hash the file instead


@pytest.mark.parametrize("size", [1, T.LEAF_SIZE, T.BLOCK_SIZE + 1, 7 * T.BLOCK_SIZE + 3 * T.LEAF_SIZE + 1, 1 << 20])
def test_every_leaf_proves_and_nothing_else_does(tmp_path, size):
    data = random.Random(size).randbytes(size)
    path = tmp_path / "obj"
    path.write_bytes(data)
    side = T.Sidecar.of_file(str(path))
    reads = []

    def read(offset, length):
        reads.append(length)
        return data[offset:offset + length]

    n = T.leaf_count(size)
    for leaf in range(n):
        leaf_data, siblings = T.read_proof(side, leaf, read)
        assert len(siblings) == T.path_length(size, leaf)
        assert T.verify_proof(side.root, size, leaf, leaf_data, siblings), leaf
        # the same answer for another position, another size, or another object fails
        assert not T.verify_proof(side.root, size, (leaf + 1) % n, leaf_data, siblings) or n == 1
        assert not T.verify_proof(side.root, size + 1, leaf, leaf_data, siblings)
        assert not T.verify_proof(T.root_of_bytes(data + b"x"), size, leaf, leaf_data, siblings)
        if leaf_data:
            bad = bytearray(leaf_data)
            bad[len(bad) // 2] ^= 0x80
            assert not T.verify_proof(side.root, size, leaf, bytes(bad), siblings)
        if siblings:
            assert not T.verify_proof(side.root, size, leaf, leaf_data, siblings[:-1])
            assert not T.verify_proof(side.root, size, leaf, leaf_data, siblings + [siblings[0]])
            wrong = [bytes(32)] + siblings[1:]
            assert not T.verify_proof(side.root, size, leaf, leaf_data, wrong)
    assert max(reads) <= T.BLOCK_SIZE  # bounded work: one block read per proof


def test_challenge_leaves_are_fresh_distinct_and_agreed():
    size = 16 << 20
    a = T.challenge_leaves(b"n" * 32, 7, size, 8)
    assert a == T.challenge_leaves(b"n" * 32, 7, size, 8)  # both sides derive the same
    assert len(set(a)) == 8 and all(0 <= i < T.leaf_count(size) for i in a)
    assert a != T.challenge_leaves(b"m" * 32, 7, size, 8)  # another nonce, other leaves
    assert a != T.challenge_leaves(b"n" * 32, 8, size, 8)  # another pack, other leaves
    assert T.challenge_leaves(b"n" * 32, 7, 3 * T.LEAF_SIZE, 8) == [0, 1, 2]  # all there are


def test_sidecar_that_does_not_add_up_is_refused():
    data = os.urandom(T.BLOCK_SIZE * 2 + 5)
    blocks = [T.root_of_bytes(b"")] * 3
    good = T.Sidecar(len(data), T.root_of_bytes(data), blocks).encode()
    assert T.Sidecar.decode(good) is None  # the root does not match the blocks
    assert T.Sidecar.decode(b"garbage") is None
    assert T.Sidecar.decode(good[:-1]) is None


def test_leaf_and_node_hashes_are_the_specified_blake2b():
    """The hashes partners' proofs are checked with, written out from their definition (BLAKE2b-256,
    person "bpfs.packtree", a domain byte, the leaf's index as u64 little-endian): a faster way of
    computing them must give the same bytes, or every recorded pack root would stop matching."""
    import hashlib
    import struct

    def spec(*parts):
        h = hashlib.blake2b(digest_size=32, person=b"bpfs.packtree")
        for p in parts:
            h.update(p)
        return h.digest()

    rng = random.Random(3)
    for i in (0, 1, 7, 2**40 + 3):
        data = rng.randbytes(rng.choice((0, 1, 2047, 2048)))
        assert T.hash_leaf(i, data) == spec(b"\x00", struct.pack("<Q", i), data)
        assert T.hash_leaf(i, memoryview(data)) == T.hash_leaf(i, data)
    left, right = rng.randbytes(32), rng.randbytes(32)
    assert T.hash_node(left, right) == spec(b"\x01", left, right)
    assert T.finish_root(5, left) == spec(b"\x02", struct.pack("<Q", 5), left)


def _check_c_leaf_hashes(lanes: int) -> None:
    from bpfs import _packhash

    assert _packhash.LANES == lanes

    rng = random.Random(11)
    for leaf in (1, 118, 119, 120, 128, 247, 248, 249, 2048, 3000):
        for count in (1, 3, 4, 5, 9):  # the four-lane path, its scalar tail, and the scalar path alone
            data = rng.randbytes(leaf * count + rng.randrange(leaf))
            first = rng.choice((0, 1, 2**32 + 5, 2**63))
            got = _packhash.leaf_hashes(memoryview(data), first, leaf, b"bpfs.packtree")
            assert len(got) == 32 * count
            for k in range(count):
                assert got[32 * k:32 * k + 32] == T.hash_leaf(first + k, data[k * leaf:(k + 1) * leaf]), (leaf, count, k)


def test_the_c_leaf_hashes_are_the_python_ones():
    """`_packhash.leaf_hashes` (the writers' path, without the GIL) gives exactly `hash_leaf`'s bytes
    for every whole leaf, whatever the leaf size (one block, block edges, many blocks), index and
    number of leaves: four at a time in vector lanes where the CPU has AVX2, and one at a time
    (BPFS_PACKHASH_SCALAR=1, checked in a child process, as on a CPU without it)."""
    from bpfs import _packhash

    with open("/proc/cpuinfo") as f:
        avx2 = " avx2" in f.read()
    _check_c_leaf_hashes(4 if avx2 else 1)
    scalar = subprocess.run([sys.executable, "-c", "from tests.unit.test_packtree import _check_c_leaf_hashes as c; c(1)"],
                            env={**os.environ, "BPFS_PACKHASH_SCALAR": "1"}, capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert scalar.returncode == 0, scalar.stderr
    with pytest.raises(ValueError):
        _packhash.leaf_hashes(b"x", 0, 0, b"")
