"""QUIC congestion control on a lossy, delayed path: aioquic + Reno (aioquic's default in bpfs), aioquic +
CUBIC and qh3 (whose core always runs CUBIC), for throughput and for fairness.

Run (as root, from the repository root):

    .venv/bin/python -m bench.quic_lossy [--quick] [--runs N] [--seconds S | --mib N]
        [--delay 0.05] [--loss 0.01] [--rate none|100mbit] [--fair-rate 50mbit] [--fair-loss P]
        [--configs reno,cubic,qh3] [--pairs reno:reno,cubic:cubic,reno:cubic,qh3:reno]
        [--only throughput,fairness] [--json FILE]

`--quick`: 10 s flows, 1 run. Default: 30 s flows, 3 runs (medians; the order of the
configurations and of the pairings rotates from run to run, and the two flows of a pair
swap their start order).

The path. A NetLab (tests/helpers/netlab) with two namespaces: the senders live in one,
the receivers in the other, and between them, in the root namespace, one UDP proxy process
per flow (`ProxyProcess`) holds every datagram `--delay` seconds and drops `--loss` of them,
each way (defaults 50 ms and 1 %: a 100 ms round trip). The kernel here has no tc netem,
hence the proxy. A rate limit is a tc tbf on the senders' veth (`Host.set_rate`: 64 kB
burst, 200 ms of queue): the data of every flow passes it, the acknowledgements do not.
Each flow is `bench/quic_ceiling.py`: `--serve --samples` in the receivers' namespace, the
sender (`--connect`, `--seconds`) in the senders' one; one stream, 1452-byte datagrams, UDP
GSO/GRO where the kernel has them, a 256 KiB send buffer (so a flow stops soon after its
time is up), SHA-256 of the payload checked end to end.

1. Throughput: one flow at a time (`--rate`, default no limit). Per configuration: the
   receiver's goodput (bytes from its first to its last read, MB/s = 10^6 bytes/s), CPU
   seconds of both ends per GiB moved, and the loss the proxy actually applied.
2. Fairness: two flows at once through the `--fair-rate` bottleneck (default 50 Mbit/s),
   with the same delay and `--fair-loss` (default: `--loss`). Each flow's rate is taken
   over the window in which both were receiving (from the receivers' progress samples,
   wall clock, 0.1 s apart), and Jain's index J = (sum x)^2 / (n sum x^2): 1 is an even
   split, 0.5 is one flow taking everything.

Every run also prints the proxies' CPU (as a share of one core) and their cost per datagram
handled; 1452 bytes / that cost is what one proxy process could carry on one core, a
bound (low: measured at low rates, with wake-ups less batched) to check that the proxy is
not the bottleneck. A proxy above 70 % of a core is flagged in the output.

Caveats. The figures are noisy: 2 cores shared with other work, and 6 processes for a pair
(2 senders, 2 receivers, 2 proxies). Random loss is what the proxy draws (Bernoulli per
datagram, each direction), not a queue's loss: under 1 % random loss the window, not the
bottleneck, limits both Reno and CUBIC (Mathis: rate ~ MSS / RTT * 1.22 / sqrt(p), about
0.18 MB/s for Reno here), so the 50 Mbit/s bottleneck is rarely full and the fairness
figure says mostly how each reacts to loss; `--fair-loss 0` shows the shared bottleneck
alone (then flows of 30 s are short for Reno to converge at a 100 ms round trip). aioquic's
Reno and CUBIC and qh3's CUBIC are each library's own (RFC 9002 NewReno; RFC 8312 CUBIC
with its Reno-friendly region); bpfs's pacer applies to aioquic only.

Cleanup: the namespaces, the proxies and every flow's processes go on exit, also after a
failure, Ctrl-C or SIGTERM (not after SIGKILL: `ip netns list`, then `ip netns del`).
Needs root, ip, iptables, nsenter and tc (`netlab_missing`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.netlab import REPO, Host, NetLab, ProxyProcess, netlab_missing

CEILING = str(Path(REPO) / "bench" / "quic_ceiling.py")
PYTHON = sys.executable
#: name -> (library, congestion control)
CONFIGS = {"reno": ("aioquic", "reno"), "cubic": ("aioquic", "cubic"), "qh3": ("qh3", "cubic")}
LABELS = {"reno": "aioquic + Reno", "cubic": "aioquic + CUBIC", "qh3": "qh3 (CUBIC)"}
PAIRS = (("reno", "reno"), ("cubic", "cubic"), ("reno", "cubic"), ("qh3", "reno"))
SEND_BUFFER = 256 << 10
PROXY_BUSY = 0.7  # a proxy above this share of a core may be what limits a flow


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes

def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    """The next stdout line of `proc`, or "" if none comes within `timeout` or it ends."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def _stderr(f) -> str:
    with contextlib.suppress(OSError, ValueError):
        f.seek(0)
        return f.read().decode(errors="replace")[-2000:]
    return ""


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


@dataclass
class Flow:
    """One QUIC flow: receiver (in the receivers' namespace), its proxy (root namespace) and
    sender (in the senders' namespace)."""

    name: str  # a CONFIGS key
    receiver: subprocess.Popen | None = None
    proxy: ProxyProcess | None = None
    sender: subprocess.Popen | None = None
    errs: list = field(default_factory=list)
    proxy_cpu0: float = 0.0

    def start_path(self, lab: "Lab", delay: float, loss: float) -> None:
        library, cc = CONFIGS[self.name]
        err = tempfile.TemporaryFile()
        self.errs.append(err)
        self.receiver = lab.receivers.popen(
            [PYTHON, CEILING, "--serve", "--samples", "--listen", f"{lab.receivers.addr}:0",
             "--library", library, "--cc", cc], stdout=subprocess.PIPE, stderr=err, text=True, cwd=str(REPO))
        line = _readline(self.receiver, 60)
        if not line.strip().isdigit():
            raise RuntimeError(f"receiver ({self.name}) did not start: {line!r} {_stderr(err)}")
        self.proxy = ProxyProcess((lab.receivers.addr, int(line)), (lab.gateway, 0), delay=delay, loss=loss)

    def start_sender(self, lab: "Lab", amount: list[str]) -> None:
        library, cc = CONFIGS[self.name]
        assert self.proxy is not None
        err = tempfile.TemporaryFile()
        self.errs.append(err)
        self.proxy_cpu0 = _proc_cpu(self.proxy.proc.pid)
        host, port = self.proxy.address
        self.sender = lab.senders.popen(
            [PYTHON, CEILING, "--connect", f"{host}:{port}", *amount, "--json", "--library", library, "--cc", cc,
             "--send-buffer", str(SEND_BUFFER)], stdout=subprocess.PIPE, stderr=err, text=True, cwd=str(REPO))

    def finish(self, timeout: float) -> dict:
        """Wait for the sender; its result, with the proxy's counters and CPU."""
        assert self.sender is not None and self.proxy is not None
        try:
            out, _ = self.sender.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"flow {self.name} still running after {timeout:.0f} s") from None
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"flow {self.name} failed (exit {self.sender.returncode}): "
                               f"{_stderr(self.errs[-1])} {_stderr(self.errs[0])}")
        r = json.loads(lines[-1])
        r["name"] = self.name
        r["proxy_cpu"] = _proc_cpu(self.proxy.proc.pid) - self.proxy_cpu0
        r["proxy"] = self.proxy.stats()
        return r

    def close(self) -> None:
        _kill(self.sender)
        _kill(self.receiver)
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                self.proxy.close()
        for p in (self.sender, self.receiver):
            if p is not None and p.stdout is not None:
                with contextlib.suppress(Exception):
                    p.stdout.close()
        for f in self.errs:
            with contextlib.suppress(Exception):
                f.close()


class Lab:
    """Two namespaces of a NetLab: senders and receivers; the proxies run in the root one."""

    def __init__(self) -> None:
        self.netlab = NetLab(2)

    def __enter__(self) -> "Lab":
        self.netlab.__enter__()
        self.senders: Host = self.netlab.hosts[0]
        self.receivers: Host = self.netlab.hosts[1]
        assert self.netlab.gateway is not None
        self.gateway: str = self.netlab.gateway
        log(f"lab: network {self.netlab.network}, namespaces {self.senders.ns} (senders), "
            f"{self.receivers.ns} (receivers), bridge {self.netlab.bridge}")
        return self

    def __exit__(self, *exc) -> None:
        self.netlab.close()

    def set_rate(self, rate: str | None) -> None:
        self.senders.set_rate(rate)

    def run_flows(self, names: list[str], *, delay: float, loss: float, amount: list[str],
                  timeout: float) -> list[dict]:
        """Run these flows at once (started back to back, in this order); their results."""
        flows = [Flow(n) for n in names]
        try:
            for f in flows:
                f.start_path(self, delay, loss)
            t0 = time.perf_counter()
            for f in flows:
                f.start_sender(self, amount)
            results = [f.finish(timeout) for f in flows]
            wall = time.perf_counter() - t0
            for r in results:
                r["proxy_share"] = r["proxy_cpu"] / wall
            return results
        finally:
            for f in flows:
                f.close()


# --------------------------------------------------------------------------- figures

def goodput(r: dict) -> float:
    """MB/s at the receiver, from its first to its last read (bytes/wall of the sender if no samples)."""
    s = r.get("samples") or []
    if len(s) >= 2 and s[-1][0] > s[0][0]:
        return (s[-1][1] - s[0][1]) / (s[-1][0] - s[0][0]) / 1e6
    return r["bytes"] / r["wall"] / 1e6


def cpu_per_gib(r: dict) -> float:
    return (r["cpu_send"] + (r["cpu_recv"] or 0.0)) / (r["bytes"] / (1 << 30))


def _at(samples: list, t: float) -> float:
    """Bytes received by time t, interpolated between samples."""
    prev = samples[0]
    if t <= prev[0]:
        return prev[1]
    for cur in samples[1:]:
        if cur[0] >= t:
            span = cur[0] - prev[0]
            return prev[1] + (cur[1] - prev[1]) * ((t - prev[0]) / span if span > 0 else 1.0)
        prev = cur
    return samples[-1][1]


def overlap_rates(results: list[dict]) -> tuple[list[float], float]:
    """Each flow's MB/s over the window in which all were receiving, and that window's length."""
    samples = [r["samples"] for r in results]
    t0 = max(s[0][0] for s in samples)
    t1 = min(s[-1][0] for s in samples)
    if t1 <= t0:
        return [goodput(r) for r in results], 0.0
    return [(_at(s, t1) - _at(s, t0)) / (t1 - t0) / 1e6 for s in samples], t1 - t0


def jain(xs: list[float]) -> float:
    sq = sum(x * x for x in xs)
    return sum(xs) ** 2 / (len(xs) * sq) if sq > 0 else float("nan")


def applied_loss(r: dict) -> float:
    """The fraction of datagrams the flow's proxy dropped, both directions together."""
    p = r["proxy"]
    seen = p["up_datagrams"] + p["up_dropped"] + p["down_datagrams"] + p["down_dropped"]
    return (p["up_dropped"] + p["down_dropped"]) / seen if seen else float("nan")


def proxy_cost(r: dict) -> float:
    """Proxy CPU seconds per datagram it handled (forwarded or dropped)."""
    p = r["proxy"]
    seen = p["up_datagrams"] + p["up_dropped"] + p["down_datagrams"] + p["down_dropped"]
    return r["proxy_cpu"] / seen if seen else float("nan")


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def _spread(xs: list[float]) -> str:
    return f"{min(xs):.3f}-{max(xs):.3f}" if len(xs) > 1 else ""


# --------------------------------------------------------------------------- the two parts

def measure_throughput(lab: Lab, args, out: dict) -> None:
    lab.set_rate(None if args.rate in (None, "none") else args.rate)
    amount = ["--mib", str(args.mib)] if args.mib else ["--seconds", str(args.seconds)]
    timeout = 600.0 + (args.seconds or 0) * 4
    runs: dict[str, list[dict]] = {n: [] for n in args.configs}
    for run in range(args.runs):
        order = args.configs[run % len(args.configs):] + args.configs[:run % len(args.configs)]
        for name in order:
            log(f"throughput run {run + 1}/{args.runs}: {LABELS[name]}")
            (r,) = lab.run_flows([name], delay=args.delay, loss=args.loss, amount=amount, timeout=timeout)
            if not r["ok"]:
                raise RuntimeError(f"{name}: the payload arrived damaged")
            runs[name].append(r)
            log(f"  {goodput(r):.3f} MB/s, {cpu_per_gib(r):.1f} CPU-s/GiB, proxy {r['proxy_share']:.0%} of a core")
    out["throughput"] = {
        name: {"label": LABELS[name], "library": CONFIGS[name][0], "cc": CONFIGS[name][1],
               "mb_s": _median([goodput(r) for r in rs]), "mb_s_runs": [goodput(r) for r in rs],
               "cpu_s_per_gib": _median([cpu_per_gib(r) for r in rs]),
               "bytes": [r["bytes"] for r in rs], "ok": all(r["ok"] for r in rs),
               "applied_loss": _median([applied_loss(r) for r in rs]),
               "proxy_share": max(r["proxy_share"] for r in rs),
               "proxy_us_per_datagram": _median([proxy_cost(r) * 1e6 for r in rs])}
        for name, rs in runs.items()}


def measure_fairness(lab: Lab, args, out: dict) -> None:
    lab.set_rate(args.fair_rate)
    seconds = args.fair_seconds or args.seconds or 10.0
    amount = ["--seconds", str(seconds)]
    runs: dict[str, list[dict]] = {f"{a}:{b}": [] for a, b in args.pairs}
    for run in range(args.runs):
        order = args.pairs[run % len(args.pairs):] + args.pairs[:run % len(args.pairs)]
        for a, b in order:
            names = [a, b] if run % 2 == 0 else [b, a]
            log(f"fairness run {run + 1}/{args.runs}: {LABELS[a]} vs {LABELS[b]}")
            rs = lab.run_flows(names, delay=args.delay, loss=args.fair_loss, amount=amount,
                               timeout=600.0 + seconds * 4)
            if run % 2:
                rs.reverse()
            if not all(r["ok"] for r in rs):
                raise RuntimeError(f"{a} vs {b}: a payload arrived damaged")
            rates, window = overlap_rates(rs)
            runs[f"{a}:{b}"].append({"rates": rates, "window": window, "jain": jain(rates), "flows": rs})
            log(f"  {rates[0]:.3f} vs {rates[1]:.3f} MB/s over {window:.1f} s, Jain {jain(rates):.3f}, "
                f"proxies {max(r['proxy_share'] for r in rs):.0%} of a core")
    out["fairness"] = {
        key: {"flows": [LABELS[n] for n in key.split(":")],
              "mb_s": [_median([x["rates"][i] for x in xs]) for i in range(2)],
              "mb_s_runs": [x["rates"] for x in xs],
              "jain": _median([x["jain"] for x in xs]), "jain_runs": [x["jain"] for x in xs],
              "window_s": _median([x["window"] for x in xs]),
              "ok": all(r["ok"] for x in xs for r in x["flows"]),
              "applied_loss": _median([applied_loss(r) for x in xs for r in x["flows"]]),
              "proxy_share": max(r["proxy_share"] for x in xs for r in x["flows"]),
              "proxy_us_per_datagram": _median([proxy_cost(r) * 1e6 for x in xs for r in x["flows"]])}
        for key, xs in runs.items()}


# --------------------------------------------------------------------------- report

def report(out: dict) -> str:
    p = out["path"]
    lines = [f"path: {p['delay'] * 1e3:.0f} ms delay and {p['loss']:.1%} loss each way (RTT ~{p['delay'] * 2e3:.0f} ms), "
             f"1452-byte datagrams; {out['runs']} run(s), medians; noisy (shared 2-core machine)"]
    costs: list[float] = []
    busy = 0.0
    if "throughput" in out:
        amount = f"{p['mib']} MiB" if p["mib"] else f"{p['seconds']:g} s"
        lines += ["", f"throughput, one flow of {amount}, rate limit {p['rate'] or 'none'}:",
                  f"  {'configuration':<18} {'MB/s':>8} {'runs':>14} {'CPU-s/GiB':>10} {'loss seen':>9}"]
        for t in out["throughput"].values():
            lines.append(f"  {t['label']:<18} {t['mb_s']:>8.3f} {_spread(t['mb_s_runs']):>14} "
                         f"{t['cpu_s_per_gib']:>10.1f} {t['applied_loss']:>9.2%}")
            costs.append(t["proxy_us_per_datagram"])
            busy = max(busy, t["proxy_share"])
    if "fairness" in out:
        lines += ["", f"fairness, two flows of {p['fair_seconds']:g} s through a {p['fair_rate']} bottleneck, "
                  f"{p['fair_loss']:.1%} loss each way (MB/s over the time both were receiving):",
                  f"  {'flow A':<18} {'flow B':<18} {'A MB/s':>8} {'B MB/s':>8} {'Jain':>6} {'Jain runs':>12}"]
        for f in out["fairness"].values():
            lines.append(f"  {f['flows'][0]:<18} {f['flows'][1]:<18} {f['mb_s'][0]:>8.3f} {f['mb_s'][1]:>8.3f} "
                         f"{f['jain']:>6.3f} {_spread(f['jain_runs']):>12}")
            costs.append(f["proxy_us_per_datagram"])
            busy = max(busy, f["proxy_share"])
    if costs:
        cost = _median(costs)
        lines += ["", f"proxy: at most {busy:.0%} of a core per proxy process; {cost:.1f} us of CPU per datagram "
                  f"handled (more at low rates: fewer datagrams a wake-up), so one proxy could carry at least "
                  f"~{1452 / cost:.0f} MB/s of 1452-byte datagrams on one core" + (" -- a proxy was busy: it may have limited a flow" if busy > PROXY_BUSY
                                    else " (not the bottleneck here)")]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def _names(text: str, allowed) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise SystemExit(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return names


def _pairs(text: str) -> list[tuple[str, str]]:
    pairs = []
    for item in text.split(","):
        a, _, b = item.strip().partition(":")
        _names(f"{a},{b}", CONFIGS)
        pairs.append((a, b))
    return pairs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.quic_lossy", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 s flows, one run")
    ap.add_argument("--runs", type=int, help="runs (default 3, --quick 1)")
    ap.add_argument("--seconds", type=float, help="seconds a flow sends (default 30, --quick 10)")
    ap.add_argument("--mib", type=int, help="throughput flows send this many MiB instead of --seconds")
    ap.add_argument("--fair-seconds", type=float, help="seconds a fairness flow sends (default --seconds)")
    ap.add_argument("--delay", type=float, default=0.05, help="seconds of delay each way (default 0.05)")
    ap.add_argument("--loss", type=float, default=0.01, help="fraction lost each way (default 0.01)")
    ap.add_argument("--rate", default="none", help="throughput's rate limit, tc tbf (e.g. 100mbit; default none)")
    ap.add_argument("--fair-rate", default="50mbit", help="fairness bottleneck, tc tbf (default 50mbit)")
    ap.add_argument("--fair-loss", type=float, help="fraction lost each way in fairness (default --loss)")
    ap.add_argument("--configs", default="reno,cubic,qh3", help="throughput: from reno, cubic, qh3")
    ap.add_argument("--pairs", default=",".join(f"{a}:{b}" for a, b in PAIRS),
                    help="fairness pairings, A:B,... (default reno:reno,cubic:cubic,reno:cubic,qh3:reno)")
    ap.add_argument("--only", default="throughput,fairness", help="throughput, fairness or both")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also save the results as JSON")
    args = ap.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    if args.seconds is None and not args.mib:
        args.seconds = 10.0 if args.quick else 30.0
    args.fair_loss = args.loss if args.fair_loss is None else args.fair_loss
    args.configs = _names(args.configs, CONFIGS)
    args.pairs = _pairs(args.pairs)
    args.only = _names(args.only, ("throughput", "fairness"))
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    return args


def _drop_qh3_if_missing(args, notes: list[str]) -> None:
    try:
        import qh3  # noqa: F401
    except ImportError:
        notes.append("qh3 is not installed (a dependency of bpfs: pip install -e .): its rows are left out")
        args.configs = [c for c in args.configs if c != "qh3"]
        args.pairs = [p for p in args.pairs if "qh3" not in p]


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    why = netlab_missing()
    if why:
        log(f"quic_lossy: cannot make the network lab: {why}")
        return 2
    notes: list[str] = []
    _drop_qh3_if_missing(args, notes)
    for n in notes:
        log(n)
    out: dict = {"runs": args.runs, "notes": notes, "path": {
        "delay": args.delay, "loss": args.loss, "rate": None if args.rate == "none" else args.rate,
        "seconds": args.seconds, "mib": args.mib, "fair_rate": args.fair_rate, "fair_loss": args.fair_loss,
        "fair_seconds": args.fair_seconds or args.seconds or 10.0, "datagram": 1452}}
    old = {s: signal.signal(s, _terminate) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        with Lab() as lab:
            if "throughput" in args.only and args.configs:
                measure_throughput(lab, args, out)
            if "fairness" in args.only and args.pairs:
                measure_fairness(lab, args, out)
    except KeyboardInterrupt:
        log("interrupted: lab and processes removed")
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    print(report(out), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
