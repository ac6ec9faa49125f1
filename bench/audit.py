"""Storage audits: what they cost on the wire and at the holder, and how soon they find a loss.

Run: ``python -m bench.audit [--quick] [--runs N] [--gib X] [--audits K] [--trials T]``;
``python -m bench`` runs it too (workload ``audit``). Each run, in a fresh directory:

- setup (untimed), as in ``bench/replication/``: two new stores, B served by ``bpfs serve B
  --listen 127.0.0.1:0``, B invites A, A mounted with ``--listen 127.0.0.1:0``; H GiB of
  incompressible data (default 1 GiB, about 64 packs of 16 MiB; ``--quick``: 256 MiB) written
  into A's mount, then ``bpfs pair A --direct B --expect B`` and ``bpfs sync A``. A's daemon
  runs its first scheduled audit of B within ~30 s of B holding packs: we wait for it (``bpfs
  reputation A --json`` shows it), so it does not fall into a measurement.
- scheduled-size audits: ``bpfs challenge A B --json --packs P --leaves 1`` K times, where P is
  the default schedule's packs per audit for what B holds (``bpfs reputation A --json`` ->
  ``audit_plan.packs_per_audit``), as a scheduled audit asks. Measured per audit: the proof
  payload (``answer_bytes``: leaves and Merkle paths), the messages (the encoded ``Prove`` and
  ``Proofs`` frames of that shape), the loopback interface's bytes (everything on the wire: QUIC,
  UDP, IP, acknowledgements; any other loopback traffic on the machine meanwhile counts too, so
  the median over the K audits is shown, next to the idle rate), and B's daemon CPU (utime +
  stime from /proc/PID/stat over the K audits, divided by K; also net of B's idle CPU rate
  measured just before). Scaled to a month at the default schedule (one audit an hour: 720) and
  per GiB held, with the ratio of audit traffic to the bytes held (target < 1 %, the default
  ``audit_budget``).
- a full challenge, as a reference: ``bpfs challenge A B --json`` (every pack, 4 leaves each),
  after dropping the page cache when root: wall time, B's CPU, bytes.
- simulated detection (pure, no stores): for n in 100, 1,000, 10,000 packs of 16 MiB, the
  default ``Config()`` schedule (``auditor.plan``, ``auditor._Cycle``, audits every
  ``audit_interval`` jittered by +-10 % as the auditor does); 1 % of the packs (at least one)
  deleted at a random moment; hours until an audit draws a deleted pack: median, 99th
  percentile, and the fraction found within 24 h (``detect_within``; the target is 99 %).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from bench import proc, stats
from bench.cleanup import Cleanup
from bench.config import BLOCK, GiB, MiB, human_bytes
from bench.replication.harness import BpfsPair
from bench.replication.measure import replicate
from bench.standalone import exit_status, log_stderr, run_standalone, save_json

from bpfs.config import Config
from bpfs.packtree import DIGEST_SIZE, LEAF_SIZE, path_length
from bpfs.peering import auditor
from bpfs.peering import protocol as P

DEFAULT_AUDITS = 20  # scheduled-size challenges per run
PACK_SIZE = 16 * MiB  # what the simulation assumes (bpfs seals packs at ~16 MiB)
SIM_PACKS = (100, 1000, 10_000)
SIM_TRIALS = {"full": 5000, "quick": 1000}
FIRST_AUDIT_WAIT = 90.0  # seconds to wait for A's first scheduled audit of B
LOOPBACK = "/sys/class/net/lo/statistics/tx_bytes"


class AuditBenchError(RuntimeError):
    """A step went wrong: a command failed, a proof failed, a figure could not be read."""


# -- measuring ------------------------------------------------------------------------------------

def _loopback_bytes() -> int | None:
    try:
        with open(LOOPBACK) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def message_bytes(packs: int, leaves: int, pack_size: int = PACK_SIZE) -> tuple[int, int]:
    """(encoded Prove frames, encoded Proofs frames) of an audit of `packs` packs of this size,
    split into requests as the auditor splits them."""
    nonce = bytes(P.NONCE_SIZE)
    depth = path_length(pack_size, 0)
    proof = P.PackProof(P.ProofStatus.HELD, pack_size, [bytes(LEAF_SIZE)] * leaves,
                        [[bytes(DIGEST_SIZE)] * depth] * leaves)
    per_request = max(1, min(P.MAX_AUDIT_PACKS, P.MAX_AUDIT_LEAVES // leaves))
    request = reply = 0
    for first in range(0, packs, per_request):
        ids = [0x1000 + i for i in range(first, min(packs, first + per_request))]
        request += len(P.PARTNER.encode(P.Prove(P.AUDIT_VERSION, nonce, ids, leaves)))
        reply += len(P.PARTNER.encode(P.Proofs([proof] * len(ids))))
    return request, reply


class AuditPair(BpfsPair):
    """bench.replication's pair of stores (A mounted, B served), with the audit commands."""

    def write_data(self, nbytes: int, seed: int = 7) -> None:
        """`nbytes` of incompressible bytes into A's mount, 1 MiB at a time, fsync'ed into packs."""
        rng = random.Random(seed)
        fd = os.open(self.mnt_a / "data.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = nbytes
            while left:
                block = memoryview(rng.randbytes(min(BLOCK, left)))
                while block:
                    block = block[os.write(fd, block):]
                left -= min(BLOCK, left)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.sync()

    def reputation(self) -> dict:
        rows = json.loads(self.bpfs("reputation", str(self.a), "--json", timeout=60).stdout)
        row = [r for r in rows if r.get("peer_id") == self.b_id]
        if not row:
            raise AuditBenchError(f"`bpfs reputation A --json` does not list B: {rows}")
        return row[0]

    def wait_first_audit(self, timeout: float = FIRST_AUDIT_WAIT) -> tuple[dict, float | None]:
        """A's daemon audits B on its own soon after B holds packs: wait for it (row, seconds)."""
        t0 = time.monotonic()
        while True:
            row = self.reputation()
            if row.get("audits"):
                return row, time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                return row, None
            time.sleep(1.0)

    def challenge(self, packs: int | None = None, leaves: int | None = None) -> tuple[dict, float]:
        """`bpfs challenge A B --json [...]`: (its JSON, wall seconds). Any failed proof is an error."""
        args = ["challenge", str(self.a), self.b_id, "--json"]
        if packs is not None:
            args += ["--packs", str(packs)]
        if leaves is not None:
            args += ["--leaves", str(leaves)]
        t0 = time.perf_counter()
        out = self.bpfs(*args, timeout=600)
        wall = time.perf_counter() - t0
        res = json.loads(out.stdout)
        if res.get("failed") or res.get("limited"):
            raise AuditBenchError(f"the challenge did not pass: {res}")
        return res, wall

    def held_bytes(self) -> int:
        """Bytes of A's packs in B's hosted folder."""
        total = 0
        for path in (self.b / "hosted").rglob("*.pack"):
            try:
                total += path.stat().st_size
            except OSError:
                pass
        return total


def _idle(pid: int, seconds: float) -> dict:
    """B's CPU and the loopback bytes over `seconds` of doing nothing: the background rates."""
    c0, l0, t0 = proc.cpu_seconds(pid), _loopback_bytes(), time.perf_counter()
    time.sleep(seconds)
    c1, l1, t1 = proc.cpu_seconds(pid), _loopback_bytes(), time.perf_counter()
    out = {"seconds": t1 - t0}
    if None not in (c0, c1):
        out["cpu_per_s"] = (c1 - c0) / (t1 - t0)
    if None not in (l0, l1):
        out["loopback_per_s"] = (l1 - l0) / (t1 - t0)
    return out


def measure(pair: AuditPair, audits: int, log) -> dict:
    """Everything of one run after the setup: the scheduled-size audits and the full challenge."""
    row, waited = pair.wait_first_audit()
    plan = row.get("audit_plan") or {}
    per_audit = math.ceil(plan.get("packs_per_audit") or 0)  # the plan's mean, rounded up
    if not per_audit:
        raise AuditBenchError(f"`bpfs reputation A --json` gives no audit plan for B: {row}")
    res: dict = {"held_packs": row.get("held_packs"), "held_bytes": pair.held_bytes(), "plan": plan,
                 "first_audit_after": waited, "level_after_first_audit": row.get("level")}
    if waited is None:
        pair.problems.append(f"A's daemon did not audit B by itself within {FIRST_AUDIT_WAIT:.0f} s of the sync")
    log(f"  B holds {res['held_packs']} packs ({res['held_bytes'] / MiB:.0f} MiB); default plan: "
        f"{per_audit} packs per audit, {plan.get('packs_per_day')} a day; first scheduled audit "
        + (f"{waited:.0f} s after the sync, level {row.get('level')}" if waited is not None else "not seen"))
    res["idle"] = idle = _idle(pair.pid_b, 3.0)

    calls = []
    cpu0, t0 = proc.cpu_seconds(pair.pid_b), time.perf_counter()
    for _ in range(audits):
        l0 = _loopback_bytes()
        out, wall = pair.challenge(per_audit, 1)
        l1 = _loopback_bytes()
        if out["checked"] != per_audit:
            raise AuditBenchError(f"asked for {per_audit} packs, {out['checked']} checked: {out}")
        calls.append({"answer_bytes": out["answer_bytes"], "seconds": out["seconds"], "wall": wall,
                      "loopback": None if None in (l0, l1) else l1 - l0})
    cpu1, t1 = proc.cpu_seconds(pair.pid_b), time.perf_counter()
    request, reply = message_bytes(per_audit, 1, res["held_bytes"] // max(1, res["held_packs"] or 1))
    sched = {"packs": per_audit, "audits": audits, "calls": calls, "elapsed": t1 - t0,
             "answer_bytes": statistics.median(c["answer_bytes"] for c in calls),
             "message_bytes": request + reply,
             "seconds": statistics.median(c["seconds"] for c in calls)}
    loops = [c["loopback"] for c in calls if c["loopback"] is not None]
    if loops:
        sched["loopback_bytes"] = statistics.median(loops)
    if None not in (cpu0, cpu1):
        sched["cpu"] = (cpu1 - cpu0) / audits
        if "cpu_per_s" in idle:
            sched["cpu_net"] = max(0.0, cpu1 - cpu0 - idle["cpu_per_s"] * (t1 - t0)) / audits
    res["scheduled"] = sched
    log(f"  {audits} audits of {per_audit} packs x 1 leaf: proofs {sched['answer_bytes']:.0f} B, messages "
        f"{sched['message_bytes']} B, loopback {sched.get('loopback_bytes', float('nan')):.0f} B, B's CPU "
        f"{1000 * sched.get('cpu', float('nan')):.1f} ms per audit")

    cold = proc.drop_caches()
    cpu0, l0 = proc.cpu_seconds(pair.pid_b), _loopback_bytes()
    out, wall = pair.challenge()
    cpu1, l1 = proc.cpu_seconds(pair.pid_b), _loopback_bytes()
    full = {"checked": out["checked"], "leaves": auditor.CHALLENGE_LEAVES, "seconds": out["seconds"], "wall": wall,
            "answer_bytes": out["answer_bytes"], "cold": cold}
    if None not in (cpu0, cpu1):
        full["cpu"] = cpu1 - cpu0
    if None not in (l0, l1):
        full["loopback_bytes"] = l1 - l0
    res["full"] = full
    log(f"  full challenge: {full['checked']} packs x {full['leaves']} leaves in {full['seconds']:.2f} s "
        f"({wall:.2f} s with the CLI), B's CPU {full.get('cpu', float('nan')):.2f} s")
    return res


# -- simulated detection --------------------------------------------------------------------------

def simulate(n: int, trials: int, config: Config | None = None, seed: int = 1) -> dict:
    """Hours from the loss of 1 % of n packs (at least one) until a scheduled audit draws one."""
    config = config or Config()
    plan = auditor.plan(n, n * PACK_SIZE, config)
    lost_count = max(1, math.ceil(config.detect_loss * n))
    cycle_audits = math.ceil(n / plan.per_audit)
    pool = set(range(n))
    hours = []
    for trial in range(trials):
        rng = random.Random(seed * 1_000_003 + trial)
        cycle = auditor._Cycle(rng, plan.buckets)
        # the loss falls at a random point of the secret order (after a first pass), and of the
        # interval between audits
        cycle.take(n, pool, set())  # a first pass
        cycle.take(round(rng.randrange(cycle_audits) * plan.per_audit), pool, set())
        lost = set(rng.sample(range(n), lost_count))
        t = rng.uniform(0, config.audit_interval * rng.uniform(0.9, 1.1))
        while not lost.intersection(cycle.take(auditor.audit_size(plan.per_audit, rng), pool, set())):
            t += config.audit_interval * rng.uniform(0.9, 1.1)
        hours.append(t / 3600.0)
    hours.sort()
    within = config.detect_within / 3600.0
    return {"packs": n, "lost": lost_count, "per_audit": plan.per_audit, "per_day": plan.per_day,
            "trials": trials, "median_hours": statistics.median(hours),
            "p99_hours": hours[min(len(hours) - 1, math.ceil(0.99 * len(hours)) - 1)],
            "max_hours": hours[-1], "within_target": sum(h <= within for h in hours) / len(hours),
            "target_hours": within, "target_probability": config.detect_probability}


# -- the runs ----------------------------------------------------------------------------------------

def _error(out: dict, run, step: str, e: BaseException, log, daemon_log: str = "") -> None:
    msg = f"{type(e).__name__}: {e}"
    out["errors"].append({"target": "bpfs", "run": run, "step": step, "error": msg,
                          "traceback": traceback.format_exc(), "daemon_log": daemon_log})
    log(f"  run {run} audit: FAILED in {step}: {msg}")


def run_audit(tmp: Path, nbytes: int, runs: int, cleanup: Cleanup, log: Callable[[str], None] = log_stderr,
              out: dict | None = None, *, audits: int = DEFAULT_AUDITS, trials: int = SIM_TRIALS["full"]) -> dict:
    """Fill ``out`` (returned) with {'bytes', 'runs': [...], 'simulation': [...], 'errors', ...}."""
    out = out if out is not None else {}
    out.update(bytes=nbytes, audits=audits, runs=[], simulation=[], errors=[], problems=[], notes=[])
    base = tmp / "audit"
    base.mkdir(parents=True, exist_ok=True)
    cleanup.add_dir(base)
    if os.geteuid() != 0:
        out["notes"].append("audit: not root: the page cache is not dropped before the full challenge")
    if _loopback_bytes() is None:
        out["notes"].append(f"audit: {LOOPBACK} is unreadable: no loopback byte counts")
    for run in range(1, runs + 1):
        log(f"audits, run {run}/{runs}: {human_bytes(nbytes)} held")
        pair = AuditPair(base / f"run{run}", cleanup)
        step = "setup (init, serve, pair --accept, mount)"
        try:
            pair.setup()
            step = "writing the data into A's mount"
            pair.write_data(nbytes, seed=run)
            step = "replication (pair --direct, sync)"
            rep = replicate(pair, nbytes)
            log(f"  replicated in {rep['seconds']:.1f} s")
            step = "audits"
            sample = measure(pair, audits, log)
            sample["run"] = run
            out["runs"].append(sample)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - recorded; the simulation still runs
            _error(out, run, step, e, log, pair.log_tail())
        finally:
            try:
                pair.destroy()
            finally:
                for p in pair.problems:
                    if p not in out["problems"]:
                        out["problems"].append(p)
    log(f"audits: simulating detection of a 1 % loss ({trials} trials each)")
    for n in SIM_PACKS:
        t0 = time.perf_counter()
        r = simulate(n, trials)
        out["simulation"].append(r)
        log(f"  n={n}: median {r['median_hours']:.1f} h, p99 {r['p99_hours']:.1f} h, within 24 h "
            f"{100 * r['within_target']:.1f} % ({time.perf_counter() - t0:.1f} s)")
    out["summary"] = summarize(out)
    return out


# -- summary and report ---------------------------------------------------------------------------

def summarize(out: dict) -> dict:
    """Medians (min, max) over runs; the monthly figures at the default schedule."""
    cfg = Config()
    per_month = 30 * 86400.0 / cfg.audit_interval
    col: dict[str, list[float]] = {}

    def add(key: str, value: float | None) -> None:
        if value is not None:
            col.setdefault(key, []).append(value)

    for r in out.get("runs", []):
        s, f = r.get("scheduled", {}), r.get("full", {})
        gib = r["held_bytes"] / GiB if r.get("held_bytes") else None
        add("packs", r.get("held_packs"))
        add("per_audit", s.get("packs"))
        add("answer_bytes", s.get("answer_bytes"))
        add("message_bytes", s.get("message_bytes"))
        add("loopback_bytes", s.get("loopback_bytes"))
        add("cpu_ms", 1000 * s["cpu"] if "cpu" in s else None)
        add("cpu_net_ms", 1000 * s["cpu_net"] if "cpu_net" in s else None)
        add("audit_ms", 1000 * s["seconds"] if "seconds" in s else None)
        add("idle_loopback_per_s", r.get("idle", {}).get("loopback_per_s"))
        add("plan_bytes_per_month", r.get("plan", {}).get("bytes_per_month"))
        # the schedule asks for the plan's mean number of packs per audit (the measured audits ask
        # for that mean rounded up): scale the measured audit to the mean
        mean = r.get("plan", {}).get("packs_per_audit")
        scale = mean / s["packs"] if mean and s.get("packs") else 1.0
        add("plan_per_audit", mean)
        if gib:
            add("held_gib", gib)
            wire = s.get("loopback_bytes") or s.get("message_bytes")
            if wire:
                add("wire_bytes_month_gib", scale * wire * per_month / gib)
                add("wire_ratio", scale * wire * per_month / r["held_bytes"])
            if s.get("message_bytes"):
                add("message_ratio", scale * s["message_bytes"] * per_month / r["held_bytes"])
            if "cpu" in s:
                add("cpu_month_gib", scale * s["cpu"] * per_month / gib)
        add("full_seconds", f.get("seconds"))
        add("full_wall", f.get("wall"))
        add("full_cpu", f.get("cpu"))
        add("full_checked", f.get("checked"))
        add("full_loopback", f.get("loopback_bytes"))
        add("full_answer_bytes", f.get("answer_bytes"))
    return {k: stats.summarize(v) for k, v in col.items()}


def _med(summary: dict, key: str) -> float | None:
    s = summary.get(key)
    return s["median"] if s else None


def report_lines(rep: dict) -> list[str]:
    summary = rep.get("summary") or summarize(rep)
    cfg = Config()
    lines = []
    per_month = round(30 * 86400.0 / cfg.audit_interval)
    if summary.get("packs"):
        packs, per_audit = _med(summary, "packs"), _med(summary, "per_audit")
        gib = _med(summary, "held_gib") or rep["bytes"] / GiB
        mean = _med(summary, "plan_per_audit") or per_audit
        lines.append(f"a holder with {gib:.2f} GiB of one owner's packs ({packs:.0f} packs); default schedule: "
                     f"{mean:.2f} packs x 1 leaf per audit on average, one audit every "
                     f"{cfg.audit_interval / 3600:g} h ({per_month} a month); measured: audits of {per_audit:.0f} "
                     f"packs, scaled to the mean for the monthly figures")
        rows = [["per audit (median of " + str(rep.get("audits")) + ")", "median (min-max over runs)"],
                ["proof payload (leaves + paths)", stats.cell(summary.get("answer_bytes"), "B")],
                ["messages (Prove + Proofs frames)", stats.cell(summary.get("message_bytes"), "B")],
                ["on the loopback wire (QUIC/UDP/IP, acks)", stats.cell(summary.get("loopback_bytes"), "B")],
                ["holder CPU (B's daemon)", stats.cell(summary.get("cpu_ms"), "ms")],
                ["holder CPU net of its idle rate", stats.cell(summary.get("cpu_net_ms"), "ms")],
                ["audit time (A's daemon: dial, prove, verify)", stats.cell(summary.get("audit_ms"), "ms")]]
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        wire = _med(summary, "wire_bytes_month_gib")
        cpu = _med(summary, "cpu_month_gib")
        ratio = _med(summary, "wire_ratio")
        msg_ratio = _med(summary, "message_ratio")
        if wire is not None:
            met = "met" if ratio < cfg.audit_budget else "NOT met"
            lines.append(f"per GiB held per month: {wire / 1e6:.2f} MB on the wire, holder CPU "
                         f"{'n/a' if cpu is None else f'{cpu:.2f} s'}; audit traffic / bytes held "
                         f"{100 * ratio:.3f} % a month (messages alone {100 * (msg_ratio or 0):.3f} %; "
                         f"target < {100 * cfg.audit_budget:g} %: {met})")
        plan_month = _med(summary, "plan_bytes_per_month")
        if plan_month:
            plans = [r.get("plan", {}) for r in rep.get("runs", [])]
            meets = all(p.get("meets_detection_target") for p in plans)
            within = all(p.get("within_budget") for p in plans)
            lines.append(f"the plan's own estimate (auditor.proof_bytes): {plan_month / 1e6:.2f} MB a month for "
                         f"this holder; its plan meets the detection target: {'yes' if meets else 'no'}, within "
                         f"the budget: {'yes' if within else 'no'}")
        idle = _med(summary, "idle_loopback_per_s")
        if idle is not None:
            lines.append(f"loopback traffic while idle: {idle:.0f} B/s (counted in the loopback figure if it "
                         f"fell in an audit)")
    if summary.get("full_seconds"):
        checked = _med(summary, "full_checked")
        lines.append(f"full challenge (every pack, {auditor.CHALLENGE_LEAVES} leaves, page cache dropped): "
                     f"{checked:.0f} packs in {stats.cell(summary.get('full_seconds'), 's')} "
                     f"({stats.cell(summary.get('full_wall'), 's')} with the CLI), holder CPU "
                     f"{stats.cell(summary.get('full_cpu'), 's')}, proofs {stats.cell(summary.get('full_answer_bytes'), 'B')}, "
                     f"loopback {stats.cell(summary.get('full_loopback'), 'B')}")
    sim = rep.get("simulation") or []
    if sim:
        lines.append(f"simulated detection of a {100 * cfg.detect_loss:g} % loss (default schedule, packs of "
                     f"{human_bytes(PACK_SIZE)}, audits every {cfg.audit_interval / 3600:g} h +-10 %; target: "
                     f"{100 * cfg.detect_probability:g} % within {cfg.detect_within / 3600:g} h):")
        rows = [["packs", "lost", "per audit", "median", "99th pct", "worst", "within 24 h", "trials"]]
        for r in sim:
            rows.append([f"{r['packs']:,}", str(r["lost"]), str(r["per_audit"]), f"{r['median_hours']:.1f} h",
                         f"{r['p99_hours']:.1f} h", f"{r['max_hours']:.1f} h",
                         f"{100 * r['within_target']:.1f} %" + ("" if r["within_target"] >= r["target_probability"]
                                                                else " (below target)"),
                         f"{r['trials']:,}"])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return lines or ["no audit results"]


def print_report(rep: dict, runs: int) -> None:
    stats.print_standalone("bpfs storage audits", rep, runs, report_lines(rep))


# -- standalone -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.audit", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"256 MiB held instead of 1 GiB (unless --gib), {SIM_TRIALS['quick']} simulated trials")
    p.add_argument("--gib", type=float, metavar="X", help="data held in GiB (default 1, or 0.25 with --quick)")
    p.add_argument("--runs", type=int, default=3, metavar="N", help="repeat N times (default 3)")
    p.add_argument("--audits", type=int, default=DEFAULT_AUDITS, metavar="K",
                   help=f"scheduled-size challenges per run (default {DEFAULT_AUDITS})")
    p.add_argument("--trials", type=int, metavar="T", help="simulated trials per n (default 5000; 1000 with --quick)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also save the results as JSON")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/bpfs-bench"), metavar="DIR",
                   help="where the stores go (default /var/tmp/bpfs-bench)")
    args = p.parse_args(argv)
    gib = args.gib if args.gib is not None else (0.25 if args.quick else 1.0)
    nbytes = int(gib * GiB) // MiB * MiB
    trials = args.trials or SIM_TRIALS["quick" if args.quick else "full"]
    if nbytes < MiB or args.runs < 1 or args.audits < 1 or trials < 1:
        p.error("--gib must give at least 1 MiB; --runs, --audits and --trials must be at least 1")
    rep: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    interrupted = run_standalone(args.workdir, rep, lambda tmp, cleanup: run_audit(
        tmp, nbytes, args.runs, cleanup, log_stderr, out=rep, audits=args.audits, trials=trials), summarize)
    if "bytes" in rep:
        print_report(rep, args.runs)
    if args.json:
        save_json(rep, args.json)
    return exit_status(rep, interrupted)


if __name__ == "__main__":
    sys.exit(main())
