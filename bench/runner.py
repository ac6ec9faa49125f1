"""Runs the timed workloads ``runs`` times on every target and collects the results.

Each (run, target) pair gets a fresh instance (new directory, new gocryptfs or
bpfs store), so no run can deduplicate against an earlier one. The target order
rotates from run to run so that drift of the machine does not favour one column.
A failing workload is recorded with its error and ends that target's run; a
target that cannot even be created or mounted is dropped from later runs.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bench import stats, targets, workloads
from bench.cleanup import Cleanup
from bench.config import TREE, Sizes, human_bytes

#: The figure of each timed workload: a rate, or (the tree's steps) the seconds it took.
UNITS = {"seq_write": "MB/s", "seq_read": "MB/s", "create": "ops/s", "stat": "ops/s",
         "unlink": "ops/s", "untar": "files/s",
         "tree_extract": "s", "tree_md5": "s", "tree_ls": "s", "tree_rm": "s"}


def labels(sizes: Sizes, src_meta: dict | None, tree_meta: dict | None = None) -> dict[str, str]:
    """Row labels of the table, with the sizes in them."""
    src = (f"untar {src_meta['files']} files {src_meta['bytes'] / 1e6:.0f}MB" if src_meta
           else "untar")
    files = tree_meta["files"] if tree_meta else sizes.tree_files
    extract = (f"extract {files} files {tree_meta['bytes'] / 1e6:.0f}MB (tar -xzf, "
               f"{tree_meta['tgz_bytes'] / 1e6:.0f}MB .tar.gz)" if tree_meta else f"extract {files} files")
    return {
        "seq_write": f"seq write {human_bytes(sizes.seq_bytes)}",
        "seq_read": f"seq read {human_bytes(sizes.seq_bytes)} cold",
        "create": f"create {sizes.nfiles} files",
        "stat": f"stat {sizes.nfiles} files cold",
        "unlink": f"unlink {sizes.nfiles} files",
        "untar": src,
        "tree_extract": extract,
        "tree_md5": f"md5sum -c {files} files, cold",
        "tree_ls": "ls -lR, cold",
        "tree_rm": "rm -rf",
    }


@dataclass
class TimedResults:
    """Raw results: per workload and target, one dict per successful run."""

    samples: dict[str, dict[str, list[dict]]] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    rss: dict[str, list[int]] = field(default_factory=lambda: {"write": [], "read": []})
    cold: bool = True

    def add(self, workload: str, target: str, result: dict) -> None:
        result = dict(result, rate=stats.rate(result, UNITS[workload]))
        self.samples.setdefault(workload, {}).setdefault(target, []).append(result)


@dataclass
class TimedPlan:
    sizes: Sizes
    only: set[str]
    runs: int
    targets: list[str]
    tmp: Path
    data: np.ndarray | None  # the sequential file's content
    buf: np.ndarray | None  # where it is read back into
    tarball: Path | None
    src_meta: dict | None
    tree_tgz: Path | None = None  # the many-file tree's .tar.gz
    tree_md5: Path | None = None  # its md5sum manifest
    tree_meta: dict | None = None


def _one(plan: TimedPlan, name: str, run: int, cleanup: Cleanup, out: TimedResults,
         log: Callable[[str], None]) -> bool:
    """One fresh instance of target ``name``; returns False if it could not be set up."""
    only = plan.only
    inst = targets.make(name, plan.tmp / f"{name}-run{run}", cleanup)
    step = "create/mount"
    ok_setup = False

    def record(workload: str, result: dict) -> None:
        if workload in only:
            out.add(workload, name, result)
            unit = UNITS[workload]
            figure = "" if unit == "s" else f" {stats.rate(result, unit):10.1f} {unit} "
            log(f"  run {run} {name:9s} {workload:12s}{figure} ({result['seconds']:.2f} s)")

    try:
        inst.create()
        inst.mount()
        ok_setup = True
        if only & {"seq_write", "seq_read"}:
            step = "seq_write"
            record(step, workloads.seq_write(inst, plan.data))
            step = "seq_read"
            res = workloads.seq_read(inst, plan.data, plan.buf)
            out.cold &= res["cold"]
            hwm_write = getattr(inst, "last_hwm", None)  # read before the remount's unmount
            record(step, res)
            if isinstance(inst, targets.Bpfs):
                step = "umount after seq_read"
                inst.umount()
                if hwm_write:
                    out.rss["write"].append(hwm_write)
                if inst.last_hwm:
                    out.rss["read"].append(inst.last_hwm)
                step = "mount after seq_read"
                inst.mount()
        if only & {"create", "stat", "unlink"}:
            step = "create"
            record(step, workloads.files_create(inst, plan.sizes.nfiles))
            step = "stat"
            res = workloads.files_stat(inst, plan.sizes.nfiles)
            out.cold &= res["cold"]
            record(step, res)
            step = "unlink"
            record(step, workloads.files_unlink(inst, plan.sizes.nfiles))
        if "untar" in only:
            step = "untar"
            record(step, workloads.untar(inst, plan.tarball, plan.src_meta))
        tree = [w for w in TREE if w in only]
        if tree:
            # One tree per instance, its steps in order up to the last one asked for; the ones not
            # asked for run untimed, so each step starts from the same state in every selection.
            # md5sum -c always runs: it is the check of what was extracted.
            last = TREE.index(tree[-1])
            step = "tree_extract"
            record(step, workloads.tree_extract(inst, plan.tree_tgz, plan.tree_meta))
            step = "tree_md5"
            res = workloads.tree_md5(inst, plan.tree_md5, plan.tree_meta)
            out.cold &= res["cold"]
            record(step, res)
            if last >= TREE.index("tree_ls"):
                step = "tree_ls"
                res = workloads.tree_ls(inst)
                out.cold &= res["cold"]
                record(step, res)
            if last >= TREE.index("tree_rm"):
                step = "tree_rm"
                record(step, workloads.tree_rm(inst))
        step = "umount"
        inst.umount()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one target failing must not end the benchmark
        msg = f"{type(e).__name__}: {e}"
        out.errors.append({"target": name, "run": run, "step": step, "error": msg,
                           "traceback": traceback.format_exc(), "daemon_log": inst.log_tail()})
        log(f"  run {run} {name}: FAILED in {step}: {msg}")
    finally:
        for p in inst.problems:
            if f"{name}: {p}" not in out.problems:
                out.problems.append(f"{name}: {p}")
        try:
            inst.destroy()
        except Exception as e:  # noqa: BLE001
            out.errors.append({"target": name, "run": run, "step": "destroy", "error": str(e)})
    return ok_setup


def run_timed(plan: TimedPlan, cleanup: Cleanup, log: Callable[[str], None],
              out: TimedResults | None = None) -> TimedResults:
    """Fill ``out`` (a new TimedResults if None) run by run, so a Ctrl-C keeps what was done."""
    out = out if out is not None else TimedResults()
    active = list(plan.targets)
    for run in range(1, plan.runs + 1):
        log(f"timed workloads, run {run}/{plan.runs}")
        shift = (run - 1) % max(1, len(active))
        for name in active[shift:] + active[:shift]:
            if not _one(plan, name, run, cleanup, out, log):
                log(f"  {name}: could not be set up, dropped from the remaining runs")
                active.remove(name)
    return out


def summary(res: TimedResults) -> dict:
    """{workload: {target: summarize(rates)}} for the table and the JSON file."""
    return {w: {t: stats.summarize([r["rate"] for r in rs]) for t, rs in per.items()}
            for w, per in res.samples.items()}
