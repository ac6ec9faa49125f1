"""The cost of one FUSE round trip: bpfs (with its poll and without) next to gocryptfs.

Run: `python -m bench.fuse_latency [--quick] [--runs N] [--requests N]` (as root, like `make bench`).
A process asks each mounted file system the same thing `--requests` times in a row: getxattr of
a name the file does not have (ENODATA), a request that reaches the daemon every time (the kernel
caches no xattrs) and that every daemon answers without touching its data. The figure is the
wall time per request, and the daemon's CPU time per request (user + system). The three targets
run in a rotating order each run; the table gives medians and the ratio to gocryptfs.
"bpfs, no poll" is bpfs with `BPFS_FUSE_SPIN_US=0` (pyfuse3's own wait: sleep in epoll at once).
"""

from __future__ import annotations

import argparse
import errno
import os
import time
from pathlib import Path

from bench.cleanup import Cleanup
from bench.standalone import exit_status, log_stderr, run_standalone, save_json
from bench.stats import num, print_standalone, summarize
from bench.targets import Bpfs, Gocryptfs, Target


class BpfsNoPoll(Bpfs):
    """bpfs with its FUSE loop's poll turned off."""

    name = "bpfs, no poll"
    extra_env = {"BPFS_FUSE_SPIN_US": "0"}


def serial_getxattr(path: Path, n: int) -> float:
    """Seconds for n getxattr requests one after another (each ENODATA)."""
    name = "user.bpfs-bench-absent"
    t0 = time.perf_counter()
    for _ in range(n):
        try:
            os.getxattr(path, name)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise
    return time.perf_counter() - t0


def measure_one(target: Target, requests: int) -> dict:
    f = target.root / "latency"
    f.write_bytes(b"x")
    serial_getxattr(f, min(1000, requests))  # warm: the daemon's first requests, the kernel's dentry
    c0 = target.daemon_cpu()
    seconds = serial_getxattr(f, requests)
    c1 = target.daemon_cpu()
    out = {"us_per_request": 1e6 * seconds / requests}
    if c0 is not None and c1 is not None:
        out["daemon_cpu_us_per_request"] = 1e6 * (c1 - c0) / requests
    return out


KINDS = (("gocryptfs", Gocryptfs), ("bpfs", Bpfs), ("bpfs, no poll", BpfsNoPoll))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuse_latency", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--quick", action="store_true", help="2 runs of 3,000 requests")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/bpfs-bench"), metavar="DIR")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    runs, requests = (2, 3000) if args.quick else (args.runs, args.requests)
    rep: dict = {"runs": [], "requests": requests}

    def measure(tmp: Path, cleanup: Cleanup) -> None:
        targets = []
        for i, (label, cls) in enumerate(KINDS):
            t = cls(tmp / f"t{i}", cleanup)
            t.create()
            t.mount()
            targets.append((label, t))
        for run in range(runs):
            order = targets[run % len(targets):] + targets[:run % len(targets)]
            row = {}
            for label, t in order:
                row[label] = measure_one(t, requests)
                log_stderr(f"  run {run + 1} {label:14s} {row[label]['us_per_request']:.1f} us per request")
            rep["runs"].append(row)
        for _, t in targets:
            t.destroy()

    def summarize_all(rep: dict) -> dict:
        out = {}
        for label, _ in KINDS:
            out[label] = {key: summarize([r[label][key] for r in rep["runs"] if key in r.get(label, {})])
                          for key in ("us_per_request", "daemon_cpu_us_per_request")}
        return out

    interrupted = run_standalone(args.workdir, rep, measure, summarize_all)
    rep["summary"] = summarize_all(rep) if rep["runs"] else {}
    lines = [f"serial getxattr (ENODATA), {requests} requests a run; microseconds, lower is better", "",
             f"{'target':16s} {'per request':>22s} {'daemon CPU':>12s} {'time / gocryptfs':>17s}"]
    base = (rep["summary"].get("gocryptfs") or {}).get("us_per_request")
    for label, _ in KINDS:
        s = rep["summary"].get(label) or {}
        wall, cpu = s.get("us_per_request"), s.get("daemon_cpu_us_per_request")
        if not wall:
            continue
        cell = f"{num(wall['median'])} ({num(wall['min'])}-{num(wall['max'])})"
        ratio = f"{wall['median'] / base['median']:.2f}" if base else "n/a"
        lines.append(f"{label:16s} {cell:>22s} {num(cpu['median']) if cpu else 'n/a':>12s} {ratio:>17s}")
    print_standalone("FUSE round trip", rep, len(rep["runs"]), lines)
    if args.json:
        save_json(rep, args.json)
    return exit_status(rep, interrupted)


if __name__ == "__main__":
    raise SystemExit(main())
