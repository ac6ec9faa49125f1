"""The read-only `.snapshots/` folder of a mount, and `bpfs snapshots`.

Snapshots are made offline (`export_snapshot` on the unmounted store, with a chosen creation
time so names are known in advance), then the store is mounted again and the history is
browsed, copied back and compared with plain copies made at snapshot time.
"""

from __future__ import annotations

import calendar
import errno
import json
import os
import random
import re
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from bpfs import history, keyfile, snapview
from bpfs.history import RetentionPolicy
from bpfs.snapshot import export_snapshot
from bpfs.store import StoreFolder, key_path
from tests.helpers.cli import PASSPHRASE, run_bpfs
from tests.helpers.files import assert_trees_equal, expect_errno, make_tree, sha256_bytes, sha256_file
from tests.helpers.procs import wait_until

KiB, MiB = 1 << 10, 1 << 20
T0 = calendar.timegm((2026, 12, 7, 8, 5, 23)) * 10**9  # 2026-12-07T08-05-23Z
NAME0 = "2026-12-07T08-05-23Z"


# ----------------------------------------------------------------------------------- helpers
def export(store: Path, created_ns: int, policy: RetentionPolicy | None = None):
    """Snapshot an unmounted store, made at `created_ns`; returns the manifest."""
    keys = keyfile.unlock(key_path(str(store)), PASSPHRASE.encode())
    st = StoreFolder(str(store), keys)
    try:
        return export_snapshot(st.index, keys, st.packs, policy=policy, clock=lambda: created_ns)
    finally:
        st.close()


def snapshot_at(m, created_ns: int, policy: RetentionPolicy | None = None):
    """Unmount, snapshot at `created_ns`, mount again; returns the manifest."""
    m.umount()
    manifest = export(m.store, created_ns, policy)
    m.mount()
    return manifest


def run(cmd: list, check: bool = True) -> subprocess.CompletedProcess:
    cp = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, timeout=300)
    if check:
        assert cp.returncode == 0, f"{cmd} failed: {cp.stdout}{cp.stderr}"
    return cp


def views_on_disk(store: Path) -> list[str]:
    d = store / "snapviews"
    return sorted(n for n in os.listdir(d) if n.isdigit()) if d.exists() else []


def opened_log_lines(store: Path, generation: int) -> int:
    text = (store / "log" / "daemon.log").read_text(errors="replace")
    return len(re.findall(rf"snapshot {generation} \(.*\) opened for \.snapshots", text))


def write_sparse(path: Path, rng: random.Random) -> None:
    with open(path, "wb") as f:
        f.write(rng.randbytes(10_000))
        f.seek(30 * MiB + 123)
        f.write(rng.randbytes(3 * MiB))
        f.seek(70 * MiB)
        f.write(b"island in a sea of zeros")
        f.truncate(90 * MiB + 5)


# ----------------------------------------------------------------------------------- pure
def test_names_are_utc_times_made_unique_by_generation():
    assert history.snapshot_name(T0) == NAME0
    assert history.snapshot_name(T0 + 999_999_999) == NAME0  # truncated to the second
    assert history.snapshot_name(T0 + 10**9) == "2026-12-07T08-05-24Z"
    names = history.snapshot_names([(12, T0 + 5), (7, T0), (30, T0 + 10**9), (20, T0 + 900_000_000)])
    assert names == {7: NAME0, 12: f"{NAME0}-g12", 20: f"{NAME0}-g20", 30: "2026-12-07T08-05-24Z"}
    assert history.unique_names([(5, "a"), (3, "a"), (9, "b")]) == {3: "a", 5: "a-g5", 9: "b"}


def test_virtual_inode_numbers_round_trip_and_stay_apart_from_live_ones():
    assert snapview.is_virtual(snapview.SNAPSHOTS_INO)
    assert snapview.split_ino(snapview.SNAPSHOTS_INO) == (0, 0)
    for slot, ino in ((1, 1), (2, 12345), ((1 << 22) - 1, (1 << 40) - 1)):
        vino = snapview.virtual_ino(slot, ino)
        assert snapview.is_virtual(vino) and vino < 1 << 63
        assert snapview.split_ino(vino) == (slot, ino)
    assert not snapview.is_virtual((1 << 62) - 1)
    for bad in ((0, 1), (1, 0), (1, 1 << 40), (1 << 22, 1)):
        with pytest.raises(ValueError):
            snapview.virtual_ino(*bad)


# ----------------------------------------------------------------------------------- mounts
@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_history_is_browsable_and_copied_back_exactly(make_mount, tmp_path, plain):
    m = make_mount(name="mnt")
    m.mount()
    rng = random.Random(42)
    make_tree(m.mnt / "tree", seed=5, n_files=50)
    big = rng.randbytes(20 * MiB)
    (m.mnt / "big.bin").write_bytes(big)
    write_sparse(m.mnt / "sparse.img", rng)
    (m.mnt / "doc.txt").write_bytes(b"version 1 of the document\n")
    os.chmod(m.mnt / "doc.txt", 0o640)
    os.setxattr(m.mnt / "doc.txt", "user.note", b"first")
    os.utime(m.mnt / "doc.txt", ns=(1_700_000_000_111_111_111, 1_600_000_000_222_222_222))
    run(["cp", "-a", f"{m.mnt}/.", plain])  # a plain copy made at snapshot time
    sparse_sha = sha256_file(m.mnt / "sparse.img")
    assert not os.path.exists(plain / ".snapshots"), "a copy of the whole mount walked into .snapshots"

    manifest = snapshot_at(m, T0)
    snap = m.mnt / ".snapshots" / NAME0
    assert os.listdir(m.mnt / ".snapshots") == [NAME0]
    assert stat.S_ISDIR(os.stat(m.mnt / ".snapshots").st_mode)
    assert stat.S_IMODE(os.stat(m.mnt / ".snapshots").st_mode) == 0o555
    assert os.stat(m.mnt / ".snapshots").st_nlink == 3
    assert os.stat(m.mnt / ".snapshots").st_dev == os.stat(m.mnt).st_dev == os.stat(snap / "doc.txt").st_dev
    # what the snapshot recorded: the live tree of that moment, read through the mount
    assert_trees_equal(plain, snap)

    # the live tree changes: an overwrite, then everything goes
    (m.mnt / "doc.txt").write_bytes(b"version 2, longer than the first one\n")
    assert (m.mnt / "doc.txt").read_bytes() == b"version 2, longer than the first one\n"
    assert (snap / "doc.txt").read_bytes() == b"version 1 of the document\n"
    for name in os.listdir(m.mnt):
        p = m.mnt / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    assert os.listdir(m.mnt) == []
    m.remount()  # the deleted files' data is kept (retired) for the snapshot across a restart too

    # one file back from yesterday is a cp
    rel = max((p for p in (plain / "tree").rglob("file-*.bin") if not p.is_symlink()),
              key=lambda p: p.stat().st_size).relative_to(plain)
    run(["cp", snap / rel, m.mnt / "restored.bin"])
    assert sha256_file(m.mnt / "restored.bin") == sha256_file(plain / rel)
    assert sha256_file(snap / "big.bin") == sha256_bytes(big)
    assert sha256_file(snap / "sparse.img") == sparse_sha
    with open(snap / "sparse.img", "rb") as f:  # a hole, and the island after it
        f.seek(70 * MiB - 5)
        assert f.read(29) == bytes(5) + b"island in a sea of zeros"
        f.seek(50 * MiB)
        assert f.read(MiB) == bytes(MiB)
    with open(snap / "big.bin", "rb") as f:  # reads at odd offsets across chunk boundaries
        for off in sorted(rng.randrange(0, 20 * MiB) for _ in range(40)):
            f.seek(off)
            assert f.read(300_001) == big[off:off + 300_001]
    assert os.getxattr(snap / "doc.txt", "user.note") == b"first"
    expect_errno(errno.ENODATA, os.getxattr, snap / "doc.txt", "user.bpfs.copies")
    assert "user.bpfs.copies" not in os.listxattr(snap / "doc.txt")

    # and the whole snapshot back with cp -a and with rsync: as the plain copy made then
    run(["cp", "-a", f"{snap}/.", tmp_path / "restored-cp"])
    assert_trees_equal(plain, tmp_path / "restored-cp")
    run(["rsync", "-aHX", f"{snap}/", f"{tmp_path / 'restored-rsync'}/"])
    assert_trees_equal(plain, tmp_path / "restored-rsync")
    run(["cp", "-a", f"{snap}/tree", m.mnt / "tree"])  # into the live tree itself
    assert_trees_equal(plain / "tree", m.mnt / "tree")
    assert (m.mnt / "restored.bin").stat().st_size > 0

    assert views_on_disk(m.store) == [str(manifest.generation)]
    m.umount()
    assert not (m.store / "snapviews").exists(), "the snapshot views outlived the mount"
    cp = m.verify("--read-data")
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_nothing_under_snapshots_can_be_changed(make_mount, tmp_path):
    m = make_mount(name="mnt")
    m.mount()
    (m.mnt / "dir").mkdir()
    (m.mnt / "dir" / "f.txt").write_bytes(b"kept as it was\n")
    os.setxattr(m.mnt / "dir" / "f.txt", "user.x", b"1")
    snapshot_at(m, T0)
    (m.mnt / "live.txt").write_bytes(b"live\n")
    (m.mnt / "livedir").mkdir()
    snaps = m.mnt / ".snapshots"
    s = snaps / NAME0
    f = s / "dir" / "f.txt"
    assert f.read_bytes() == b"kept as it was\n"
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o644, "the snapshot shows the file's real mode"

    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND,
                  os.O_WRONLY | os.O_CREAT):
        expect_errno(errno.EROFS, os.open, f, flags)
    expect_errno(errno.EROFS, os.open, s / "dir" / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    expect_errno(errno.EROFS, os.open, snaps / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    expect_errno(errno.EROFS, os.truncate, f, 0)
    expect_errno(errno.EROFS, os.utime, f, None)
    expect_errno(errno.EROFS, os.chmod, f, 0o600)
    expect_errno(errno.EROFS, os.chown, f, 1, 1)
    expect_errno(errno.EROFS, os.mkdir, s / "newdir")
    expect_errno(errno.EROFS, os.mkdir, snaps / "newdir")
    expect_errno(errno.EROFS, os.symlink, "x", s / "newlink")
    expect_errno(errno.EROFS, os.mknod, s / "fifo", stat.S_IFIFO | 0o644)
    expect_errno(errno.EROFS, os.unlink, f)
    expect_errno(errno.EROFS, os.rmdir, s / "dir")
    expect_errno(errno.EROFS, os.rmdir, s)
    expect_errno(errno.EROFS, os.rename, f, s / "dir" / "g.txt")
    expect_errno(errno.EROFS, os.rename, f, m.mnt / "out.txt")  # out of .snapshots
    expect_errno(errno.EROFS, os.rename, m.mnt / "live.txt", s / "dir" / "in.txt")  # into it
    expect_errno(errno.EROFS, os.rename, m.mnt / "livedir", snaps / "in")
    expect_errno(errno.EROFS, os.rename, s, snaps / "renamed")
    expect_errno(errno.EROFS, os.link, f, m.mnt / "hardlink.txt")
    expect_errno(errno.EROFS, os.link, m.mnt / "live.txt", s / "hardlink.txt")
    expect_errno(errno.EROFS, os.setxattr, f, "user.y", b"2")
    expect_errno(errno.EROFS, os.removexattr, f, "user.x")
    expect_errno(errno.EROFS, os.setxattr, snaps, "user.y", b"2")
    # the tools say the same
    for cmd in (["touch", f], ["mkdir", s / "d2"], ["rm", "-f", f], ["mv", m.mnt / "live.txt", s / "dir"],
                ["chmod", "600", f], ["setfattr", "-n", "user.z", "-v", "1", f]):
        cp = run(cmd, check=False)
        assert cp.returncode != 0 and "Read-only file system" in cp.stderr, (cmd, cp.stderr)
    cp = run(["sh", "-c", f"echo data > '{f}'"], check=False)
    assert cp.returncode != 0 and "Read-only file system" in cp.stderr, cp.stderr

    # the name .snapshots in the root is taken, and stays
    expect_errno(errno.EEXIST, os.mkdir, snaps)
    expect_errno(errno.EEXIST, os.open, snaps, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    expect_errno(errno.EEXIST, os.symlink, "x", snaps)
    expect_errno(errno.EEXIST, os.link, m.mnt / "live.txt", snaps)
    expect_errno(errno.EEXIST, os.mknod, snaps, stat.S_IFIFO | 0o644)
    expect_errno(errno.EEXIST, os.rename, m.mnt / "livedir", snaps)
    expect_errno(errno.EPERM, os.rmdir, snaps)
    expect_errno(errno.EPERM, os.rename, snaps, m.mnt / "elsewhere")
    cp = run(["rm", "-rf", snaps], check=False)
    assert cp.returncode != 0
    # nothing changed, anywhere
    assert f.read_bytes() == b"kept as it was\n" and os.getxattr(f, "user.x") == b"1"
    assert sorted(os.listdir(s)) == ["dir"] and os.listdir(s / "dir") == ["f.txt"]
    assert os.listdir(snaps) == [NAME0]
    assert sorted(os.listdir(m.mnt)) == ["dir", "live.txt", "livedir"]
    assert (m.mnt / "live.txt").read_bytes() == b"live\n"
    # the live tree is as writable as ever
    (m.mnt / "dir" / "f.txt").write_bytes(b"changed live\n")
    assert f.read_bytes() == b"kept as it was\n"
    m.umount()
    cp = m.verify()
    assert cp.returncode == 0, cp.stdout + cp.stderr


def test_snapshots_of_one_second_get_generation_suffixes_and_keep_their_versions(make_mount):
    m = make_mount(name="mnt")
    m.mount()
    versions = {}
    gens = []
    for i, when in enumerate((T0, T0 + 400_000_000, T0 + 900_000_000, T0 + 2 * 10**9)):
        content = f"version {i}\n".encode() * (i + 1)
        (m.mnt / "notes.txt").write_bytes(content)
        gens.append(snapshot_at(m, when).generation)
        versions[gens[-1]] = content
    names = [NAME0, f"{NAME0}-g{gens[1]}", f"{NAME0}-g{gens[2]}", "2026-12-07T08-05-25Z"]
    assert sorted(os.listdir(m.mnt / ".snapshots")) == sorted(names)
    for gen, name in zip(gens, names):
        assert (m.mnt / ".snapshots" / name / "notes.txt").read_bytes() == versions[gen]
    # the live file has moved on meanwhile
    (m.mnt / "notes.txt").write_bytes(b"live\n")
    assert (m.mnt / ".snapshots" / names[0] / "notes.txt").read_bytes() == versions[gens[0]]

    # bpfs snapshots, with the daemon and without
    live = json.loads(run_bpfs("snapshots", m.store, "--json").stdout)
    m.umount()
    offline = json.loads(run_bpfs("snapshots", m.store, "--json").stdout)
    for rows in (live, offline):
        assert [r["name"] for r in rows] == names
        assert [r["generation"] for r in rows] == gens
        assert all(r["files"] == 1 and r["partners"] == [] for r in rows)
        assert [r["bytes"] for r in rows] == [len(versions[g]) for g in gens]
        assert abs(rows[0]["created"] - T0 / 1e9) < 1e-3
    text = run_bpfs("snapshots", m.store).stdout.splitlines()
    assert len(text) == 4 and all(line.startswith(name + " ") for line, name in zip(text, names)), text
    assert f"generation {gens[1]}" in text[1] and "1 files" in text[1]


def test_snapshots_command_on_a_store_without_snapshots(make_mount):
    m = make_mount(name="mnt")
    cp = run_bpfs("snapshots", m.store)
    assert cp.returncode == 0 and "no snapshots" in cp.stdout and "bpfs sync" in cp.stdout, cp.stdout
    assert json.loads(run_bpfs("snapshots", m.store, "--json").stdout) == []
    m.mount()
    assert json.loads(run_bpfs("snapshots", "--store", m.store, "--json").stdout) == []
    assert os.listdir(m.mnt / ".snapshots") == []
    assert os.stat(m.mnt / ".snapshots").st_nlink == 2


def test_root_listing_with_many_entries_hidden_and_visible(make_mount):
    m = make_mount(name="mnt")
    m.mount()
    names = {f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(3000)}
    for n in names:
        (m.mnt / n).write_bytes(b"")
    snapshot_at(m, T0)
    # by default .snapshots is reached by name only: a listing (and a copy of the mount) is the live tree
    assert set(os.listdir(m.mnt)) == names
    assert len(os.listdir(m.mnt / ".snapshots" / NAME0)) == 3000
    assert os.path.isdir(m.mnt / ".snapshots")
    root_nlink = os.stat(m.mnt).st_nlink

    m.umount()
    m.mount("-o", "snapdir=visible")
    listed = os.listdir(m.mnt)  # getdents in several batches: offsets resume correctly
    assert len(listed) == len(names) + 1 and set(listed) == names | {".snapshots"}
    assert listed[-1] == ".snapshots"
    assert sorted(os.listdir(m.mnt / ".snapshots" / NAME0)) == sorted(names)
    assert os.stat(m.mnt).st_nlink == root_nlink + 1
    # telldir/seekdir in the middle of the root listing
    cp = run(["python3", "-c", SEEKDIR_SCRIPT, m.mnt])
    got = json.loads(cp.stdout)
    assert got["first"] == got["second"] == got["all"][1700:]
    assert set(got["all"]) - {".", ".."} == names | {".snapshots"}
    assert got["all"].count(".snapshots") == 1


SEEKDIR_SCRIPT = """
import ctypes, ctypes.util, json, sys
libc = ctypes.CDLL(ctypes.util.find_library("c"))
class Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]
libc.opendir.restype = ctypes.c_void_p
libc.opendir.argtypes = [ctypes.c_char_p]
libc.readdir.restype = ctypes.POINTER(Dirent)
libc.readdir.argtypes = libc.telldir.argtypes = libc.closedir.argtypes = [ctypes.c_void_p]
libc.telldir.restype = ctypes.c_long
libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
def rest(d):
    out = []
    while True:
        e = libc.readdir(d)
        if not e:
            return out
        out.append(e.contents.d_name.decode())
d = libc.opendir(sys.argv[1].encode())
everything = rest(d)
libc.closedir(d)
d = libc.opendir(sys.argv[1].encode())
for _ in range(1700):
    libc.readdir(d)
pos = libc.telldir(d)
first = rest(d)
libc.seekdir(d, pos)
second = rest(d)
print(json.dumps({"all": everything, "first": first, "second": second}))
"""


def test_views_are_cached_least_recently_used_and_built_once(make_mount):
    m = make_mount(name="mnt")
    m.mount()
    gens, contents = [], []
    for i in range(6):
        contents.append(random.Random(i).randbytes(300_000 + i))
        (m.mnt / "data.bin").write_bytes(contents[-1])
        (m.mnt / f"added-{i}").write_bytes(b"")
        m.umount()
        gens.append(export(m.store, T0 + i * 60 * 10**9).generation)
        m.mount()
    names = [history.snapshot_name(T0 + i * 60 * 10**9) for i in range(6)]
    assert sorted(os.listdir(m.mnt / ".snapshots")) == names
    assert views_on_disk(m.store) == [], "listing .snapshots materialized snapshots"

    # many readers at once of a snapshot nobody opened yet: one build
    target = m.mnt / ".snapshots" / names[0] / "data.bin"
    results, start = [], threading.Barrier(8)

    def reader():
        start.wait()
        results.append(target.read_bytes())

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [contents[0]] * 8
    assert opened_log_lines(m.store, gens[0]) == 1

    for _round in range(2):
        for i, name in enumerate(names):
            assert (m.mnt / ".snapshots" / name / "data.bin").read_bytes() == contents[i]
            assert len(os.listdir(m.mnt / ".snapshots" / name)) == i + 2
            on_disk = views_on_disk(m.store)
            assert len(on_disk) <= 4 and str(gens[i]) in on_disk, on_disk
    assert views_on_disk(m.store) == sorted(str(g) for g in gens[2:])
    # a view with an open file stays while it is open, however many others are used
    with open(m.mnt / ".snapshots" / names[0] / "data.bin", "rb") as f:
        for name in names[1:]:
            os.listdir(m.mnt / ".snapshots" / name / ".")
            (m.mnt / ".snapshots" / name / "data.bin").read_bytes()
        assert str(gens[0]) in views_on_disk(m.store)
        assert f.read() == contents[0]
    assert (m.mnt / "data.bin").read_bytes() == contents[-1]


def test_read_only_mount_shows_snapshots(make_mount):
    m = make_mount(name="mnt")
    m.mount()
    (m.mnt / "a.txt").write_bytes(b"old\n")
    m.umount()
    export(m.store, T0)
    m.mount()
    (m.mnt / "a.txt").write_bytes(b"new\n")
    m.umount()
    m.mount("-o", "ro")
    assert os.listdir(m.mnt / ".snapshots") == [NAME0]
    assert (m.mnt / ".snapshots" / NAME0 / "a.txt").read_bytes() == b"old\n"
    assert (m.mnt / "a.txt").read_bytes() == b"new\n"
    expect_errno(errno.EROFS, os.open, m.mnt / ".snapshots" / NAME0 / "a.txt", os.O_WRONLY)
    rows = json.loads(run_bpfs("snapshots", m.store, "--json").stdout)  # the ro daemon cannot be asked
    assert [r["name"] for r in rows] == [NAME0]


KEEP_ONE = RetentionPolicy(keep_within=0, keep_daily=0, keep_weekly=0, keep_monthly=0, keep_last=1)


@pytest.mark.timeout(300)
def test_snapshot_file_moved_by_compaction_is_read_where_it_is_now(make_mount):
    """A chunk the snapshot recorded in one pack, moved since by compaction (the pack is gone),
    is read where the live index says it is now."""
    m = make_mount(name="mnt")
    m.mount()
    rng = random.Random(9)
    keep, drop = rng.randbytes(2 * MiB + 17), rng.randbytes(11 * MiB)
    (m.mnt / "keep.bin").write_bytes(keep)
    (m.mnt / "drop.bin").write_bytes(drop)
    first = snapshot_at(m, T0)
    (m.mnt / "drop.bin").unlink()
    (m.mnt / "small.txt").write_bytes(b"moves the generation on\n")
    m.umount()
    second = export(m.store, T0 + 3600 * 10**9, KEEP_ONE)  # the first is released: drop.bin's data goes
    before = {p.name for p in (m.store / "packs").rglob("*.pack")}
    assert second.stats["released_snapshots"] == [first.generation], second.stats
    assert second.stats["sparse_packs"], second.stats  # keep.bin's pack is now mostly empty
    m.mount()  # ... and the mount compacts it in the background
    assert wait_until(lambda: not before <= {p.name for p in (m.store / "packs").rglob("*.pack")}, timeout=30), \
        "no pack was compacted away"
    (m.mnt / "keep.bin").unlink()  # retired, in the pack compaction moved it to
    name = history.snapshot_name(T0 + 3600 * 10**9)
    assert os.listdir(m.mnt / ".snapshots") == [name]
    assert (m.mnt / ".snapshots" / name / "keep.bin").read_bytes() == keep
    assert not (m.mnt / ".snapshots" / name / "drop.bin").exists()
    m.umount()
    cp = m.verify("--read-data")
    assert cp.returncode == 0, cp.stdout + cp.stderr
