"""The report of the replication benchmark: medians over the runs (``summarize``), the printed
section (``report_lines``, also part of ``python -m bench``'s report) and the aims it is held to.
Everything is per combination of QUIC library and UDP I/O mode (``combo_key``)."""

from __future__ import annotations

from bench import stats
from bench.config import GiB, human_bytes

#: The aims (issue 15): replication at >= 150 MB/s with 1452-byte datagrams at <= 15 CPU s/GiB for both
#: ends together; 1 GiB recovered in < 10 s. And (earlier) replication within 2x of the raw ceiling.
AIM_MBPS = 150.0
AIM_CPU_PER_GIB = 15.0
AIM_CEILING_RATIO = 0.5
AIM_RECOVERY_SECONDS_PER_GIB = 10.0
#: Other load (cores) above which the report says the wall-clock figures were disturbed.
BUSY_CORES = 0.5

IO_LABELS = {"on": "GSO + GRO", "off": "1 datagram/call"}


def combo_key(library: str, offload: str) -> str:
    """The name of a (QUIC library, UDP offload "on"/"off") combination in the results: 'qh3/on'."""
    return f"{library}/{offload}"


def _per_gib(cpu: float, nbytes: int) -> float:
    return cpu / (nbytes / GiB)


class _Figures:
    """Lists of figures per (group, name, key), summarized into {group: {name: {key: summary}}}."""

    def __init__(self) -> None:
        self.col: dict[str, dict[str, dict[str, list[float]]]] = {}

    def add(self, group: str, name: str, key: str, value: float | None) -> None:
        if value is not None:
            self.col.setdefault(group, {}).setdefault(name, {}).setdefault(key, []).append(value)

    def sides(self, group: str, name: str, r: dict, a: float | None, b: float | None) -> None:
        """CPU s/GiB of each end and in total, the CPU-bound rate, the other load on the machine."""
        self.add(group, name, "others_cores", r.get("others_cores"))
        if a is None or b is None:
            return
        self.add(group, name, "cpu_a", _per_gib(a, r["bytes"]))
        self.add(group, name, "cpu_b", _per_gib(b, r["bytes"]))
        self.add(group, name, "cpu", _per_gib(a + b, r["bytes"]))
        if max(a, b) > 0:
            self.add(group, name, "idle_mbps", r["bytes"] / max(a, b) / 1e6)

    def summary(self) -> dict:
        return {g: {n: {k: stats.summarize(v) for k, v in keys.items()} for n, keys in names.items()}
                for g, names in self.col.items()}


def _recovery(f: _Figures, key: str, name: str, r: dict) -> None:
    f.add(key, name, "mbps", r["bytes"] / r["seconds"] / 1e6)
    f.add(key, name, "seconds", r["seconds"])
    f.add(key, name, "seconds_per_gib", r["seconds"] / (r["bytes"] / GiB))
    f.add(key, name, "partners", r.get("partners"))
    cpu_p = sum(r["cpu_partners"]) if r.get("cpu_partners") else r.get("cpu_b")
    f.sides(key, name, r, r["cpu_client"], cpu_p)


def summarize(out: dict) -> dict:
    """{'combos': {key: {'bpfs' | 'ceiling' | 'recovery_one' | 'recovery_two' | 'ratio' | ...:
    {figure: summary}}}, 'rsync': {figure: summary}}: medians (with min, max). The ratios bpfs /
    ceiling are taken within each run (same library and I/O mode, same run), then summarized."""
    f = _Figures()
    for s in out["runs"]:
        combos = dict(s.get("combos") or {})
        if "bpfs" in s or "ceiling" in s or "recovery" in s:  # the results of before the combinations
            combos.setdefault("aioquic/on", {k: s[k] for k in ("bpfs", "ceiling") if k in s})
            if "recovery" in s:
                combos["aioquic/on"]["recovery_one"] = s["recovery"]
        for key, per in combos.items():
            b, c = per.get("bpfs"), per.get("ceiling")
            if b:
                f.add(key, "bpfs", "mbps", b["bytes"] / b["seconds"] / 1e6)
                f.add(key, "bpfs", "seconds", b["seconds"])
                f.add(key, "bpfs", "sync_seconds", b.get("sync_seconds"))
                f.sides(key, "bpfs", b, b.get("cpu_a"), b.get("cpu_b"))
                if b.get("wire_bytes"):
                    f.add(key, "bpfs", "wire_overhead", b["wire_bytes"] / b["bytes"] - 1)
            if c:
                f.add(key, "ceiling", "mbps", c["bytes"] / c["seconds"] / 1e6)
                f.add(key, "ceiling", "seconds", c["seconds"])
                f.add(key, "ceiling", "send_per_call", c.get("send_per_call"))
                f.add(key, "ceiling", "recv_per_read", c.get("recv_per_read"))
                f.sides(key, "ceiling", c, c["cpu_send"], c["cpu_recv"])
            if b and c:
                f.add(key, "ratio", "mbps", (b["bytes"] / b["seconds"]) / (c["bytes"] / c["seconds"]))
                if b.get("cpu_a") is not None and b.get("cpu_b") is not None:
                    f.add(key, "ratio", "cpu", _per_gib(b["cpu_a"] + b["cpu_b"], b["bytes"])
                          / _per_gib(c["cpu_send"] + c["cpu_recv"], c["bytes"]))
            if b and s.get("rsync"):
                r = s["rsync"]
                f.add(key, "ratio", "rsync", (b["bytes"] / b["seconds"]) / (r["bytes"] / r["seconds"]))
            for name in ("one", "two"):
                if per.get(f"recovery_{name}"):
                    _recovery(f, key, f"recovery_{name}", per[f"recovery_{name}"])
            one, two = per.get("recovery_one"), per.get("recovery_two")
            if one and two:
                f.add(key, "ratio", "two_one", one["seconds"] / two["seconds"])
        if s.get("rsync"):
            r = s["rsync"]
            f.add("-", "rsync", "mbps", r["bytes"] / r["seconds"] / 1e6)
            f.add("-", "rsync", "seconds", r["seconds"])
            f.sides("-", "rsync", r, r["cpu_client"], r.get("cpu_server"))
    full = f.summary()
    summary: dict = {"combos": {k: v for k, v in full.items() if k != "-"}}
    if "-" in full:
        summary["rsync"] = full["-"]["rsync"]
    return summary


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _cell(s: dict | None, unit: str = "") -> str:
    """``stats.cell``, also for a figure without a unit (a ratio, CPU s/GiB)."""
    return stats.cell(s, unit).replace("  (", " (").strip()


def _med(s: dict | None, fmt: str = "") -> str:
    if not s:
        return "n/a"
    return format(s["median"], fmt) if fmt else stats.num(s["median"])


def _cpu(per: dict | None) -> list[str]:
    """Cells: sender, receiver, both (with min-max)."""
    per = per or {}
    return [_med(per.get("cpu_a")), _med(per.get("cpu_b")), _cell(per.get("cpu"))]


def _order(rep: dict, combos: dict) -> list[str]:
    keys = list(rep.get("combos") or [])
    return keys + [k for k in combos if k not in keys]


def _split(key: str) -> tuple[str, str]:
    lib, _, off = key.partition("/")
    return lib, IO_LABELS.get(off, off)


def report_lines(rep: dict) -> list[str]:
    """The printed section: replication and ceiling per library and I/O mode, their CPU per end,
    the recoveries per library, rsync as the reference, the aims."""
    summary = rep.get("summary") or summarize(rep)
    combos = summary.get("combos") or {}
    rsync = summary.get("rsync")
    if not combos and not rsync:
        return ["no replication results"]
    size = human_bytes(rep["bytes"])
    keys = _order(rep, combos)
    dg = next((c["ceiling"] for s in rep["runs"] for c in (s.get("combos") or {}).values() if "ceiling" in c), None)
    lines = [f"replication of {size} (bpfs pair + sync, A -> B) and the raw ceiling (1 stream"
             + (f", {dg['datagram']} B datagrams" if dg else "") + ") of the same library and UDP I/O, same run"]
    rows = [["library", "UDP I/O", "bpfs replication", "raw ceiling", "bpfs/ceiling", "CPU-bound bpfs",
             "ceiling dgrams/call", "other load"]]
    for key in keys:
        per = combos.get(key) or {}
        b, c, ratio = per.get("bpfs") or {}, per.get("ceiling") or {}, per.get("ratio") or {}
        calls = (f"{_med(c.get('send_per_call'), '.1f')} out, {_med(c.get('recv_per_read'), '.1f')} in"
                 if c.get("send_per_call") else "n/a")
        load = max((x["others_cores"]["median"] for x in (b, c) if x.get("others_cores")), default=None)
        rows.append([*_split(key), stats.cell(b.get("mbps"), "MB/s"), stats.cell(c.get("mbps"), "MB/s"),
                     _cell(ratio.get("mbps")), f"{_med(b.get('idle_mbps'))} MB/s" if b.get("idle_mbps")
                     else "n/a", calls, f"{load:.2f} cores" if load is not None else "n/a"])
    if rsync:
        rows.append(["rsync -a", "over ssh", stats.cell(rsync.get("mbps"), "MB/s"), "", "",
                     f"{_med(rsync.get('idle_mbps'))} MB/s" if rsync.get("idle_mbps") else "n/a", "",
                     f"{rsync['others_cores']['median']:.2f} cores" if rsync.get("others_cores") else "n/a"])
    lines += _table(rows)

    lines += ["", "CPU s per GiB of data, each end: bpfs sender = A's mount daemon, receiver = B's serve daemon; "
              "ceiling: the sending and the receiving process; rsync: the client (rsync, ssh) and the sshd side"]
    rows = [["library", "UDP I/O", "bpfs sender", "bpfs receiver", "bpfs both", "ceiling sender",
             "ceiling receiver", "ceiling both", "bpfs/ceiling CPU"]]
    for key in keys:
        per = combos.get(key) or {}
        rows.append([*_split(key), *_cpu(per.get("bpfs")), *_cpu(per.get("ceiling")),
                     _cell((per.get("ratio") or {}).get("cpu"))])
    if rsync:
        rows.append(["rsync -a", "over ssh", *_cpu(rsync), "", "", "", ""])
    lines += _table(rows)

    rec_keys = [k for k in keys if (combos.get(k) or {}).get("recovery_one") or (combos.get(k) or {}).get("recovery_two")]
    if rec_keys:
        lines += ["", f"recovery of {size} (bpfs recover NEW --from B; from two: C, which holds everything too, "
                      "found in the snapshot's partner list, packs from both at once)"]
        rows = [["library", "UDP I/O", "from one partner", "s per GiB", "from two partners", "s per GiB",
                 "speedup (t one / t two)", "CPU s/GiB recover + partners: one", "two", "partners that sent"]]
        for key in rec_keys:
            per = combos[key]
            one, two = per.get("recovery_one") or {}, per.get("recovery_two") or {}

            def cpu(r: dict) -> str:
                if not r.get("cpu"):
                    return "n/a"
                return f"{_med(r['cpu'])} = {_med(r['cpu_a'])} + {_med(r['cpu_b'])}"

            rows.append([*_split(key), stats.cell(one.get("seconds"), "s"), _med(one.get("seconds_per_gib"), ".1f"),
                         stats.cell(two.get("seconds"), "s"), _med(two.get("seconds_per_gib"), ".1f"),
                         stats.cell((per.get("ratio") or {}).get("two_one"), "x"), cpu(one), cpu(two),
                         f"{_med(one.get('partners'), '.0f')} / {_med(two.get('partners'), '.0f')}"])
        lines += _table(rows)
        lines.append("On loopback the partners and `bpfs recover` share this machine's cores: a second partner "
                     "adds no CPU, so one/two shows this machine, not two partners elsewhere (see bench/recovery.py "
                     "for partners behind limited uplinks).")

    lines += ["", "CPU-bound = data / CPU time of the busier end: the rate with an idle core per end. Other load = "
              "CPU the rest of the machine used meanwhile (other processes, kernel threads), in cores; when it is "
              "high, compare CPU s/GiB and the ratios within a run rather than throughput."]
    lines += _aims(keys, combos)
    vs_rsync = [f"{key} {_cell((combos.get(key) or {}).get('ratio', {}).get('rsync'))}" for key in keys
                if ((combos.get(key) or {}).get("ratio") or {}).get("rsync")]
    if vs_rsync:
        lines.append("bpfs/rsync throughput (within each run): " + ", ".join(vs_rsync))
    extra = []
    for key in keys:
        b = (combos.get(key) or {}).get("bpfs") or {}
        if b.get("wire_overhead"):
            extra.append(f"{key} {100 * b['wire_overhead']['median']:.1f} %")
    if extra:
        lines.append("bytes replicated (packs) over data: + " + ", ".join(extra))
    return lines


def _aims(keys: list[str], combos: dict) -> list[str]:
    out = []
    for key in keys:
        per = combos.get(key) or {}
        b, ratio = per.get("bpfs") or {}, per.get("ratio") or {}
        parts = []
        if b.get("mbps"):
            met = b["mbps"]["median"] >= AIM_MBPS and b.get("cpu") and b["cpu"]["median"] <= AIM_CPU_PER_GIB
            parts.append(f"{stats.num(b['mbps']['median'])} MB/s at {_med(b.get('cpu'))} CPU s/GiB "
                         f"({'met' if met else 'NOT met'})")
        if ratio.get("mbps"):
            met = ratio["mbps"]["median"] >= AIM_CEILING_RATIO
            parts.append(f"bpfs/ceiling {ratio['mbps']['median']:.2f} ({'met' if met else 'NOT met'})")
        for name in ("one", "two"):
            r = (per.get(f"recovery_{name}") or {}).get("seconds_per_gib")
            if r:
                met = r["median"] < AIM_RECOVERY_SECONDS_PER_GIB
                parts.append(f"recovery from {name}: {r['median']:.1f} s/GiB ({'met' if met else 'NOT met'})")
        if parts:
            out.append(f"  {key:12s} " + "; ".join(parts))
    if out:
        out.insert(0, f"aims: replication >= {AIM_MBPS:.0f} MB/s at <= {AIM_CPU_PER_GIB:.0f} CPU s/GiB (both ends), "
                      f"within 2x of the ceiling (>= {AIM_CEILING_RATIO:.2f}), recovery < "
                      f"{AIM_RECOVERY_SECONDS_PER_GIB:.0f} s per GiB:")
    return out


def print_report(rep: dict, runs: int) -> None:
    stats.print_standalone("bpfs replication and recovery, per QUIC library and UDP I/O mode", rep, runs,
                           report_lines(rep))
