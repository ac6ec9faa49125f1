"""Model-based test: random operation sequences run side by side on a bpfs mount
and on a plain directory; results (including errno) and full trees must match.

Hypothesis state machines cannot use function fixtures, so each example
creates its own store + mount under a per-test base directory and tears it
down in teardown().  Set BPFS_MODEL_EXAMPLES / BPFS_MODEL_STEPS to change the
budget and BPFS_MODEL_SHRINK=1 to let hypothesis shrink a failure (slow: every
shrink step mounts a store).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, rule,
                                 run_state_machine_as_test)

from tests.helpers.cli import init_store
from tests.helpers.mounts import Mount

MiB = 1 << 20
TRACE = os.environ.get("BPFS_MODEL_TRACE") == "1"

# Names may end up being files, dirs or symlinks depending on the sequence.
PATHS = ["a", "b", "c", "a/a", "a/b", "b/a", "b/c", "a/a/a", "a/a/b", "c/b/a"]
paths = st.sampled_from(PATHS)
modes = st.sampled_from([0o644, 0o600, 0o755, 0o700, 0o777, 0o444, 0o000, 0o750])
xattr_names = st.sampled_from(["user.x", "user.y", "user." + "z" * 60])
times = st.integers(0, 4 * 10**18)
offsets = st.one_of(st.integers(0, 5000), st.integers(0, 3 * MiB))
# no ".." targets: a top-level "../x" would escape the compared roots
symlink_targets = st.sampled_from(["a", "b/c", "nowhere", "a/a", "."])


def _gen(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


datas = st.one_of(st.binary(max_size=100),
                  st.builds(_gen, st.integers(0, 2**32), st.integers(0, 600_000)))


def outcome(fn):
    try:
        v = fn()
        if isinstance(v, bytes) and len(v) > 32:
            v = (f"<{len(v)} bytes>", hashlib.sha256(v).hexdigest()[:16])
        return ("ok", v)
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def _sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(MiB), b""):
            h.update(b)
    return h.hexdigest()


def snapshot(root: Path) -> dict:
    """relpath -> (metadata dict, plain inode) for every entry below root."""
    snap = {}
    root = str(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st_ = os.lstat(p)
            e = {"type": stat.S_IFMT(st_.st_mode)}
            if stat.S_ISLNK(st_.st_mode):
                e["target"] = os.readlink(p)
            else:
                e["mode"] = stat.S_IMODE(st_.st_mode)
                e["owner"] = (st_.st_uid, st_.st_gid)
                e["mtime_ns"] = st_.st_mtime_ns
                e["xattrs"] = {n: os.getxattr(p, n) for n in sorted(os.listxattr(p)) if n.startswith("user.")}
            if stat.S_ISREG(st_.st_mode):
                e["size"] = st_.st_size
                e["sha256"] = _sha(p)
                e["nlink"] = st_.st_nlink
            snap[rel] = (e, st_.st_ino)
    return snap


class BpfsModel(RuleBasedStateMachine):
    base: Path = Path(tempfile.gettempdir())

    def __init__(self):
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="ex-", dir=self.base))
        self.plain = self.tmp / "plain"
        self.plain.mkdir()
        self.m = None
        init_store(self.tmp / "store")
        self.m = Mount(self.tmp / "store", self.tmp / "mnt")
        self.m.mount()
        self.pinned: set[int] = set()   # plain-side inodes whose mtime was set by utime and not touched since

    # ------------------------------------------------------------ helpers
    def _ino(self, rel: str, follow: bool) -> int | None:
        try:
            p = self.plain / rel if rel else self.plain
            return (os.stat(p) if follow else os.lstat(p)).st_ino
        except OSError:
            return None

    def _unpin(self, *rels: str) -> None:
        for rel in rels:
            for r, follow in ((rel, True), (rel, False), (os.path.dirname(rel), True)):
                ino = self._ino(r, follow)
                if ino is not None:
                    self.pinned.discard(ino)

    def both(self, fn, *, unpin=()):
        """Run fn(root) on both sides; results / errnos must agree."""
        self._unpin(*unpin)
        r_plain = outcome(lambda: fn(self.plain))
        r_mnt = outcome(lambda: fn(self.m.mnt))
        self._unpin(*unpin)
        if TRACE:
            print(f"  {fn.__code__.co_firstlineno}: {r_plain} / {r_mnt}")
        assert r_mnt == r_plain, f"bpfs gave {r_mnt}, plain dir gave {r_plain}"
        return r_plain

    # ------------------------------------------------------------ rules
    @initialize(layout=st.sampled_from(["dirs", "files", "mixed"]), data=datas)
    def start(self, layout, data):
        """Start from a small populated tree so that most operations hit something."""
        kinds = {"dirs": "dddddd", "files": "dffdff", "mixed": "dfddfd"}[layout]
        for rel, kind in zip(["a", "b", "c", "a/a", "a/b", "c/b"], kinds):
            if kind == "d":
                self.both(lambda r, rel=rel: os.mkdir(r / rel))
            else:
                self.both(lambda r, rel=rel: (r / rel).write_bytes(data))

    @rule(p=paths, mode=modes, excl=st.booleans(), trunc=st.booleans(),
          data=st.one_of(st.none(), datas))
    def create(self, p, mode, excl, trunc, data):
        flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if excl else 0) | (os.O_TRUNC if trunc else 0)

        def fn(r):
            fd = os.open(r / p, flags, mode)
            try:
                if data is not None:
                    return os.write(fd, data)
            finally:
                os.close(fd)
        self.both(fn, unpin=[p])

    @rule(p=paths, uid=st.sampled_from([-1, 0, 1000, 65534]), gid=st.sampled_from([-1, 0, 100, 65534]))
    def chown(self, p, uid, gid):
        self.both(lambda r: os.chown(r / p, uid, gid))

    @rule(p=paths, offset=offsets, data=datas)
    def write(self, p, offset, data):
        def fn(r):
            fd = os.open(r / p, os.O_WRONLY)
            try:
                return os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        self.both(fn, unpin=[p])

    @rule(p=paths, data=datas)
    def append(self, p, data):
        def fn(r):
            fd = os.open(r / p, os.O_WRONLY | os.O_APPEND)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)
        self.both(fn, unpin=[p])

    @rule(p=paths, offset=offsets, n=st.integers(0, 200_000))
    def read(self, p, offset, n):
        def fn(r):
            fd = os.open(r / p, os.O_RDONLY)
            try:
                return os.pread(fd, n, offset)
            finally:
                os.close(fd)
        self.both(fn)

    @rule(p=paths, size=offsets)
    def truncate(self, p, size):
        self.both(lambda r: os.truncate(r / p, size), unpin=[p])

    @rule(src=paths, dst=paths)
    def rename(self, src, dst):
        self.both(lambda r: os.rename(r / src, r / dst), unpin=[src, dst])

    @rule(src=paths, dst=paths)
    def link(self, src, dst):
        self.both(lambda r: os.link(r / src, r / dst, follow_symlinks=False), unpin=[src, dst])

    @rule(tgt=symlink_targets, p=paths)
    def symlink(self, tgt, p):
        self.both(lambda r: os.symlink(tgt, r / p), unpin=[p])

    @rule(p=paths)
    def unlink(self, p):
        self.both(lambda r: os.unlink(r / p), unpin=[p])

    @rule(p=paths, mode=modes)
    def mkdir(self, p, mode):
        self.both(lambda r: os.mkdir(r / p, mode), unpin=[p])

    @rule(p=paths)
    def rmdir(self, p):
        self.both(lambda r: os.rmdir(r / p), unpin=[p])

    @rule(p=paths, mode=modes)
    def chmod(self, p, mode):
        self.both(lambda r: os.chmod(r / p, mode))

    @rule(p=paths, atime=times, mtime=times)
    def utime(self, p, atime, mtime):
        res = self.both(lambda r: os.utime(r / p, ns=(atime, mtime)))
        if res[0] == "ok":
            sp, sm = os.stat(self.plain / p), os.stat(self.m.mnt / p)
            assert (sm.st_atime_ns, sm.st_mtime_ns) == (sp.st_atime_ns, sp.st_mtime_ns) == (atime, mtime)
            self.pinned.add(sp.st_ino)

    @rule(p=paths, name=xattr_names, value=st.binary(max_size=64),
          flags=st.sampled_from([0, os.XATTR_CREATE, os.XATTR_REPLACE]))
    def setxattr(self, p, name, value, flags):
        self.both(lambda r: os.setxattr(r / p, name, value, flags))

    @rule(p=paths, name=xattr_names)
    def removexattr(self, p, name):
        self.both(lambda r: os.removexattr(r / p, name))

    @rule(p=paths, name=xattr_names)
    def getxattr(self, p, name):
        self.both(lambda r: os.getxattr(r / p, name))

    @rule(p=paths)
    def fsync(self, p):
        def fn(r):
            fd = os.open(r / p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.both(fn)

    @rule(p=paths)
    def listdir(self, p):
        self.both(lambda r: sorted(os.listdir(r / p)))

    @rule()
    def remount(self):
        self.m.umount()
        self.m.mount()

    # ------------------------------------------------------------ invariant
    @invariant()
    def trees_match(self):
        sp, sm = snapshot(self.plain), snapshot(self.m.mnt)
        assert sorted(sm) == sorted(sp), f"names differ: bpfs {sorted(sm)} vs plain {sorted(sp)}"
        for rel, (ep, ino) in sp.items():
            em = dict(sm[rel][0])
            ep = dict(ep)
            if ino not in self.pinned:
                ep.pop("mtime_ns", None)
                em.pop("mtime_ns", None)
            assert em == ep, f"{rel!r} differs:\n  bpfs:  {em}\n  plain: {ep}"

    def teardown(self):
        try:
            if self.m is not None and self.m.is_mounted():
                self.m.umount()
                cp = self.m.verify("--read-data")
                assert cp.returncode == 0, f"verify --read-data failed after the sequence: {cp.stdout}{cp.stderr}"
        finally:
            if self.m is not None:
                self.m.cleanup()
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.mark.timeout(1200)
def test_model_against_plain_directory(tmp_path):
    BpfsModel.base = tmp_path
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if os.environ.get("BPFS_MODEL_SHRINK") == "1":
        phases.append(Phase.shrink)
    run_state_machine_as_test(BpfsModel, settings=settings(
        max_examples=int(os.environ.get("BPFS_MODEL_EXAMPLES", "25")),
        stateful_step_count=int(os.environ.get("BPFS_MODEL_STEPS", "30")),
        deadline=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    ))
