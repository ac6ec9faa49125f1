"""``python -m bench.rendezvous``: the flags, then the runs on their own (see bench/standalone.py)."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import bench.rendezvous
from bench.config import human_bytes
from bench.rendezvous.measure import FIGURES, FULL, QUICK, run_rendezvous
from bench.rendezvous.report import print_report, summarize
from bench.standalone import exit_status, log_stderr, run_standalone, save_json
from bench.targets import REPO

DESCRIPTION = bench.rendezvous.__doc__.splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rendezvous", description=DESCRIPTION)
    p.add_argument("--quick", action="store_true",
                   help=f"smaller sizes ({human_bytes(QUICK['relay_bytes'])} relayed, {QUICK['requests']:,} "
                        f"requests, {QUICK['connects']:,} new connections)")
    p.add_argument("--runs", type=int, default=3, metavar="N", help="repeat N times (default 3)")
    p.add_argument("--only", metavar="NAME[,NAME]", help=f"figures to measure, from {', '.join(FIGURES)}")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="save the results as JSON (default bench/results/rendezvous[-quick].json)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/bpfs-bench"), metavar="DIR",
                   help="where the stores and the broker's state go (default /var/tmp/bpfs-bench)")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    figures = FIGURES
    if args.only:
        figures = tuple(f for f in FIGURES if f in {n.strip() for n in args.only.split(",")})
        if not figures:
            p.error(f"--only: choose from {', '.join(FIGURES)}")
    sizes = QUICK if args.quick else FULL
    json_path = args.json or REPO / "bench" / "results" / f"rendezvous{'-quick' if args.quick else ''}.json"
    rep: dict = {"mode": "quick" if args.quick else "full", "runs_asked": args.runs,
                 "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    interrupted = run_standalone(args.workdir, rep, lambda tmp, cleanup: run_rendezvous(
        tmp, sizes, args.runs, cleanup, log_stderr, out=rep, figures=figures), summarize)
    print_report(rep, args.runs)
    save_json(rep, json_path)
    log_stderr(f"results saved to {json_path}")
    return exit_status(rep, interrupted)
