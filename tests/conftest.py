"""Shared helpers and fixtures for the bpfs test suite.

Every test drives the real CLI (``python -m bpfs``) against a real store and a
real FUSE mount.  Nothing is mocked.

Helpers defined here are also imported directly by test modules
(``from conftest import ...``) because hypothesis state machines cannot use
function-scoped fixtures.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = os.environ.get("BPFS_TEST_PYTHON") or sys.executable
PASSPHRASE = "bpfs test passphrase: correct horse battery staple"
FUSE_AVAILABLE = os.path.exists("/dev/fuse")
FUSE_SKIP_REASON = "/dev/fuse is missing: FUSE mounts are impossible on this machine"

# Stores made by tests talk to no broker unless a test names one (--broker / BPFS_BROKER): the
# default public broker is not reachable here, and most tests pair directly.
os.environ.setdefault("BPFS_BROKER", "none")

# Default per-test timeout (seconds) unless a test sets its own.
DEFAULT_TIMEOUT = 300


# --------------------------------------------------------------------------
# pytest configuration
# --------------------------------------------------------------------------

def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: slow test (large data volumes); still part of the normal run")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))
        if not FUSE_AVAILABLE:
            item.add_marker(pytest.mark.skip(reason=FUSE_SKIP_REASON))


# --------------------------------------------------------------------------
# running the CLI
# --------------------------------------------------------------------------

def bpfs_env(passphrase: str | None = PASSPHRASE, **extra) -> dict:
    """Environment for a bpfs subprocess: passphrase via BPFS_PASSPHRASE."""
    env = os.environ.copy()
    env.pop("BPFS_STORE", None)
    env.pop("BPFS_PASSPHRASE", None)
    if passphrase is not None:
        env["BPFS_PASSPHRASE"] = passphrase
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


class BpfsError(AssertionError):
    pass


def run_bpfs(*args, env: dict | None = None, check: bool = True, timeout: float = 120,
             input: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python -m bpfs ARGS`` and return the CompletedProcess (text mode).

    stdout/stderr are captured through temporary files rather than pipes so
    that a background daemon which (wrongly) keeps the inherited descriptors
    open cannot make this call hang.  (test_cli checks pipe behaviour
    separately.)
    """
    cmd = [PYTHON, "-m", "bpfs", *[os.fspath(a) for a in args]]
    if env is None:
        env = bpfs_env()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.run(
                cmd, env=env, stdout=out, stderr=err,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                input=input.encode() if input is not None else None,
                timeout=timeout, cwd=cwd or str(REPO),
            )
        except subprocess.TimeoutExpired as e:
            out.seek(0)
            err.seek(0)
            raise BpfsError(
                f"command timed out after {timeout}s: {cmd}\n"
                f"stdout: {out.read().decode(errors='replace')}\n"
                f"stderr: {err.read().decode(errors='replace')}") from e
        out.seek(0)
        err.seek(0)
        cp = subprocess.CompletedProcess(cmd, proc.returncode,
                                         out.read().decode(errors="replace"),
                                         err.read().decode(errors="replace"))
    if check and cp.returncode != 0:
        raise BpfsError(f"command failed (exit {cp.returncode}): {' '.join(cmd)}\n"
                        f"stdout: {cp.stdout}\nstderr: {cp.stderr}")
    return cp


def init_store(store: Path, env: dict | None = None, *extra) -> subprocess.CompletedProcess:
    return run_bpfs("init", store, "--kdf", "interactive", *extra, env=env)


def one_line_error(cp: subprocess.CompletedProcess) -> str:
    """Assert the command failed with exactly one (non-traceback) line on stderr."""
    assert cp.returncode != 0, f"expected failure, got exit 0; stdout={cp.stdout!r} stderr={cp.stderr!r}"
    lines = [l for l in cp.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}: {cp.stderr!r}"
    assert "Traceback" not in cp.stderr
    return lines[0]


# --------------------------------------------------------------------------
# mount inspection / cleanup
# --------------------------------------------------------------------------

def _unescape_mountinfo(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mount_entries() -> list[tuple[str, str]]:
    """(mountpoint, fstype) for every mount visible to this process."""
    res = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            res.append((_unescape_mountinfo(parts[4]), parts[sep + 1]))
    return res


def is_mounted(path) -> bool:
    p = os.path.abspath(os.fspath(path))
    return any(mp == p for mp, _ in mount_entries())


def fuse_mounted(path) -> bool:
    p = os.path.abspath(os.fspath(path))
    return any(mp == p and fs.startswith("fuse") for mp, fs in mount_entries())


def pid_alive(pid: int) -> bool:
    """True if any thread of process ``pid`` is still running (not zombie/dead).

    A multi-threaded process whose main thread has exited shows as a zombie
    while other threads (which keep its file descriptors open) still run, so
    every task is checked.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state not in ("Z", "X", "x"):
            return True
    return False


def thread_states(pid: int) -> str:
    """Each live thread's state, kernel wait channel and (root) kernel stack: why a process
    has not died yet."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return "gone"
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/stat") as f:
                stat_line = f.read()
            state = stat_line.rsplit(")", 1)[1].split()[0]
            name = stat_line[stat_line.index("(") + 1:stat_line.rindex(")")]
            with open(f"{base}/wchan") as f:
                wchan = f.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        if state in ("Z", "X", "x"):
            continue
        try:
            with open(f"{base}/stack") as f:
                stack = " <- ".join(line.split()[-1] for line in f.read().splitlines()[:6])
        except OSError:
            stack = "?"
        out.append(f"tid {tid} ({name}) state {state} wchan {wchan}: {stack}")
    return "; ".join(out) or "no live threads"


def read_daemon_json(store) -> dict:
    with open(os.path.join(store, "daemon.json")) as f:
        return json.load(f)


def pids_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line mentions ``text`` (a unique tmp path)."""
    res = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if text.encode() in cmd and pid_alive(int(d)):
            res.append(int(d))
    return res


def fuse_fd_holders() -> list[tuple[int, str]]:
    """(pid, cmdline) of every process holding /dev/fuse open."""
    res = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{d}/fd"):
                try:
                    if os.readlink(f"/proc/{d}/fd/{fd}") == "/dev/fuse":
                        with open(f"/proc/{d}/cmdline", "rb") as f:
                            res.append((int(d), f.read().replace(b"\0", b" ").decode(errors="replace")[:200]))
                        break
                except OSError:
                    pass
        except OSError:
            pass
    return res


def process_report(pid: int) -> str:
    """State, wchan and kernel stack of a process (for diagnosing hangs)."""
    out = []
    for what in ("status", "wchan", "syscall", "stack"):
        try:
            with open(f"/proc/{pid}/{what}") as f:
                txt = f.read()
            if what == "status":
                txt = "".join(l for l in txt.splitlines(True) if l.startswith(("State", "PPid")))
            out.append(f"{what}: {txt.strip()}")
        except OSError as e:
            out.append(f"{what}: <{e}>")
    try:
        fds = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        out.append(f"fds: {fds}")
    except OSError:
        pass
    return "\n".join(out)


def kill_pid(pid: int, timeout: float = 60) -> None:
    """SIGKILL and wait until the process is gone. A thread inside fdatasync on a busy disk is
    in uninterruptible sleep and dies only when the call returns: seconds under CI's I/O load."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.05)


def force_unmount(mnt) -> None:
    """Unmount whatever is mounted at mnt, the hard way."""
    mnt = os.path.abspath(os.fspath(mnt))
    for cmd in (["fusermount3", "-uz", mnt], ["umount", "-l", mnt]):
        if not is_mounted(mnt):
            return
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)


def cleanup_mount(mnt, store, env=None) -> None:
    """Best-effort teardown: bpfs umount, fall back to fusermount3 -uz, kill daemons."""
    mnt = os.path.abspath(os.fspath(mnt))
    if is_mounted(mnt):
        try:
            run_bpfs("umount", mnt, env=env, check=False, timeout=60)
        except BpfsError:
            pass
    force_unmount(mnt)
    pids = set()
    try:
        pids.add(int(read_daemon_json(store)["pid"]))
    except Exception:
        pass
    pids.update(pids_mentioning(os.path.abspath(os.fspath(store))))
    for pid in pids:
        if pid != os.getpid() and pid_alive(pid):
            kill_pid(pid)
    force_unmount(mnt)


def wait_until(pred, timeout: float = 10, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


# --------------------------------------------------------------------------
# store inspection
# --------------------------------------------------------------------------

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
    for root, dirs, files in os.walk(os.fspath(path)):
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
    for root, dirs, files in os.walk(os.fspath(path)):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if stat.S_ISREG(st.st_mode):
                total += st.st_blocks * 512
    return total


def pack_files(store) -> list[Path]:
    return sorted(Path(store, "packs").glob("**/*.pack"))


# --------------------------------------------------------------------------
# The Mount object and fixtures
# --------------------------------------------------------------------------

class Mount:
    """A bpfs store and a mountpoint, driven through the real CLI."""

    def __init__(self, store: Path, mnt: Path, env: dict | None = None):
        self.store = Path(store)
        self.mnt = Path(mnt)
        self.env = env or bpfs_env()

    def path(self, *parts) -> Path:
        return self.mnt.joinpath(*parts)

    def log_tail(self, n: int = 60) -> str:
        """The last lines of the daemon's log in the store (if it keeps one), for failure messages."""
        logs = sorted(self.store.glob("log/*.log")) if self.store.exists() else []
        out = []
        for p in logs:
            try:
                lines = p.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                continue
            out.append(f"--- {p} (last {len(lines)} lines) ---\n" + "\n".join(lines))
        return "\n".join(out)

    def _run(self, *args, check, timeout):
        try:
            return run_bpfs(*args, env=self.env, check=check, timeout=timeout)
        except BpfsError as e:
            raise BpfsError(f"{e}\n{self.log_tail()}") from None

    def mount(self, *extra, check=True, timeout=120) -> subprocess.CompletedProcess:
        self.mnt.mkdir(parents=True, exist_ok=True)
        cp = self._run("mount", self.store, self.mnt, *extra, check=check, timeout=timeout)
        if check:
            assert fuse_mounted(self.mnt), \
                f"`bpfs mount` exited 0 but {self.mnt} is not a FUSE mount; stderr={cp.stderr!r}"
        return cp

    def umount(self, check=True, timeout=120) -> subprocess.CompletedProcess:
        cp = self._run("umount", self.mnt, check=check, timeout=timeout)
        if check:
            assert not is_mounted(self.mnt), f"`bpfs umount` exited 0 but {self.mnt} is still mounted"
        return cp

    def remount(self) -> None:
        self.umount()
        self.mount()

    def daemon_pid(self) -> int:
        return int(read_daemon_json(self.store)["pid"])

    def is_mounted(self) -> bool:
        return fuse_mounted(self.mnt)

    def kill_daemon(self, unmount: bool = True) -> int:
        """kill -9 the daemon; with unmount, also detach the dead mount.  Returns the killed pid.

        Pass unmount=False while other processes still use the mount: after a lazy
        unmount their next open() would silently land in the directory underneath.
        Call force_unmount(self.mnt) once they are done.
        """
        pid = self.daemon_pid()
        kill_pid(pid)
        assert not pid_alive(pid), f"daemon {pid} survived SIGKILL: {thread_states(pid)}"
        if unmount:
            force_unmount(self.mnt)
            assert not is_mounted(self.mnt)
        return pid

    def verify(self, *extra, check=False, timeout=600) -> subprocess.CompletedProcess:
        return run_bpfs("verify", self.store, *extra, env=self.env, check=check, timeout=timeout)

    def cleanup(self) -> None:
        cleanup_mount(self.mnt, self.store, self.env)


def new_store(base: Path, name: str = "store") -> Path:
    store = Path(base) / name
    init_store(store)
    return store


@pytest.fixture
def env():
    return bpfs_env()


@pytest.fixture
def store(tmp_path) -> Path:
    """An initialised, unmounted store (passphrase PASSPHRASE, --kdf interactive)."""
    return new_store(tmp_path)


@pytest.fixture
def make_mount(tmp_path):
    """Factory: make_mount(store=None, name=...) -> Mount (not yet mounted).  All are cleaned up."""
    created: list[Mount] = []

    def factory(store: Path | None = None, name: str = "mnt-extra", init: bool = True) -> Mount:
        if store is None:
            store = tmp_path / f"store-{name}"
            if init:
                init_store(store)
        m = Mount(store, tmp_path / name)
        m.mnt.mkdir(parents=True, exist_ok=True)
        created.append(m)
        return m

    yield factory
    for m in reversed(created):
        m.cleanup()


@pytest.fixture
def mounted(store, tmp_path):
    """The ``store`` fixture mounted at tmp_path/mnt.  Always unmounted at teardown."""
    m = Mount(store, tmp_path / "mnt")
    m.mnt.mkdir()
    try:
        m.mount()
        yield m
    finally:
        m.cleanup()


@pytest.fixture
def plain(tmp_path) -> Path:
    """A plain directory on the host filesystem, for side-by-side comparisons."""
    p = tmp_path / "plain"
    p.mkdir()
    return p


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
    for dirpath, dirnames, filenames in os.walk(os.fspath(root)):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.isfile(p) and not os.path.islink(p):
                res[os.path.relpath(p, root)] = sha256_file(p)
    return res


def expect_errno(err: int, fn, *args, **kwargs):
    """Call fn and assert it raises OSError with errno ``err``."""
    with pytest.raises(OSError) as ei:
        fn(*args, **kwargs)
    assert ei.value.errno == err, \
        f"{getattr(fn, '__name__', fn)}: expected {errno.errorcode[err]}, got " \
        f"{errno.errorcode.get(ei.value.errno, ei.value.errno)} ({ei.value})"
    return ei.value


@pytest.fixture
def small_tmpfs(tmp_path):
    """Factory: small_tmpfs(size="64m", name="tmpfs") -> Path of a freshly mounted tmpfs."""
    mounts: list[Path] = []

    def factory(size: str = "64m", name: str = "tmpfs") -> Path:
        d = tmp_path / name
        d.mkdir()
        cp = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(d)],
                            capture_output=True, text=True)
        assert cp.returncode == 0, f"cannot mount a tmpfs (tests need root): {cp.stderr}"
        mounts.append(d)
        return d

    yield factory
    for d in reversed(mounts):
        # a bpfs mount whose store lives here must go first
        for mp, fs in mount_entries():
            if fs.startswith("fuse") and mp.startswith(str(tmp_path)):
                force_unmount(mp)
        for pid in pids_mentioning(str(d)):
            kill_pid(pid)
        subprocess.run(["umount", str(d)], capture_output=True)
        if is_mounted(d):
            subprocess.run(["umount", "-l", str(d)], capture_output=True)
