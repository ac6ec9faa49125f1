"""``python -m bench.replication``: the flags, then the runs on their own (see bench/standalone.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import bench.replication
from bench.config import GiB, MiB
from bench.replication.harness import LIBRARIES, OFFLOADS
from bench.replication.measure import run_replication
from bench.replication.report import print_report, summarize
from bench.standalone import exit_status, log_stderr, run_standalone, save_json

DESCRIPTION = bench.replication.__doc__.splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replication", description=DESCRIPTION)
    p.add_argument("--quick", action="store_true",
                   help="256 MiB instead of 1 GiB and 1 run instead of 3 (unless --gib / --runs are given)")
    p.add_argument("--gib", type=float, metavar="X", help="data size in GiB (default 1, or 0.25 with --quick)")
    p.add_argument("--runs", type=int, metavar="N", help="repeat N times (default 3, or 1 with --quick)")
    p.add_argument("--library", default=",".join(LIBRARIES), metavar="LIST",
                   help=f"QUIC libraries to measure, comma-separated (default {','.join(LIBRARIES)}; BPFS_QUIC)")
    p.add_argument("--offload", default=",".join(OFFLOADS), metavar="LIST",
                   help=f"UDP I/O modes to measure, comma-separated: on = GSO + GRO, off = one datagram per system "
                        f"call (default {','.join(OFFLOADS)}; BPFS_UDP_OFFLOAD); the recoveries use the first mode listed")
    p.add_argument("--no-recovery", action="store_true", help="measure replication only, not the recoveries")
    p.add_argument("--json", type=Path, metavar="FILE", help="also save the results as JSON")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/bpfs-bench"), metavar="DIR",
                   help="where the stores, mounts and sshd keys go (default /var/tmp/bpfs-bench)")
    args = p.parse_args(argv)
    gib = args.gib if args.gib is not None else (0.25 if args.quick else 1.0)
    nbytes = int(gib * GiB) // MiB * MiB
    if args.runs is None:  # four combinations of library and I/O mode a run: --quick stays a few minutes
        args.runs = 1 if args.quick else 3
    if nbytes < MiB or args.runs < 1:
        p.error("--gib must give at least 1 MiB and --runs must be at least 1")
    libraries, offloads = _list(p, "--library", args.library, LIBRARIES), _list(p, "--offload", args.offload, OFFLOADS)
    rep: dict = {}
    interrupted = run_standalone(args.workdir, rep, lambda tmp, cleanup: run_replication(
        tmp, nbytes, args.runs, cleanup, log_stderr, out=rep, libraries=libraries, offloads=offloads,
        recovery=not args.no_recovery), summarize)
    if "bytes" in rep:
        print_report(rep, args.runs)
    if args.json:
        save_json(rep, args.json)
    return exit_status(rep, interrupted)


def _list(p: argparse.ArgumentParser, flag: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma-separated flag value: its items in the order given, each one of ``allowed``."""
    items = list(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        p.error(f"{flag}: give one or more of {', '.join(allowed)}, comma-separated (not {value!r})")
    return items
