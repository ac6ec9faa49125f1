"""kill -9 of the daemon at random moments: closed files survive, the store stays verifiable."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.files import sha256_file
from tests.helpers.mounts import force_unmount
from tests.helpers.procs import fuse_fd_holders, process_report

WRITER = r'''
import hashlib, os, random, sys
mnt, log, seed, prefix = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
rng = random.Random(seed)
logf = open(log, "a")

def record(*fields):
    logf.write(" ".join(fields) + "\n")
    logf.flush()
    os.fsync(logf.fileno())

def write_file(path, data, fsync):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError as e:
        listing = sorted(os.listdir(os.path.dirname(path)))[-8:]
        raise OSError(e.errno, f"O_EXCL create of {path} (never created before under this name "
                               f"unless renamed away): {e}; tail of listing: {listing}")
    try:
        for off in range(0, len(data), 131072):
            os.write(fd, data[off:off + 131072])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)

i = 0
try:
    while True:
        size = rng.choice([0, rng.randrange(1, 4096), rng.randrange(4096, 262144),
                           rng.randrange(262144, 3 << 20)])
        data = rng.randbytes(size)
        name = f"{prefix}-{i:05d}"
        write_file(os.path.join(mnt, name), data, rng.random() < 0.3)
        record("file", name, hashlib.sha256(data).hexdigest())
        if i % 3 == 0:
            # atomic replace pattern: write tmp, fsync, close, rename over target
            cfg = rng.randbytes(rng.randrange(1, 100000))
            sha = hashlib.sha256(cfg).hexdigest()
            tmp = os.path.join(mnt, f"{prefix}-cfg.tmp")
            write_file(tmp, cfg, True)
            record("candidate", "config", sha)
            os.rename(tmp, os.path.join(mnt, "config"))
            record("renamed", "config", sha)
        i += 1
except OSError as e:
    import traceback
    print(f"writer stopped: {e}\n{traceback.format_exc(limit=3)}", file=sys.stderr)
'''


def strace_sample(pid: int, seconds: float = 1.0) -> str:
    """A second of `strace -p pid` (if strace exists): what a hung process is doing."""
    if not shutil.which("strace"):
        return "<no strace>"
    try:
        cp = subprocess.run(["timeout", str(seconds), "strace", "-f", "-p", str(pid)],
                            capture_output=True, text=True, timeout=seconds + 10)
    except subprocess.TimeoutExpired:
        return "<strace timed out>"
    return "\n".join(cp.stderr.splitlines()[:25])


def parse_log(log: Path):
    files, candidates, renamed = {}, [], []
    if not log.exists():
        return files, candidates, renamed
    for line in log.read_text().splitlines():
        kind, name, sha = line.split()
        if kind == "file":
            files[name] = sha
        elif kind == "candidate":
            candidates.append(sha)
        elif kind == "renamed":
            renamed.append(sha)
    return files, candidates, renamed


def check_logged(mnt: Path, log: Path) -> int:
    files, candidates, renamed = parse_log(log)
    names = list(files)
    for idx, (name, sha) in enumerate(files.items()):
        p = mnt / name
        where = f"(logged file {idx + 1} of {len(files)}; last logged: {names[-3:]})"
        assert p.exists(), f"{name} was closed (and logged) before kill -9 but is missing {where}"
        got = sha256_file(p)
        assert got == sha, (f"{name} was closed before kill -9 but its content changed {where}; "
                            f"size now {p.stat().st_size}")
    if renamed:
        cfg = mnt / "config"
        assert cfg.exists(), "rename over 'config' returned before kill -9, but 'config' is gone"
        got = sha256_file(cfg)
        last = candidates.index(renamed[-1])
        allowed = candidates[last:]
        assert got in allowed, ("'config' is neither the last renamed-in version nor a later complete one "
                                f"(is it an older version? {got in candidates})")
    return len(files)


def read_everything(mnt: Path) -> int:
    """Every entry is stat-able and every file readable (no EIO) after a crash."""
    n = 0
    for dirpath, _dirnames, filenames in os.walk(mnt):
        for name in filenames:
            p = os.path.join(dirpath, name)
            os.lstat(p)
            if not os.path.islink(p):
                sha256_file(p)
                n += 1
    return n


def start_writer(tmp_path: Path, mnt: Path, log: Path, seed: int, prefix: str) -> subprocess.Popen:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(mnt), str(log), str(seed), prefix],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(tmp_path))


@pytest.mark.timeout(600)
def test_kill9_during_writes(mounted, tmp_path):
    seed = int(os.environ.get("BPFS_CRASH_SEED", random.randrange(1 << 30)))
    print(f"BPFS_CRASH_SEED={seed}")
    rng = random.Random(seed)
    log = tmp_path / "written.log"
    rounds = 6
    for rnd in range(rounds):
        writer = start_writer(tmp_path, mounted.mnt, log, rng.randrange(1 << 30), f"r{rnd}")
        # let it write for a while, then pull the plug
        time.sleep(rng.uniform(0.3, 3.0))
        assert writer.poll() is None, f"writer died before the kill: {writer.stderr.read()!r}"
        killed = mounted.kill_daemon(unmount=False)   # the writer must hit the dead mount, not the dir below
        try:
            writer.wait(timeout=60)
        except subprocess.TimeoutExpired:
            diag = (f"writer {writer.pid}:\n{process_report(writer.pid)}\n"
                    f"strace:\n{strace_sample(writer.pid)}\n"
                    f"/dev/fuse holders: {fuse_fd_holders()}\nkilled daemon: {killed}")
            writer.kill()
            writer.wait()
            pytest.fail("writer hung after the daemon was killed (FUSE requests not aborted)\n" + diag)
        force_unmount(mounted.mnt)
        assert os.listdir(mounted.mnt) == [], "something was written into the directory under the mount"
        mounted.mount()
        n = check_logged(mounted.mnt, log)
        read_everything(mounted.mnt)
        print(f"round {rnd}: {n} logged files intact")
    assert n >= rounds, "writer logged too few files for the test to mean anything"
    mounted.umount()
    cp = mounted.verify("--read-data")
    assert cp.returncode == 0, f"verify --read-data after kill -9 rounds: exit {cp.returncode}\n{cp.stdout}{cp.stderr}"
    mounted.mount()
    check_logged(mounted.mnt, log)


METADATA_WRITER = r'''
import os, random, sys
mnt, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
try:
    while True:
        d = os.path.join(mnt, f"d{rng.randrange(20)}")
        os.makedirs(d, exist_ok=True)
        a = os.path.join(d, f"f{rng.randrange(50)}")
        b = os.path.join(mnt, f"d{rng.randrange(20)}", f"f{rng.randrange(50)}")
        op = rng.randrange(6)
        try:
            if op == 0:
                with open(a, "wb") as f:
                    f.write(rng.randbytes(rng.randrange(0, 200000)))
            elif op == 1:
                os.rename(a, b)
            elif op == 2:
                os.unlink(a)
            elif op == 3:
                os.link(a, b)
            elif op == 4:
                os.truncate(a, rng.randrange(0, 300000))
            else:
                os.setxattr(a, "user.k", rng.randbytes(20))
        except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError):
            pass
except OSError as e:
    print(f"writer stopped: {e}", file=sys.stderr)
'''


@pytest.mark.timeout(600)
def test_kill9_during_metadata_churn(mounted, tmp_path):
    seed = int(os.environ.get("BPFS_CRASH_SEED", random.randrange(1 << 30)))
    print(f"BPFS_CRASH_SEED={seed}")
    rng = random.Random(seed)
    script = tmp_path / "meta.py"
    script.write_text(METADATA_WRITER)
    for _round in range(4):
        w = subprocess.Popen([sys.executable, str(script), str(mounted.mnt), str(rng.randrange(1 << 30))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(tmp_path))
        time.sleep(rng.uniform(0.5, 2.5))
        assert w.poll() is None, f"writer died before the kill: {w.stderr.read()!r}"
        killed = mounted.kill_daemon(unmount=False)
        try:
            w.wait(timeout=60)
        except subprocess.TimeoutExpired:
            diag = f"{process_report(w.pid)}\nstrace:\n{strace_sample(w.pid)}\n/dev/fuse holders: {fuse_fd_holders()}\nkilled daemon: {killed}"
            w.kill()
            w.wait()
            pytest.fail("writer hung after the daemon was killed\n" + diag)
        force_unmount(mounted.mnt)
        assert os.listdir(mounted.mnt) == [], "something was written into the directory under the mount"
        mounted.mount()
        read_everything(mounted.mnt)  # every file reads back (raises on EIO)
        # hard link counts must be consistent with what is visible
        inodes = {}
        for dirpath, _, filenames in os.walk(mounted.mnt):
            for name in filenames:
                st = os.lstat(os.path.join(dirpath, name))
                inodes.setdefault(st.st_ino, [st.st_nlink, 0])[1] += 1
        bad = {ino: v for ino, v in inodes.items() if v[0] != v[1]}
        assert not bad, f"st_nlink disagrees with the number of visible names after kill -9: {bad}"
    mounted.umount()
    cp = mounted.verify("--read-data")
    assert cp.returncode == 0, f"verify --read-data: exit {cp.returncode}\n{cp.stdout}{cp.stderr}"
