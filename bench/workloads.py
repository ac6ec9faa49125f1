"""The timed workloads. Each takes a mounted ``Target`` and returns {'seconds': ..., ...}.

Only the operation itself is timed (``time.perf_counter``); the set-up before it
(``os.sync()`` so earlier dirty pages do not bleed into the timing, remounting
with cold caches) and the checks after it are not.

The many-file tree's steps (``tree_*``) run the usual tools as a shell would, output to
/dev/null, in the C locale: ``tar -xzf``, ``md5sum --quiet -c``, ``ls -lR``, ``rm -rf``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import proc
from bench.config import BLOCK
from bench.datagen import TREE_TOP
from bench.targets import Target


class WorkloadError(RuntimeError):
    """The filesystem did something wrong (wrong data read back, files missing, ...)."""


def _cpu(target: Target, before: float | None) -> dict:
    """{'daemon_cpu': seconds} used by the filesystem daemon since ``before`` ({} if unknown)."""
    after = target.daemon_cpu()
    return {} if before is None or after is None else {"daemon_cpu": after - before}


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]


def seq_write(target: Target, data: np.ndarray) -> dict:
    """dd-like: write ``data`` in 1 MiB blocks to a new file, fsync, close."""
    path = target.root / "seq.bin"
    view = memoryview(data)
    os.sync()
    c0 = target.daemon_cpu()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(view), BLOCK):
            _write_all(fd, view[off:off + BLOCK])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": len(view), **_cpu(target, c0)}


def seq_read(target: Target, data: np.ndarray, buf: np.ndarray) -> dict:
    """Remount with cold caches, then read the file back in 1 MiB blocks and compare it (untimed)."""
    path = target.root / "seq.bin"
    target.remount_cold()
    view = memoryview(buf)[: len(data)]
    total = 0
    c0 = target.daemon_cpu()
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while total < len(view):
            n = f.readinto(view[total:total + BLOCK])
            if not n:
                break
            total += n
        extra = f.read(1)
    seconds = time.perf_counter() - t0
    cpu = _cpu(target, c0)
    if total != len(data) or extra:
        raise WorkloadError(f"read back {total + len(extra)} bytes of {path.name}, wrote {len(data)}")
    if not np.array_equal(buf[: len(data)], data):
        first = int(np.argmax(buf[: len(data)] != data))
        raise WorkloadError(f"data read back from {path.name} differs from what was written "
                            f"(first difference at byte {first})")
    return {"seconds": seconds, "bytes": total, "cold": target.cold_ok, **cpu}


def _names(target: Target, n: int) -> list[Path]:
    d = target.root / "files"
    return [d / f"f{i:05d}" for i in range(n)]


def files_create(target: Target, n: int) -> dict:
    """Create ``n`` empty files in one directory (open O_CREAT|O_EXCL, close)."""
    (target.root / "files").mkdir()
    names = _names(target, n)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    os.sync()
    c0 = target.daemon_cpu()
    t0 = time.perf_counter()
    for p in names:
        os.close(os.open(p, flags, 0o644))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ops": n, **_cpu(target, c0)}


def files_stat(target: Target, n: int) -> dict:
    """Remount with cold caches, then stat every file made by ``files_create``."""
    target.remount_cold()
    names = _names(target, n)
    c0 = target.daemon_cpu()
    t0 = time.perf_counter()
    for p in names:
        os.stat(p)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ops": n, "cold": target.cold_ok, **_cpu(target, c0)}


def files_unlink(target: Target, n: int) -> dict:
    """Unlink every file made by ``files_create``; check the directory is empty afterwards."""
    names = _names(target, n)
    os.sync()
    c0 = target.daemon_cpu()
    t0 = time.perf_counter()
    for p in names:
        os.unlink(p)
    seconds = time.perf_counter() - t0
    cpu = _cpu(target, c0)
    left = os.listdir(target.root / "files")
    if left:
        raise WorkloadError(f"{len(left)} entries left in the directory after unlinking all {n} files")
    (target.root / "files").rmdir()
    return {"seconds": seconds, "ops": n, **cpu}


def untar(target: Target, tarball: Path, meta: dict) -> dict:
    """Extract the source tarball with GNU tar (the tarball is read into the page cache first)."""
    with open(tarball, "rb") as f:
        while f.read(8 * BLOCK):
            pass
    dest = target.root / "untar"
    dest.mkdir()
    os.sync()
    c0 = target.daemon_cpu()
    t0 = time.perf_counter()
    proc.run(["tar", "-xf", str(tarball), "-C", str(dest), "--no-same-owner"], timeout=3600)
    seconds = time.perf_counter() - t0
    cpu = _cpu(target, c0)
    files = nbytes = 0

    def fail(err: OSError) -> None:
        raise WorkloadError(f"after untar, listing {err.filename} failed: {err}")

    for dirpath, _dirs, names in os.walk(dest, onerror=fail):
        for name in names:
            files += 1
            nbytes += os.lstat(os.path.join(dirpath, name)).st_size
    if files != meta["files"] or nbytes != meta["bytes"]:
        raise WorkloadError(f"after untar: {files} files / {nbytes} bytes, "
                            f"expected {meta['files']} / {meta['bytes']}")
    return {"seconds": seconds, "files": files, "bytes": nbytes, **cpu}


# -- the many-file tree: extract -> md5sum -c (cold) -> ls -lR (cold) -> rm -rf, on one tree ------

def _into_page_cache(path: Path) -> None:
    """Read ``path`` once, so reading it again during a timed step costs no disk reads."""
    with open(path, "rb") as f:
        while f.read(8 * BLOCK):
            pass


def _tool(argv: list[str], cwd: Path, timeout: float = 3600) -> None:
    """Run a tool in ``cwd`` with its output going to /dev/null (stdout of md5sum --quiet, which is
    only its complaints, to a file); raise WorkloadError with the end of its output if it fails."""
    env = {**os.environ, "LC_ALL": "C"}
    with tempfile.TemporaryFile() as err:
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL,
                                  stdout=err if argv[0] == "md5sum" else subprocess.DEVNULL,
                                  stderr=err, cwd=cwd, env=env, timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise WorkloadError(f"`{' '.join(argv)}` timed out after {timeout:.0f} s") from None
        if done.returncode:
            err.seek(0)
            lines = err.read().decode(errors="replace").strip().splitlines()
            more = f"[... {len(lines) - 6} more lines]\n" if len(lines) > 6 else ""
            raise WorkloadError(f"`{' '.join(argv)}` in {cwd} exited {done.returncode}:\n"
                                + more + "\n".join(lines[-6:]))


def tree_extract(target: Target, tgz: Path, meta: dict) -> dict:
    """``tar -xzf`` the many-file tree's tarball (read into the page cache first) into the target."""
    if os.path.lexists(target.root / TREE_TOP):
        raise WorkloadError(f"{TREE_TOP} already exists in the target before extracting")
    _into_page_cache(tgz)
    os.sync()
    c0 = target.daemon_cpu()
    t0 = time.perf_counter()
    _tool(["tar", "-xzf", str(tgz), "--no-same-owner"], target.root)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "files": meta["files"], "bytes": meta["bytes"], **_cpu(target, c0)}


def tree_md5(target: Target, manifest: Path, meta: dict) -> dict:
    """Remount with cold caches, then ``md5sum --quiet -c`` the manifest of every file of the tree
    (the manifest itself is read into the page cache first). This is also the check of what
    ``tree_extract`` wrote: a file missing or different fails it."""
    target.remount_cold()
    _into_page_cache(manifest)
    c0 = target.daemon_cpu()
    t0 = time.perf_counter()
    _tool(["md5sum", "--quiet", "-c", str(manifest)], target.root)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "files": meta["files"], "bytes": meta["bytes"], "cold": target.cold_ok,
            **_cpu(target, c0)}


def tree_ls(target: Target) -> dict:
    """Remount with cold caches, then ``ls -lR`` the tree."""
    target.remount_cold()
    c0 = target.daemon_cpu()
    t0 = time.perf_counter()
    _tool(["ls", "-lR", TREE_TOP], target.root)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cold": target.cold_ok, **_cpu(target, c0)}


def tree_rm(target: Target) -> dict:
    """``rm -rf`` the tree (right after ``tree_ls``, as a shell session would); check it is gone."""
    os.sync()
    c0 = target.daemon_cpu()
    t0 = time.perf_counter()
    _tool(["rm", "-rf", TREE_TOP], target.root)
    seconds = time.perf_counter() - t0
    cpu = _cpu(target, c0)
    if os.path.lexists(target.root / TREE_TOP):
        raise WorkloadError(f"{TREE_TOP} still exists after rm -rf")
    return {"seconds": seconds, **cpu}
