"""The replication benchmark's plan and report (bench/replication/): the combinations of QUIC library
and UDP I/O mode, the order of a run, the environment each bpfs process gets, the command-line
lists, and the summary and printed section made of made-up results. Pure: no store, no network."""

from __future__ import annotations

import argparse

import pytest

from bench.config import GiB
from bench.replication import cli, harness, measure, report

MB = 1e6


def test_combinations_and_environment():
    combos = measure.combinations(["aioquic", "qh3"], ["on", "off"])
    assert combos == [("aioquic", "on"), ("aioquic", "off"), ("qh3", "on"), ("qh3", "off")]
    assert [report.combo_key(*c) for c in combos] == ["aioquic/on", "aioquic/off", "qh3/on", "qh3/off"]
    assert harness.quic_env("qh3", "off") == {"BPFS_QUIC": "qh3", "BPFS_UDP_OFFLOAD": "0"}
    assert harness.quic_env("aioquic", "on") == {"BPFS_QUIC": "aioquic", "BPFS_UDP_OFFLOAD": "1"}
    with pytest.raises(ValueError):
        harness.quic_env("quiche", "on")
    with pytest.raises(ValueError):
        harness.quic_env("qh3", "maybe")


def test_every_item_leads_one_run_when_there_are_as_many_runs():
    items = list(range(9))
    firsts = [measure.plan_run(items, run, 9)[0] for run in range(1, 10)]
    assert sorted(firsts) == items
    for run in (1, 2, 3):
        order = measure.plan_run(items, run, 3)
        assert sorted(order) == items  # a rotation: nothing left out, nothing twice
    assert [measure.plan_run(items, run, 3)[0] for run in (1, 2, 3)] == [0, 3, 6]
    assert measure.plan_run(items, 1, 1) == items
    assert measure.plan_run([], 1, 3) == []


def test_cli_lists():
    p = argparse.ArgumentParser()
    assert cli._list(p, "--library", "qh3, aioquic,qh3", harness.LIBRARIES) == ["qh3", "aioquic"]
    assert cli._list(p, "--offload", "off", harness.OFFLOADS) == ["off"]
    with pytest.raises(SystemExit):
        cli._list(p, "--offload", "on,gso", harness.OFFLOADS)
    with pytest.raises(SystemExit):
        cli._list(p, "--library", ",", harness.LIBRARIES)


def _bpfs(mbps: float, cpu_a: float, cpu_b: float, nbytes: int = GiB) -> dict:
    return {"bytes": nbytes, "seconds": nbytes / (mbps * MB), "sync_seconds": 1.0, "cpu_a": cpu_a,
            "cpu_b": cpu_b, "cpu_cli": 0.1, "wire_bytes": int(nbytes * 1.01)}


def _ceiling(mbps: float, send: float, recv: float, per_call: float, nbytes: int = GiB) -> dict:
    return {"bytes": nbytes, "seconds": nbytes / (mbps * MB), "cpu_send": send, "cpu_recv": recv,
            "datagram": 1452, "cc": "reno", "send_per_call": per_call, "recv_per_read": per_call}


def _recovery(seconds: float, client: float, partners: list[float], nbytes: int = GiB) -> dict:
    return {"seconds": seconds, "bytes": nbytes, "cpu_client": client, "cpu_partners": partners,
            "cpu_b": partners[0], "partners": len(partners), "asked_partners": len(partners)}


def _rep() -> dict:
    runs = []
    for run, k in ((1, 1.0), (2, 1.2)):
        runs.append({"run": run, "combos": {
            "aioquic/on": {"bpfs": _bpfs(40 * k, 20, 20), "ceiling": _ceiling(50 * k, 12, 12, 30),
                           "recovery_one": _recovery(20 / k, 15, [10]),
                           "recovery_two": _recovery(16 / k, 15, [5, 5])},
            "qh3/off": {"bpfs": _bpfs(100 * k, 8, 6), "ceiling": _ceiling(200 * k, 5, 5, 1)},
        }, "rsync": {"bytes": GiB, "seconds": GiB / (200 * k * MB), "cpu_client": 3, "cpu_server": 4}})
    return {"bytes": GiB, "runs": runs, "errors": [], "problems": [], "notes": [],
            "combos": ["aioquic/on", "qh3/off"], "recovery_offload": "on"}


def test_summary_per_combination():
    s = report.summarize(_rep())
    a, q = s["combos"]["aioquic/on"], s["combos"]["qh3/off"]
    assert a["bpfs"]["mbps"]["median"] == pytest.approx(44)
    assert a["bpfs"]["mbps"]["min"] == pytest.approx(40) and a["bpfs"]["mbps"]["max"] == pytest.approx(48)
    assert a["bpfs"]["cpu_a"]["median"] == 20 and a["bpfs"]["cpu_b"]["median"] == 20
    assert a["bpfs"]["cpu"]["median"] == 40
    assert a["ceiling"]["cpu"]["median"] == 24
    # the ratios are taken within each run, then summarized
    assert a["ratio"]["mbps"]["median"] == pytest.approx(0.8) and a["ratio"]["mbps"]["n"] == 2
    assert q["ratio"]["mbps"]["median"] == pytest.approx(0.5)
    assert a["ratio"]["cpu"]["median"] == pytest.approx(40 / 24)
    assert q["ratio"]["rsync"]["median"] == pytest.approx(0.5)
    # recovery: seconds per GiB, CPU of `bpfs recover` + every partner, the speedup of two over one
    assert a["recovery_one"]["seconds_per_gib"]["median"] == pytest.approx((20 + 20 / 1.2) / 2)
    assert a["recovery_two"]["cpu"]["median"] == 25 and a["recovery_two"]["cpu_b"]["median"] == 10
    assert a["recovery_two"]["partners"]["median"] == 2
    assert a["ratio"]["two_one"]["median"] == pytest.approx(1.25)
    assert "recovery_one" not in q
    assert s["rsync"]["cpu"]["median"] == 7


def test_report_lines_show_every_combination_and_recovery():
    lines = report.report_lines(_rep())
    text = "\n".join(lines)
    rows = [line for line in lines if line.startswith(("aioquic", "qh3"))]
    assert [r.split()[0] for r in rows] == ["aioquic", "qh3"] * 2 + ["aioquic"]  # throughput, CPU, recovery
    assert "GSO + GRO" in rows[0] and "1 datagram/call" in rows[1]
    assert "44.0 MB/s (40.0-48.0)" in rows[0] and "0.80 (0.80-0.80)" in rows[0]
    assert "rsync -a" in text and "from two partners" in text and "1.25 x" in text
    assert "1 / 2" in rows[-1]  # partners that sent bytes: one, then two
    assert "aims:" in text and "qh3/off" in text


def test_report_of_nothing_and_of_the_old_layout():
    assert report.report_lines({"bytes": GiB, "runs": []}) == ["no replication results"]
    old = {"bytes": GiB, "runs": [{"run": 1, "bpfs": _bpfs(40, 20, 20), "ceiling": _ceiling(50, 12, 12, 30),
                                   "recovery": _recovery(20, 15, [10])}]}
    s = report.summarize(old)
    assert s["combos"]["aioquic/on"]["ratio"]["mbps"]["median"] == pytest.approx(0.8)
    assert s["combos"]["aioquic/on"]["recovery_one"]["seconds"]["median"] == 20
