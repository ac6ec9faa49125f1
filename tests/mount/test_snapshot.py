"""Index snapshots and rebuilding a store from one (recovery without the network).

A store is filled through a real mount, its index exported as a signed root plus sealed
metadata chunks, and a brand-new store made from the recovery secret is rebuilt from the
root and the metadata chunks (read from the old store's packs, as a partner would serve
them), then given the data packs and mounted: the tree must match byte for byte. Also:
dedup between snapshots, rejection of tampered or old roots, damaged metadata chunks, a
strict parser, and no plaintext in anything a partner would hold.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest

from bpfs import keyfile
from bpfs.chunker import Chunker
from bpfs.index import Index
from bpfs.packs import PackFiles
from bpfs.history import RetentionPolicy
from bpfs.snapshot import (
    MAX_ROOT_SIZE, STREAM_MAGIC, RootRejected, SignedRoot, SnapshotError, SnapshotManifest, _cut, _StreamReader,
    create_store_from_recovery_secret, export_snapshot, latest_root, local_fetcher, metadata_packs, needed_packs,
    open_manifest, open_meta_chunk, rebuild_index, retained_generations, verify_root)
from bpfs.store import StoreFolder, key_path
from tests.helpers.cli import PASSPHRASE, run_bpfs
from tests.helpers.files import make_tree, sha256_file, snapshot_tree
from tests.helpers.procs import wait_until

KiB, MiB = 1 << 10, 1 << 20


# ----------------------------------------------------------------------------------- helpers
def init_json(store: Path) -> dict:
    return json.loads(run_bpfs("init", store, "--kdf", "interactive", "--json").stdout)


def unlock(store: Path) -> keyfile.KeyRing:
    return keyfile.unlock(key_path(str(store)), PASSPHRASE.encode())


KEEP_TWO = RetentionPolicy(keep_within=0, keep_daily=0, keep_weekly=0, keep_monthly=0, keep_last=2)
KEEP_ONE = RetentionPolicy(keep_within=0, keep_daily=0, keep_weekly=0, keep_monthly=0, keep_last=1)


def export(store: Path, **kw):
    keys = unlock(store)
    st = StoreFolder(str(store), keys)
    try:
        return export_snapshot(st.index, keys, st.packs, **kw)
    finally:
        st.close()


def with_index(store: Path, fn):
    keys = unlock(store)
    st = StoreFolder(str(store), keys)
    try:
        return fn(st.index, keys, st.packs)
    finally:
        st.close()


def copy_packs(old: Path, new: Path, pack_ids) -> None:
    src, dst = PackFiles(str(old)), PackFiles(str(new))
    for pack_id in pack_ids:
        target = dst.path(pack_id)
        os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
        shutil.copyfile(src.path(pack_id), target)
        os.chmod(target, 0o600)


def new_recovered_store(path: Path, secret: str) -> keyfile.KeyRing:
    return create_store_from_recovery_secret(str(path), secret, PASSPHRASE.encode(), "interactive")


def rebuild_from(old: Path, new: Path, keys, root: bytes, fetch=None, **kw):
    packs = PackFiles(str(old))
    try:
        return rebuild_index(str(new), keys, root, fetch or local_fetcher(packs), **kw)
    finally:
        packs.close()


def index_summary(store: Path) -> dict:
    """Records per table of a store's index, read directly."""
    keys = unlock(store)
    index = Index(os.path.join(store, "index"), keys)
    try:
        with index.read_view() as records:
            return {t: sum(1 for _ in records(t)) for t in ("inodes", "dirents", "extents", "chunks", "packs")}
    finally:
        index.close()


def meta_chunk_bytes(store: Path, manifest) -> list[bytes]:
    packs = PackFiles(str(store))
    try:
        return [packs.read(c.pack, c.offset, c.sealed_length) for c in manifest.chunks]
    finally:
        packs.close()


def write_many_small_files(root: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    dirs = []
    for i in range(max(1, n // 150)):
        d = root / f"d{i:03d}"
        d.mkdir(parents=True)
        dirs.append(d)
    for i in range(n):
        (dirs[i % len(dirs)] / f"f{i:05d}.txt").write_bytes(rng.randbytes(rng.randrange(20, 600)))


def write_mixed_tree(mnt: Path) -> None:
    """Small files, a ~20 MiB file, a sparse file, symlinks, hard links, xattrs, deep dirs."""
    rng = random.Random(11)
    make_tree(mnt / "tree", seed=3, n_files=80)
    part = rng.randbytes(6 * MiB)
    (mnt / "big.bin").write_bytes(part + rng.randbytes(2 * MiB) + part + rng.randbytes(6 * MiB + 12345))
    with open(mnt / "sparse.img", "wb") as f:
        f.seek(50 * MiB)
        f.write(rng.randbytes(4096))
        f.seek(200 * MiB + 7)
        f.write(b"tail of a sparse file")
        f.truncate(300 * MiB)
    deep = mnt.joinpath(*[f"level{i}" for i in range(12)])
    deep.mkdir(parents=True)
    (deep / "leaf.txt").write_bytes(b"at the bottom\n")
    os.setxattr(deep / "leaf.txt", "user.where", b"deep")
    os.setxattr(mnt / "big.bin", "user.big", rng.randbytes(3000))
    os.symlink("level0/level1", mnt / "link-to-dir")
    os.link(mnt / "big.bin", mnt / "big-hardlink.bin")
    os.chmod(mnt / "sparse.img", 0o640)
    os.utime(mnt / "sparse.img", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))


# ----------------------------------------------------------------------------- round trip
@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_rebuild_from_snapshot_restores_the_tree(tmp_path, make_mount):
    old = tmp_path / "old"
    info = init_json(old)
    m = make_mount(store=old, name="mnt-old")
    m.mount()
    write_mixed_tree(m.mnt)
    before = snapshot_tree(m.mnt)
    m.umount()

    manifest = export(old)
    root = manifest.root
    assert manifest.generation >= 1 and manifest.records > 100
    assert verify_root(unlock(old).identity.public_key, root).generation == manifest.generation
    assert manifest.pack_count >= 2  # 20 MiB of data does not fit one 16 MiB pack
    # the old store is still whole, snapshot bookkeeping and all
    cp = m.verify("--read-data")
    assert cp.returncode == 0, cp.stdout + cp.stderr

    new = tmp_path / "new"
    keys = new_recovered_store(new, info["recovery_secret"])
    assert keys.identity.peer_id == info["peer_id"]
    rebuilt = rebuild_from(old, new, keys, root)
    assert rebuilt.generation == manifest.generation
    assert rebuilt.stats["records"] == manifest.records
    assert not (new / "index.rebuild").exists()
    copy_packs(old, new, rebuilt.packs)
    assert not set(rebuilt.packs) & {c.pack for c in manifest.chunks}, "metadata packs are not data packs"

    n = make_mount(store=new, name="mnt-new")
    n.mount()
    after = snapshot_tree(n.mnt)
    assert after == before, [k for k in set(before) | set(after) if before.get(k) != after.get(k)][:10]
    st = os.stat(n.mnt / "sparse.img")
    assert st.st_size == 300 * MiB and st.st_mtime_ns == 1_500_000_000_987_654_321
    # the rebuilt store goes on working: new inodes and packs do not collide with old ones
    inos = {os.lstat(os.path.join(d, f)).st_ino for d, ds, fs in os.walk(n.mnt) for f in fs + ds}
    (n.mnt / "new-dir").mkdir()
    (n.mnt / "new-dir" / "after-recovery.bin").write_bytes(random.Random(5).randbytes(3 * MiB))
    assert os.lstat(n.mnt / "new-dir").st_ino not in inos
    assert os.lstat(n.mnt / "new-dir" / "after-recovery.bin").st_ino not in inos
    sha_new = sha256_file(n.mnt / "new-dir" / "after-recovery.bin")
    n.remount()
    assert sha256_file(n.mnt / "new-dir" / "after-recovery.bin") == sha_new
    assert sha256_file(n.mnt / "big.bin") == before[b"big.bin"]["sha256"]
    n.umount()
    cp = n.verify("--read-data", "--json")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert not json.loads(cp.stdout)["notes"], cp.stdout

    # and its next snapshot outranks the root it was rebuilt from
    again = export(new)
    assert again.generation > manifest.generation
    verify_root(keys.identity.public_key, again.root, min_generation=manifest.generation + 1)


# ------------------------------------------------------------------------ dedup and retention
@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_snapshots_share_metadata_chunks_and_survive_compaction(tmp_path, make_mount):
    old = tmp_path / "old"
    info = init_json(old)
    m = make_mount(store=old, name="mnt-old")
    m.mount()
    write_many_small_files(m.mnt / "many", 10000, seed=1)
    m.umount()

    first = export(old)
    assert first.stats["new_chunks"] == len({c.chunk_id for c in first.chunks}) >= 10
    meta_bytes = sum(c.sealed_length for c in first.chunks)

    m.mount()
    with open(m.mnt / "many" / "d007" / "f00007.txt", "ab") as f:
        f.write(b"one small change")
    (m.mnt / "many" / "d003" / "new-file.txt").write_bytes(b"and one new file")
    m.umount()

    second = export(old)
    shared = {c.chunk_id for c in first.chunks} & {c.chunk_id for c in second.chunks}
    print(f"\nmetadata: {len(first.chunks)} chunks, {meta_bytes} bytes; after a small change "
          f"{second.stats['reused_chunks']}/{second.stats['chunks']} chunks reused, "
          f"{second.stats['new_bytes']} new bytes")
    assert second.generation > first.generation
    # a change touches about a dozen places (counters, two inodes, a directory, extents, chunk
    # records at random places, pack records): each costs about one chunk, the rest is shared
    assert second.stats["reused_chunks"] >= 0.6 * second.stats["chunks"]
    assert len(shared) >= 0.6 * len(second.chunks)
    assert second.stats["new_bytes"] <= 0.3 * meta_bytes

    # a third snapshot releases the first (a policy keeping two); chunks still used stay
    third = export(old, policy=KEEP_TWO)
    assert third.stats["new_chunks"] <= 3  # nothing but counters changed
    gens, live, packs_of_meta, needed = with_index(old, lambda index, keys, packs: (
        retained_generations(index), {k[1:] for k, _ in index.snapshot_records(b"c")}, metadata_packs(index),
        needed_packs(index, keys)))
    assert gens == [second.generation, third.generation]
    assert live == {c.chunk_id for c in second.chunks + third.chunks}
    assert {c.pack for c in second.chunks + third.chunks} <= packs_of_meta <= needed
    for pack_id in {c.pack for c in first.chunks} - packs_of_meta:
        assert not os.path.exists(PackFiles(str(old)).path(pack_id)), "an empty metadata pack was kept"
    assert with_index(old, lambda index, keys, packs: latest_root(index)) == third.root

    # delete most files: their data stays while a retained snapshot holds it; once a snapshot
    # after the deletion is the only one kept, data packs are compacted and deleted, metadata
    # chunks stay
    m.mount()
    data_packs_before = set(third.packs)
    for i in range(8000):
        os.unlink(m.mnt / "many" / f"d{i % 66:03d}" / f"f{i:05d}.txt")
    m.umount()
    after_delete = export(old, policy=KEEP_TWO)
    assert all(os.path.exists(PackFiles(str(old)).path(p)) for p in data_packs_before), \
        "data of deleted files went while the snapshot before the deletion is kept"
    keep_one = export(old, policy=KEEP_ONE)
    assert after_delete.generation in keep_one.stats["released_snapshots"] and keep_one.stats["sparse_packs"]
    m.mount()
    assert wait_until(lambda: any(not os.path.exists(PackFiles(str(old)).path(p)) for p in data_packs_before),
                      timeout=30), "compaction did not replace the data packs"
    m.umount()
    keys = unlock(old)
    for manifest in (keep_one,):
        for chunk, sealed in zip(manifest.chunks, meta_chunk_bytes(old, manifest)):
            open_meta_chunk(keys, chunk, sealed)
    cp = m.verify("--read-data")
    assert cp.returncode == 0, cp.stdout + cp.stderr

    # a snapshot taken once compaction is done rebuilds the compacted store (a snapshot needs
    # its data packs: the store must not compact them away before the next snapshot)
    m.mount()
    before = snapshot_tree(m.mnt)

    def packs_now():
        return sorted(p.name for p in (old / "packs").glob("*/*.pack"))

    settled = [packs_now()]
    assert wait_until(lambda: settled.append(packs_now()) or settled[-1] == settled[-2], timeout=30, interval=2)
    m.umount()
    fourth = export(old)
    assert fourth.stats["reused_chunks"] < fourth.stats["chunks"]
    new = tmp_path / "new"
    nkeys = new_recovered_store(new, info["recovery_secret"])
    rebuilt = rebuild_from(old, new, nkeys, fourth.root, min_generation=keep_one.generation + 1)
    copy_packs(old, new, rebuilt.packs)
    n = make_mount(store=new, name="mnt-new")
    n.mount()
    assert snapshot_tree(n.mnt) == before
    n.umount()
    cp = n.verify("--read-data")
    assert cp.returncode == 0, cp.stdout + cp.stderr


# ------------------------------------------------------------------------------ the root
@pytest.fixture
def small_snapshot(tmp_path, make_mount):
    """A store with a few hundred files and its exported snapshot: (store, info, manifest)."""
    store = tmp_path / "old"
    info = init_json(store)
    m = make_mount(store=store, name="mnt-old")
    m.mount()
    write_many_small_files(m.mnt / "files", 1500, seed=2)
    make_tree(m.mnt / "tree", seed=4, n_files=30)
    m.umount()
    return store, info, export(store)


def test_tampered_or_old_roots_are_rejected(tmp_path, small_snapshot):
    store, info, manifest = small_snapshot
    keys = unlock(store)
    pub = keys.identity.public_key
    root = manifest.root
    parsed = verify_root(pub, root, min_generation=manifest.generation)
    assert parsed.generation == manifest.generation
    assert SignedRoot.decode(root).encode() == root
    assert len(root) < 8 * KiB  # a partner holds a small blob

    for pos in [0, 8, 9, 20, 29, 33, 37, 41, 60, len(root) // 2, len(root) - 65, len(root) - 64, len(root) - 1]:
        bad = bytearray(root)
        bad[pos] ^= 0x01
        with pytest.raises(RootRejected):
            verify_root(pub, bytes(bad))
    for bad in (root[:-1], root + b"\0", root[:40], b"", b"BPFSROOT" + bytes(200), bytes(MAX_ROOT_SIZE + 1)):
        with pytest.raises(RootRejected):
            verify_root(pub, bad)
    with pytest.raises(RootRejected):
        verify_root(pub, "not bytes")

    # another store's key: rejected, by a partner and by that store
    other = tmp_path / "other"
    init_json(other)
    other_keys = unlock(other)
    with pytest.raises(RootRejected, match="another store"):
        verify_root(other_keys.identity.public_key, root)
    with pytest.raises(RootRejected):
        open_manifest(other_keys, root)
    # a re-signed root under another key (the signature is valid, the signer is not the owner)
    forged = SignedRoot(parsed.peer_id, parsed.generation, parsed.sealed_manifest, b"")
    forged = SignedRoot(forged.peer_id, forged.generation, forged.sealed_manifest,
                        other_keys.identity.sign(forged.signed_message())).encode()
    with pytest.raises(RootRejected, match="signature"):
        verify_root(pub, forged)

    # rollback: a partner that accepted a newer generation refuses this one
    with pytest.raises(RootRejected, match="rollback"):
        verify_root(pub, root, min_generation=manifest.generation + 1)
    newer = export(store)
    assert newer.generation > manifest.generation
    verify_root(pub, newer.root, min_generation=manifest.generation + 1)
    with pytest.raises(RootRejected):
        verify_root(pub, root, min_generation=newer.generation)

    # the owner opens it; nobody else learns anything from it
    opened = open_manifest(keys, root)
    assert opened.chunks == manifest.chunks and opened.pack_ranges == manifest.pack_ranges
    assert opened.stream_digest == manifest.stream_digest
    new = tmp_path / "new"
    nkeys = new_recovered_store(new, info["recovery_secret"])
    with pytest.raises(RootRejected):
        rebuild_from(store, new, nkeys, root, min_generation=newer.generation)
    assert index_summary(new) == {"inodes": 1, "dirents": 0, "extents": 0, "chunks": 0, "packs": 0}


def test_manifest_decoding_is_strict(small_snapshot):
    _, _, manifest = small_snapshot
    good = manifest.encode()
    assert SnapshotManifest.decode(good).chunks == manifest.chunks
    for pos in (0, 9, 50, len(good) // 2, len(good) - 1):
        bad = bytearray(good)
        bad[pos] ^= 0x80
        with pytest.raises(SnapshotError):
            SnapshotManifest.decode(bytes(bad))
    with pytest.raises(SnapshotError):
        SnapshotManifest.decode(good[:-1])
    with pytest.raises(SnapshotError):
        SnapshotManifest.decode(b"")
    # well hashed but inconsistent: lengths that do not add up, overlapping pack ranges
    from bpfs.snapshot import _manifest_hash
    wrong = SnapshotManifest(manifest.generation, 0, manifest.stream_length + 1, 0, bytes(32), manifest.chunks,
                             manifest.pack_ranges)
    with pytest.raises(SnapshotError, match="add up"):
        SnapshotManifest.decode(wrong.encode())
    body = SnapshotManifest(manifest.generation, 0, manifest.stream_length, 0, bytes(32), manifest.chunks,
                            [(5, 3), (7, 2)]).encode()[:-32]
    with pytest.raises(SnapshotError, match="pack ranges"):
        SnapshotManifest.decode(body + _manifest_hash(body))


# ---------------------------------------------------------------------- damaged metadata chunks
def test_damaged_metadata_chunks_fail_the_rebuild_cleanly(tmp_path, small_snapshot, make_mount):
    store, info, manifest = small_snapshot
    assert len(manifest.chunks) >= 3
    new = tmp_path / "new"
    keys = new_recovered_store(new, info["recovery_secret"])
    empty = index_summary(new)
    packs = PackFiles(str(store))
    honest = local_fetcher(packs)
    last = manifest.chunks[-1].chunk_id

    def flipped(cid, pack_id, offset, length):
        data = bytearray(honest(cid, pack_id, offset, length))
        if cid == last:
            data[len(data) // 2] ^= 0x04
        return bytes(data)

    def swapped(cid, pack_id, offset, length):
        c = manifest.chunks[0]
        return honest(c.chunk_id, c.pack, c.offset, c.sealed_length) if cid == last else \
            honest(cid, pack_id, offset, length)

    def truncated(cid, pack_id, offset, length):
        return honest(cid, pack_id, offset, length)[:-1 if cid == last else None]

    def missing(cid, pack_id, offset, length):
        if cid == last:
            raise FileNotFoundError(f"pack {pack_id:012x} is not here")
        return honest(cid, pack_id, offset, length)

    try:
        for fetch, why in ((flipped, "authenticate"), (swapped, "authenticate|wrong length|bytes fetched"),
                           (truncated, "bytes fetched"), (missing, "could not be fetched")):
            with pytest.raises(SnapshotError, match=why) as e:
                rebuild_index(str(new), keys, manifest.root, fetch)
            assert last[:6].hex() in str(e.value)
            assert not (new / "index.rebuild").exists()
            assert index_summary(new) == empty, "a failed rebuild left records behind"
        # the store stays a valid empty store...
        cp = run_bpfs("verify", new, "--json", check=False)
        assert cp.returncode == 0 and json.loads(cp.stdout)["counts"]["inodes"] == 1, cp.stdout + cp.stderr
        # ...and a later honest attempt succeeds
        rebuilt = rebuild_index(str(new), keys, manifest.root, honest)
    finally:
        packs.close()
    copy_packs(store, new, rebuilt.packs)
    n = make_mount(store=new, name="mnt-new")
    n.mount()
    assert len(os.listdir(n.mnt / "files")) == 10
    n.umount()
    # a rebuilt store is not fresh any more: a second rebuild is refused
    with pytest.raises(SnapshotError, match="not freshly created"):
        rebuild_from(store, new, keys, manifest.root)


# ------------------------------------------------------------------------------- the parser
def _stream(records, count=None) -> bytes:
    out = [STREAM_MAGIC]
    for t, key, value in records:
        out.append(struct.pack("<BHI", t, len(key), len(value)) + key + value)
    out.append(b"\xff" + struct.pack("<Q", len(records) if count is None else count))
    return b"".join(out)


def _parse(data: bytes, piece: int = 1 << 20) -> list:
    reader = _StreamReader()
    out = []
    for i in range(0, len(data), piece):
        out += reader.feed(data[i:i + piece])
    reader.finish()
    return out


def test_record_stream_parser_is_strict():
    sealed = bytes(40 + 76)
    good = [(0, b"generation", bytes(8)), (0, b"last_ino", bytes(8)), (1, bytes(8), sealed),
            (1, bytes(7) + b"\x02", sealed), (5, bytes(7) + b"\x01", bytes(21)), (6, bytes(40), b"")]
    data = _stream(good)
    assert [r[0] for r in _parse(data)] == ["meta", "meta", "inodes", "inodes", "packs", "packchunks"]
    assert _parse(data, piece=1) == _parse(data)  # byte by byte: the same records
    bad_cases = {
        "magic": b"XPSNAPS1" + data[8:],
        "table": _stream(good + [(12, bytes(8), b"")]),
        "empty key": _stream([(1, b"", sealed)]),
        "long key": _stream([(0, b"k" * 600, bytes(8))]),
        "huge value": STREAM_MAGIC + struct.pack("<BHI", 1, 8, (1 << 20) + 1) + bytes(8),
        "order": _stream([good[1], good[0]]),
        "repeat": _stream([good[2], good[2]]),
        "tables back": _stream([good[2], good[0]]),
        "key size": _stream([(1, bytes(9), sealed)]),
        "plain size": _stream([(5, bytes(8), bytes(20))]),
        "sealed too short": _stream([(1, bytes(8), bytes(10))]),
        "counter name": _stream([(0, b"bad name", bytes(8))]),
        "count": _stream(good, count=5),
        "after end": data + b"\0",
        "truncated": data[:-1],
        "no end": data[:-9],
    }
    for what, bad in bad_cases.items():
        with pytest.raises(SnapshotError, match="damaged"):
            _parse(bad)
            pytest.fail(f"accepted a stream with a bad {what}")


def test_cutting_a_stream_piecewise_equals_cutting_it_whole():
    rng = random.Random(9)
    data = rng.randbytes(5 * MiB) + bytes(700 * KiB) + rng.randbytes(300 * KiB)
    chunker = Chunker(b"a test gear table key", 64 * KiB, 16 * KiB, 256 * KiB)
    whole, pos = [], 0
    for n in chunker.cut(data):
        whole.append(data[pos:pos + n])
        pos += n
    pieces, pos = [], 0
    while pos < len(data):
        n = rng.choice([1, 100, 5000, 70000, 300000])
        pieces.append(data[pos:pos + n])
        pos += n
    assert list(_cut(iter(pieces), chunker)) == whole


# ------------------------------------------------------------------------------- no plaintext
def _forms(marker: bytes) -> list[bytes]:
    forms = [marker, marker.hex().encode(), marker.decode("latin-1").encode("utf-16-le")]
    for k in range(3):
        part = marker[k:]
        forms.append(base64.b64encode(part[:len(part) - len(part) % 3]).rstrip(b"="))
    return forms


def test_no_plaintext_in_root_or_metadata(tmp_path, make_mount):
    store = tmp_path / "old"
    info = init_json(store)
    markers = {
        "file name": b"MRKfilename-3vN0aa2e",
        "dir name": b"MRKdirname-Yt6sPq11",
        "symlink target": b"MRKlinktarget-W2mmQ8",
        "xattr name": b"MRKxattrname-e4RRt0",
        "xattr value": b"MRKxattrvalue-Pz0k77",
        "file content": b"MRKcontent-q7Zk2LpW",
        "recovery secret": info["recovery_secret"].encode(),
    }
    m = make_mount(store=store, name="mnt-old")
    m.mount()
    d = m.mnt / markers["dir name"].decode()
    d.mkdir()
    for i in range(50):
        (d / f"{markers['file name'].decode()}-{i}").write_bytes(markers["file content"] * (i + 1))
    os.symlink(markers["symlink target"].decode(), m.mnt / "link")
    os.setxattr(d, "user." + markers["xattr name"].decode(), markers["xattr value"])
    m.umount()
    manifest = export(store)
    keys = unlock(store)
    sealed_chunks = meta_chunk_bytes(store, manifest)
    plain_stream = b"".join(open_meta_chunk(keys, c, s) for c, s in zip(manifest.chunks, sealed_chunks))
    meta_pack_files = b"".join(Path(PackFiles(str(store)).path(p)).read_bytes()
                               for p in {c.pack for c in manifest.chunks})
    places = {"root": manifest.root, "metadata chunks": b"".join(sealed_chunks), "metadata packs": meta_pack_files,
              "decrypted record stream": plain_stream}
    leaks = [f"{what} in the {where}" for where, blob in places.items() for what, marker in markers.items()
             if any(form in blob for form in _forms(marker))]
    assert not leaks, leaks


# ------------------------------------------------------------------------- a failed export
def test_failed_export_changes_nothing(tmp_path, make_mount):
    store = tmp_path / "old"
    init_json(store)
    m = make_mount(store=store, name="mnt-old")
    m.mount()
    write_many_small_files(m.mnt / "files", 1500, seed=3)
    m.umount()
    packs_before = sorted(p.name for p in (store / "packs").glob("*/*.pack"))

    def failing(index, keys, packs):
        writes = []
        real = packs.write

        def write(pack_id, offset, data):
            writes.append(pack_id)
            if len(writes) == 3:
                raise OSError(28, "No space left on device")
            real(pack_id, offset, data)

        packs.write = write
        with pytest.raises(OSError):
            export_snapshot(index, keys, packs)
        assert retained_generations(index) == [] and not metadata_packs(index)

    with_index(store, failing)
    assert sorted(p.name for p in (store / "packs").glob("*/*.pack")) == packs_before
    cp = m.verify("--read-data", "--json")
    assert cp.returncode == 0 and not json.loads(cp.stdout)["notes"], cp.stdout + cp.stderr
    manifest = export(store)
    assert manifest.stats["new_chunks"] == len({c.chunk_id for c in manifest.chunks})
    cp = m.verify("--read-data", "--json")
    assert cp.returncode == 0 and not json.loads(cp.stdout)["notes"], cp.stdout + cp.stderr
