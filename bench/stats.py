"""Summaries of repeated measurements: median, minimum, maximum; rates from timings."""

from __future__ import annotations

import statistics


def summarize(values: list[float]) -> dict | None:
    """{'median', 'min', 'max', 'n'} of ``values``, or None when there are none."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def rate(result: dict, unit: str) -> float:
    """Turn one workload result into its figure: MB/s (10^6 bytes), ops/s or files/s."""
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
