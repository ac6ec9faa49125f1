"""The report of the rendezvous benchmark: medians over the runs and the ratios to the references
(``summarize``), and the printed section (``report_lines``, also part of ``python -m bench``'s report)."""

from __future__ import annotations

from bench import stats
from bench.config import GiB, MiB, human_bytes
from bench.rendezvous.harness import ANNOUNCERS, CONNECTIONS, IN_FLIGHT


def mbps(r: dict) -> float:
    return r["bytes"] / r["seconds"] / 1e6


RATE_NAMES = {"ping": "Ping round trips (reference)", "lookup": "Lookups (hits)",
              "announce": "Announcements on open connections",
              "connect": "Announcements, each on a new connection"}


def summarize(out: dict) -> dict:
    col: dict[str, dict[str, list[float]]] = {}

    def add(name: str, key: str, value) -> None:
        if value is not None:
            col.setdefault(name, {}).setdefault(key, []).append(value)

    for s in out.get("runs", []):
        for name in ("pair_code", "pair_direct"):
            if name in s:
                add(name, "seconds", s[name]["seconds"])
                for k in ("code_seconds", "joiner_seconds", "creator_seconds", "accept_seconds", "direct_seconds"):
                    add(name, k, s[name].get(k))
        for name, r in s.get("rates", {}).items():
            add(name, "rate", r["n"] / r["seconds"])
            add(name, "broker_ms", 1000 * r["cpu_broker"] / r["n"])
            add(name, "client_ms", 1000 * r["cpu_client"] / r["n"])
        for name, r in s.get("relay", {}).items():
            add(name, "mbps", mbps(r))
            add(name, "client_cpu_gib", r["cpu_client"] / (r["bytes"] / GiB))
            if name == "relay":
                add(name, "broker_cpu_gib", r["cpu_broker"] / (r["bytes"] / GiB))
                add(name, "frames_dropped", r.get("frames_dropped"))
                add(name, "dropped_rate", r.get("dropped_rate"))
    summary = {name: {k: stats.summarize(v) for k, v in keys.items()} for name, keys in col.items()}
    ratios = {}
    r = stats.ratio(summary.get("pair_code", {}).get("seconds"), summary.get("pair_direct", {}).get("seconds"))
    if r is not None:
        ratios["code/direct seconds"] = r
    for name in ("lookup", "announce", "connect"):
        r = stats.ratio(summary.get(name, {}).get("rate"), summary.get("ping", {}).get("rate"))
        if r is not None:
            ratios[f"{name}/ping"] = r
    r = stats.ratio(summary.get("relay", {}).get("mbps"), summary.get("direct", {}).get("mbps"))
    if r is not None:
        ratios["relay/direct"] = r
    summary["ratios"] = ratios
    return summary


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:.2f}" if x >= 0.1 else f"{x:.2g}")


def report_lines(rep: dict) -> list[str]:
    summary = rep.get("summary") or summarize(rep)
    ratios = summary.get("ratios", {})
    lines: list[str] = []
    if "pair_code" in summary or "pair_direct" in summary:
        rows = [["pairing over loopback (4 new served stores a run)", "time", "ratio"]]
        code, direct = summary.get("pair_code", {}), summary.get("pair_direct", {})
        if code:
            rows.append(["by code through the broker (bpfs pair A; bpfs pair B CODE)",
                         stats.cell(code.get("seconds"), "s"), _ratio(ratios.get("code/direct seconds"))])
        if direct:
            rows.append(["directly (reference: --accept, then --direct --expect)",
                         stats.cell(direct.get("seconds"), "s"), "1"])
        lines += _table(rows)
        if code.get("code_seconds"):
            lines.append(f"by code: the code was printed after {code['code_seconds']['median']:.2f} s, the joiner "
                         f"exited after {code['joiner_seconds']['median']:.2f} s, the creator after "
                         f"{code['creator_seconds']['median']:.2f} s (medians; each `bpfs pair` is a new process)")
        lines.append("")
    if any(k in summary for k in RATE_NAMES):
        sizes = rep.get("sizes", {})
        rows = [[f"requests to the broker from one process ({IN_FLIGHT} in flight)", "rate", "vs pings",
                 "broker CPU", "client CPU"]]
        for name, label in RATE_NAMES.items():
            per = summary.get(name)
            if not per:
                continue
            n = sizes.get("connects" if name == "connect" else "requests")
            label = f"{label} ({n:,})" if n else label
            if name == "connect":
                label += f", {ANNOUNCERS} at once"
            rows.append([label, stats.cell(per.get("rate"), "/s"),
                         "1" if name == "ping" else _ratio(ratios.get(f"{name}/ping")),
                         f"{per['broker_ms']['median']:.2f} ms/req", f"{per['client_ms']['median']:.2f} ms/req"])
        lines += _table(rows)
        lines.append(f"pings and lookups: one identity, {CONNECTIONS} connections; lookups find stores that "
                     "announced and disconnected (no Punch pushed); announcements on open connections: "
                     f"{IN_FLIGHT} stores, one connection each. CPU = CPU ms per request of the broker process "
                     "and of this (client) process; the busier one bounds the rate.")
        lines.append("")
    if "relay" in summary or "direct" in summary:
        size = human_bytes(rep.get("sizes", {}).get("relay_bytes", 0))
        rows = [[f"one stream of {size} between two endpoints in one process", "throughput", "ratio",
                 "client CPU s/GiB", "broker CPU s/GiB"]]
        for name, label in (("relay", "through the broker's relay"), ("direct", "directly (reference)")):
            per = summary.get(name)
            if not per:
                continue
            rows.append([label, stats.cell(per.get("mbps"), "MB/s"),
                         _ratio(ratios.get("relay/direct")) if name == "relay" else "1",
                         stats.num(per["client_cpu_gib"]["median"]),
                         stats.num(per["broker_cpu_gib"]["median"]) if per.get("broker_cpu_gib") else "-"])
        lines += _table(rows)
        rel = summary.get("relay", {})
        if rel.get("broker_cpu_gib"):
            lines.append(f"the broker's CPU alone would relay about {GiB / 1e6 / rel['broker_cpu_gib']['median']:.0f} "
                         "MB/s of data per core (1 GiB / its CPU s per relayed GiB)")
        if rel.get("frames_dropped") is not None:
            lines.append(f"frames the relay dropped (median per run): {rel['frames_dropped']['median']:.0f}, of "
                         f"which over the rate cap {rel['dropped_rate']['median']:.0f}")
        lines.append("client CPU = this process (sender and receiver share its one trio loop); broker CPU = the "
                     "broker process while it relayed, per GiB relayed.")
    if rep.get("broker_rss_peak"):
        lines.append(f"broker peak RSS (VmHWM) over the whole run: {rep['broker_rss_peak'] / MiB:.0f} MiB")
    return lines


def print_report(rep: dict, runs: int) -> None:
    stats.print_standalone("bpfs rendezvous through a broker over loopback", rep, runs, report_lines(rep))

