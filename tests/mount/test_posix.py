"""POSIX behaviour inside a real bpfs mount, plus real tools (cp, rsync, tar, git, sqlite)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import random
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.cli import init_store
from tests.helpers.files import (assert_trees_equal, checksums, dir_apparent_size, dir_disk_usage, expect_errno,
                                 make_tree, sha256_bytes, sha256_file)
from tests.helpers.mounts import Mount

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def read_all(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ====================================================================== big & sparse

@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_sparse_file_past_4gib(mounted):
    mounted.umount()
    base_apparent = dir_apparent_size(mounted.store)
    base_disk = dir_disk_usage(mounted.store)
    mounted.mount()

    p = mounted.mnt / "sparse"
    far = 4 * GiB + GiB // 2
    marker = b"bpfs sparse marker at 4.5 GiB"
    straddle = random.Random(7).randbytes(MiB)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, marker, far) == len(marker)
        assert os.pwrite(fd, straddle, 4 * GiB - 7) == len(straddle)
        os.fsync(fd)
    finally:
        os.close(fd)

    def check():
        st = os.stat(p)
        assert st.st_size == far + len(marker)
        assert st.st_blocks * 512 < 16 * MiB, f"sparse file occupies {st.st_blocks * 512} bytes"
        fd = os.open(p, os.O_RDONLY)
        try:
            assert os.pread(fd, len(marker), far) == marker
            assert os.pread(fd, 100, far - 100) == bytes(100)
            assert os.pread(fd, 1000, far + len(marker)) == b"", "read past EOF returned data"
            assert os.pread(fd, len(straddle), 4 * GiB - 7) == straddle
            assert os.pread(fd, MiB, 0) == bytes(MiB), "hole at start is not zero"
            assert os.pread(fd, MiB, 4 * GiB - 7 - MiB) == bytes(MiB)
            assert os.pread(fd, MiB, 4 * GiB - 7 + MiB) == bytes(MiB)
            rng = random.Random(1)
            for _ in range(20):
                off = rng.randrange(MiB, 4 * GiB - 2 * MiB)
                assert os.pread(fd, 64 * KiB, off) == bytes(64 * KiB), f"hole at {off} not zero"
        finally:
            os.close(fd)

    check()
    mounted.umount()
    grown_apparent = dir_apparent_size(mounted.store) - base_apparent
    grown_disk = dir_disk_usage(mounted.store) - base_disk
    assert grown_apparent < 16 * MiB, f"store grew by {grown_apparent} bytes for a sparse 4.5 GiB file"
    assert grown_disk < 32 * MiB, f"store uses {grown_disk} more bytes on disk for a sparse file"
    mounted.mount()
    check()
    # extend further with truncate: still sparse, zeros
    os.truncate(p, 5 * GiB)
    assert os.stat(p).st_size == 5 * GiB
    with open(p, "rb") as f:
        f.seek(5 * GiB - 4096)
        assert f.read() == bytes(4096)


@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_large_dense_file_bounded_memory(mounted):
    """256 MiB sequential write: content intact, daemon RSS stays < 300 MiB."""
    p = mounted.mnt / "dense"
    h = hashlib.sha256()
    rng = random.Random(3)
    with open(p, "wb") as f:
        for _ in range(256):
            b = rng.randbytes(MiB)
            h.update(b)
            f.write(b)
    pid = mounted.daemon_pid()
    with open(f"/proc/{pid}/status") as f:
        hwm = [int(line.split()[1]) for line in f if line.startswith("VmHWM:")][0] * 1024
    assert hwm < 300 * MiB, f"daemon peak RSS {hwm / MiB:.0f} MiB while writing a 256 MiB file"
    assert os.stat(p).st_size == 256 * MiB
    mounted.remount()
    assert sha256_file(p) == h.hexdigest()


# ====================================================================== big directories

@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_directory_with_100k_entries(mounted):
    d = mounted.mnt / "big"
    os.mkdir(d)
    n = 100_000
    names = [f"entry-{i:06d}" for i in range(n)]
    ds = str(d) + "/"
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    for name in names:
        os.close(os.open(ds + name, flags, 0o644))

    def check():
        listed = os.listdir(d)
        assert len(listed) == n
        assert set(listed) == set(names)
        assert sum(1 for _ in os.scandir(d)) == n
        rng = random.Random(5)
        for name in rng.sample(names, 300):
            st = os.stat(ds + name)
            assert stat.S_ISREG(st.st_mode) and st.st_size == 0
        for i in range(50):
            expect_errno(errno.ENOENT, os.stat, ds + f"missing-{i}")

    check()
    mounted.remount()
    check()
    for name in names[:1000]:
        os.unlink(ds + name)
    assert len(os.listdir(d)) == n - 1000
    expect_errno(errno.ENOENT, os.stat, ds + names[0])


# ====================================================================== links

def test_symlinks(mounted):
    m = mounted.mnt
    (m / "target.txt").write_text("through the link")
    os.mkdir(m / "dir")
    (m / "dir" / "inner").write_text("inner")
    long_target = "x/" * 1500 + "end"          # 3003 bytes
    odd_target = b"odd-\xff\xfe-target"
    os.symlink("target.txt", m / "rel")
    os.symlink(str(m / "target.txt"), m / "abs")
    os.symlink("does/not/exist", m / "dangling")
    os.symlink("dir", m / "dirlink")
    os.symlink(long_target, m / "long")
    os.symlink(odd_target, os.fsencode(m / "odd"))

    def check():
        assert os.readlink(m / "rel") == "target.txt"
        st = os.lstat(m / "rel")
        assert stat.S_ISLNK(st.st_mode)
        assert st.st_size == len("target.txt")
        assert (m / "rel").read_text() == "through the link"
        assert (m / "abs").read_text() == "through the link"
        assert os.stat(m / "rel").st_ino == os.stat(m / "target.txt").st_ino
        assert stat.S_ISLNK(os.lstat(m / "dangling").st_mode)
        expect_errno(errno.ENOENT, os.stat, m / "dangling")
        assert os.listdir(m / "dirlink") == ["inner"]
        assert os.readlink(m / "long") == long_target
        assert os.lstat(m / "long").st_size == len(long_target)
        assert os.readlink(os.fsencode(m / "odd")) == odd_target
        expect_errno(errno.ELOOP, os.open, m / "rel", os.O_RDONLY | os.O_NOFOLLOW)

    check()
    expect_errno(errno.EEXIST, os.symlink, "other", m / "rel")
    mounted.remount()
    check()
    os.unlink(m / "rel")
    assert (m / "target.txt").read_text() == "through the link"


def test_hard_links(mounted):
    m = mounted.mnt
    os.mkdir(m / "d")
    a, b, c = m / "a", m / "d" / "b", m / "c"
    a.write_bytes(b"shared content")
    os.link(a, b)
    sa, sb = os.stat(a), os.stat(b)
    assert sa.st_ino == sb.st_ino
    assert sa.st_nlink == sb.st_nlink == 2
    with open(b, "ab") as f:
        f.write(b" + appended via b")
    assert a.read_bytes() == b"shared content + appended via b"
    os.chmod(a, 0o600)
    assert stat.S_IMODE(os.stat(b).st_mode) == 0o600
    os.link(b, c)
    assert os.stat(a).st_nlink == 3
    expect_errno(errno.EEXIST, os.link, a, c)
    expect_errno(errno.EPERM, os.link, m / "d", m / "dlink")
    # rename between two links of the same inode is a no-op that keeps both names
    os.rename(a, c)
    assert a.exists() and c.exists(), "rename(a, c) with a, c hard links of one inode removed a name"
    assert os.stat(a).st_nlink == 3

    mounted.remount()
    sa, sb, sc = os.stat(a), os.stat(b), os.stat(c)
    assert sa.st_ino == sb.st_ino == sc.st_ino, "hard links lost their shared inode across remount"
    assert sa.st_nlink == 3
    assert b.read_bytes() == b"shared content + appended via b"
    os.unlink(a)
    assert os.stat(b).st_nlink == 2
    os.unlink(c)
    assert os.stat(b).st_nlink == 1
    assert b.read_bytes() == b"shared content + appended via b"
    mounted.remount()
    assert os.stat(b).st_nlink == 1
    assert b.read_bytes() == b"shared content + appended via b"


# ====================================================================== rename

def test_rename_over_existing_file(mounted):
    m = mounted.mnt
    (m / "a").write_bytes(b"AAAA")
    (m / "b").write_bytes(b"BBBBBBBB")
    ino_a = os.stat(m / "a").st_ino
    fd = os.open(m / "b", os.O_RDONLY)
    try:
        os.rename(m / "a", m / "b")
        assert not (m / "a").exists()
        assert (m / "b").read_bytes() == b"AAAA"
        assert os.stat(m / "b").st_ino == ino_a
        assert os.pread(fd, 100, 0) == b"BBBBBBBB", "replaced file unreadable through an open fd"
    finally:
        os.close(fd)
    assert sorted(os.listdir(m)) == ["b"]
    mounted.remount()
    assert sorted(os.listdir(m)) == ["b"]
    assert (m / "b").read_bytes() == b"AAAA"


def test_rename_across_directories(mounted):
    m = mounted.mnt
    os.makedirs(m / "d1")
    os.makedirs(m / "d2" / "deep")
    data = os.urandom(300 * KiB)
    (m / "d1" / "x").write_bytes(data)
    ino = os.stat(m / "d1" / "x").st_ino
    os.rename(m / "d1" / "x", m / "d2" / "deep" / "y")
    assert os.listdir(m / "d1") == []
    assert os.listdir(m / "d2" / "deep") == ["y"]
    assert os.stat(m / "d2" / "deep" / "y").st_ino == ino
    mounted.remount()
    assert os.listdir(m / "d1") == []
    assert (m / "d2" / "deep" / "y").read_bytes() == data


def test_rename_directories(mounted):
    m = mounted.mnt
    os.makedirs(m / "src" / "sub" / "subsub")
    (m / "src" / "sub" / "subsub" / "f").write_text("deep file")
    (m / "src" / "g").write_text("g")
    os.makedirs(m / "dst" / "parent")
    os.rename(m / "src", m / "dst" / "parent" / "moved")
    new = m / "dst" / "parent" / "moved"
    assert not (m / "src").exists()
    assert (new / "sub" / "subsub" / "f").read_text() == "deep file"
    assert os.stat(new / "..").st_ino == os.stat(m / "dst" / "parent").st_ino
    # nlink of directories: parent loses/gains a subdir
    # into own subdirectory
    expect_errno(errno.EINVAL, os.rename, new, new / "sub" / "inside")
    # onto a non-empty directory
    os.makedirs(m / "full" / "child")
    expect_errno(errno.ENOTEMPTY, os.rename, new, m / "full")
    assert (new / "g").read_text() == "g"
    assert os.listdir(m / "full") == ["child"]
    # onto an empty directory: replaces it
    os.mkdir(m / "empty")
    os.rename(new, m / "empty")
    assert (m / "empty" / "g").read_text() == "g"
    assert not new.exists()
    # type mismatches
    (m / "file").write_text("file")
    expect_errno(errno.ENOTDIR, os.rename, m / "empty", m / "file")
    expect_errno(errno.EISDIR, os.rename, m / "file", m / "full")
    mounted.remount()
    assert (m / "empty" / "sub" / "subsub" / "f").read_text() == "deep file"
    assert sorted(os.listdir(m)) == ["dst", "empty", "file", "full"]
    assert os.listdir(m / "dst" / "parent") == []


def test_rmdir_non_empty(mounted):
    m = mounted.mnt
    os.makedirs(m / "d" / "e")
    expect_errno(errno.ENOTEMPTY, os.rmdir, m / "d")
    (m / "f").write_text("x")
    expect_errno(errno.ENOTDIR, os.rmdir, m / "f")
    expect_errno(errno.EISDIR, os.unlink, m / "d")
    os.rmdir(m / "d" / "e")
    os.rmdir(m / "d")
    assert os.listdir(m) == ["f"]


def _renameat2(src, dst, flags):
    libc = ctypes.CDLL(None, use_errno=True)
    AT_FDCWD = -100
    r = libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_rename_noreplace_never_replaces(mounted):
    """RENAME_NOREPLACE may be unsupported (EINVAL), but must never clobber the target."""
    m = mounted.mnt
    (m / "a").write_text("a")
    (m / "b").write_text("b")
    with pytest.raises(OSError) as ei:
        _renameat2(m / "a", m / "b", 1)  # RENAME_NOREPLACE
    assert ei.value.errno in (errno.EEXIST, errno.EINVAL)
    assert (m / "a").read_text() == "a" and (m / "b").read_text() == "b"


# ====================================================================== unlink / truncate / append

def test_unlink_open_file_stays_readable(mounted):
    m = mounted.mnt
    data = os.urandom(200 * KiB)
    (m / "victim").write_bytes(data)
    (m / "other").write_text("other")
    fd = os.open(m / "victim", os.O_RDWR)
    try:
        os.unlink(m / "victim")
        assert not (m / "victim").exists()
        assert sorted(os.listdir(m)) == ["other"], f"unlinked-but-open file visible: {os.listdir(m)}"
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, len(data) + 10, 0) == data
        os.pwrite(fd, b"tail", len(data))
        assert os.fstat(fd).st_size == len(data) + 4
        assert os.pread(fd, 10, len(data)) == b"tail"
        # a new file with the same name is a different file
        (m / "victim").write_text("new")
        assert os.pread(fd, 4, 0) == data[:4]
    finally:
        os.close(fd)
    assert (m / "victim").read_text() == "new"
    assert sorted(os.listdir(m)) == ["other", "victim"]
    mounted.remount()
    assert sorted(os.listdir(m)) == ["other", "victim"]
    assert (m / "victim").read_text() == "new"


def test_unlink_open_file_across_umount(mounted):
    """An fd held while the file is unlinked: after close + remount the file is gone."""
    m = mounted.mnt
    (m / "gone").write_bytes(b"x" * 5000)
    fd = os.open(m / "gone", os.O_RDONLY)
    os.unlink(m / "gone")
    assert os.read(fd, 10) == b"x" * 10
    os.close(fd)
    mounted.remount()
    assert os.listdir(m) == []


def test_truncate(mounted):
    p = mounted.mnt / "t"
    p.write_bytes(b"abcdefgh")
    os.truncate(p, 3)
    assert p.read_bytes() == b"abc"
    os.truncate(p, 10)
    assert p.read_bytes() == b"abc" + bytes(7), "truncate down then up must expose zeros, not old data"
    with open(p, "r+b") as f:
        f.truncate(1)
        f.seek(0)
        assert f.read() == b"a"
        f.truncate(5)
        f.seek(0)
        assert f.read() == b"a" + bytes(4)
    # multi-chunk file: cut in the middle, extend, old bytes must not reappear
    big = random.Random(9).randbytes(6 * MiB)
    q = mounted.mnt / "big"
    q.write_bytes(big)
    cut = 3 * MiB + 12345
    os.truncate(q, cut)
    os.truncate(q, 8 * MiB)
    expect = big[:cut] + bytes(8 * MiB - cut)
    assert sha256_file(q) == sha256_bytes(expect)
    # O_TRUNC
    fd = os.open(mounted.mnt / "t", os.O_WRONLY | os.O_TRUNC)
    assert os.fstat(fd).st_size == 0, "O_TRUNC did not truncate"
    os.write(fd, b"Z")
    os.close(fd)
    assert p.read_bytes() == b"Z"
    mounted.remount()
    assert p.read_bytes() == b"Z"
    assert sha256_file(q) == sha256_bytes(expect)
    assert os.stat(q).st_size == 8 * MiB


def test_o_append(mounted):
    p = mounted.mnt / "log"
    fd1 = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    fd2 = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd1, b"one;")
        os.write(fd2, b"two;")
        os.lseek(fd1, 0, os.SEEK_SET)
        os.write(fd1, b"three;")
        fd3 = os.open(p, os.O_WRONLY)
        os.pwrite(fd3, b"X" * 30, 0)   # extend from a non-append fd
        os.close(fd3)
        os.write(fd2, b"four;")
    finally:
        os.close(fd1)
        os.close(fd2)
    expect = b"X" * 30 + b"four;"
    assert p.read_bytes() == expect
    mounted.remount()
    assert p.read_bytes() == expect


# ====================================================================== metadata

def test_chmod_chown_utimens(mounted):
    m = mounted.mnt
    f, d = m / "f", m / "d"
    f.write_text("x")
    os.mkdir(d)
    os.symlink("f", m / "l")
    # chown first: Linux clears S_ISUID on chown (even for root)
    os.chown(f, 1234, 5678)
    os.chown(d, -1, 42)
    ctime0 = os.stat(f).st_ctime_ns
    time.sleep(0.01)
    os.chmod(f, 0o4751)
    os.chmod(d, 0o1777)
    assert os.stat(f).st_ctime_ns > ctime0, "chmod did not update ctime"
    os.lchown(m / "l", 777, 888)
    t_f = (1_234_567_890_123_456_789, 1_600_000_000_987_654_321)
    t_d = (5, 999_999_999)
    t_l = (1_000_000_000_000_000_001, 1_111_111_111_111_111_111)
    os.utime(f, ns=t_f)
    os.utime(d, ns=t_d)
    os.utime(m / "l", ns=t_l, follow_symlinks=False)

    def check():
        sf, sd, sl = os.stat(f), os.stat(d), os.lstat(m / "l")
        assert stat.S_IMODE(sf.st_mode) == 0o4751
        assert stat.S_IMODE(sd.st_mode) == 0o1777
        assert (sf.st_uid, sf.st_gid) == (1234, 5678)
        assert (sd.st_uid, sd.st_gid) == (0, 42)
        assert (sl.st_uid, sl.st_gid) == (777, 888)
        assert (sf.st_atime_ns, sf.st_mtime_ns) == t_f
        assert (sd.st_atime_ns, sd.st_mtime_ns) == t_d
        assert sl.st_mtime_ns == t_l[1]
        assert sf.st_mtime_ns != sl.st_mtime_ns  # symlink times did not leak to target

    check()
    mounted.remount()
    check()
    # writing updates mtime to "now"
    before = time.time_ns()
    with open(f, "a") as fh:
        fh.write("more")
    st = os.stat(f)
    assert st.st_mtime_ns >= before - 2 * 10**9, "write did not update mtime"
    assert abs(st.st_mtime_ns - time.time_ns()) < 60 * 10**9
    # utime(None) = now
    os.utime(d)
    assert abs(os.stat(d).st_mtime_ns - time.time_ns()) < 60 * 10**9


def test_extreme_timestamps(mounted):
    """Pre-1970 and far-future nanosecond timestamps round-trip exactly."""
    f = mounted.mnt / "old"
    f.write_text("x")
    cases = [(-1, -1), (-10**18 + 123, -5 * 10**17 + 7), (0, 0), (2**33 * 10**9 + 1, 2**33 * 10**9 + 999_999_999)]
    for ns in cases:
        os.utime(f, ns=ns)
        st = os.stat(f)
        assert (st.st_atime_ns, st.st_mtime_ns) == ns, f"utime {ns} read back as {(st.st_atime_ns, st.st_mtime_ns)}"
    mounted.remount()
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == cases[-1]


def test_directory_mtime_changes_on_entry_changes(mounted):
    d = mounted.mnt / "d"
    os.mkdir(d)
    os.utime(d, ns=(10**18, 10**18))
    (d / "new").write_text("x")
    m1 = os.stat(d).st_mtime_ns
    assert m1 != 10**18, "creating an entry did not update the directory mtime"
    os.utime(d, ns=(10**18, 10**18))
    os.unlink(d / "new")
    assert os.stat(d).st_mtime_ns != 10**18, "removing an entry did not update the directory mtime"


def test_xattrs(mounted):
    m = mounted.mnt
    f, d = m / "f", m / "d"
    f.write_text("x")
    os.mkdir(d)
    values = {
        "user.simple": b"value",
        "user.binary": bytes(range(256)),
        "user.empty": b"",
        "user.big": random.Random(2).randbytes(16 * KiB),
        "user." + "n" * 200: b"long name",
    }
    for k, v in values.items():
        os.setxattr(f, k, v)
    os.setxattr(d, "user.on-dir", b"dir value")

    def check():
        assert sorted(os.listxattr(f)) == sorted(values)
        for k, v in values.items():
            assert os.getxattr(f, k) == v, k
        assert os.listxattr(d) == ["user.on-dir"]
        assert os.getxattr(d, "user.on-dir") == b"dir value"

    check()
    expect_errno(errno.ENODATA, os.getxattr, f, "user.missing")
    expect_errno(errno.EEXIST, os.setxattr, f, "user.simple", b"v2", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, f, "user.missing", b"v2", os.XATTR_REPLACE)
    expect_errno(errno.ENODATA, os.removexattr, f, "user.missing")
    os.setxattr(f, "user.simple", b"replaced", os.XATTR_REPLACE)
    values["user.simple"] = b"replaced"
    check()
    mounted.remount()
    check()
    os.removexattr(f, "user.binary")
    del values["user.binary"]
    check()
    mounted.remount()
    check()
    # xattrs follow the inode through rename and hard link
    os.rename(f, m / "g")
    os.link(m / "g", m / "h")
    assert os.getxattr(m / "h", "user.simple") == b"replaced"


# ====================================================================== statfs / fsync

def test_statfs_reports_backing_free_space(mounted):
    sm = os.statvfs(mounted.mnt)
    ss = os.statvfs(mounted.store)
    free_m, free_s = sm.f_bavail * sm.f_frsize, ss.f_bavail * ss.f_frsize
    total_s = ss.f_blocks * ss.f_frsize
    tol = max(0.02 * total_s, 256 * MiB)
    assert abs(free_m - free_s) <= tol, f"mount reports {free_m} free, backing drive has {free_s}"
    assert sm.f_blocks * sm.f_frsize >= free_m
    assert sm.f_namemax == 255


def test_statfs_on_small_backing_fs(small_tmpfs):
    fs = small_tmpfs("128m")
    store = fs / "store"
    init_store(store)
    m = Mount(store, fs.parent / "mnt")
    try:
        m.mount()
        ss = os.statvfs(fs)
        sm = os.statvfs(m.mnt)
        free_s, free_m = ss.f_bavail * ss.f_frsize, sm.f_bavail * sm.f_frsize
        assert abs(free_m - free_s) <= 4 * MiB, f"mount says {free_m} free, tmpfs has {free_s}"
        assert sm.f_blocks * sm.f_frsize <= 160 * MiB
        (m.mnt / "blob").write_bytes(os.urandom(40 * MiB))
        os.sync()
        sm2 = os.statvfs(m.mnt)
        free_m2 = sm2.f_bavail * sm2.f_frsize
        assert free_m - free_m2 >= 30 * MiB, "free space did not drop after writing 40 MiB"
        ss2 = os.statvfs(fs)
        assert abs(free_m2 - ss2.f_bavail * ss2.f_frsize) <= 4 * MiB
    finally:
        m.cleanup()


def test_fsync_and_fdatasync(mounted):
    m = mounted.mnt
    data = os.urandom(3 * MiB + 17)
    fd = os.open(m / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, data[:MiB])
    os.fsync(fd)
    os.write(fd, data[MiB:])
    os.fdatasync(fd)
    dfd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    # fsync()ed data must survive kill -9 of the daemon even before close()
    mounted.kill_daemon()
    try:
        os.close(fd)
    except OSError:
        pass
    mounted.mount()
    assert read_all(m / "f") == data


# ====================================================================== names

def test_long_and_odd_names(mounted):
    m = mounted.mnt
    mb = os.fsencode(m)
    n255 = "a" * 255
    n256 = "b" * 256
    e254 = "é" * 127                # 254 bytes
    e256 = "é" * 128                # 256 bytes
    odd = [b"\xff\xfe\xfd", b"caf\xe9", b"new\nline", b"back\\slash", b"-dash", b" space ",
           b"ctrl\x01\x7f", "日本語".encode(), b"." * 3]
    (m / n255).write_text("255")
    os.mkdir(m / ("D" * 255))
    (m / e254).write_text("e254")
    for name in odd:
        with open(mb + b"/" + name, "wb") as f:
            f.write(name)
    for fn in (lambda n: open(m / n, "w"), lambda n: os.mkdir(m / n),
               lambda n: os.symlink("x", m / n), lambda n: os.link(m / n255, m / n),
               lambda n: os.rename(m / n255, m / n), lambda n: os.stat(m / n)):
        for bad in (n256, e256):
            expect_errno(errno.ENAMETOOLONG, fn, bad)
    # non-UTF-8 name renamed to another non-UTF-8 name
    os.rename(mb + b"/caf\xe9", mb + b"/na\xefve")

    expect = {n255.encode(), b"D" * 255, e254.encode(), b"na\xefve"} | set(odd) - {b"caf\xe9"}

    def check():
        assert set(os.listdir(mb)) == expect
        assert (m / n255).read_text() == "255"
        assert (m / e254).read_text() == "e254"
        for name in odd:
            if name != b"caf\xe9":
                with open(mb + b"/" + name, "rb") as f:
                    assert f.read() == name
        with open(mb + b"/na\xefve", "rb") as f:
            assert f.read() == b"caf\xe9"

    check()
    mounted.remount()
    check()


# ====================================================================== persistence / mmap

def test_data_persists_across_remount(mounted):
    rng = random.Random(11)
    sizes = [0, 1, 4095, 4096, 4097, 65536, MiB + 1, 9 * MiB + 333]
    expect = {}
    for i, size in enumerate(sizes):
        data = rng.randbytes(size)
        (mounted.mnt / f"f{i}").write_bytes(data)
        expect[f"f{i}"] = sha256_bytes(data)
    os.makedirs(mounted.mnt / "a" / "b" / "c")
    (mounted.mnt / "a" / "b" / "c" / "deep").write_bytes(b"deep")
    expect[os.path.join("a", "b", "c", "deep")] = sha256_bytes(b"deep")
    assert checksums(mounted.mnt) == expect
    for _ in range(2):
        mounted.remount()
        assert checksums(mounted.mnt) == expect
    # overwrite the middle of a multi-chunk file
    p = mounted.mnt / f"f{len(sizes) - 1}"
    data = bytearray(p.read_bytes())
    patch = rng.randbytes(100_000)
    with open(p, "r+b") as f:
        f.seek(4 * MiB + 5)
        f.write(patch)
    data[4 * MiB + 5:4 * MiB + 5 + len(patch)] = patch
    mounted.remount()
    assert sha256_file(p) == sha256_bytes(bytes(data))


def test_mmap_shared_write(mounted):
    p = mounted.mnt / "mm"
    p.write_bytes(bytes(3 * 4096))
    with open(p, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        mm[4096:4096 + 11] = b"hello mmap!"
        mm.flush()
        mm.close()
    assert p.read_bytes()[4096:4096 + 11] == b"hello mmap!"
    mounted.remount()
    assert p.read_bytes() == bytes(4096) + b"hello mmap!" + bytes(4096 - 11) + bytes(4096)


# ====================================================================== real tools

def _run(cmd, **kw):
    cp = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert cp.returncode == 0, f"{cmd} failed ({cp.returncode}):\nstdout: {cp.stdout}\nstderr: {cp.stderr}"
    return cp


def test_cp_a(mounted, tmp_path, plain):
    src = make_tree(tmp_path / "src", seed=21)
    _run(["cp", "-a", str(src), str(plain / "copy")])
    _run(["cp", "-a", str(src), str(mounted.mnt / "copy")])
    assert_trees_equal(plain / "copy", mounted.mnt / "copy")
    mounted.remount()
    assert_trees_equal(plain / "copy", mounted.mnt / "copy")
    # and back out again
    _run(["cp", "-a", str(mounted.mnt / "copy"), str(tmp_path / "back")])
    assert_trees_equal(plain / "copy", tmp_path / "back")


def test_rsync(mounted, tmp_path, plain):
    src = make_tree(tmp_path / "src", seed=22)
    for dst in (plain / "r", mounted.mnt / "r"):
        _run(["rsync", "-aHX", str(src) + "/", str(dst) + "/"])
    assert_trees_equal(plain / "r", mounted.mnt / "r")
    # incremental update: modify, delete, add; rsync writes temp files and renames them
    files = sorted(p for p in src.rglob("file-*.bin"))
    with open(files[0], "ab") as f:
        f.write(b"appended")
    os.unlink(files[1])
    (src / "added.txt").write_text("added")
    os.utime(src / "added.txt", ns=(10**18, 10**18 + 1))
    for dst in (plain / "r", mounted.mnt / "r"):
        _run(["rsync", "-aHX", "--delete", str(src) + "/", str(dst) + "/"])
    # rsync does not restore directory mtimes after --delete/adds (plain dirs neither): skip those
    assert_trees_equal(plain / "r", mounted.mnt / "r", dir_mtime=False)
    mounted.remount()
    assert_trees_equal(plain / "r", mounted.mnt / "r", dir_mtime=False)
    # a second rsync finds nothing to transfer
    cp = _run(["rsync", "-aHXi", "--delete", str(src) + "/", str(mounted.mnt / "r") + "/"])
    assert cp.stdout.strip() == "", f"rsync found differences after remount:\n{cp.stdout}"


def test_tar_extract(mounted, tmp_path, plain):
    src = make_tree(tmp_path / "src", seed=23)
    for i, p in enumerate(sorted(src.rglob("*"))):
        if i % 5 == 0:
            os.lchown(p, 1000 + i, 2000 + i)
    tarball = tmp_path / "t.tar"
    _run(["tar", "--xattrs", "--xattrs-include=user.*", "-cf", str(tarball), "-C", str(src), "."])
    for dst in (plain / "x", mounted.mnt / "x"):
        os.mkdir(dst)
        _run(["tar", "--xattrs", "--xattrs-include=user.*", "-xpf", str(tarball), "-C", str(dst)])
    assert_trees_equal(plain / "x", mounted.mnt / "x")
    mounted.remount()
    assert_trees_equal(plain / "x", mounted.mnt / "x")


@pytest.fixture
def git_env(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_NAME="T", GIT_AUTHOR_EMAIL="t@example.invalid",
               GIT_COMMITTER_NAME="T", GIT_COMMITTER_EMAIL="t@example.invalid")
    return env


def test_git_clone_and_fsck(mounted, tmp_path, git_env):
    repo = tmp_path / "repo"

    def git(*a, cwd=repo):
        return _run(["git", *a], cwd=cwd, env=git_env)

    repo.mkdir()
    git("init", "-q", "-b", "main")
    rng = random.Random(31)
    for c in range(25):
        for _ in range(5):
            p = repo / f"d{rng.randrange(4)}" / f"f{rng.randrange(30)}.txt"
            p.parent.mkdir(exist_ok=True)
            p.write_text("\n".join(str(rng.random()) for _ in range(rng.randrange(1, 400))))
        (repo / "bin.dat").write_bytes(rng.randbytes(rng.randrange(1, 200_000)))
        if c % 7 == 3:
            victims = [p for p in repo.glob("d*/*.txt")][:2]
            for v in victims:
                v.unlink()
        git("add", "-A")
        git("commit", "-q", "-m", f"commit {c}")
    git("tag", "v1")
    git("checkout", "-q", "-b", "side")
    (repo / "side.txt").write_text("side")
    git("add", "-A")
    git("commit", "-q", "-m", "side")
    git("checkout", "-q", "main")

    clone = mounted.mnt / "clone"
    _run(["git", "clone", "-q", "--no-local", str(repo), str(clone)], env=git_env)
    git("fsck", "--full", "--strict", cwd=clone)
    assert git("status", "--porcelain", cwd=clone).stdout == ""
    assert git("rev-parse", "HEAD", cwd=clone).stdout == git("rev-parse", "HEAD").stdout
    assert {k: v for k, v in checksums(clone).items() if not k.startswith(".git")} == \
           {k: v for k, v in checksums(repo).items() if not k.startswith(".git")}
    # work in the clone: commit, gc (rewrites packs with renames, mmap reads), fsck
    (clone / "new.txt").write_text("made in the mount")
    git("add", "-A", cwd=clone)
    git("commit", "-q", "-m", "in mount", cwd=clone)
    git("gc", "-q", cwd=clone)
    git("fsck", "--full", "--strict", cwd=clone)
    head = git("rev-parse", "HEAD", cwd=clone).stdout
    mounted.remount()
    git("fsck", "--full", "--strict", cwd=clone)
    assert git("rev-parse", "HEAD", cwd=clone).stdout == head
    assert git("status", "--porcelain", cwd=clone).stdout == ""
    assert int(git("rev-list", "--count", "HEAD", cwd=clone).stdout) == 26


def _sqlite_workload(path: Path, journal_mode: str, seed: int = 41) -> None:
    rng = random.Random(seed)
    con = sqlite3.connect(path)
    try:
        mode = con.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0]
        assert mode.lower() == journal_mode.lower(), f"journal_mode {journal_mode} not accepted: {mode}"
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT, v BLOB)")
        for batch in range(30):
            with con:
                con.executemany("INSERT INTO t (k, v) VALUES (?, ?)",
                                [(f"k{rng.random()}", rng.randbytes(rng.randrange(0, 3000)))
                                 for _ in range(300)])
                top = con.execute("SELECT max(id) FROM t").fetchone()[0]
                con.executemany("UPDATE t SET v = ? WHERE id = ?",
                                [(rng.randbytes(rng.randrange(0, 5000)), rng.randrange(1, top + 1))
                                 for _ in range(100)])
                con.executemany("DELETE FROM t WHERE id = ?", [(rng.randrange(1, top + 1),) for _ in range(40)])
            if batch == 10:
                con.execute("CREATE INDEX tk ON t (k)")
        con.execute("VACUUM")
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()


@pytest.mark.parametrize("journal_mode", ["DELETE", "WAL"])
def test_sqlite(mounted, plain, journal_mode):
    _sqlite_workload(plain / "db.sqlite", journal_mode)
    _sqlite_workload(mounted.mnt / "db.sqlite", journal_mode)
    assert sorted(os.listdir(mounted.mnt)) == sorted(os.listdir(plain))
    assert sha256_file(mounted.mnt / "db.sqlite") == sha256_file(plain / "db.sqlite"), \
        "sqlite database differs byte-wise from the same workload on a plain directory"
    mounted.remount()
    assert sha256_file(mounted.mnt / "db.sqlite") == sha256_file(plain / "db.sqlite")
    counts = []
    for db in (plain / "db.sqlite", mounted.mnt / "db.sqlite"):
        con = sqlite3.connect(db)
        try:
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            counts.append(con.execute("SELECT count(*), sum(length(v)) FROM t").fetchone())
        finally:
            con.close()
    assert counts[0] == counts[1]
    assert counts[0][0] > 5000


# ====================================================================== random access / concurrency

def test_random_overwrites_match_model(mounted):
    """200 random pwrites/truncates on a 24 MiB file, checked against an in-memory model."""
    rng = random.Random(61)
    model = bytearray(rng.randbytes(24 * MiB))
    p = mounted.mnt / "ra"
    p.write_bytes(model)
    fd = os.open(p, os.O_RDWR)
    try:
        for i in range(200):
            if i % 50 == 49:
                size = rng.randrange(len(model) // 2, len(model) + 4 * MiB)
                os.ftruncate(fd, size)
                model = model[:size] + bytearray(max(0, size - len(model)))
                continue
            off = rng.randrange(0, len(model) + MiB)
            data = rng.randbytes(rng.choice([1, 17, 4096, rng.randrange(1, 300_000)]))
            os.pwrite(fd, data, off)
            if off > len(model):
                model += bytearray(off - len(model))
            model[off:off + len(data)] = data
            if i % 20 == 0:
                probe = rng.randrange(0, len(model))
                assert os.pread(fd, 65536, probe) == bytes(model[probe:probe + 65536])
    finally:
        os.close(fd)
    assert os.stat(p).st_size == len(model)
    assert sha256_file(p) == sha256_bytes(bytes(model))
    mounted.remount()
    assert sha256_file(p) == sha256_bytes(bytes(model))


def test_concurrent_writers_and_readers(mounted):
    import threading
    errors = []
    done: dict[str, str] = {}
    lock = threading.Lock()

    def writer(k):
        rng = random.Random(1000 + k)
        try:
            for i in range(10):
                data = rng.randbytes(rng.randrange(0, 3 * MiB))
                name = f"w{k}-{i}"
                with open(mounted.mnt / name, "wb") as f:
                    for off in range(0, len(data), 100_000):
                        f.write(data[off:off + 100_000])
                with lock:
                    done[name] = sha256_bytes(data)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"writer {k}: {e!r}")

    def reader():
        try:
            for _ in range(40):
                with lock:
                    items = list(done.items())
                for name, sha in items[-5:]:
                    assert sha256_file(mounted.mnt / name) == sha, f"{name} read back wrong while others write"
                time.sleep(0.01)
        except Exception as e:  # noqa: BLE001
            errors.append(f"reader: {e!r}")

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)] + \
              [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "threads hung"
    assert not errors, errors
    assert len(done) == 40
    mounted.remount()
    for name, sha in done.items():
        assert sha256_file(mounted.mnt / name) == sha
