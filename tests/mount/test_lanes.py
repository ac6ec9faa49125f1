"""Pack lanes: `.backupignore` keeps files on the drive, priority patterns replicate first.

Real mounts, real LMDB: after unmounting, the index is read with bpfs.index.Index to see
which packs hold each file's chunks, whether those packs are local (never in the outbox)
or queued (b"" normal, b"\\x01" priority), and which inodes carry the local marker.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

from bpfs import keyfile
from bpfs.index import LANE_LOCAL, LANE_NORMAL, LANE_PRIORITY, Index, u64
from bpfs.packs import PackFiles
from bpfs.snapshot import create_store_from_recovery_secret, export_snapshot, local_fetcher, rebuild_index
from bpfs.store import StoreFolder, key_path
from tests.helpers.cli import PASSPHRASE, run_bpfs
from tests.helpers.files import sha256_file, snapshot_tree

KiB, MiB = 1 << 10, 1 << 20


# ----------------------------------------------------------------------------------- helpers
def unlock(store: Path) -> keyfile.KeyRing:
    return keyfile.unlock(key_path(str(store)), PASSPHRASE.encode())


def put(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


class Lanes:
    """What the index of an unmounted store says about lanes."""

    def __init__(self, store: Path):
        index = Index(os.path.join(store, "index"), unlock(store))
        try:
            with index.read_view() as records:
                self.outbox = {int.from_bytes(k, "big"): v for k, v in records("outbox")}
            self.packs = dict(index.all_packs())
            self.ignored = set(index.ignored_inodes())
            self.extents: dict[int, list] = {}
            for ino, e in index.all_extents():
                self.extents.setdefault(ino, []).append(e)
            self.chunks = dict(index.all_chunks())
        finally:
            index.close()

    def packs_of(self, ino: int) -> set[int]:
        return {self.chunks[e.chunk_id].pack for e in self.extents.get(ino, [])}

    def lane_of(self, ino: int) -> set[int]:
        return {self.packs[p].lane for p in self.packs_of(ino)}

    def assert_local(self, ino: int, what: str) -> None:
        packs = self.packs_of(ino)
        assert packs, f"{what}: no chunks"
        assert ino in self.ignored, f"{what}: not marked local"
        for p in packs:
            assert self.packs[p].lane == LANE_LOCAL, f"{what}: chunk in pack {p} of lane {self.packs[p].lane}"
            assert p not in self.outbox, f"{what}: chunk in pack {p}, which is queued for partners"

    def assert_replicated(self, ino: int, what: str, lane: int = LANE_NORMAL) -> None:
        packs = self.packs_of(ino)
        assert packs, f"{what}: no chunks"
        assert ino not in self.ignored, f"{what}: marked local"
        for p in packs:
            assert self.packs[p].lane == lane, f"{what}: chunk in pack {p} of lane {self.packs[p].lane}, not {lane}"
            assert self.packs[p].sealed
            assert self.outbox.get(p) == (b"\x01" if lane == LANE_PRIORITY else b""), \
                f"{what}: pack {p} outbox entry {self.outbox.get(p)!r}"

    def assert_no_local_pack_queued(self) -> None:
        for p, rec in self.packs.items():
            if rec.lane == LANE_LOCAL:
                assert p not in self.outbox, f"local pack {p} is in the outbox"


def verify_ok(m, *extra) -> dict:
    cp = m.verify("--json", *extra)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    return json.loads(cp.stdout)


# ----------------------------------------------------------------------------- .backupignore
def test_ignored_files_stay_local_nested_and_negated(tmp_path, make_mount):
    m = make_mount(name="mnt")
    m.mount()
    mnt = m.mnt
    (mnt / ".backupignore").write_text("# comment\n*.log\ncache/\n!keep.log\n")
    (mnt / "sub").mkdir()
    (mnt / "sub" / ".backupignore").write_text("*.tmp\n!important.log\n")
    files = {
        "a.log": True, "keep.log": False, "cache/x.bin": True, "cache/deep/y.bin": True,
        "cache/keep.log": True,  # a file inside an ignored directory cannot be re-included (as in git)
        "sub/t.tmp": True, "t.tmp": False, "sub/important.log": False, "sub/other.log": True,
        "sub/deeper/z.tmp": True, "normal.bin": False, "sub/normal.txt": False,
    }
    inos = {}
    for i, (rel, _) in enumerate(files.items()):
        put(mnt / rel, random.Random(i).choice([700, 90 * KiB, 2 * MiB + 17]), seed=100 + i)
        inos[rel] = os.stat(mnt / rel).st_ino
    os.symlink("a.log", mnt / "cache" / "link.log")  # symlinks and directories always replicate
    (mnt / "empty.log").touch()
    empty_ino = os.stat(mnt / "empty.log").st_ino
    m.umount()

    lanes = Lanes(m.store)
    for rel, ignored in files.items():
        if ignored:
            lanes.assert_local(inos[rel], rel)
        else:
            lanes.assert_replicated(inos[rel], rel)
    assert empty_ino in lanes.ignored
    assert lanes.ignored == {inos[r] for r, ig in files.items() if ig} | {empty_ino}
    lanes.assert_no_local_pack_queued()
    report = verify_ok(m, "--read-data")
    assert report["counts"]["local files"] == len(lanes.ignored) and not report["notes"], report

    # and everything still reads back, after a remount too
    m.mount()
    for i, rel in enumerate(files):
        assert (m.mnt / rel).read_bytes() == random.Random(100 + i).randbytes(len((m.mnt / rel).read_bytes()))
    m.umount()


def test_lanes_follow_renames_links_and_ignore_changes(tmp_path, make_mount):
    m = make_mount(name="mnt")
    m.mount()
    mnt = m.mnt
    (mnt / ".backupignore").write_text("cache/\n*.log\n")
    data = {}
    for i, rel in enumerate(["cache/big.bin", "cache/sub/f.bin", "cache/linked.bin", "normal.bin", "a.log",
                             "other/z.bin", "cache/two-names.bin"]):
        data[rel] = put(mnt / rel, 3 * MiB + i, seed=i)
    inos = {rel: os.stat(mnt / rel).st_ino for rel in data}
    os.link(mnt / "cache" / "two-names.bin", mnt / "cache" / "sub" / "second-name.bin")  # both ignored
    m.umount()
    lanes = Lanes(m.store)
    for rel in ("cache/big.bin", "cache/sub/f.bin", "cache/linked.bin", "a.log", "cache/two-names.bin"):
        lanes.assert_local(inos[rel], rel)
    for rel in ("normal.bin", "other/z.bin"):
        lanes.assert_replicated(inos[rel], rel)

    m.mount()
    os.rename(mnt / "cache" / "big.bin", mnt / "out.bin")  # a file out of an ignored directory
    os.rename(mnt / "cache" / "sub", mnt / "moved")  # a directory out of it: its files follow
    os.link(mnt / "cache" / "linked.bin", mnt / "visible.bin")  # a second name that is not ignored
    os.rename(mnt / "normal.bin", mnt / "cache" / "normal.bin")  # into the ignored area
    with open(mnt / ".backupignore", "w") as f:  # stop ignoring *.log, start ignoring other/
        f.write("cache/\nother/\n")
    m.umount()

    lanes = Lanes(m.store)
    for rel in ("cache/big.bin", "cache/sub/f.bin", "cache/linked.bin", "a.log"):
        lanes.assert_replicated(inos[rel], rel)  # chunks moved out of the local packs
    # moved/second-name.bin is the other name of cache/two-names.bin: no longer every name is ignored
    lanes.assert_replicated(inos["cache/two-names.bin"], "two-names.bin")
    # became ignored later: marked local (left out of snapshots), chunks stay where they were
    for rel in ("normal.bin", "other/z.bin"):
        assert inos[rel] in lanes.ignored, rel
        assert lanes.lane_of(inos[rel]) == {LANE_NORMAL}, rel
    lanes.assert_no_local_pack_queued()
    report = verify_ok(m, "--read-data")
    assert not report["notes"], report

    m.mount()
    assert (mnt / "out.bin").read_bytes() == data["cache/big.bin"]
    assert (mnt / "moved" / "f.bin").read_bytes() == data["cache/sub/f.bin"]
    assert (mnt / "visible.bin").read_bytes() == data["cache/linked.bin"]
    assert (mnt / "a.log").read_bytes() == data["a.log"]
    # removing the .backupignore makes every file replicable again
    os.unlink(mnt / ".backupignore")
    m.umount()
    lanes = Lanes(m.store)
    assert not lanes.ignored
    assert all(rec.lane != LANE_LOCAL for rec in lanes.packs.values()), "a local pack is left"


def test_backupignore_replaced_by_rename_and_rechecked_after_a_crash(tmp_path, make_mount):
    m = make_mount(name="mnt")
    m.mount()
    mnt = m.mnt
    (mnt / "d").mkdir()
    (mnt / "d" / ".backupignore").write_text("*.bin\n")
    data = put(mnt / "d" / "a.bin", 2 * MiB, seed=1)
    ino = os.stat(mnt / "d" / "a.bin").st_ino
    # an editor's save: write a new file, rename it over the old one
    (mnt / "d" / ".backupignore.new").write_text("*.nothing\n")
    os.rename(mnt / "d" / ".backupignore.new", mnt / "d" / ".backupignore")
    m.umount()
    lanes = Lanes(m.store)
    lanes.assert_replicated(ino, "a.bin")

    # a change whose re-evaluation may not have happened before a kill -9 is redone at the next mount
    m.mount()
    (mnt / "d" / ".backupignore.new").write_text("a.*\n")
    os.rename(mnt / "d" / ".backupignore.new", mnt / "d" / ".backupignore")  # durable when it returns
    m.kill_daemon()
    m.mount()
    assert (mnt / "d" / "a.bin").read_bytes() == data
    m.umount()
    lanes = Lanes(m.store)
    assert ino in lanes.ignored
    verify_ok(m, "--read-data")


def test_dedup_between_ignored_and_replicated_files(tmp_path, make_mount):
    m = make_mount(name="mnt")
    m.mount()
    mnt = m.mnt
    (mnt / ".backupignore").write_text("ignored/\n")
    first = put(mnt / "ignored" / "first.bin", 5 * MiB, seed=1)
    second = put(mnt / "kept" / "second.bin", 5 * MiB, seed=2)
    os.sync()
    shutil.copyfile(mnt / "ignored" / "first.bin", mnt / "kept" / "first-copy.bin")  # local chunks now shared
    shutil.copyfile(mnt / "kept" / "second.bin", mnt / "ignored" / "second-copy.bin")  # dedups to normal packs
    inos = {p: os.stat(mnt / p).st_ino for p in ("ignored/first.bin", "kept/second.bin", "kept/first-copy.bin",
                                               "ignored/second-copy.bin")}
    m.umount()

    lanes = Lanes(m.store)
    lanes.assert_replicated(inos["kept/first-copy.bin"], "first-copy")
    lanes.assert_replicated(inos["kept/second.bin"], "second")
    for rel in ("ignored/first.bin", "ignored/second-copy.bin"):
        assert inos[rel] in lanes.ignored
        # the same chunks as the replicated copy: nothing of them is left in a local pack
        assert lanes.lane_of(inos[rel]) == {LANE_NORMAL}, rel
    assert lanes.packs_of(inos["ignored/first.bin"]) <= lanes.packs_of(inos["kept/first-copy.bin"])
    assert all(lanes.chunks[e.chunk_id].refs == 2 for e in lanes.extents[inos["ignored/first.bin"]])
    report = verify_ok(m, "--read-data")
    assert not report["notes"], report
    m.mount()
    assert (mnt / "kept" / "first-copy.bin").read_bytes() == first
    assert (mnt / "ignored" / "second-copy.bin").read_bytes() == second
    m.umount()


# ------------------------------------------------------------------------------------ priority
def test_priority_files_are_queued_first(tmp_path, make_mount):
    m = make_mount(name="mnt")
    m.mount()
    mnt = m.mnt
    files = {".ssh/id_ed25519": LANE_PRIORITY, ".ssh/config": LANE_PRIORITY, "work/server.pem": LANE_PRIORITY,
             "home/wallet.dat": LANE_PRIORITY, "vault.kdbx": LANE_PRIORITY, "notes.txt": LANE_NORMAL,
             "work/cert.pem.txt": LANE_NORMAL, "secrets/local.key": LANE_LOCAL}
    (mnt / ".backupignore").write_text("secrets/\n")  # local beats priority
    inos = {}
    for i, rel in enumerate(files):
        put(mnt / rel, 40 * KiB + i, seed=i)
        inos[rel] = os.stat(mnt / rel).st_ino
    put(mnt / "plain-name", 10 * KiB, seed=99)
    os.rename(mnt / "plain-name", mnt / "renamed.p12")  # lanes follow renames for new data
    with open(mnt / "renamed.p12", "ab") as f:
        f.write(random.Random(7).randbytes(20 * KiB))
    renamed = os.stat(mnt / "renamed.p12").st_ino
    m.umount()
    lanes = Lanes(m.store)
    for rel, lane in files.items():
        if lane == LANE_LOCAL:
            lanes.assert_local(inos[rel], rel)
        else:
            lanes.assert_replicated(inos[rel], rel, lane)
    assert LANE_PRIORITY in lanes.lane_of(renamed), "data written after a rename to a priority name"
    prio = [p for p, v in lanes.outbox.items() if v == b"\x01"]
    assert prio and all(lanes.packs[p].lane == LANE_PRIORITY for p in prio)

    # configurable: [replication] priority in STORE/bpfs.toml replaces the defaults
    (m.store / "bpfs.toml").write_text('[replication]\npriority = ["*.secret", "!not.secret"]\n')
    m.mount()
    put(mnt / "x.secret", 30 * KiB, seed=20)
    put(mnt / "not.secret", 30 * KiB, seed=21)
    put(mnt / "y.pem", 30 * KiB, seed=22)
    inos2 = {rel: os.stat(mnt / rel).st_ino for rel in ("x.secret", "not.secret", "y.pem")}
    m.umount()
    lanes = Lanes(m.store)
    lanes.assert_replicated(inos2["x.secret"], "x.secret", LANE_PRIORITY)
    lanes.assert_replicated(inos2["not.secret"], "not.secret", LANE_NORMAL)
    lanes.assert_replicated(inos2["y.pem"], "y.pem", LANE_NORMAL)


def test_crash_leaves_local_packs_out_of_the_outbox(tmp_path, make_mount):
    m = make_mount(name="mnt")
    m.mount()
    (m.mnt / ".backupignore").write_text("*.iso\n")
    put(m.mnt / "disk.iso", 3 * MiB, seed=1)
    put(m.mnt / "id_rsa", 3000, seed=2)
    put(m.mnt / "doc.txt", 3000, seed=3)
    with open(m.mnt / "disk.iso", "rb+") as f:
        os.fsync(f.fileno())
    m.kill_daemon()
    m.mount()  # repairs: the open packs of every lane are sealed in their lane
    assert (m.mnt / "disk.iso").read_bytes() == random.Random(1).randbytes(3 * MiB)
    ino = os.stat(m.mnt / "disk.iso").st_ino
    m.umount()
    lanes = Lanes(m.store)
    lanes.assert_local(ino, "disk.iso")
    lanes.assert_no_local_pack_queued()
    assert all(rec.sealed for rec in lanes.packs.values())
    assert {lanes.outbox[p] for p in lanes.outbox} <= {b"", b"\x01"}
    verify_ok(m, "--read-data")


# ------------------------------------------------------------------------------------ snapshots
def test_snapshot_and_rebuild_leave_ignored_files_out(tmp_path, make_mount):
    old = tmp_path / "old"
    info = json.loads(run_bpfs("init", old, "--kdf", "interactive", "--json").stdout)
    m = make_mount(store=old, name="mnt-old")
    m.mount()
    mnt = m.mnt
    (mnt / ".backupignore").write_text("*.log\nbuild/\n")
    (mnt / "src" / "nested").mkdir(parents=True)
    (mnt / "src" / ".backupignore").write_text("*.o\n!keep.o\n")
    ignored = ["app.log", "build/out.bin", "build/deep/more.bin", "src/a.o", "src/nested/b.o",
               "build/empty", "build/dup-of-kept.bin", "ignored-first.log", "build/hard1"]
    kept = ["README", "src/main.c", "src/keep.o", "src/nested/c.c", "big.bin", "kept-copy-of-ignored.bin"]
    put(mnt / "build" / "out.bin", 6 * MiB, seed=1)
    put(mnt / "build" / "deep" / "more.bin", 300 * KiB, seed=2)
    put(mnt / "app.log", 5000, seed=3)
    put(mnt / "src" / "a.o", 70 * KiB, seed=4)
    put(mnt / "src" / "nested" / "b.o", 1000, seed=5)
    (mnt / "build" / "empty").touch()
    os.symlink("out.bin", mnt / "build" / "link-to-ignored")  # symlinks always replicate (dangling after)
    os.setxattr(mnt / "build" / "deep" / "more.bin", "user.note", b"an ignored file's xattr")
    put(mnt / "README", 2000, seed=6)
    put(mnt / "src" / "main.c", 9000, seed=7)
    put(mnt / "src" / "keep.o", 9000, seed=8)
    put(mnt / "src" / "nested" / "c.c", 100, seed=9)
    put(mnt / "big.bin", 4 * MiB, seed=10)
    os.setxattr(mnt / "README", "user.note", b"kept")
    shutil.copyfile(mnt / "big.bin", mnt / "build" / "dup-of-kept.bin")  # ignored, shares normal chunks
    put(mnt / "ignored-first.log", 3 * MiB, seed=11)
    shutil.copyfile(mnt / "ignored-first.log", mnt / "kept-copy-of-ignored.bin")  # moves chunks out of local
    put(mnt / "build" / "hard1", 20 * KiB, seed=12)
    os.link(mnt / "build" / "hard1", mnt / "build" / "deep" / "hard2")  # every name ignored
    put(mnt / "shared-name.bin", 20 * KiB, seed=13)
    os.link(mnt / "shared-name.bin", mnt / "build" / "also-here.bin")  # one name replicates: all do
    kept += ["shared-name.bin", "build/also-here.bin"]
    put(mnt / "late.bin", 1 * MiB + 5, seed=14)
    os.sync()
    os.rename(mnt / "late.bin", mnt / "build" / "late.bin")  # ignored from now on; chunks in a normal pack
    ignored += ["build/deep/hard2", "build/late.bin"]
    tree = snapshot_tree(mnt)
    m.umount()
    assert verify_ok(m, "--read-data")["counts"]["local files"] == 10  # hard1/hard2 are one inode

    keys = unlock(old)
    st = StoreFolder(str(old), keys)
    try:
        manifest = export_snapshot(st.index, keys, st.packs)
        local = {p for p, rec in st.index.all_packs() if rec.local}
    finally:
        st.close()
    assert local, "no local pack was made"
    assert not set(manifest.packs) & local, "the manifest lists a local pack"
    assert manifest.stats["left_out_files"] == 10
    verify_ok(m, "--read-data")  # the old store is untouched by the export

    new = tmp_path / "new"
    nkeys = create_store_from_recovery_secret(str(new), info["recovery_secret"], PASSPHRASE.encode(), "interactive")
    src = PackFiles(str(old))
    try:
        rebuilt = rebuild_index(str(new), nkeys, manifest.root, local_fetcher(src))
    finally:
        src.close()
    dst = PackFiles(str(new))
    for pack_id in rebuilt.packs:
        os.makedirs(os.path.dirname(dst.path(pack_id)), mode=0o700, exist_ok=True)
        shutil.copyfile(PackFiles(str(old)).path(pack_id), dst.path(pack_id))
    n = make_mount(store=new, name="mnt-new")
    report = verify_ok(n, "--read-data")
    assert "local files" not in report["counts"] and not report["notes"], report
    rebuilt_lanes = Lanes(new)
    for pack_id, rec in rebuilt_lanes.packs.items():  # live counts match what is left in each pack
        in_pack = [c for c in rebuilt_lanes.chunks.values() if c.pack == pack_id]
        assert rec.live_chunks == len(in_pack) and rec.live_bytes == sum(c.sealed_length for c in in_pack)
        assert rec.lane != LANE_LOCAL

    expected = {k: v for k, v in tree.items() if os.fsdecode(k) not in ignored}
    expected[b"<hardlink groups>"] = [g for g in tree[b"<hardlink groups>"]
                                      if not any(os.fsdecode(p) in ignored for p in g)]
    n.mount()
    after = snapshot_tree(n.mnt)
    assert after == expected, [k for k in set(after) | set(expected) if after.get(k) != expected.get(k)][:10]
    for rel in ("build", "build/deep", "src/nested"):
        assert (n.mnt / rel).is_dir()  # directories stay, possibly empty
    assert not list((n.mnt / "build" / "deep").iterdir())
    assert sha256_file(n.mnt / "kept-copy-of-ignored.bin") == tree[b"ignored-first.log"]["sha256"]
    # the rebuilt store goes on working, ignore rules included
    put(n.mnt / "new.log", 1000, seed=30)
    ino = os.stat(n.mnt / "new.log").st_ino
    n.umount()
    assert ino in Lanes(new).ignored
    verify_ok(n, "--read-data")


def test_outbox_value_format_of_the_index(tmp_path, make_mount):
    """The replicator's contract: every sealed replicable pack is in the outbox with b"" or
    b"\\x01"; `Index.is_local_pack` tells a local pack from its plain record."""
    m = make_mount(name="mnt")
    m.mount()
    (m.mnt / ".backupignore").write_text("*.tmp\n")
    put(m.mnt / "a.tmp", 5000, seed=1)
    put(m.mnt / "b.pem", 5000, seed=2)
    put(m.mnt / "c.txt", 5000, seed=3)
    m.umount()
    keys = unlock(m.store)
    index = Index(os.path.join(m.store, "index"), keys)
    try:
        seen = set()
        for pack_id, rec in index.all_packs():
            raw_flags = index.txn.get(u64(pack_id), db=index._db["packs"])[20]
            queued = index.txn.get(u64(pack_id), db=index._db["outbox"])
            assert index.is_local_pack(pack_id) == rec.local == bool(raw_flags & 2)
            if rec.local:
                assert queued is None
            else:
                assert queued == (b"\x01" if rec.priority else b"") and rec.priority == bool(raw_flags & 4)
            seen.add(rec.lane)
        assert seen >= {LANE_LOCAL, LANE_PRIORITY, LANE_NORMAL}
    finally:
        index.close()


def test_reseal_is_deterministic_and_opens(tmp_path):
    """Snapshots re-seal records they filter: the same change gives the same bytes (metadata
    chunks stay deduplicated between snapshots), another plaintext another nonce."""
    store = tmp_path / "s"
    run_bpfs("init", store, "--kdf", "interactive")
    sealer = unlock(store).records
    prev = sealer.seal(b"original value", b"dirents\0key")
    a = sealer.reseal(b"filtered value", b"dirents\0key", prev)
    assert a == sealer.reseal(b"filtered value", b"dirents\0key", prev)
    assert sealer.open(a, b"dirents\0key") == b"filtered value"
    b = sealer.reseal(b"other value", b"dirents\0key", prev)
    assert a[:24] != b[:24] and sealer.open(b, b"dirents\0key") == b"other value"
    assert sealer.reseal(b"filtered value", b"dirents\0key", sealer.seal(b"original value", b"dirents\0key"))[:24] \
        != a[:24]


# ----------------------------------------------------------------------------- max_file_size
def test_a_new_max_file_size_re_evaluates_every_file_at_the_next_mount(tmp_path, make_mount):
    """Files written without a limit replicate; a mount with `max_file_size` set marks the ones
    above it local (left out of snapshots) without anything touching them, and a mount with the
    limit removed again makes them replicate (their chunks out of local packs)."""
    m = make_mount(name="mnt")
    m.mount()
    put(m.mnt / "big.bin", 3 * MiB, seed=1)
    put(m.mnt / "small.bin", 100 * KiB, seed=2)
    big, small = os.stat(m.mnt / "big.bin").st_ino, os.stat(m.mnt / "small.bin").st_ino
    m.umount()
    lanes = Lanes(m.store)
    lanes.assert_replicated(big, "big.bin without a limit")
    (m.store / "bpfs.toml").write_text('[replication]\nmax_file_size = "1M"\n')
    m.mount()
    m.umount()
    lanes = Lanes(m.store)
    assert big in lanes.ignored and small not in lanes.ignored, lanes.ignored
    lanes.assert_replicated(small, "small.bin under the limit")
    # it was marked while mounted (not by this read): a truncate below the limit, and it replicates
    m.mount()
    os.truncate(m.mnt / "big.bin", 200 * KiB)
    m.umount()
    lanes = Lanes(m.store)
    lanes.assert_replicated(big, "big.bin cut below the limit")
    # grown past it again, then the limit removed: it replicates again, its chunks out of local packs
    m.mount()
    with open(m.mnt / "big.bin", "ab") as f:
        f.write(random.Random(3).randbytes(2 * MiB))
    m.umount()
    lanes = Lanes(m.store)
    assert big in lanes.ignored and LANE_LOCAL in lanes.lane_of(big), lanes.lane_of(big)
    (m.store / "bpfs.toml").write_text("")
    m.mount()
    m.umount()
    Lanes(m.store).assert_replicated(big, "big.bin once the limit is gone")
    assert verify_ok(m, "--read-data")
