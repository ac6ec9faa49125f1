"""Summaries of repeated measurements (median, minimum, maximum; rates from timings), their figures
formatted for tables, and the printed parts every benchmark report shares."""

from __future__ import annotations

import statistics


def summarize(values: list[float]) -> dict | None:
    """{'median', 'min', 'max', 'n'} of ``values``, or None when there are none."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def rate(result: dict, unit: str) -> float:
    """Turn one workload result into its figure: MB/s (10^6 bytes), ops/s, files/s, or s (its seconds)."""
    if unit == "s":
        return result["seconds"]
    if unit == "MB/s":
        return result["bytes"] / 1e6 / result["seconds"]
    if unit == "ops/s":
        return result["ops"] / result["seconds"]
    if unit == "files/s":
        return result["files"] / result["seconds"]
    raise ValueError(unit)


def ratio(a: dict | None, b: dict | None) -> float | None:
    """Ratio of two summaries' medians (None if either is missing)."""
    if not a or not b or not b["median"]:
        return None
    return a["median"] / b["median"]


def num(x: float) -> str:
    """A figure with about three significant digits."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def cell(s: dict | None, unit: str) -> str:
    """A table cell: the median with its unit, and the min-max range when there were several runs."""
    if not s:
        return "n/a"
    if s["n"] == 1:
        return f"{num(s['median'])} {unit}"
    return f"{num(s['median'])} {unit} ({num(s['min'])}-{num(s['max'])})"


def failure_lines(results: dict, log_lines: int = 12) -> list[str]:
    """The errors (with the last lines of the daemon log) and problems of a report, as lines."""
    out: list[str] = []
    if results.get("errors"):
        out += ["", "errors:"]
        for e in results["errors"]:
            msg = "\n    ".join(e["error"].splitlines())
            out.append(f"  {e['target']} run {e['run']} in {e['step']}: {msg}")
            log = (e.get("daemon_log") or "").strip().splitlines()
            if log:
                out.append("    daemon log, last lines:")
                out += [f"      {line}" for line in log[-log_lines:]]
    if results.get("problems"):
        out += ["", "problems noticed:"] + [f"  {p}" for p in results["problems"]]
    return out


def print_standalone(title: str, rep: dict, runs: int, lines: list[str]) -> None:
    """A benchmark run on its own: the title, the load, its notes, its lines, what went wrong."""
    import os

    print()
    print(f"{title} ({runs} run{'s' if runs != 1 else ''}, medians with min-max; MB = 10^6 bytes)")
    print(f"load average (1 min) {rep.get('loadavg_start', [0])[0]:.2f} at start, "
          f"{rep.get('loadavg_end', [0])[0]:.2f} at end, {os.cpu_count()} CPUs")
    for note in rep.get("notes", []):
        print(f"note: {note}")
    print()
    for line in lines + failure_lines(rep):
        print(line)
