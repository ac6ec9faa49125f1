"""``python -m bench.replication``: the flags, then the runs on their own (see bench/standalone.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import bench.replication
from bench.config import GiB, MiB
from bench.replication.measure import run_replication
from bench.replication.report import print_report, summarize
from bench.standalone import exit_status, log_stderr, run_standalone, save_json

DESCRIPTION = bench.replication.__doc__.splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replication", description=DESCRIPTION)
    p.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB (unless --gib is given)")
    p.add_argument("--gib", type=float, metavar="X", help="data size in GiB (default 1, or 0.25 with --quick)")
    p.add_argument("--runs", type=int, default=3, metavar="N", help="repeat N times (default 3)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also save the results as JSON")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/bpfs-bench"), metavar="DIR",
                   help="where the stores, mounts and sshd keys go (default /var/tmp/bpfs-bench)")
    args = p.parse_args(argv)
    gib = args.gib if args.gib is not None else (0.25 if args.quick else 1.0)
    nbytes = int(gib * GiB) // MiB * MiB
    if nbytes < MiB or args.runs < 1:
        p.error("--gib must give at least 1 MiB and --runs must be at least 1")
    rep: dict = {}
    interrupted = run_standalone(args.workdir, rep, lambda tmp, cleanup: run_replication(
        tmp, nbytes, args.runs, cleanup, log_stderr, out=rep), summarize)
    if "bytes" in rep:
        print_report(rep, args.runs)
    if args.json:
        save_json(rep, args.json)
    return exit_status(rep, interrupted)
