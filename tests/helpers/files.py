"""Files and trees: SHA-256 of files and bytes, sizes of folders, what a store folder holds,
generating a deterministic tree (odd names, links, xattrs, nanosecond times), comparing two
trees, and asserting the errno a call fails with."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import stat
from pathlib import Path


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def store_snapshot(store, volatile=("index/lock.mdb", "lock")) -> dict:
    """relpath -> (type, mode, sha256) for everything in the store.

    Files in ``volatile`` (lock files whose bytes are transient runtime state)
    are recorded by existence and mode only.
    """
    store = os.fspath(store)
    snap = {}
    for root, dirs, files in os.walk(store):
        for name in dirs + files:
            p = os.path.join(root, name)
            rel = os.path.relpath(p, store)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                digest = None if rel in volatile else sha256_file(p)
                snap[rel] = ("f", stat.S_IMODE(st.st_mode), digest)
            else:
                snap[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), None)
    return snap


def dir_apparent_size(path) -> int:
    """Sum of apparent sizes of all regular files below path (like du --apparent-size -b)."""
    total = 0
    for root, _dirs, files in os.walk(os.fspath(path)):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def dir_disk_usage(path) -> int:
    """Sum of allocated bytes (st_blocks*512) of all regular files below path."""
    total = 0
    for root, _dirs, files in os.walk(os.fspath(path)):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_blocks * 512
    return total


def pack_files(store) -> list[Path]:
    return sorted(Path(store, "packs").glob("**/*.pack"))


# --------------------------------------------------------------------------
# trees: generation and comparison
# --------------------------------------------------------------------------

def rand_bytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


def make_tree(root, seed: int = 1, n_files: int = 60, max_size: int = 300_000,
              non_utf8: bool = True, xattrs: bool = True, hardlinks: bool = True) -> Path:
    """Generate a deterministic tree with files, dirs, symlinks, hard links,
    odd names, modes, xattrs and nanosecond mtimes."""
    rng = random.Random(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dirs = [root]
    for i in range(max(3, n_files // 8)):
        parent = rng.choice(dirs)
        d = parent / f"dir {i} é"
        d.mkdir()
        os.chmod(d, rng.choice([0o755, 0o700, 0o750, 0o775]))
        dirs.append(d)
    files = []
    for i in range(n_files):
        parent = rng.choice(dirs)
        size = rng.choice([0, 1, rng.randrange(2, 4096), rng.randrange(4096, max_size)])
        p = parent / f"file-{i}.bin"
        p.write_bytes(rand_bytes(rng, size))
        os.chmod(p, rng.choice([0o644, 0o600, 0o755, 0o444, 0o640]))
        if xattrs and rng.random() < 0.2:
            os.setxattr(p, f"user.test{i}", rand_bytes(rng, rng.randrange(0, 100)))
        files.append(p)
    # some files with identical content
    for i in range(3):
        src = rng.choice(files)
        p = rng.choice(dirs) / f"dup-{i}.bin"
        p.write_bytes(src.read_bytes())
        files.append(p)
    if non_utf8:
        nb = os.fsencode(root) + b"/bad-\xff\xfe-name-" + bytes([0x80, 0xc3])
        with open(nb, "wb") as f:
            f.write(b"non utf8 name content")
    # long name (255 bytes)
    (root / ("L" * 251 + ".txt")).write_bytes(b"long name")
    # symlinks
    os.symlink("file-0.bin", root / "rel-link")
    os.symlink("/nonexistent/dangling/target", root / "dangling-link")
    os.symlink(os.path.relpath(files[-1], dirs[1]), dirs[1] / "link-to-file")
    os.symlink(".", root / "self-dir-link")
    if hardlinks:
        for i in range(3):
            src = rng.choice(files)
            dst = rng.choice(dirs) / f"hardlink-{i}"
            os.link(src, dst)
    # nanosecond times, bottom-up so dir mtimes stick
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            p = os.path.join(dirpath, name)
            t = rng.randrange(10**17, 17 * 10**17)
            os.utime(p, ns=(t + rng.randrange(10**9), t), follow_symlinks=False)
        t = rng.randrange(10**17, 17 * 10**17)
        os.utime(dirpath, ns=(t, t + 123456789))
    return root


def snapshot_tree(root, *, content=True, mtime=True, xattrs=True, owner=True,
                  dir_mtime=True, nlink=True, link_groups=True) -> dict:
    """relpath(bytes) -> dict of comparable metadata for everything below root."""
    root = os.fsencode(os.fspath(root))
    snap = {}
    inodes: dict[int, list[bytes]] = {}

    def entry(p: bytes, rel: bytes):
        st = os.lstat(p)
        e = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode)}
        if owner:
            e["uid"], e["gid"] = st.st_uid, st.st_gid
        if stat.S_ISLNK(st.st_mode):
            e["target"] = os.readlink(p)
            e["size"] = st.st_size
            if mtime:
                e["mtime_ns"] = st.st_mtime_ns
        elif stat.S_ISREG(st.st_mode):
            e["size"] = st.st_size
            if content:
                e["sha256"] = sha256_file(p)
            if mtime:
                e["mtime_ns"] = st.st_mtime_ns
            if nlink:
                e["nlink"] = st.st_nlink
            inodes.setdefault(st.st_ino, []).append(rel)
        elif stat.S_ISDIR(st.st_mode):
            if mtime and dir_mtime:
                e["mtime_ns"] = st.st_mtime_ns
        if xattrs and not stat.S_ISLNK(st.st_mode):
            e["xattrs"] = {n: os.getxattr(p, n) for n in sorted(os.listxattr(p)) if n.startswith("user.")}
        snap[rel] = e

    entry(root, b".")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            entry(p, os.path.relpath(p, root))
    if link_groups:
        groups = sorted(sorted(v) for v in inodes.values() if len(v) > 1)
        snap[b"<hardlink groups>"] = groups
    return snap


def assert_trees_equal(a, b, **kw) -> None:
    """Compare two directory trees (names, types, modes, sizes, contents, times...)."""
    sa, sb = snapshot_tree(a, **kw), snapshot_tree(b, **kw)
    if sa == sb:
        return
    diffs = []
    for k in sorted(set(sa) | set(sb)):
        if sa.get(k) != sb.get(k):
            diffs.append(f"  {k!r}:\n    {a}: {sa.get(k)!r}\n    {b}: {sb.get(k)!r}")
    raise AssertionError(f"trees differ in {len(diffs)} entries (first 15):\n" + "\n".join(diffs[:15]))


def checksums(root) -> dict:
    """relpath -> sha256 for regular files below root."""
    res = {}
    for dirpath, _dirnames, filenames in os.walk(os.fspath(root)):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                res[os.path.relpath(p, root)] = sha256_file(p)
    return res


def expect_errno(err: int, fn, *args, **kwargs):
    """Call fn and assert it raises OSError with errno ``err``."""
    import pytest  # here, not at the top: bench/ uses this module without pytest's machinery

    with pytest.raises(OSError) as ei:
        fn(*args, **kwargs)
    assert ei.value.errno == err, \
        f"{getattr(fn, '__name__', fn)}: expected {errno.errorcode[err]}, got " \
        f"{errno.errorcode.get(ei.value.errno, ei.value.errno)} ({ei.value})"
    return ei.value
