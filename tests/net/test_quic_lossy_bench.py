"""bench/quic_lossy.py in a tiny mode: the data arrives intact through the lab's lossy proxy,
the report has its fields, and the lab is gone afterwards (also after SIGTERM). No timing
assertions: the figures themselves are the benchmark's business."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import pytest

from tests.helpers.netlab import PYTHON, REPO, netlab_missing, sh

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(netlab_missing() is not None, reason=str(netlab_missing()))]


def _namespaces_of(pid: int) -> list[str]:
    """The lab namespaces a harness process with this pid made (NetLab names them after it)."""
    tag = f"bpfslab{pid % 100000:05d}"
    return [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines()
            if line.startswith(tag)]


def _run(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "bench.quic_lossy", *args], cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_quick_mode_reports_intact_flows(tmp_path):
    out = tmp_path / "lossy.json"
    proc = _run(["--mib", "2", "--delay", "0.005", "--loss", "0.01", "--fair-seconds", "2", "--runs", "1",
                 "--configs", "reno", "--pairs", "reno:cubic", "--json", str(out)])
    stdout, stderr = proc.communicate(timeout=200)
    assert proc.returncode == 0, stderr
    assert _namespaces_of(proc.pid) == []
    assert "throughput, one flow of 2 MiB" in stdout and "Jain" in stdout and "proxy:" in stdout
    res = json.loads(out.read_text())
    assert res["path"]["delay"] == 0.005 and res["path"]["loss"] == 0.01
    t = res["throughput"]["reno"]
    assert t["ok"] and t["bytes"] == [2 << 20]
    assert t["library"] == "aioquic" and t["cc"] == "reno"
    assert t["mb_s"] > 0 and t["cpu_s_per_gib"] > 0
    assert 0 < t["applied_loss"] < 0.1  # the proxy did drop datagrams, and QUIC repaired it
    assert 0 < t["proxy_share"] and t["proxy_us_per_datagram"] > 0
    f = res["fairness"]["reno:cubic"]
    assert f["ok"] and f["flows"] == ["aioquic + Reno", "aioquic + CUBIC"]
    assert len(f["mb_s"]) == 2 and all(x > 0 for x in f["mb_s"])
    assert 0.5 <= f["jain"] <= 1.0 and f["window_s"] > 0


def test_sigterm_removes_the_lab():
    proc = _run(["--seconds", "60", "--delay", "0.005", "--runs", "1", "--configs", "reno",
                 "--only", "throughput"])
    try:
        deadline = time.monotonic() + 60
        while not _namespaces_of(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert _namespaces_of(proc.pid), "the lab never appeared"
        time.sleep(3)  # the flow is running by now
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert _namespaces_of(proc.pid) == []
    # the proxy (root namespace) and both ends of the flow name the lab's network in their arguments
    net = re.search(r"lab: network (\d+\.\d+\.\d+\.)0/24", stderr)
    assert net, stderr
    left = [a for a in sh("ps", "-eo", "args").stdout.splitlines() if net.group(1) in a]
    assert left == []
