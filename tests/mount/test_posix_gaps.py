"""The last POSIX gaps of the mount, tried as a new user would: `.` and `..` in listings,
renameat2 flags, fallocate, POSIX ACLs, times outside 1677-2262, `-o fsname=`/`subtype=`,
and ctime on chown(f, -1, -1). Real mounts, real tools (setfacl/getfacl: Debian's `acl`)."""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import shutil
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.cli import PASSPHRASE, run_bpfs
from tests.helpers.files import expect_errno
from tests.helpers.mounts import is_mounted, read_daemon_json
from tests.helpers.procs import pid_alive, wait_until

libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100


def _check(r: int) -> int:
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def run(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    cp = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)
    if check:
        assert cp.returncode == 0, f"{cmd} failed ({cp.returncode}): {cp.stdout}{cp.stderr}"
    return cp


def as_user(uid: int, cmd, cwd) -> subprocess.CompletedProcess:
    """Run `cmd` as uid:gid `uid` (no supplementary groups) in `cwd`, entered as root first (the
    test's temporary folders are not open to other users; the mount is, with allow_other)."""
    return run(cmd, check=False, cwd=cwd, user=uid, group=uid, extra_groups=[])


# ====================================================================== `.` and `..`

_GETDENTS64 = {"x86_64": 217, "aarch64": 61}.get(platform.machine())


def getdents(fd: int, bufsize: int = 4096) -> list[tuple[int, int, bytes]]:
    """(inode, offset of the next entry, name) of every entry from the fd's position on, read
    with raw getdents64 calls of `bufsize` bytes (small: several calls, so offsets resume)."""
    out = []
    buf = ctypes.create_string_buffer(bufsize)
    while True:
        n = _check(libc.syscall(_GETDENTS64, fd, buf, bufsize))
        if n == 0:
            return out
        raw, pos = buf.raw[:n], 0
        while pos < n:
            ino, off, reclen, _ = struct.unpack_from("<QqHB", raw, pos)
            name = raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
            out.append((ino, off, name))
            pos += reclen


def listing(path) -> list[tuple[int, int, bytes]]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return getdents(fd)
    finally:
        os.close(fd)


def check_resumes(path, entries) -> None:
    """Seeking a directory fd to any entry's offset lists exactly the entries after it."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for k in sorted({0, 1, 2, len(entries) // 2, len(entries) - 1}):
            os.lseek(fd, entries[k][1], os.SEEK_SET)
            assert getdents(fd) == entries[k + 1:], f"listing resumed after entry {k} ({entries[k][2]!r}) differs"
    finally:
        os.close(fd)


@pytest.mark.skipif(_GETDENTS64 is None, reason="getdents64 syscall number unknown on this machine")
def test_listings_have_dot_and_dotdot_with_stable_offsets(mounted):
    m = mounted.mnt
    sub = m / "d" / "sub"
    sub.mkdir(parents=True)
    names = {f"entry-{i:04d}-{'n' * (i % 50)}".encode() for i in range(400)}
    for n in names:
        (sub / os.fsdecode(n)).write_bytes(b"")
    (m / "d" / "file").write_bytes(b"x")

    entries = listing(sub)
    got = [e[2] for e in entries]
    assert got[:2] == [b".", b".."], f"a listing starts with {got[:3]}"
    assert set(got[2:]) == names and len(got) == len(names) + 2
    assert entries[0][0] == os.stat(sub).st_ino, "`.` does not carry the folder's inode number"
    assert entries[1][0] == os.stat(m / "d").st_ino, "`..` does not carry the parent's inode number"
    offsets = [e[1] for e in entries]
    assert len(set(offsets)) == len(offsets), "two entries share a readdir offset"
    check_resumes(sub, entries)

    root = listing(m)
    assert [e[2] for e in root[:2]] == [b".", b".."]
    assert root[0][0] == root[1][0] == os.stat(m).st_ino, "the root folder's `..` is not itself"
    small = [e[2] for e in listing(m / "d")]
    assert small[:2] == [b".", b".."] and sorted(small[2:]) == [b"file", b"sub"], small

    out = run(["ls", "-fa", m / "d"]).stdout.split()
    assert sorted(out) == [".", "..", "file", "sub"], f"ls -fa prints {out}"
    # what reads a listing through libc still sees every name once (and find walks fine)
    assert sorted(os.listdir(sub)) == sorted(os.fsdecode(n) for n in names)
    found = run(["find", m / "d"]).stdout.splitlines()
    assert len(found) == len(names) + 3  # d, d/file, d/sub and its entries

    # the kernel takes no reference for `.`/`..`: a folder listed many times still goes away cleanly
    for _ in range(3):
        listing(sub)
    shutil.rmtree(m / "d")
    assert os.listdir(m) == []
    mounted.remount()
    assert os.listdir(m) == []


@pytest.mark.skipif(_GETDENTS64 is None, reason="getdents64 syscall number unknown on this machine")
def test_snapshot_listings_have_dot_and_dotdot_and_keep_far_times(make_mount):
    from bpfs import keyfile
    from bpfs.snapshot import export_snapshot
    from bpfs.store import StoreFolder, key_path

    m = make_mount(name="mnt")
    m.mount()
    (m.mnt / "dir").mkdir()
    (m.mnt / "dir" / "f").write_bytes(b"then")
    far = (-(2 ** 40) * 10 ** 9 + 7, 17_202_218_383 * 10 ** 9 + 123_456_789)  # about 32900 BC, and 2515
    os.utime(m.mnt / "dir" / "f", ns=far)
    m.umount()
    keys = keyfile.unlock(key_path(str(m.store)), PASSPHRASE.encode())
    st = StoreFolder(str(m.store), keys)
    try:
        export_snapshot(st.index, keys, st.packs, clock=lambda: 1_800_000_000 * 10 ** 9)
    finally:
        st.close()
    m.mount("-o", "snapdir=visible")

    root = listing(m.mnt)
    assert [e[2] for e in root[:2]] == [b".", b".."] and root[-1][2] == b".snapshots"
    assert len({e[1] for e in root}) == len(root)
    snaps = m.mnt / ".snapshots"
    top = listing(snaps)
    assert [e[2] for e in top[:2]] == [b".", b".."] and len(top) == 3, top
    assert top[0][0] == os.stat(snaps).st_ino and top[1][0] == os.stat(m.mnt).st_ino
    snap = snaps / os.fsdecode(top[2][2])
    check_resumes(snaps, top)
    inside = listing(snap)
    assert [e[2] for e in inside] == [b".", b"..", b"dir"]
    assert inside[0][0] == os.stat(snap).st_ino and inside[1][0] == os.stat(snaps).st_ino
    deeper = listing(snap / "dir")
    assert [e[2] for e in deeper] == [b".", b"..", b"f"]
    assert deeper[0][0] == os.stat(snap / "dir").st_ino and deeper[1][0] == os.stat(snap).st_ino
    st_f = os.stat(snap / "dir" / "f")
    assert (st_f.st_atime_ns, st_f.st_mtime_ns) == far, "a snapshot changed far-away times"


# ====================================================================== renameat2 flags

RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


def renameat2(src, dst, flags: int) -> None:
    _check(libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)))


def test_rename_whiteout_is_refused_not_done_as_a_plain_rename(mounted):
    m = mounted.mnt
    (m / "a").write_text("a")
    (m / "b").write_text("b")
    for flags in (RENAME_WHITEOUT, RENAME_WHITEOUT | RENAME_NOREPLACE):
        expect_errno(errno.EINVAL, renameat2, m / "a", m / "new", flags)
        with pytest.raises(OSError) as ei:  # the kernel says EEXIST first for RENAME_NOREPLACE
            renameat2(m / "a", m / "b", flags)
        assert ei.value.errno in ((errno.EEXIST, errno.EINVAL) if flags & RENAME_NOREPLACE else (errno.EINVAL,))
        assert sorted(os.listdir(m)) == ["a", "b"], f"renameat2 flags {flags} changed the folder"
        assert (m / "a").read_text() == "a" and (m / "b").read_text() == "b"
    # the supported flags still work
    expect_errno(errno.EEXIST, renameat2, m / "a", m / "b", RENAME_NOREPLACE)
    renameat2(m / "a", m / "b", RENAME_EXCHANGE)
    assert (m / "a").read_text() == "b" and (m / "b").read_text() == "a"
    renameat2(m / "a", m / "c", RENAME_NOREPLACE)
    assert sorted(os.listdir(m)) == ["b", "c"]


# ====================================================================== fallocate

def test_fallocate_is_refused_honestly(mounted):
    """pyfuse3 3.5 has no fallocate handler: the kernel answers EOPNOTSUPP for every mode. The
    point here: it is refused, never pretended, and the file is untouched."""
    f = mounted.mnt / "f"
    f.write_bytes(b"0123456789")
    fd = os.open(f, os.O_RDWR)
    try:
        for mode in (0, 1, 1 | 2, 0x10):  # default, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE, ZERO_RANGE
            r = libc.fallocate(fd, mode, ctypes.c_int64(2), ctypes.c_int64(1 << 20))
            assert r == -1 and ctypes.get_errno() == errno.EOPNOTSUPP, (mode, r, ctypes.get_errno())
    finally:
        os.close(fd)
    assert f.read_bytes() == b"0123456789"


# ====================================================================== POSIX ACLs

@pytest.fixture
def acl_tools():
    missing = [t for t in ("setfacl", "getfacl") if shutil.which(t) is None]
    assert not missing, f"{missing} missing: install Debian's `acl` package (apt-get install acl)"


def getfacl(path) -> list[str]:
    return run(["getfacl", "-cp", path]).stdout.split()


def test_posix_acls_are_stored_enforced_inherited_and_copied(mounted, acl_tools):
    mounted.umount()
    mounted.mount("-o", "allow_other")  # other users may use the mount at all
    m = mounted.mnt
    old_umask = os.umask(0o022)
    try:
        f = m / "secret"
        f.write_text("for 1234 only\n")
        os.chmod(f, 0o600)
        assert as_user(1234, ["cat", "secret"], m).returncode != 0, "mode 0600 let another user read"

        run(["setfacl", "-m", "u:1234:r", f])  # was: "Operation not supported"
        acl = getfacl(f)
        assert "user:1234:r--" in acl and "mask::r--" in acl, acl
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o640, "the mode's group bits are not the ACL's mask"
        assert "system.posix_acl_access" in os.listxattr(f)
        cp = as_user(1234, ["cat", "secret"], m)
        assert cp.returncode == 0 and cp.stdout == "for 1234 only\n", f"the ACL does not let 1234 read: {cp.stderr}"
        assert as_user(1235, ["cat", "secret"], m).returncode != 0, "a user the ACL does not name could read"

        # chmod rewrites the ACL's mask; the mask limits the named user
        os.chmod(f, 0o600)
        assert "mask::---" in getfacl(f) and as_user(1234, ["cat", "secret"], m).returncode != 0
        os.chmod(f, 0o640)
        assert "mask::r--" in getfacl(f) and as_user(1234, ["cat", "secret"], m).returncode == 0

        # a default ACL is inherited by new files and folders (the kernel leaves that to us)
        d = m / "shared"
        d.mkdir(mode=0o700)
        run(["setfacl", "-m", "u:1234:rx", "-d", "-m", "u:1234:rw", d])
        assert "default:user:1234:rw-" in getfacl(d)
        fd = os.open(d / "new", os.O_WRONLY | os.O_CREAT, 0o660)
        os.write(fd, b"inherited\n")
        os.close(fd)
        (d / "sub").mkdir()
        assert "user:1234:rw-" in getfacl(d / "new"), getfacl(d / "new")
        assert "default:user:1234:rw-" in getfacl(d / "sub") and "user:1234:rw-" in getfacl(d / "sub")
        cp = as_user(1234, ["cat", "shared/new"], m)
        assert cp.returncode == 0 and cp.stdout == "inherited\n", cp.stderr
        assert as_user(1235, ["cat", "shared/new"], m).returncode != 0
        os.symlink("new", d / "link")  # symlinks take no ACL (and creating one works)
        assert os.readlink(d / "link") == "new"

        # cp -a and rsync -A keep them, on the mount itself
        run(["cp", "-a", f, m / "copy"])
        run(["rsync", "-aA", f, m / "synced"])
        run(["cp", "-a", d, m / "shared-copy"])
        for p in (m / "copy", m / "synced"):
            assert getfacl(p) == getfacl(f), p
        assert getfacl(m / "shared-copy") == getfacl(d)
        assert getfacl(m / "shared-copy" / "new") == getfacl(d / "new")

        # a remount keeps and still enforces them
        mounted.umount()
        mounted.mount("-o", "allow_other")
        assert "user:1234:r--" in getfacl(f) and "default:user:1234:rw-" in getfacl(d)
        assert as_user(1234, ["cat", "secret"], m).returncode == 0
        assert as_user(1234, ["cat", "copy"], m).returncode == 0
        assert as_user(1235, ["cat", "copy"], m).returncode != 0

        # removing: an ACL the mode says all of is not kept; other system.* names stay refused
        run(["setfacl", "-b", f])
        assert "system.posix_acl_access" not in os.listxattr(f)
        assert as_user(1234, ["cat", "secret"], m).returncode != 0
        run(["setfacl", "-k", d])
        assert not any(line.startswith("default:") for line in getfacl(d))
        expect_errno(errno.EOPNOTSUPP, os.setxattr, f, "system.bpfs_other", b"x")
    finally:
        os.umask(old_umask)
    mounted.umount()
    assert mounted.verify().returncode == 0


# ====================================================================== times outside 1677-2262

def test_times_of_the_whole_linux_range_are_stored(mounted):
    m = mounted.mnt
    f = m / "f"
    f.write_text("x")
    run(["touch", "-d", "2514-05-30 01:53:03 UTC", f])  # was EIO (struct.error in the daemon)
    assert os.stat(f).st_mtime_ns == (2 ** 34 - 1) * 10 ** 9
    cases = [
        (-(2 ** 40) * 10 ** 9 + 1, 2 ** 40 * 10 ** 9 + 999_999_999),
        (-1, -(10 ** 19) - 5),  # just before 1970, and before 1677
        (9_999_999_999 * 10 ** 9 + 5, 10 ** 9),
    ]
    for ns in cases:
        os.utime(f, ns=ns)
        st = os.stat(f)
        assert (st.st_atime_ns, st.st_mtime_ns) == ns
    d = m / "d"
    d.mkdir()
    os.utime(d, ns=cases[0])
    os.symlink("f", m / "l")
    os.utime(m / "l", ns=cases[1], follow_symlinks=False)
    mounted.remount()
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == cases[-1]
    assert (os.stat(d).st_atime_ns, os.stat(d).st_mtime_ns) == cases[0]
    assert os.lstat(m / "l").st_mtime_ns == cases[1][1]
    assert "Traceback" not in (mounted.store / "log" / "daemon.log").read_text(errors="replace")


def test_inode_records_of_the_old_format_are_read_and_rewritten(mounted):
    """Stores written before this change hold inode records with times as 64-bit nanoseconds."""
    from bpfs import keyfile
    from bpfs.index import _ATTR, _ATTR_V0, Attr, Index, u64
    from bpfs.store import key_path

    m = mounted.mnt
    (m / "old").write_bytes(b"kept")
    times = (1_500_000_000_123_456_789, 1_600_000_000_987_654_321)
    os.utime(m / "old", ns=times)
    ino = os.stat(m / "old").st_ino
    mounted.umount()

    keys = keyfile.unlock(key_path(str(mounted.store)), PASSPHRASE.encode())
    index = Index(os.path.join(mounted.store, "index"), keys)
    try:
        a = index.get_attr(ino)
        old = _ATTR_V0.pack(a.mode, a.uid, a.gid, a.nlink, a.rdev, a.size, a.stored, a.atime_ns, a.mtime_ns,
                            a.ctime_ns, a.parent)
        index._put("inodes", u64(ino), old)
        index.commit()
        index._attrs.clear()
        assert index.get_attr(ino) == a and Attr.unpack(ino, old) == a
    finally:
        index.close()

    mounted.mount()
    st = os.stat(m / "old")
    assert (st.st_atime_ns, st.st_mtime_ns) == times and (m / "old").read_bytes() == b"kept"
    run(["touch", "-d", "2514-05-30 01:53:03 UTC", m / "old"])
    mounted.umount()
    index = Index(os.path.join(mounted.store, "index"), keys, readonly=True)
    try:
        assert len(index._get("inodes", u64(ino))) == _ATTR.size, "a changed record was not rewritten"
    finally:
        index.close()
    assert mounted.verify().returncode == 0
    mounted.mount()
    assert os.stat(m / "old").st_mtime_ns == (2 ** 34 - 1) * 10 ** 9


# ====================================================================== -o fsname= / subtype=

def _mountinfo(mnt: Path) -> tuple[str, str]:
    """(source, fstype) of the mount at mnt."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == str(mnt):
                fstype, source = right.split()[:2]
                found = (source, fstype)
    assert found, f"{mnt} is not mounted"
    return found


def test_fsname_and_subtype_options_are_accepted(make_mount):
    m = make_mount(name="mnt")
    m.mount()
    assert _mountinfo(m.mnt) == (str(m.store), "fuse.bpfs")  # the defaults
    m.umount()

    m.mount("-o", "fsname=backup-of-alice,subtype=bpfs")  # was: unknown mount option
    assert _mountinfo(m.mnt) == ("backup-of-alice", "fuse.bpfs")
    (m.mnt / "f").write_text("x")
    run(["fusermount3", "-u", m.mnt])
    assert wait_until(lambda: not (m.store / "daemon.json").exists(), 60), "the daemon did not stop cleanly"

    m.mount("-o", "subtype=bpfs-test")
    assert _mountinfo(m.mnt) == (str(m.store), "fuse.bpfs-test")
    assert (m.mnt / "f").read_text() == "x"
    pid = read_daemon_json(m.store)["pid"]
    run(["fusermount3", "-u", m.mnt])
    assert wait_until(lambda: not pid_alive(pid), 60) and not (m.store / "daemon.json").exists()
    assert not is_mounted(m.mnt)

    for bad in ("fsname=", "subtype"):
        cp = run_bpfs("mount", m.store, m.mnt, "-o", bad, env=m.env, check=False)
        assert cp.returncode == 2 and "needs a value" in cp.stderr, cp.stderr
        assert not is_mounted(m.mnt)


@pytest.mark.parametrize("option", ["fsname=backup-of-alice", "subtype=backup"])
def test_bpfs_umount_of_a_mount_with_its_own_fsname_or_subtype(make_mount, option):
    """`bpfs umount` (and a later mount over it) finds the store of a mount whose fsname or
    subtype the user chose, though mountinfo does not name the store then."""
    m = make_mount(name="mnt")
    m.mount("-o", option)
    cp = run_bpfs("mount", m.store, m.mnt, env=m.env, check=False)
    assert cp.returncode == 3 and "already a mount point" in cp.stderr, cp.stderr  # not taken for a stale mount
    cp = run_bpfs("umount", m.mnt, env=m.env, check=False)
    assert cp.returncode == 0 and "not" not in cp.stdout.lower(), (cp.stdout, cp.stderr)
    assert not m.is_mounted()


# ====================================================================== chown(f, -1, -1)

def test_chown_without_change_updates_ctime(mounted):
    m = mounted.mnt
    for p in (m / "f", m / "d"):
        if p.name == "d":
            p.mkdir()
        else:
            p.write_text("x")
        before = os.stat(p).st_ctime_ns
        time.sleep(0.02)
        os.chown(p, -1, -1)
        after = os.stat(p).st_ctime_ns
        assert after > before, f"chown({p.name}, -1, -1) did not update ctime"
