"""The printed tables (medians with min-max; ratios to raw, gocryptfs; dedup; replication) and the JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from bench import audit, recovery, rendezvous, replication, stats
from bench.config import RATES, TIMED, TREE, human_bytes
from bench.dedup import TARGET_PERCENT
from bench.runner import UNITS


def _ratio(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def timed_table(summary: dict, labels: dict[str, str], columns: list[str],
                workloads: tuple[str, ...] = RATES, ratio_header: str = "bpfs/{other}") -> list[str]:
    """One line per workload: each column's median (min-max), then bpfs/raw and bpfs/gocryptfs
    (ratios of the medians; their headers are ``ratio_header`` with the other column's name)."""
    rows = []
    for w in workloads:
        if w not in summary:
            continue
        per = summary[w]
        cells = [stats.cell(per.get(t), UNITS[w]) for t in columns]
        ratios = []
        if "bpfs" in columns:
            for other in ("raw", "gocryptfs"):
                if other in columns:
                    ratios.append(_ratio(stats.ratio(per.get("bpfs"), per.get(other))))
        rows.append([labels[w], *cells, *ratios])
    if not rows:
        return []
    header = ["workload", *columns]
    if "bpfs" in columns:
        header += [ratio_header.format(other=o) for o in ("raw", "gocryptfs") if o in columns]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in [header, *rows]]


def tree_table(summary: dict, labels: dict[str, str], columns: list[str]) -> list[str]:
    """The many-file tree's steps: each column's median seconds (min-max), then bpfs time / raw
    time and bpfs time / gocryptfs time (below 1: bpfs was faster)."""
    return timed_table(summary, labels, columns, TREE, "bpfs time / {other} time")


def tree_heading(tree: dict | None) -> str:
    """The line above the tree table: what the tree is and how its steps run."""
    what = "many-file tree"
    if tree:
        what = (f"many-file tree: {tree['files']} files in {tree['dirs']} folders, {tree['bytes'] / 1e6:.0f} MB "
                f"(log-normal sizes, median {tree['median']} bytes), a {tree['tgz_bytes'] / 1e6:.0f} MB .tar.gz")
    return (f"{what}; per target and run on one tree: extract, md5sum -c (cold), ls -lR (cold), rm -rf "
            "(seconds, medians with min-max; lower is better)")


def dedup_table(dedup: dict) -> list[str]:
    lines = []
    names = {"dedup_copy": "2nd copy of a {size} tree: store growth",
             "dedup_insert": "1 byte inserted at start of a {size} file: new bytes stored"}
    for figure in ("dedup_copy", "dedup_insert"):
        if figure not in dedup:
            continue
        d = dedup[figure]
        size = d["tree"]["bytes"] if figure == "dedup_copy" else d["file_bytes"]
        label = names[figure].format(size=human_bytes(size))
        cells = []
        for tool in ("bpfs", "restic"):
            if tool in d:
                r = d[tool]
                if "percent" not in r:
                    cells.append(f"{tool} FAILED")
                elif len(r.get("runs", [])) > 1:
                    cells.append(f"{tool} {r['percent']:.2f} % ({r['min']:.2f}-{r['max']:.2f})")
                else:
                    cells.append(f"{tool} {r['percent']:.2f} %")
        lines.append(f"{label:62s}  " + "   ".join(f"{c:28s}" for c in cells)
                     + f"  (target < {TARGET_PERCENT[figure]:g} %)")
    return lines


def rss_lines(rss: dict) -> list[str]:
    parts = []
    for phase in ("write", "read"):
        vals = rss.get(phase) or []
        if vals:
            parts.append(f"seq {phase} {max(vals) / 2**20:.0f} MiB")
    if not parts:
        return []
    return ["bpfs daemon peak RSS (VmHWM, max over runs): " + ", ".join(parts)]


def cpu_line(samples: dict) -> list[str]:
    """The bpfs daemon's CPU time as % of the workload's wall time (median over runs)."""
    short = {"seq_write": "seq write", "seq_read": "seq read", "create": "create", "stat": "stat",
             "unlink": "unlink", "untar": "untar", "tree_extract": "tree extract", "tree_md5": "tree md5",
             "tree_ls": "tree ls", "tree_rm": "tree rm"}
    parts = []
    for w in TIMED:
        runs = [r for r in samples.get(w, {}).get("bpfs", []) if "daemon_cpu" in r]
        if runs:
            pct = stats.summarize([100 * r["daemon_cpu"] / r["seconds"] for r in runs])["median"]
            parts.append(f"{short[w]} {pct:.0f}%")
    if not parts:
        return []
    return ["bpfs daemon CPU time / wall time (median; 100% = one core busy): " + ", ".join(parts)]


def print_report(results: dict) -> None:
    print()
    runs = results["meta"]["runs"]
    print(f"bpfs benchmark ({results['meta']['mode']}, {runs} run{'s' if runs != 1 else ''}, medians "
          f"with min-max; MB = 10^6 bytes; rates: higher is better, seconds: lower is better)")
    meta = results["meta"]
    if "loadavg_end" in meta:
        print(f"load average (1 min) {meta['loadavg_start'][0]:.2f} at start, {meta['loadavg_end'][0]:.2f} "
              f"at end, {meta['cpus']} CPUs")
    if results["meta"].get("notes"):
        for note in results["meta"]["notes"]:
            print(f"note: {note}")
    if results.get("timed"):
        rates = timed_table(results["timed"], results["labels"], results["meta"]["targets"])
        if rates:
            print()
            for line in rates:
                print(line)
        tree = tree_table(results["timed"], results["labels"], results["meta"]["targets"])
        if tree:
            print()
            print(tree_heading(results.get("tree")))
            for line in tree:
                print(line)
    for line in rss_lines(results.get("rss", {})) + cpu_line(results.get("samples", {})):
        print(line)
    if results.get("dedup"):
        print()
        print("deduplication (store growth; lower is better; the insert figure is the median over runs, "
              "each in a new store)")
        for line in dedup_table(results["dedup"]):
            print(line)
    if results.get("replication", {}).get("runs"):
        print()
        print("replication to a partner and recovery, over loopback (medians with min-max)")
        for line in replication.report_lines(results["replication"]):
            print(line)
    if results.get("rendezvous", {}).get("runs"):
        print()
        print("rendezvous through a broker over loopback (medians with min-max)")
        for line in rendezvous.report_lines(results["rendezvous"]):
            print(line)
    if results.get("audit", {}).get("runs") or results.get("audit", {}).get("simulation"):
        print()
        print("storage audits of a partner over loopback (medians with min-max)")
        for line in audit.report_lines(results["audit"]):
            print(line)
    if results.get("recovery", {}).get("runs"):
        print()
        print("recovery from one partner and from two, over loopback (medians with min-max)")
        for line in recovery.report_lines(results["recovery"]):
            print(line)
    for line in stats.failure_lines(results, log_lines=6):
        print(line)


def save_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
