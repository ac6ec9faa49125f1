"""The timed workloads. Each takes a mounted ``Target`` and returns {'seconds': ..., ...}.

Only the operation itself is timed (``time.perf_counter``); the set-up before it
(``os.sync()`` so earlier dirty pages do not bleed into the timing, remounting
with cold caches) and the checks after it are not.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from bench import proc
from bench.config import BLOCK
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
