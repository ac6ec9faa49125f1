"""Pack trees: a Merkle tree over each pack's bytes, for storage proofs (pure computation).

An owner keeps one 32-byte root per pack (recorded when the pack is sealed, carried in the
snapshot); a holder keeps the pack and a small sidecar of block hashes. An audit names a pack
and a fresh nonce; both sides derive the same random leaf indices from them, the holder
returns those leaves with their Merkle paths, and the owner checks them against the root it
kept, without its own copy of the pack (so audits keep working after a recovery).

The tree (BLAKE2b-256, person "bpfs.packtree", so no other hash in bpfs can collide with it):
  leaf i   = H(0x00 | u64 i | bytes [i*LEAF, (i+1)*LEAF) of the object)   (the last may be short)
  node     = H(0x01 | left | right); a level's last node without a partner moves up unchanged
  root     = H(0x02 | u64 size | top node)
The index in each leaf hash means a leaf cannot answer for another position; the size in the
root means a truncated or extended copy has another root. The same root is the digest an
upload is acknowledged by (`peering.protocol`), so "the partner acknowledged it by its digest"
and "the partner's bytes hash to the root we audit against" are one statement.

A holder answers with bounded work: it keeps the hashes of aligned blocks of BLOCK_LEAVES leaves
(16 KiB; 32 bytes per 16 KiB = 0.2 % of the pack) and, per challenged leaf, reads only that
leaf's block. The blocks' hashes are exactly the tree's nodes BLOCK_LEVEL levels up (blocks are
aligned, so the promotion rule gives the same nodes as hashing the whole tree).

Nothing here does I/O except `root_of_file` and `build_sidecar` (sequential reads of a file the
caller names) and `read_proof` (reads the blocks it needs through a callable).
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading

from . import _packhash

LEAF_SIZE = 2048  # bytes per leaf: 2 KiB hashes release the GIL (CPython does for >= 2048 bytes)
BLOCK_LEVEL = 3
BLOCK_LEAVES = 1 << BLOCK_LEVEL  # leaves per block a holder reads to answer for one of them
BLOCK_SIZE = LEAF_SIZE * BLOCK_LEAVES
DIGEST_SIZE = 32
MAX_DEPTH = 40  # siblings in a path: far beyond any object we send (2^40 leaves)
_PERSON = b"bpfs.packtree"
_U64 = struct.Struct("<Q")
_SIDECAR_MAGIC = b"BPTREE01"
_SIDECAR_HEAD = struct.Struct("<8sQ32sI")


def _h(*parts) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=_PERSON)
    for p in parts:
        h.update(p)
    return h.digest()


def leaf_count(size: int) -> int:
    """Leaves of an object of `size` bytes (an empty object has one empty leaf)."""
    return max(1, -(-size // LEAF_SIZE))


def _prefixed(tag: bytes):
    h = hashlib.blake2b(digest_size=DIGEST_SIZE, person=_PERSON)
    h.update(tag)
    return h


# the hash states after the domain tag: copying one costs a quarter less than setting up a new
# hash with its personalisation, for every leaf of every pack written
_LEAF, _NODE = _prefixed(b"\x00"), _prefixed(b"\x01")


def hash_leaf(index: int, data) -> bytes:
    h = _LEAF.copy()
    h.update(_U64.pack(index))
    h.update(data)
    return h.digest()


def hash_node(left: bytes, right: bytes) -> bytes:
    h = _NODE.copy()
    h.update(left)
    h.update(right)
    return h.digest()


def finish_root(size: int, top: bytes) -> bytes:
    return _h(b"\x02", _U64.pack(size), top)


def _up(level: list[bytes]) -> list[bytes]:
    """The next level: pairs hashed, a last lone node carried up unchanged."""
    out = [hash_node(level[j], level[j + 1]) for j in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        out.append(level[-1])
    return out


def _top(level: list[bytes]) -> bytes:
    while len(level) > 1:
        level = _up(level)
    return level[0]


def root_of_leaves(size: int, leaves: list[bytes]) -> bytes:
    if len(leaves) != leaf_count(size):
        raise ValueError(f"{len(leaves)} leaf hashes for {leaf_count(size)} leaves")
    return finish_root(size, _top(list(leaves)))


def _leaf_hashes(data, first_index: int = 0) -> list[bytes]:
    """Hashes of the leaves in `data`, the first being leaf `first_index` (none for no data)."""
    view = memoryview(data)
    whole = len(view) // LEAF_SIZE
    digests = _packhash.leaf_hashes(view[:whole * LEAF_SIZE], first_index, LEAF_SIZE, _PERSON)
    out = [digests[32 * k:32 * k + 32] for k in range(whole)]
    if len(view) % LEAF_SIZE:
        out.append(hash_leaf(first_index + whole, view[whole * LEAF_SIZE:]))
    return out


def _all_leaves(data) -> list[bytes]:
    return _leaf_hashes(data) or [hash_leaf(0, b"")]


def root_of_bytes(data) -> bytes:
    """The root of an object held in memory."""
    return root_of_leaves(len(data), _all_leaves(data))


class InOrderHasher:
    """The block hashes of an object whose bytes arrive in order: a file read from its start,
    or a pack a holder receives piece by piece (so it need not read the pack back to check it).

    Keeps the hashes of whole blocks, the leaves of the block being filled and the bytes of the
    leaf being filled: about 0.5 % of the bytes hashed (some 75 KiB for a 16 MiB pack).
    """

    __slots__ = ("size", "_blocks", "_leaves", "_tail")

    def __init__(self):
        self.size = 0
        self._blocks: list[bytes] = []
        self._leaves: list[bytes] = []  # of the block being filled
        self._tail = b""  # the bytes of the leaf being filled

    @property
    def _next_leaf(self) -> int:
        return len(self._blocks) * BLOCK_LEAVES + len(self._leaves)

    def add(self, data) -> None:
        """The next bytes of the object."""
        view = memoryview(data)
        self.size += len(view)
        if self._tail:
            take = LEAF_SIZE - len(self._tail)
            self._tail += bytes(view[:take])
            view = view[take:]
            if len(self._tail) < LEAF_SIZE:
                return
            self._add_leaves([hash_leaf(self._next_leaf, self._tail)])
            self._tail = b""
        whole = len(view) - len(view) % LEAF_SIZE
        if whole:
            self._add_leaves(_leaf_hashes(view[:whole], self._next_leaf))
        self._tail = bytes(view[whole:])

    def _add_leaves(self, leaves: list[bytes]) -> None:
        at = 0
        while at < len(leaves):
            take = BLOCK_LEAVES - len(self._leaves)
            self._leaves += leaves[at:at + take]
            at += take
            if len(self._leaves) == BLOCK_LEAVES:
                self._blocks.append(_top(self._leaves))
                self._leaves = []

    def blocks(self) -> list[bytes]:
        """The hashes of every block of the bytes so far (the last leaf and block may be partial)."""
        leaves = self._leaves + ([hash_leaf(self._next_leaf, self._tail)] if self._tail else [])
        if not self._blocks and not leaves:
            leaves = [hash_leaf(0, b"")]
        return self._blocks + ([_top(leaves)] if leaves else [])

    def sidecar(self) -> "Sidecar":
        blocks = self.blocks()
        return Sidecar(self.size, finish_root(self.size, _top(list(blocks))), blocks)


def _file_blocks(path: str, size: int | None = None) -> tuple[int, list[bytes]]:
    """(size, hashes of every block) of a file's first `size` bytes, read sequentially."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if size is None:
            size = os.fstat(fd).st_size
        hasher = InOrderHasher()
        while hasher.size < size:
            data = os.pread(fd, min(1 << 20, size - hasher.size), hasher.size)
            if not data:
                raise OSError(f"{path}: shorter than {size} bytes (ends at {hasher.size})")
            hasher.add(data)
    finally:
        os.close(fd)
    return size, hasher.blocks()


def root_of_file(path: str, size: int | None = None) -> tuple[bytes, int]:
    """(root, size) of a file's first `size` bytes (all of it by default)."""
    size, blocks = _file_blocks(path, size)
    return finish_root(size, _top(blocks)), size


# ----- the holder's sidecar ----------------------------------------------------------------------
class Sidecar:
    """What a holder keeps beside a pack to prove it cheaply: its size, root and block hashes.

    Attributes:
      size: the object's size in bytes.
      root: its tree root (equal to the digest the owner sent and the holder checked).
      blocks: hashes of the aligned 16 KiB blocks, in order.
    """

    __slots__ = ("size", "root", "blocks")

    def __init__(self, size: int, root: bytes, blocks: list[bytes]):
        self.size, self.root, self.blocks = size, root, blocks

    @classmethod
    def of_file(cls, path: str, size: int | None = None) -> "Sidecar":
        size, blocks = _file_blocks(path, size)
        return cls(size, finish_root(size, _top(blocks)), blocks)

    def encode(self) -> bytes:
        return _SIDECAR_HEAD.pack(_SIDECAR_MAGIC, self.size, self.root, len(self.blocks)) + b"".join(self.blocks)

    @classmethod
    def decode(cls, raw: bytes) -> "Sidecar | None":
        """The sidecar, or None when the bytes are not a consistent one (rebuild it then)."""
        if len(raw) < _SIDECAR_HEAD.size:
            return None
        magic, size, root, n = _SIDECAR_HEAD.unpack_from(raw)
        body = raw[_SIDECAR_HEAD.size:]
        if magic != _SIDECAR_MAGIC or n != -(-leaf_count(size) // BLOCK_LEAVES) or len(body) != n * DIGEST_SIZE:
            return None
        blocks = [bytes(body[i:i + DIGEST_SIZE]) for i in range(0, len(body), DIGEST_SIZE)]
        if finish_root(size, _top(list(blocks))) != root:
            return None
        return cls(size, root, blocks)


# ----- proofs -------------------------------------------------------------------------------------
def challenge_leaves(nonce: bytes, object_id: int, size: int, count: int) -> list[int]:
    """`count` distinct leaf indices of the object, derived from the audit's nonce (all leaves
    when it has no more). Owner and holder derive the same ones; nobody can know them before
    the nonce is chosen."""
    n = leaf_count(size)
    if count >= n:
        return list(range(n))
    out: dict[int, None] = {}
    counter = 0
    while len(out) < count:
        digest = _h(b"\x03", nonce, _U64.pack(object_id), _U64.pack(counter))
        out.setdefault(int.from_bytes(digest[:8], "little") % n)
        counter += 1
    return sorted(out)


def _path(level: list[bytes], index: int, levels_above: int | None = None) -> list[bytes]:
    """Siblings of node `index` from `level` up to the top (or `levels_above` levels)."""
    out = []
    climbed = 0
    while len(level) > 1 and (levels_above is None or climbed < levels_above):
        sib = index ^ 1
        if sib < len(level):
            out.append(level[sib])
        level = _up(level)
        index //= 2
        climbed += 1
    return out


def read_proof(sidecar: Sidecar, leaf: int, read) -> tuple[bytes, list[bytes]]:
    """The holder's answer for one leaf: (its bytes, its siblings bottom-up). `read(offset,
    length)` returns bytes of the held object; only the leaf's block is read."""
    if not 0 <= leaf < leaf_count(sidecar.size):
        raise ValueError("leaf out of range")
    block = leaf // BLOCK_LEAVES
    start = block * BLOCK_SIZE
    data = read(start, min(BLOCK_SIZE, sidecar.size - start))
    first = block * BLOCK_LEAVES
    in_block = _leaf_hashes(data, first) or [hash_leaf(0, b"")]
    offset = (leaf - first) * LEAF_SIZE
    leaf_data = bytes(memoryview(data)[offset:offset + LEAF_SIZE])
    # Below the block level the block's own leaves decide; a partial last block has fewer
    # nodes per level, which is exactly the tree's own promotion rule there.
    siblings = _path(in_block, leaf - first)
    siblings += _path(sidecar.blocks, block)
    return leaf_data, siblings


def verify_proof(root: bytes, size: int, leaf: int, data: bytes, siblings: list[bytes]) -> bool:
    """Whether `data` is leaf `leaf` of the object of `size` bytes whose root is `root`."""
    n = leaf_count(size)
    if not 0 <= leaf < n or len(siblings) > MAX_DEPTH:
        return False
    expected = min(LEAF_SIZE, size - leaf * LEAF_SIZE) if size else 0
    if len(data) != expected:
        return False
    node, index, width, used = hash_leaf(leaf, data), leaf, n, 0
    while width > 1:
        sib = index ^ 1
        if sib < width:
            if used >= len(siblings) or len(siblings[used]) != DIGEST_SIZE:
                return False
            node = hash_node(siblings[used], node) if index & 1 else hash_node(node, siblings[used])
            used += 1
        index //= 2
        width = -(-width // 2)
    return used == len(siblings) and finish_root(size, node) == root


def path_length(size: int, leaf: int) -> int:
    """How many siblings the path of `leaf` has (for bounds and cost figures)."""
    n, index, count = leaf_count(size), leaf, 0
    while n > 1:
        if index ^ 1 < n:
            count += 1
        index //= 2
        n = -(-n // 2)
    return count


# ----- building a root while a pack is written -----------------------------------------------------
class TreeBuilder:
    """Leaf hashes of a pack collected as its bytes are written (any order, any thread).

    Writes to a pack land at disjoint reserved ranges, from several worker threads, in no
    particular order. Whole leaves are hashed at once; the pieces of a leaf that straddles
    two writes wait until the leaf is complete. `root(size)` is None when some leaf was never
    completely written (a failed write): the caller then hashes the file instead.
    """

    def __init__(self):
        self._leaves: dict[int, bytes] = {}
        self._pieces: dict[int, list[tuple[int, bytes]]] = {}
        self._lock = threading.Lock()

    def add(self, offset: int, data) -> None:
        view = memoryview(data)
        end = offset + len(view)
        first_full = -(-offset // LEAF_SIZE)
        last_full = end // LEAF_SIZE  # exclusive
        hashed = []
        if last_full > first_full:  # the whole leaves in one call of the C extension, without the GIL
            at = first_full * LEAF_SIZE - offset
            digests = _packhash.leaf_hashes(view[at:at + (last_full - first_full) * LEAF_SIZE], first_full,
                                            LEAF_SIZE, _PERSON)
            hashed = [(first_full + k, digests[32 * k:32 * k + 32]) for k in range(last_full - first_full)]
        edges = []
        if offset % LEAF_SIZE:
            i = offset // LEAF_SIZE
            edges.append((i, offset - i * LEAF_SIZE, bytes(view[:min(len(view), (i + 1) * LEAF_SIZE - offset)])))
        if end % LEAF_SIZE and end // LEAF_SIZE >= first_full and (not edges or edges[0][0] != end // LEAF_SIZE):
            i = end // LEAF_SIZE
            start = max(offset, i * LEAF_SIZE)
            edges.append((i, start - i * LEAF_SIZE, bytes(view[start - offset:])))
        with self._lock:
            self._leaves.update(hashed)
            for i, at, piece in edges:
                self._pieces.setdefault(i, []).append((at, piece))
                self._complete(i, LEAF_SIZE)

    def _complete(self, i: int, length: int) -> None:
        pieces = self._pieces.get(i)
        if not pieces or sum(len(p) for _, p in pieces) < length:
            return
        pieces.sort()
        buf, pos = bytearray(), 0
        for at, piece in pieces:
            if at != pos:
                return  # overlapping or gapped pieces: leave it to the file
            buf += piece
            pos += len(piece)
        if pos != length:
            return
        del self._pieces[i]
        self._leaves[i] = hash_leaf(i, buf)

    def root(self, size: int) -> bytes | None:
        n = leaf_count(size)
        with self._lock:
            last = n - 1
            if last not in self._leaves:
                self._complete(last, size - last * LEAF_SIZE)
            if size == 0:
                self._leaves.setdefault(0, hash_leaf(0, b""))
            leaves = [self._leaves.get(i) for i in range(n)]
        present = [h for h in leaves if h is not None]
        if len(present) != n or len(self._leaves) != n:
            return None
        return root_of_leaves(size, present)
