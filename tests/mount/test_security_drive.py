"""What a thief of the drive can learn or change (issue 12), and that stores made before stay good.

Real CLI, real mounts; the drive is read the way a thief reads it: the LMDB files opened raw,
without keys. Each test fails on the code before its change (commit 9e1357c):
  - equal names in different directories (and equal xattr names on different inodes) had equal
    keys in the index;
  - extent keys showed where every chunk starts;
  - an old sealed index value put back under its key, or a record added to a plain table (a
    local pack's id in the outbox), was taken as the store's own; nothing authenticated the
    index as a whole (and so nothing could stay consistent across a crash's redo-log replay).
Stores written by that code (tests/data/head-store.tar.gz, made by tests/data/make_head_store.py)
open, upgrade and recover with today's code.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import json
import os
import random
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import lmdb
import pytest

from bpfs import keyfile
from bpfs import index as bpfs_index
from bpfs.index import Index
from bpfs.packs import PackFiles
from bpfs.snapshot import create_store_from_recovery_secret, local_fetcher, rebuild_index
from bpfs.store import key_path
from tests.helpers.cli import PASSPHRASE, bpfs_env, run_bpfs
from tests.helpers.mounts import force_unmount

HEAD_STORE = Path(__file__).resolve().parent.parent / "data" / "head-store.tar.gz"


# ----------------------------------------------------------------------------------- helpers
def raw_tables(store: Path, *tables: str) -> dict[str, list[tuple[bytes, bytes]]]:
    """(key, value) of each table exactly as on the drive: what anyone holding it reads."""
    env = lmdb.open(str(store / "index"), readonly=True, max_dbs=64, lock=False)
    try:
        out = {}
        with env.begin() as txn:
            for t in tables:
                try:
                    db = env.open_db(t.encode(), txn=txn, create=False)
                except lmdb.NotFoundError:
                    out[t] = []
                    continue
                out[t] = [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
        return out
    finally:
        env.close()


def unlock(store: Path) -> keyfile.KeyRing:
    return keyfile.unlock(key_path(str(store)), PASSPHRASE.encode())


def head_store(tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the store made by the code before these changes, and what it holds."""
    with tarfile.open(HEAD_STORE) as tar:
        tar.extractall(tmp_path / "head", filter="data")
    doc = json.loads((tmp_path / "head" / "head-store.json").read_text())
    return tmp_path / "head" / "store", doc


def tree_hashes(root: Path) -> dict[str, str]:
    out = {}
    for d, _, names in os.walk(root):
        for name in names:
            p = os.path.join(d, name)
            if not os.path.islink(p):
                out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


class _Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
_libc.closedir.argtypes = [ctypes.c_void_p]


def readdir_with_offsets(path: Path, start: int | None = None) -> list[tuple[bytes, int]]:
    """(name, d_off) of every entry, as the kernel hands them out; from `start` (a d_off) on."""
    d = _libc.opendir(os.fsencode(path))
    assert d, os.strerror(ctypes.get_errno())
    try:
        if start is not None:
            _libc.seekdir(d, start)
        out = []
        while True:
            ent = _libc.readdir(d)
            if not ent:
                return out
            out.append((ent.contents.d_name, ent.contents.d_off))
    finally:
        _libc.closedir(d)


def shared_tags(records, prefix_len: int = 8) -> dict[bytes, set[bytes]]:
    """Tags (the key after its inode) that appear under more than one inode."""
    owners = defaultdict(set)
    for key, _ in records:
        owners[key[prefix_len:]].add(key[:prefix_len])
    return {tag: inos for tag, inos in owners.items() if len(inos) > 1}


# --------------------------------------------------------------------- 1. equal names stand out
def write_look_alike_trees(mnt: Path) -> None:
    for d in ("a", "b", "c"):
        (mnt / d / "node_modules").mkdir(parents=True)
        for name in ("same.txt", "index.js", "package.json"):
            p = mnt / d / "node_modules" / name
            p.write_bytes(f"{d}/{name}\n".encode())
            os.setxattr(p, "user.tag", d.encode())
        os.setxattr(mnt / d, "user.tag", d.encode())


def test_equal_names_in_two_directories_have_different_keys(make_mount):
    m = make_mount(name="mnt")
    m.mount()
    write_look_alike_trees(m.mnt)
    m.umount()
    raw = raw_tables(m.store, "dirents", "xattrs")
    assert len(raw["dirents"]) >= 3 * 4 + 3 and len(raw["xattrs"]) >= 12
    assert not shared_tags(raw["dirents"]), "a name has the same tag in several directories"
    assert not shared_tags(raw["xattrs"]), "an xattr name has the same tag on several inodes"

    # and the mount works as before: lookups, listings in a stable order with offsets to resume
    # from, renames across directories, hard links
    m.mount()
    for d in ("a", "b", "c"):
        assert (m.mnt / d / "node_modules" / "same.txt").read_bytes() == f"{d}/same.txt\n".encode()
        assert os.getxattr(m.mnt / d / "node_modules" / "index.js", "user.tag") == d.encode()
    big = m.mnt / "a" / "many"
    big.mkdir()
    for i in range(300):
        (big / f"n{i:03d}").write_bytes(b"")
    listing = readdir_with_offsets(big)
    names = [n for n, _ in listing]
    assert sorted(names) == sorted([b".", b".."] + [f"n{i:03d}".encode() for i in range(300)])
    for i in (0, 1, 2, 57, 150, 298):  # resuming at any entry's offset gives the rest, in order
        assert readdir_with_offsets(big, listing[i][1]) == listing[i + 1:]
    os.rename(m.mnt / "a" / "node_modules" / "same.txt", m.mnt / "b" / "moved.txt")
    os.rename(m.mnt / "b" / "node_modules" / "same.txt", m.mnt / "c" / "node_modules" / "same.txt")  # replaces
    os.link(m.mnt / "c" / "node_modules" / "index.js", m.mnt / "a" / "index.js")
    m.remount()
    assert readdir_with_offsets(big) == listing, "the listing's order or offsets changed across a remount"
    assert (m.mnt / "b" / "moved.txt").read_bytes() == b"a/same.txt\n"
    assert not (m.mnt / "a" / "node_modules" / "same.txt").exists()
    assert not (m.mnt / "b" / "node_modules" / "same.txt").exists()
    assert (m.mnt / "c" / "node_modules" / "same.txt").read_bytes() == b"b/same.txt\n"
    assert os.stat(m.mnt / "a" / "index.js").st_ino == os.stat(m.mnt / "c" / "node_modules" / "index.js").st_ino
    assert os.stat(m.mnt / "a" / "index.js").st_nlink == 2
    assert os.getxattr(m.mnt / "b" / "moved.txt", "user.tag") == b"a"
    assert sorted(os.listdir(m.mnt / "b")) == ["moved.txt", "node_modules"]
    m.umount()
    cp = m.verify()
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert not shared_tags(raw_tables(m.store, "dirents")["dirents"])


# ------------------------------------------------------------------ stores made by the old code
def test_a_store_made_before_is_upgraded_and_reads_the_same(tmp_path, make_mount):
    store, doc = head_store(tmp_path)
    raw = raw_tables(store, "dirents", "xattrs")
    assert shared_tags(raw["dirents"]) and shared_tags(raw["xattrs"])  # the old layout, as made
    old_tags = set(shared_tags(raw["dirents"])) | set(shared_tags(raw["xattrs"]))

    m = make_mount(store=store, name="mnt-head")
    m.mount()
    assert tree_hashes(m.mnt) == doc["files"]
    assert os.getxattr(m.mnt / "b" / "node_modules" / "same.txt", "user.tag") == b"tagged b"
    assert os.readlink(m.mnt / "link") == "a/node_modules"
    assert os.stat(m.mnt / "pieces.bin").st_ino == os.stat(m.mnt / "b" / "pieces-link.bin").st_ino
    (m.mnt / "a" / "node_modules" / "new.txt").write_bytes(b"written after the upgrade\n")
    m.umount()

    raw = raw_tables(store, "meta", "dirents", "xattrs")
    assert dict(raw["meta"])[b"format"] == bpfs_index.FORMAT.to_bytes(8, "big")
    assert not shared_tags(raw["dirents"]) and not shared_tags(raw["xattrs"])
    data = (store / "index" / "data.mdb").read_bytes()
    assert not [t for t in old_tags if t in data], "the old keys are still in the file (freed pages)"
    cp = m.verify("--read-data")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    m.mount()
    assert tree_hashes(m.mnt) == {**doc["files"], "a/node_modules/new.txt": hashlib.sha256(
        b"written after the upgrade\n").hexdigest()}
    m.umount()


def test_a_snapshot_made_before_still_recovers(tmp_path, make_mount):
    """Partners hold snapshots carrying index records of the old format: a store rebuilt from
    one reads them, and upgrades itself on its first mount."""
    old, doc = head_store(tmp_path)
    new = tmp_path / "new"
    keys = create_store_from_recovery_secret(str(new), doc["recovery_secret"], PASSPHRASE.encode(), "interactive")
    packs = PackFiles(str(old))
    try:
        manifest = rebuild_index(str(new), keys, base64.b64decode(doc["root"]), local_fetcher(packs))
    finally:
        packs.close()
    for pid in manifest.packs:
        src = PackFiles(str(old)).path(pid)
        dst = PackFiles(str(new)).path(pid)
        os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
        shutil.copyfile(src, dst)
    index = Index(str(new / "index"), keys, readonly=True)  # as recovery reads it before the first mount
    try:
        assert index.format == 1 and index.lookup(1, b"a") is not None
    finally:
        index.close()
    m = make_mount(store=new, name="mnt-new")
    m.mount()
    expected = {k: v for k, v in doc["files"].items() if not k.endswith(".local")}  # kept local: not in it
    assert tree_hashes(m.mnt) == expected
    m.umount()
    assert not shared_tags(raw_tables(new, "dirents")["dirents"])
    cp = m.verify("--read-data")
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_an_index_of_an_unknown_format_is_refused(tmp_path):
    store, _ = head_store(tmp_path)
    env = lmdb.open(str(store / "index"), max_dbs=64)
    with env.begin(write=True) as txn:
        txn.put(b"format", (bpfs_index.FORMAT + 1).to_bytes(8, "big"), db=env.open_db(b"meta", txn=txn))
    env.close()
    cp = run_bpfs("verify", store, check=False)
    assert cp.returncode == 2 and "format" in cp.stderr and "Traceback" not in cp.stderr, cp.stderr


# -------------------------------------------------------------------- 2. partner records are plain
def drive_bytes(store: Path) -> list[tuple[str, bytes]]:
    """Every file of the store, raw: a copy of the drive."""
    out = []
    for d, _, names in os.walk(store):
        for name in names:
            p = os.path.join(d, name)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append((os.path.relpath(p, store), open(p, "rb").read()))
    return out


def found_on_drive(store: Path, secrets: list[bytes]) -> list[tuple[str, bytes]]:
    forms = set()
    for s in secrets:
        forms |= {s, s.upper(), base64.b64encode(s)} if len(s) >= 6 else set()
    return [(path, form) for path, data in drive_bytes(store) for form in forms if form in data]


@pytest.fixture
def stores(tmp_path):
    from tests.helpers.partners import StoreFactory

    factory = StoreFactory(tmp_path)
    yield factory
    factory.cleanup()


def test_pair_keys_and_addresses_are_sealed_on_the_drive(tmp_path, stores):
    from bpfs.peering.ledger import Ledger
    from tests.helpers.partners import pair

    a, b = stores.owner("A"), stores.server("B")
    b.serve()
    a.mount()
    pair(a, b)
    b_address = b.address()
    (a.mnt / "f").write_bytes(b"some data to replicate")
    a.sync()
    a.umount()
    b.stop()
    for me, other in ((a, b), (b, a)):
        ledger = Ledger(str(me.path), unlock(me.path))
        try:
            p = ledger.partner(other.peer_id)
        finally:
            ledger.close()
        assert p.pair_key and (p.address or p.observed or me is b)
        secrets = [p.pair_key.encode(), bytes.fromhex(p.pair_key)] + [x.encode() for x in p.addresses]
        assert not found_on_drive(me.path, secrets), f"{me.path}: {found_on_drive(me.path, secrets)}"

    # what needs no passphrase still works, and shows what is not sealed
    no_pass = {"env": bpfs_env(passphrase=None)}
    rows = json.loads(run_bpfs("peers", a.path, "--json", **no_pass).stdout)
    assert [r["peer_id"] for r in rows] == [b.peer_id] and rows[0]["address"] is None and rows[0]["sealed"]
    assert "(address sealed)" in run_bpfs("peers", a.path, **no_pass).stdout
    status = json.loads(run_bpfs("status", a.path, "--json", **no_pass).stdout)
    assert [p["peer_id"] for p in status["partners"]] == [b.peer_id]
    assert status["partners"][0]["replicated_packs"] >= 1
    assert [r["peer_id"] for r in json.loads(run_bpfs("reputation", a.path, "--json", **no_pass).stdout)] \
        == [b.peer_id]
    # and with the keys, the partnership goes on: the owner reaches its partner again
    b.serve(listen=b_address)
    a.mount(listen="none")
    (a.mnt / "g").write_bytes(b"more data")
    a.sync()
    assert a.partner_status(b.peer_id)["pending_packs"] == 0
    a.umount()


def test_the_partner_ledger_of_a_store_made_before_is_sealed_on_first_use(tmp_path, make_mount):
    from bpfs.peering.ledger import Ledger

    store, doc = head_store(tmp_path)
    partner = doc["partner"]
    secrets = [partner["pair_key"].encode(), bytes.fromhex(partner["pair_key"]), partner["address"].encode(),
               b"203.0.113.9:5555", b"be" * 32, b"ab" * 32]
    assert found_on_drive(store / "partners", secrets)  # the old ledger: all plain
    no_pass = {"env": bpfs_env(passphrase=None)}
    rows = json.loads(run_bpfs("peers", store, "--json", **no_pass).stdout)
    assert rows[0]["address"] == partner["address"]  # an unsealed ledger shows what it has

    m = make_mount(store=store, name="mnt-head")
    m.mount("--listen", "none")
    m.umount()
    assert not found_on_drive(store / "partners", secrets), found_on_drive(store / "partners", secrets)
    rows = json.loads(run_bpfs("peers", store, "--json", **no_pass).stdout)
    assert [r["peer_id"] for r in rows] == [partner["peer_id"]] and rows[0]["address"] is None
    ledger = Ledger(str(store), unlock(store))
    try:
        p = ledger.partner(partner["peer_id"])
        assert (p.pair_key, p.address, p.observed, p.beacon_slot, p.beacon) == (
            partner["pair_key"], partner["address"], "203.0.113.9:5555", 3, "be" * 32)
        assert [i.pair_key for i in ledger.invites()] == ["ab" * 32]
    finally:
        ledger.close()
    # a plain pair key put back by hand is not taken for ours
    env = lmdb.open(str(store / "partners"), max_dbs=16)
    with env.begin(write=True) as txn:
        db = env.open_db(b"peers", txn=txn)
        key, raw = next(iter(txn.cursor(db=db)))
        forged = dict(json.loads(bytes(raw)), pair_key="66" * 32, address="192.0.2.1:1")
        del forged["sealed"]
        txn.put(key, json.dumps(forged).encode(), db=db)
    env.close()
    ledger = Ledger(str(store), unlock(store))
    try:
        p = ledger.partner(partner["peer_id"])
        assert p.pair_key is None and p.address is None
    finally:
        ledger.close()


# ------------------------------------------------------------------ 3. known files can be recognised
def gear_hash_bit_search(data: bytes, cuts: list[tuple[int, int]], gear: list[int], *, avg: int, limit: int = 1 << 16):
    """The search of IACR eprint 2025/532 against a chunker whose secret is one constant XORed into
    the public gear `table`: grow the constant bit by bit, keeping the guesses for which every
    observed cut has the masked hash bits at zero. `cuts`: (chunk start, cut offset) of each cut
    the content made (not forced at the maximum size, not the end of the data). Returns the
    guesses (mod 2^48) that survive; [] when none does (or too many do)."""
    from pyfastcdc.py.constants import MASKS  # FastCDC's masks, which bpfs's chunker uses too

    bits = avg.bit_length() - 1
    mask_s, mask_l = MASKS[bits + 1], MASKS[bits - 1]
    # the hash that decided a cut covers the bytes up to the first byte of the next chunk
    windows = [(data[start + off - 47:start + off + 1][::-1], mask_s if off < avg else mask_l)
               for start, off in cuts]
    candidates = [0]
    for j in range(48):
        candidates = [s | t << j for s in candidates for t in (0, 1)]
        checks = [w for w, mask in windows if mask >> j & 1]
        if not checks:
            if len(candidates) > limit:
                return []
            continue
        low = (1 << (j + 1)) - 1
        kept = []
        for s in candidates:
            for w in checks:
                h = 0
                for k in range(j + 1):
                    h += ((gear[w[k]] ^ s) & low) << k
                if h >> j & 1:
                    break
            else:
                kept.append(s)
        candidates = kept
        if not candidates:
            return []
    return candidates


def observed_cuts(lengths: list[int], *, min_size: int, max_size: int) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in lengths[:-1]:
        if min_size + 64 <= n < max_size:
            out.append((start, n))
        start += n
    return out


def test_a_known_file_does_not_give_the_chunker_secret_away(tmp_path, make_mount):
    """The bit-by-bit search recovers a seeded public table's secret from one known file (as bpfs
    chunked before: pyfastcdc, seed derived from the master key) and then predicts the cuts of
    any file; against the chunker's whole secret table it finds nothing."""
    import time

    from pyfastcdc import FastCDC
    from pyfastcdc.py.constants import GEAR

    from bpfs.crypto import derive_key

    AVG_SIZE, MIN_SIZE, MAX_SIZE = 1 << 20, 256 << 10, 4 << 20  # bpfs's chunk sizes, before and now

    gear = list(GEAR)
    rng = random.Random(2025_532)
    known = rng.randbytes(48 << 20)
    other = rng.randbytes(16 << 20)

    # the chunker as it was: the attack works (this is what the test guards against)
    keys_root = os.urandom(20)
    seed = (int.from_bytes(derive_key(derive_key(keys_root, "master"), "chunker-seed", 8), "little") | 1) \
        & 0x7FFF_FFFF_FFFF_FFFF

    def old_cut(s, data):
        return [c.length for c in FastCDC(AVG_SIZE, min_size=MIN_SIZE, max_size=MAX_SIZE, seed=s).cut_buf(data)]

    started = time.monotonic()
    found = gear_hash_bit_search(known, observed_cuts(old_cut(seed, known), min_size=MIN_SIZE, max_size=MAX_SIZE),
                                 gear, avg=AVG_SIZE)
    took = time.monotonic() - started
    assert seed % (1 << 48) in found, "the search itself is broken: it does not find a seeded table's secret"
    assert any(old_cut(s, other) == old_cut(seed, other) for s in found)
    print(f"seeded public table: secret found in {took:.1f} s ({len(found)} candidates)")

    # the chunker of a store now: a file written through the mount, its cut points as recorded
    m = make_mount(name="mnt")
    m.mount()
    (m.mnt / "known.bin").write_bytes(known)
    ino = os.stat(m.mnt / "known.bin").st_ino
    m.umount()
    index = Index(str(m.store / "index"), unlock(m.store), readonly=True)
    try:
        lengths = [e.length for e in index.extents(ino)]
    finally:
        index.close()
    assert sum(lengths) == len(known) and len(lengths) > 20
    cuts = observed_cuts(lengths, min_size=MIN_SIZE, max_size=MAX_SIZE)
    assert len(cuts) > 20
    assert not gear_hash_bit_search(known, cuts, gear, avg=AVG_SIZE), "the chunker's secret was recovered"


# ------------------------------------------------------------- 4. the index cannot be changed unseen
REFUSED = "the index on the drive does not match its authenticator"


def raw_put(store: Path, table: str, key: bytes, value: bytes) -> None:
    """Write one record the way a thief with the drive does: LMDB raw, no keys."""
    env = lmdb.open(str(store / "index"), max_dbs=64)
    try:
        with env.begin(write=True) as txn:
            txn.put(key, value, db=env.open_db(table.encode(), txn=txn, create=False))
    finally:
        env.close()


def assert_refused(m) -> None:
    cp = m.mount(check=False)
    assert cp.returncode != 0 and not m.is_mounted(), f"the changed index was mounted: {cp.stdout}{cp.stderr}"
    assert REFUSED in cp.stderr and "Traceback" not in cp.stderr, cp.stderr
    assert len([line for line in cp.stderr.splitlines() if line.strip()]) == 1, cp.stderr
    cp = m.verify()  # and any other command that opens the index
    assert cp.returncode == 2 and REFUSED in cp.stderr and "Traceback" not in cp.stderr, cp.stderr


def test_an_old_index_value_put_back_is_refused(make_mount):
    m = make_mount(name="mnt")
    m.mount()
    old = random.Random(1).randbytes(300_000)
    (m.mnt / "f").write_bytes(old)
    ino = os.stat(m.mnt / "f").st_ino
    m.umount()
    prefix = bpfs_index.u64(ino)
    taken = [(k, v) for k, v in raw_tables(m.store, "extents")["extents"] if k.startswith(prefix)]
    assert taken
    m.mount()
    (m.mnt / "f").write_bytes(random.Random(2).randbytes(300_000))  # same size: same block keys
    m.umount()
    now = dict(raw_tables(m.store, "extents")["extents"])
    assert all(k in now and now[k] != v for k, v in taken)
    for key, value in taken:  # the old extent block: it authenticates on its own, under its key
        raw_put(m.store, "extents", key, value)
    assert_refused(m)


def test_a_local_pack_added_to_the_outbox_is_refused(make_mount):
    m = make_mount(name="mnt")
    m.mount()
    (m.mnt / ".backupignore").write_text("*.secret\n")
    (m.mnt / "a.secret").write_bytes(random.Random(3).randbytes(200_000))
    (m.mnt / "shared.bin").write_bytes(random.Random(4).randbytes(200_000))
    m.umount()
    raw = raw_tables(m.store, "packs", "outbox")
    local = [k for k, v in raw["packs"] if bpfs_index.PackRecord.unpack(v).local]
    assert local and not set(local) & {k for k, _ in raw["outbox"]}
    raw_put(m.store, "outbox", local[0], bpfs_index.OUTBOX_PRIORITY)  # "send it to partners, first"
    assert_refused(m)


def test_kill9_after_fsynced_writes_replays_to_a_consistent_index(make_mount):
    """fsync checkpoints the index (an LMDB commit); close() saves the changes since to the redo
    log (one write() per batch, each ending with the authenticator's state). Killed with both
    on the drive, the next open replays the log onto the checkpoint: the index authenticates."""
    m = make_mount(name="mnt")
    m.mount()
    (m.mnt / "before").write_bytes(b"committed at the start\n")
    expected = {}
    redo = m.store / "index.redo"
    for attempt in range(20):  # until a kill finds saved batches not yet checkpointed
        for i in range(20):
            data = random.Random(attempt * 100 + i).randbytes(1000 + i)
            path = m.mnt / f"f{attempt}-{i}"
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                if i < 10:  # checkpointed; the rest only closed: saved to the redo log
                    os.fsync(f.fileno())
            os.setxattr(path, "user.n", str(i).encode())
            expected[path.name] = data
        if redo.exists() and redo.stat().st_size > 0:
            break
    assert redo.stat().st_size > 0, "every kill found the redo log empty: nothing would be replayed"
    m.kill_daemon(unmount=False)
    force_unmount(m.mnt)
    assert redo.stat().st_size > 0
    m.mount()
    for name, data in expected.items():
        assert (m.mnt / name).read_bytes() == data
    assert (m.mnt / "before").read_bytes() == b"committed at the start\n"
    (m.mnt / "after").write_bytes(b"written after the replay\n")
    m.umount()
    meta = dict(raw_tables(m.store, "meta")["meta"])
    assert meta[b"format"] == bpfs_index.FORMAT.to_bytes(8, "big") and b"state" in meta
    index = Index(str(m.store / "index"), unlock(m.store), readonly=True)  # checks the authenticator
    try:
        assert index.scan_state() == index._stored_state()[1]
    finally:
        index.close()
    cp = m.verify()
    assert cp.returncode == 0, cp.stdout + cp.stderr
    m.mount()
    assert (m.mnt / "after").read_bytes() == b"written after the replay\n"
    m.umount()


def test_extent_offsets_are_not_on_the_drive(make_mount):
    m = make_mount(name="mnt")
    m.mount()
    (m.mnt / "big.bin").write_bytes(random.Random(5).randbytes(6 << 20))
    ino = os.stat(m.mnt / "big.bin").st_ino
    m.umount()
    prefix = bpfs_index.u64(ino)
    records = [(k, v) for k, v in raw_tables(m.store, "extents")["extents"] if k.startswith(prefix)]
    assert [k for k, _ in records] == [prefix + bpfs_index.u64(b) for b in range(6)]
    assert len({len(v) for _, v in records}) == 1, "the value lengths tell how many extents a block holds"
    index = Index(str(m.store / "index"), unlock(m.store), readonly=True)
    try:
        offsets = [e.offset for e in index.extents(ino)]
    finally:
        index.close()
    assert len(offsets) >= 3 and offsets[0] == 0
    keys = {k for k, _ in records}
    shown = [o for o in offsets[1:] if prefix + bpfs_index.u64(o) in keys]
    assert not shown, f"chunk start offsets readable from the drive: {shown}"
