"""The memory bound on a very large file: write and read N GiB through bpfs, raw disk beside it.

Run: `python -m bench.bigfile --gib 10` (as root: it drops the page cache). Prints the
throughput of both, and the bpfs daemon's peak RSS (VmHWM) for the write and for the
read against the 300 MiB budget. Data is pseudo-random (a seeded generator, 1 MiB at a
time), so nothing deduplicates and nothing of it is held in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MiB = 1 << 20
BUDGET_MIB = 300
PASSPHRASE = "bench-passphrase"


def _bpfs(*args: str) -> None:
    env = dict(os.environ, BPFS_PASSPHRASE=PASSPHRASE)
    subprocess.run([sys.executable, "-m", "bpfs", *args], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def _daemon_hwm_mib(store: Path) -> float:
    pid = json.loads((store / "daemon.json").read_text())["pid"]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _drop_caches() -> None:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        print("warning: cannot drop the page cache (not root): reads may be warm", file=sys.stderr)


def _write(path: Path, total: int) -> float:
    rng = np.random.Generator(np.random.PCG64(1))
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(total // MiB):
            os.write(fd, rng.bytes(MiB))
        os.fsync(fd)
    finally:
        os.close(fd)
    return total / (time.perf_counter() - start) / 1e6


def _read(path: Path, total: int) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, MiB):
            pass
    finally:
        os.close(fd)
    return total / (time.perf_counter() - start) / 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bigfile", description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=int, default=10, help="file size in GiB (default 10)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/bpfs-bench"))
    args = p.parse_args(argv)
    total = args.gib * 1024 * MiB
    args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="big-") as tmp:
        tmp = Path(tmp)
        raw = tmp / "raw"
        raw.mkdir()
        raw_w = _write(raw / "big", total)
        _drop_caches()
        raw_r = _read(raw / "big", total)
        (raw / "big").unlink()

        store, mnt = tmp / "store", tmp / "mnt"
        mnt.mkdir()
        _bpfs("init", str(store), "--kdf", "interactive")
        _bpfs("mount", str(store), str(mnt))
        try:
            bpfs_w = _write(mnt / "big", total)
            hwm_w = _daemon_hwm_mib(store)
        finally:
            _bpfs("umount", str(mnt))
        _drop_caches()
        _bpfs("mount", str(store), str(mnt))
        try:
            bpfs_r = _read(mnt / "big", total)
            hwm_r = _daemon_hwm_mib(store)
        finally:
            _bpfs("umount", str(mnt))
    print(f"{args.gib} GiB file   raw write {raw_w:.0f} MB/s  read {raw_r:.0f} MB/s   "
          f"bpfs write {bpfs_w:.0f} MB/s ({bpfs_w / raw_w:.2f}x)  read {bpfs_r:.0f} MB/s ({bpfs_r / raw_r:.2f}x)")
    print(f"bpfs daemon peak RSS: write {hwm_w:.0f} MiB, read {hwm_r:.0f} MiB (budget {BUDGET_MIB} MiB)")
    return 0 if max(hwm_w, hwm_r) < BUDGET_MIB else 1


if __name__ == "__main__":
    sys.exit(main())
