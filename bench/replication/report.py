"""The report of the replication benchmark: medians over the runs (``summarize``), the printed
section (``report_lines``, also part of ``python -m bench``'s report) and the aims it is held to."""

from __future__ import annotations

from bench import stats
from bench.config import GiB, human_bytes

#: The aims of the issue: replication within 2x of the raw aioquic ceiling, 1 GiB recovered in < 60 s.
AIM_CEILING_RATIO = 0.5
AIM_RECOVERY_SECONDS_PER_GIB = 60.0
#: Other load (cores) above which the report says the wall-clock figures were disturbed.
BUSY_CORES = 0.5


def _per_gib(cpu: float, nbytes: int) -> float:
    return cpu / (nbytes / GiB)


def summarize(out: dict) -> dict:
    """Medians (with min, max) of throughput, seconds and CPU s/GiB per column; the ratios."""
    col: dict[str, dict[str, list[float]]] = {}

    def add(name: str, key: str, value: float | None) -> None:
        if value is not None:
            col.setdefault(name, {}).setdefault(key, []).append(value)

    def sides(name: str, r: dict, a: float | None, b: float | None) -> None:
        """CPU s/GiB of each end and in total, the CPU-bound rate, the other load on the machine."""
        if a is None or b is None:
            return
        add(name, "cpu_a", _per_gib(a, r["bytes"]))
        add(name, "cpu_b", _per_gib(b, r["bytes"]))
        add(name, "cpu", _per_gib(a + b, r["bytes"]))
        if max(a, b) > 0:
            add(name, "idle_mbps", r["bytes"] / max(a, b) / 1e6)
        add(name, "others_cores", r.get("others_cores"))

    for s in out["runs"]:
        if "bpfs" in s:
            r = s["bpfs"]
            add("bpfs", "mbps", r["bytes"] / r["seconds"] / 1e6)
            add("bpfs", "seconds", r["seconds"])
            add("bpfs", "sync_seconds", r["sync_seconds"])
            sides("bpfs", r, r.get("cpu_a"), r.get("cpu_b"))
            if r.get("wire_bytes"):
                add("bpfs", "wire_overhead", r["wire_bytes"] / r["bytes"] - 1)
        if "recovery" in s:
            r = s["recovery"]
            add("recovery", "mbps", r["bytes"] / r["seconds"] / 1e6)
            add("recovery", "seconds", r["seconds"])
            add("recovery", "seconds_per_gib", r["seconds"] / (r["bytes"] / GiB))
            sides("recovery", r, r["cpu_client"], r.get("cpu_b"))
        if "ceiling" in s:
            r = s["ceiling"]
            add("ceiling", "mbps", r["bytes"] / r["seconds"] / 1e6)
            add("ceiling", "seconds", r["seconds"])
            sides("ceiling", r, r["cpu_send"], r["cpu_recv"])
        if "rsync" in s:
            r = s["rsync"]
            add("rsync", "mbps", r["bytes"] / r["seconds"] / 1e6)
            add("rsync", "seconds", r["seconds"])
            sides("rsync", r, r["cpu_client"], r.get("cpu_server"))
    summary = {name: {k: stats.summarize(v) for k, v in keys.items()} for name, keys in col.items()}
    ratios = {}
    bpfs = summary.get("bpfs", {})
    for other in ("ceiling", "rsync"):
        r = stats.ratio(bpfs.get("mbps"), summary.get(other, {}).get("mbps"))
        if r is not None:
            ratios[f"bpfs/{other}"] = r
        r = stats.ratio(bpfs.get("cpu"), summary.get(other, {}).get("cpu"))
        if r is not None:
            ratios[f"bpfs/{other} cpu"] = r
        r = stats.ratio(bpfs.get("idle_mbps"), summary.get(other, {}).get("idle_mbps"))
        if r is not None:
            ratios[f"bpfs/{other} idle"] = r
    rec = summary.get("recovery", {}).get("seconds_per_gib")
    if rec:
        ratios["recovery/aim"] = rec["median"] / AIM_RECOVERY_SECONDS_PER_GIB
    summary["ratios"] = ratios
    return summary


def report_lines(rep: dict) -> list[str]:
    """The printed section: one row per column, then the ratios against the aims."""
    summary = rep.get("summary") or summarize(rep)
    size = human_bytes(rep["bytes"])
    rows = [["transfer over loopback", "throughput", "seconds", "CPU s/GiB (sender + receiver)",
             "CPU-bound", "other load"]]
    names = {"bpfs": f"bpfs replication of {size} (pair + sync)",
             "ceiling": "raw aioquic ceiling (1 stream{dg})",
             "rsync": "rsync -a over ssh",
             "recovery": f"bpfs recovery of {size} (recover)"}
    for name in ("bpfs", "ceiling", "rsync", "recovery"):
        per = summary.get(name)
        if not per:
            continue
        label = names[name]
        if name == "ceiling":
            dg = next((s["ceiling"] for s in rep["runs"] if "ceiling" in s), None)
            label = label.format(dg=f", {dg['datagram']} B datagrams, {dg['cc']}" if dg else "")
        cpu = "n/a"
        if per.get("cpu"):
            cpu = (f"{stats.num(per['cpu']['median'])} = {stats.num(per['cpu_a']['median'])} + "
                   f"{stats.num(per['cpu_b']['median'])}")
        elif per.get("cpu_a"):
            cpu = f"{stats.num(per['cpu_a']['median'])} + n/a"
        idle = f"{stats.num(per['idle_mbps']['median'])} MB/s" if per.get("idle_mbps") else "n/a"
        others = f"{per['others_cores']['median']:.2f} cores" if per.get("others_cores") else "n/a"
        rows.append([label, stats.cell(per.get("mbps"), "MB/s"), stats.cell(per.get("seconds"), "s"), cpu, idle, others])
    if len(rows) == 1:
        return ["no replication results"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("CPU: bpfs = A's mount daemon + B's serve daemon; ceiling = sender + receiver process; "
                 "rsync = client (rsync, ssh) + sshd side; recovery = `bpfs recover` + B's daemon.")
    lines.append("CPU-bound = data / CPU time of the busier end: the rate with an idle core per end. "
                 "Other load = CPU the rest of the machine used meanwhile (other processes, kernel "
                 "threads), in cores; when it is high, compare CPU s/GiB rather than throughput.")
    ratios = summary.get("ratios", {})
    parts = []
    if "bpfs/ceiling" in ratios:
        met = "met" if ratios["bpfs/ceiling"] >= AIM_CEILING_RATIO else "NOT met"
        parts.append(f"bpfs/ceiling {ratios['bpfs/ceiling']:.2f} (aim >= {AIM_CEILING_RATIO:.2f}, "
                     f"within 2x: {met})")
    if "bpfs/rsync" in ratios:
        parts.append(f"bpfs/rsync {ratios['bpfs/rsync']:.2f}")
    cpu_parts = [f"{k.replace(' cpu', '')} {v:.2f}" for k, v in ratios.items() if k.endswith(" cpu")]
    idle_parts = [f"{k.replace(' idle', '')} {v:.2f}" for k, v in ratios.items() if k.endswith(" idle")]
    if parts:
        lines.append("throughput ratios: " + ", ".join(parts))
    if idle_parts:
        lines.append("CPU-bound throughput ratios: " + ", ".join(idle_parts))
    if cpu_parts:
        lines.append("CPU s/GiB ratios (lower is better for bpfs): " + ", ".join(cpu_parts))
    rec = summary.get("recovery", {}).get("seconds_per_gib")
    if rec:
        met = "met" if rec["median"] < AIM_RECOVERY_SECONDS_PER_GIB else "NOT met"
        line = f"recovery: {rec['median']:.1f} s per GiB (aim < {AIM_RECOVERY_SECONDS_PER_GIB:.0f} s per GiB: {met})"
        per = summary["recovery"]
        if per.get("others_cores") and per["others_cores"]["median"] > BUSY_CORES and per.get("idle_mbps"):
            line += (f"; the machine was busy with other work ({per['others_cores']['median']:.2f} cores), "
                     f"CPU-bound: {GiB / 1e6 / per['idle_mbps']['median']:.1f} s per GiB")
        lines.append(line)
    bp = summary.get("bpfs", {})
    extra = []
    if bp.get("sync_seconds"):
        extra.append(f"of the bpfs time, `bpfs sync` alone {bp['sync_seconds']['median']:.2f} s")
    if bp.get("wire_overhead"):
        extra.append(f"bytes replicated (packs) = data + {100 * bp['wire_overhead']['median']:.1f} %")
    if extra:
        lines.append("; ".join(extra))
    return lines


def print_report(rep: dict, runs: int) -> None:
    stats.print_standalone("bpfs replication and recovery", rep, runs, report_lines(rep))
