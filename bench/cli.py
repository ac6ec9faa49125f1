"""Command-line flags and the top-level flow: check the tools, generate data, run, report, clean up."""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import audit, config, datagen, dedup, proc, recovery, rendezvous, replication, report, runner, targets
from bench.cleanup import Cleanup, force_unmount

DEFAULT_WORKDIR = "/var/tmp/bpfs-bench"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark bpfs against the raw disk and gocryptfs (timed workloads, among them "
                    "a many-file tree: extract its .tar.gz, md5sum -c and ls -lR with cold caches, "
                    "rm -rf, in seconds with bpfs time / gocryptfs time), "
                    "restic (deduplication), the raw aioquic ceiling and rsync over ssh "
                    "(replication to a partner on loopback, and recovery), and pairing by code, "
                    "lookups and the relay through a broker (next to direct pairing, pings and a "
                    "direct connection), storage audits of a partner (bytes and holder CPU per "
                    "audit, simulated detection of a loss), and recovery from one partner next to two. "
                    "Needs root for dropping the page cache and for the private sshd.")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes (256 MiB file, 2,000 files, 1,500-file tarball, 3,000-file "
                        "tree instead of 36,000, 256 MiB replicated, 64 MiB relayed, 256 MiB audited, "
                        "256 MiB recovered) for a fast check")
    p.add_argument("--only", metavar="NAME[,NAME]",
                   help="workloads to run, from: " + ", ".join(config.ALL) + " (default: all); 'tree' stands for "
                        + ", ".join(config.TREE) + ": they run in that order on one extracted tree "
                        "per target and run, and a later one brings the earlier ones along, untimed "
                        "(tree_md5 always: it checks the extraction)")
    p.add_argument("--targets", metavar="NAME[,NAME]", default=",".join(config.ALL_TARGETS),
                   help="what to measure, from raw, gocryptfs, bpfs (timed workloads; bpfs also "
                        "dedup) and restic (dedup only); default: all")
    p.add_argument("--runs", type=int, default=3, metavar="N",
                   help="repeat each timed workload N times (default 3)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also save the results as JSON")
    p.add_argument("--workdir", type=Path, default=Path(DEFAULT_WORKDIR), metavar="DIR",
                   help=f"where the temporary stores and mounts go (default {DEFAULT_WORKDIR}); "
                        "put it on the disk you want to measure")
    args = p.parse_args(argv)
    args.only = _only(p, args.only) if args.only else list(config.ALL)
    args.targets = _names(p, args.targets, config.ALL_TARGETS, "--targets")
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def _names(p: argparse.ArgumentParser, text: str, allowed: tuple, flag: str) -> list[str]:
    names = [n.strip().replace("-", "_") for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        p.error(f"{flag}: unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(allowed)}")
    return [n for n in allowed if n in names]  # canonical order


def _only(p: argparse.ArgumentParser, text: str) -> list[str]:
    names, bad = config.expand(text.split(","))
    if bad or not names:
        p.error(f"--only: unknown {', '.join(bad) or 'empty list'}; choose from "
                f"{', '.join(config.ALL)}, or {', '.join(config.GROUPS)}")
    return names


def _remove_stale_runs(workdir: Path) -> None:
    """Unmount and delete run directories left by a benchmark that was killed (kill -9)."""
    for d in workdir.glob("run-*"):
        try:
            pid = int((d / "bench.pid").read_text())
        except (OSError, ValueError):
            pid = None
        if pid and proc.pid_alive(pid):
            continue  # another benchmark is running right now
        if pid is None and time.time() - d.stat().st_mtime < 60:
            continue  # another benchmark that is just starting
        log(f"removing stale {d}")
        for m in proc.mounts_under(d):
            force_unmount(m)
        if not proc.mounts_under(d):
            shutil.rmtree(d, ignore_errors=True)


def _notes(workdir: Path, sizes: config.Sizes) -> list[str]:
    notes = []
    tree = sizes.tree_files * sizes.tree_median * math.exp(sizes.tree_sigma ** 2 / 2)  # the log-normal's mean
    need = 2 * sizes.seq_bytes + int(3 * tree) + 5 * sizes.tree_bytes + 4 * sizes.insert_bytes \
        + 5 * sizes.repl_bytes + 2 * sizes.audit_bytes + 6 * sizes.recovery_bytes
    free = shutil.disk_usage(workdir).free
    if free < need:
        notes.append(f"only {free >> 20} MiB free in {workdir}, about {need >> 20} MiB needed")
    try:
        if os.stat(workdir).st_dev != os.stat(targets.REPO).st_dev:
            notes.append(f"{workdir} is not on the same filesystem as {targets.REPO}")
    except OSError:
        pass
    return notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = config.QUICK if args.quick else config.FULL
    only = set(args.only)
    timed = [w for w in config.TIMED if w in only]
    dedups = [w for w in config.DEDUP if w in only]
    network = [w for w in config.NETWORK if w in only]
    broker = [w for w in config.RENDEZVOUS if w in only]
    audits = [w for w in config.AUDIT if w in only]
    recoveries = [w for w in config.RECOVERY if w in only]
    columns = [t for t in args.targets if t in config.TARGETS]
    notes: list[str] = []

    if "bpfs" in columns:
        ok, why = targets.bpfs_available()
        if not ok:
            notes.append(f"bpfs left out: `python -m bpfs --help` fails: {why}")
            log(notes[-1])
            columns.remove("bpfs")
    dedup_tools = [t for t in ("bpfs", "restic") if t in columns or t in args.targets and t == "restic"]
    if network and "bpfs" not in columns:
        network = []  # replication is a bpfs figure (the ceiling and rsync are its references)
    if broker and "bpfs" not in columns:
        broker = []  # so are the broker figures
    if audits and "bpfs" not in columns:
        audits = []  # and the audit figures
    if recoveries and "bpfs" not in columns:
        recoveries = []  # and the recovery figures

    args.workdir.mkdir(parents=True, exist_ok=True)
    notes += _notes(args.workdir, sizes)
    _remove_stale_runs(args.workdir)
    if os.geteuid() != 0:
        notes.append("not root: the page cache cannot be dropped, reads are not cold")

    results: dict = {
        "meta": {
            "mode": "quick" if args.quick else "full", "runs": args.runs, "targets": columns,
            "workloads": args.only, "sizes": vars(sizes), "workdir": str(args.workdir),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "kernel": platform.release(), "cpus": os.cpu_count(), "notes": notes,
            "versions": _versions(), "loadavg_start": os.getloadavg(),
        },
        "errors": [], "problems": [],
    }

    interrupted = False
    with Cleanup(log) as cleanup:
        tmp = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
        cleanup.add_dir(tmp)
        (tmp / "bench.pid").write_text(f"{os.getpid()}\n")
        try:
            if timed and columns:
                _timed(args, sizes, timed, columns, tmp, cleanup, results)
            if dedups and dedup_tools:
                results["dedup"] = {}
                dedup.run_dedup(set(dedups), dedup_tools, tmp, sizes.tree_bytes, sizes.insert_bytes,
                                cleanup, log, out=results["dedup"], runs=args.runs)
            if network:
                results["replication"] = {}
                replication.run_replication(tmp, sizes.repl_bytes, args.runs, cleanup, log,
                                            out=results["replication"])
            if broker:
                results["rendezvous"] = {}
                rendezvous.run_rendezvous(tmp, rendezvous.sizes_of(sizes), args.runs, cleanup, log,
                                          out=results["rendezvous"])
            if audits:
                results["audit"] = {}
                audit.run_audit(tmp, sizes.audit_bytes, args.runs, cleanup, log, out=results["audit"],
                                trials=audit.SIM_TRIALS["quick" if args.quick else "full"])
            if recoveries:
                results["recovery"] = {}
                recovery.run_recovery(tmp, sizes.recovery_bytes, args.runs, cleanup, log, out=results["recovery"])
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: cleaning up")
            notes.append("interrupted: the results are incomplete")
    results["meta"]["loadavg_end"] = os.getloadavg()
    _collect(results, dedup_tools)
    report.print_report(results)
    if args.json:
        report.save_json(results, args.json)
        log(f"results saved to {args.json}")
    if interrupted:
        return 130
    return 1 if results["errors"] else 0


def _timed(args, sizes: config.Sizes, timed: list[str], columns: list[str], tmp: Path,
           cleanup: Cleanup, results: dict) -> None:
    """Run the timed workloads; results["_timed"] fills in as runs finish (kept on Ctrl-C)."""
    only = set(timed)
    data = buf = tarball = src_meta = tree_tgz = tree_md5 = tree_meta = None
    if only & {"seq_write", "seq_read"}:
        log(f"generating {sizes.seq_bytes >> 20} MiB of random data in memory")
        data = datagen.random_block(sizes.seq_bytes, seed=1)
        buf = np.empty(sizes.seq_bytes, dtype=np.uint8)
        buf.fill(0)  # fault the pages in now, not during the timed read
    if "untar" in only:
        log("preparing the source tarball")
        tarball, src_meta = datagen.source_tarball(args.workdir / "cache", sizes.src_files, sizes.src_bytes)
    if only & set(config.TREE):
        log("preparing the many-file tree")
        tree_tgz, tree_md5, tree_meta = datagen.source_tree(args.workdir / "cache", sizes.tree_files,
                                                            sizes.tree_median, sizes.tree_sigma, log=log)
        log(f"  {tree_meta['files']} files in {tree_meta['dirs']} folders, {tree_meta['bytes'] / 1e6:.0f} MB, "
            f"median {tree_meta['median']} bytes; {tree_tgz.name} {tree_meta['tgz_bytes'] / 1e6:.0f} MB")
    results["labels"] = runner.labels(sizes, src_meta, tree_meta)
    if tree_meta:
        results["tree"] = tree_meta
    plan = runner.TimedPlan(sizes=sizes, only=only, runs=args.runs, targets=columns, tmp=tmp,
                            data=data, buf=buf, tarball=tarball, src_meta=src_meta,
                            tree_tgz=tree_tgz, tree_md5=tree_md5, tree_meta=tree_meta)
    results["_timed"] = runner.TimedResults()
    runner.run_timed(plan, cleanup, log, out=results["_timed"])


def _collect(results: dict, dedup_tools: list[str]) -> None:
    """Turn the raw results into the summary, errors and problems lists of ``results``."""
    res = results.pop("_timed", None)
    if res is not None:
        results["timed"] = runner.summary(res)
        results["samples"] = res.samples
        results["rss"] = res.rss
        results["errors"] += res.errors
        results["problems"] += res.problems
        results["cold_cache"] = res.cold
        if not res.cold:
            results["meta"]["notes"].append("the page cache could not be dropped: reads were not cold")
    for figure, per in results.get("dedup", {}).items():
        for tool in dedup_tools:
            r = per.get(tool, {})
            for err in r.get("errors", []) + ([r["error"]] if "error" in r else []):
                results["errors"].append({"target": tool, "run": "-", "step": figure, "error": err})
            results["problems"] += [f"{tool} ({figure}): {p}" for p in r.get("problems", [])]
    for name, module in (("replication", replication), ("rendezvous", rendezvous), ("audit", audit),
                         ("recovery", recovery)):
        rep = results.get(name)
        if not rep:
            continue
        if "runs" in rep and "summary" not in rep:  # interrupted half-way
            rep["summary"] = module.summarize(rep)
        for e in rep.get("errors", []):
            results["errors"].append(dict(e, step=f"{name}: {e['step']}"))
        results["problems"] += [f"{name}: {p}" for p in rep.get("problems", [])]
        results["meta"]["notes"] += rep.get("notes", [])


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name, argv in (("gocryptfs", ["gocryptfs", "-version"]), ("restic", ["restic", "version"])):
        try:
            out[name] = proc.run(argv, timeout=30).stdout.strip().splitlines()[0]
        except (proc.CommandError, OSError, IndexError):
            out[name] = None
    return out
