"""Recovery from one partner next to recovery from two: over loopback, and behind limited uplinks.

Run: ``python -m bench.recovery [--quick] [--runs N] [--gib X] [--uplink MB_S]``; ``python -m
bench`` runs it too (workload ``recovery``). Each run, in a fresh directory:

- setup (untimed): stores A (mounted with ``--listen 127.0.0.1:0``), B and C (``bpfs serve
  --listen 127.0.0.1:0``), both inviting A; the data (incompressible, from a seed) copied into A's
  mount and fsync'ed; A paired with B; ``bpfs sync A``; A unmounted.
- one partner (timed): ``bpfs recover R1 --from B --expect B`` (B is A's only partner).
- A mounted again, paired with C, a small file written (so that a new snapshot is taken: its
  manifest lists C among A's partners), ``bpfs sync A`` (C receives everything; untimed), A
  unmounted.
- two partners (timed): ``bpfs recover R2 --from B --expect B``: C comes from the snapshot's
  partner list, and the packs come from both at once.
- checked (untimed): R1 and R2 mount, and the file's SHA-256 matches.

Measured for each recovery: wall time and throughput (data bytes / seconds), the steps' times
``bpfs recover --json`` reports, and CPU (utime + stime, /proc/PID/stat) of each end: the
``bpfs recover`` process with the children it reaped, and each partner daemon serving it; also
the CPU the rest of the machine used meanwhile. Printed: medians with min-max, CPU s/GiB per end,
the ratio two/one against the aim (>= 1.5), and the time per GiB against the aim (< 60 s).

On loopback the partner daemons run on the same cores as ``bpfs recover``: with every end
CPU-bound (the QUIC transport), a second partner adds no CPU, so the loopback ratio shows what
this machine can do, not what two partners elsewhere give. So each run also repeats the same
steps with a quarter of the data (at most 256 MiB) from partners behind limited uplinks (default
8 MB/s each): B and C listen on 127.0.0.2 and are reached only through a forwarder each (a child
process on 127.0.0.1, same port) that passes at most that rate towards the recovering store and
queues 2 MiB beyond it, as a home router would; the network sets the pace, as between machines.
All stores use ``BPFS_BROKER=none``: nothing is looked up on the network.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import proc, stats
from bench.cleanup import Cleanup
from bench.config import GiB, MiB, human_bytes
from bench.replication.harness import QUOTA, BpfsPair, ReplicationError, copy_into, make_source, sha256_file
from bench.replication.measure import busy, children_cpu, go_cold
from bench.standalone import exit_status, log_stderr, run_standalone, save_json
from bench.targets import REPO, store_log_tail

AIM_SPEEDUP = 1.5  # two partners against one
UPLINK = 8_000_000  # bytes per second: partners' uplinks in the network-bound figure (64 Mbit/s)
UPLINK_BYTES = 256 * MiB  # recovered in the network-bound figure: a quarter of the data, at most this
AIM_SECONDS_PER_GIB = 60.0
TIMEOUT = 3600


class Shaper:
    """A UDP forwarder in a child process that limits what flows from a partner to whoever dialled
    it through the forwarder to `rate` bytes per second (a partner's uplink), queueing up to
    SHAPER_QUEUE bytes as a router does and dropping beyond; the other direction is not limited."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], rate: int):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-m", "bench.recovery", "--shaper", f"{listen[0]}:{listen[1]}",
                                      f"{target[0]}:{target[1]}", str(rate)], cwd=REPO, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     start_new_session=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening"):
            self.stop()
            raise ReplicationError(f"the uplink shaper did not start: {line!r}")
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()


SHAPER_QUEUE = 2 * MiB


def run_shaper(listen: str, target: str, rate: int) -> None:
    """The Shaper's process: forward until terminated."""
    import collections
    import selectors
    import socket

    def addr(text: str) -> tuple[str, int]:
        host, port = text.rsplit(":", 1)
        return host, int(port)

    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind(addr(listen))
    front.setblocking(False)
    for s in (front,):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    target_addr = addr(target)
    sel = selectors.DefaultSelector()
    sel.register(front, selectors.EVENT_READ, None)
    upstream: dict = {}  # client address -> socket towards the target
    queue: collections.deque = collections.deque()  # (data, client address) going down, limited
    queued, tokens, stamp = 0, float(rate) / 50, time.monotonic()
    print("listening", flush=True)
    while True:
        now = time.monotonic()
        tokens = min(rate / 50.0, tokens + (now - stamp) * rate)  # a burst of at most 20 ms
        stamp = now
        while queue and tokens >= len(queue[0][0]):
            data, client = queue.popleft()
            queued -= len(data)
            tokens -= len(data)
            try:
                front.sendto(data, client)
            except OSError:
                pass
        wait = None if not queue else max(0.0005, (len(queue[0][0]) - tokens) / rate)
        for key, _ in sel.select(wait):
            sock = key.fileobj
            for _ in range(256):
                try:
                    data, src = sock.recvfrom(65536)
                except (BlockingIOError, OSError):
                    break
                if sock is front:
                    up = upstream.get(src)
                    if up is None:
                        up = upstream[src] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
                        up.setblocking(False)
                        up.connect(target_addr)
                        sel.register(up, selectors.EVENT_READ, src)
                    try:
                        up.send(data)
                    except OSError:
                        pass
                elif queued + len(data) <= SHAPER_QUEUE:
                    queue.append((data, key.data))
                    queued += len(data)


class RecoveryTrio(BpfsPair):
    """Stores A (mounted), B and C (served), and two recoveries. With `uplink` (bytes per second),
    B and C listen on 127.0.0.2 and are reached only through a Shaper each on 127.0.0.1 (same port
    number, so the address a partner announces leads through it too): partners with a limited
    uplink, as over the internet, instead of partners competing for this machine's CPU."""

    def __init__(self, base: Path, cleanup: Cleanup, uplink: int | None = None):
        super().__init__(base, cleanup)
        self.c = base / "C"
        self.c_id = None
        self.port_c: int | None = None
        self.pid_c = None
        self.r1, self.r2 = base / "R1", base / "R2"
        self.uplink = uplink
        self.shapers: list[Shaper] = []

    def bpfs(self, *args: str, timeout: float = 600, env: dict | None = None):
        return super().bpfs(*args, timeout=timeout, env={"BPFS_BROKER": "none", **(env or {})})

    def _serve(self, store: Path) -> tuple[int, int]:
        """`bpfs serve STORE`: (its pid, the port to reach it at)."""
        host = "127.0.0.2" if self.uplink else "127.0.0.1"
        self.bpfs("serve", str(store), "--listen", f"{host}:0", timeout=120)
        pid = self.daemon_pid(store)
        if pid is None:
            raise ReplicationError(f"`bpfs serve {store.name}` returned but its daemon.json has no readable pid")
        self.cleanup.add_pid(pid)
        info = json.loads(self.bpfs("id", "--store", str(store), "--json", timeout=60).stdout)
        addrs = [a for a in info.get("addresses") or [] if a.startswith(f"{host}:")]
        if not addrs:
            raise ReplicationError(f"`bpfs id --store {store.name} --json` gives no {host} address: {info}")
        port = int(addrs[0].rsplit(":", 1)[1])
        if self.uplink:
            shaper = Shaper(("127.0.0.1", port), (host, port), self.uplink)
            self.shapers.append(shaper)
            self.cleanup.add_pid(shaper.pid)
        return pid, port

    def setup(self) -> None:
        """init A, B, C; serve B and C; both invite A; mount A."""
        self.base.mkdir(parents=True)
        ids = {}
        for name, store in (("a", self.a), ("b", self.b), ("c", self.c)):
            ids[name] = json.loads(self.bpfs("init", str(store), "--kdf", "interactive", "--json",
                                              timeout=120).stdout)
        self.a_id, self.recovery_secret = ids["a"]["peer_id"], ids["a"]["recovery_secret"]
        self.b_id, self.c_id = ids["b"]["peer_id"], ids["c"]["peer_id"]
        self.serving = True  # from here on destroy() tries `bpfs stop B`
        self.pid_b, self.port = self._serve(self.b)
        self.pid_c, self.port_c = self._serve(self.c)
        for store in (self.b, self.c):
            self.bpfs("pair", str(store), "--accept", self.a_id, "--offer", QUOTA, "--ask", QUOTA, timeout=120)
        self.pid_a = self.mount(self.a, self.mnt_a, "--listen", "127.0.0.1:0")

    def remount_a(self) -> None:
        self.pid_a = self.mount(self.a, self.mnt_a, "--listen", "127.0.0.1:0")

    def timed_recover(self, target: Path, nbytes: int, partners: list[int]) -> dict:
        """Timed: ``bpfs recover TARGET --from B --expect B --json``; CPU of it and of each partner."""
        cold = go_cold()
        pids = [p for p in partners if p]
        c0 = {pid: proc.cpu_seconds(pid) for pid in pids}
        cc0, busy0 = children_cpu(), busy()
        t0 = time.perf_counter()
        out = self.bpfs("recover", str(target), "--from", f"127.0.0.1:{self.port}", "--expect", self.b_id,
                         "--kdf", "interactive", "--json", timeout=TIMEOUT, env={"BPFS_RECOVERY": self.recovery_secret})
        seconds = time.perf_counter() - t0
        res = {"seconds": seconds, "bytes": nbytes, "cold": cold, "cpu_client": children_cpu() - cc0}
        partner_cpu = []
        for pid in pids:
            c1 = proc.cpu_seconds(pid)
            if c0[pid] is not None and c1 is not None:
                partner_cpu.append(c1 - c0[pid])
        if len(partner_cpu) == len(pids):
            res["cpu_partners"] = partner_cpu
            other = busy() - busy0 - res["cpu_client"] - sum(partner_cpu)
            if other == other:
                res["others_cores"] = max(0.0, other) / seconds
        try:
            doc = json.loads(out.stdout)
            res["recover"] = {k: doc.get(k) for k in ("generation", "partners", "bytes_this_run", "phases", "seconds")}
            if len(doc.get("partners") or []) != len(pids):
                self.problems.append(f"recovery from {len(pids)} partners received bytes from "
                                     f"{len(doc.get('partners') or [])}")
        except ValueError:
            res["recover"] = out.stdout.strip()
        return res

    def check(self, target: Path, name: str, nbytes: int, digest: str) -> None:
        mnt = self.base / f"mnt-{target.name}"
        self.mount(target, mnt, "--listen", "none")
        try:
            got, size = sha256_file(mnt / name)
        finally:
            self.umount(mnt)
        if size != nbytes or got != digest:
            raise ReplicationError(f"recovered {name} in {target.name} differs: {size} bytes, sha256 {got[:16]}...")

    def log_tail(self, lines: int = 15) -> str:
        return store_log_tail((self.a, self.b, self.c, self.r1, self.r2), lines)

    def destroy(self) -> None:
        if self.pid_c and (self.c / "daemon.json").exists():
            try:
                self.bpfs("stop", str(self.c), timeout=120)
            except Exception as e:  # noqa: BLE001 - cleanup goes on
                self.problems.append(f"`bpfs stop C` failed: {str(e).splitlines()[0]}")
        for shaper in self.shapers:
            shaper.stop()
        super().destroy()


def _error(out: dict, run, step: str, e: BaseException, log, daemon_log: str = "") -> None:
    msg = f"{type(e).__name__}: {e}"
    out["errors"].append({"target": "bpfs", "run": run, "step": step, "error": msg,
                          "traceback": traceback.format_exc(), "daemon_log": daemon_log})
    log(f"  run {run} recovery: FAILED in {step}: {msg}")


def _one_run(base: Path, src: Path, digest: str, nbytes: int, run: int, cleanup: Cleanup, log, out: dict,
             uplink: int | None = None) -> None:
    trio_ = RecoveryTrio(base, cleanup, uplink)
    sample: dict = {"run": run}
    runs = out["uplink_runs" if uplink else "runs"]
    what = f" (uplinks {uplink / 1e6:.0f} MB/s)" if uplink else ""
    step = "setup (init A, B, C; serve B, C; invite A; mount A)"
    try:
        trio_.setup()
        step = "copy the data into A's mount"
        copy_into(src, trio_.mnt_a / src.name)
        os.sync()
        step = "pair A with B and sync"
        log(f"  run {run}: replicated to B in {trio_.pair_and_sync(trio_.port, trio_.b_id):.1f} s")
        trio_.umount(trio_.mnt_a)
        step = "recovery from one partner"
        r = sample["one"] = trio_.timed_recover(trio_.r1, nbytes, [trio_.pid_b])
        log(f"  run {run}: recovery from one partner{what}  {nbytes / r['seconds'] / 1e6:6.1f} MB/s "
            f"({r['seconds']:.1f} s)")
        step = "pair A with C and sync"
        trio_.remount_a()
        # a change, so that the next snapshot is taken and lists C among A's partners
        (trio_.mnt_a / "after-pairing-C.txt").write_text("C holds everything too\n")
        log(f"  run {run}: replicated to C in {trio_.pair_and_sync(trio_.port_c, trio_.c_id):.1f} s")
        trio_.umount(trio_.mnt_a)
        step = "recovery from two partners"
        r = sample["two"] = trio_.timed_recover(trio_.r2, nbytes, [trio_.pid_b, trio_.pid_c])
        log(f"  run {run}: recovery from two partners{what} {nbytes / r['seconds'] / 1e6:6.1f} MB/s "
            f"({r['seconds']:.1f} s)")
        step = "checking the recovered stores"
        trio_.check(trio_.r1, src.name, nbytes, digest)
        trio_.check(trio_.r2, src.name, nbytes, digest)
        sample["checked"] = True
        runs.append(sample)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - recorded, the next run goes on
        if sample.get("one") or sample.get("two"):
            runs.append(sample)
        _error(out, run, step + what, e, log, trio_.log_tail())
    finally:
        try:
            trio_.destroy()
        finally:
            for p in trio_.problems:
                if p not in out["problems"]:
                    out["problems"].append(p)


def run_recovery(tmp: Path, nbytes: int, runs: int, cleanup: Cleanup, log: Callable[[str], None] = log_stderr,
                 out: dict | None = None, *, uplink: int = UPLINK, uplink_bytes: int | None = None) -> dict:
    """Fill ``out`` (returned) with {'bytes', 'runs': [...], 'uplink_runs': [...], 'errors': [...],
    'problems': [...], ...}. `uplink` (bytes per second, 0: none): also recover `uplink_bytes`
    from partners behind uplinks of that rate."""
    out = out if out is not None else {}
    uplink_bytes = min(nbytes // 4, UPLINK_BYTES) // MiB * MiB if uplink_bytes is None else uplink_bytes
    out.update(bytes=nbytes, runs=[], uplink_runs=[], uplink=uplink, uplink_bytes=uplink_bytes, errors=[],
               problems=[], notes=[])
    base = tmp / "recovery"
    base.mkdir(parents=True, exist_ok=True)
    cleanup.add_dir(base)
    if os.geteuid() != 0:
        out["notes"].append("recovery: not root: the page cache cannot be dropped before the recoveries")
    src = base / "src" / "data.bin"
    src.parent.mkdir()
    log(f"recovery: writing {human_bytes(nbytes)} of random data to {src}")
    digest = make_source(src, nbytes, seed=4048)
    try:
        for run in range(1, runs + 1):
            log(f"recovery from one partner and from two, run {run}/{runs}")
            _one_run(base / f"run{run}", src, digest, nbytes, run, cleanup, log, out)
            if uplink and uplink_bytes:
                small = base / "src" / "uplink.bin"
                if not small.exists():
                    small_digest = make_source(small, uplink_bytes, seed=4049)
                _one_run(base / f"uplink-run{run}", small, small_digest, uplink_bytes, run, cleanup, log, out,
                         uplink=uplink)
    finally:
        src.unlink(missing_ok=True)
        (base / "src" / "uplink.bin").unlink(missing_ok=True)
    out["summary"] = summarize(out)
    return out


# -- summary and report ---------------------------------------------------------------------------

def _summarize_runs(runs: list[dict]) -> dict:
    col: dict[str, dict[str, list[float]]] = {}

    def add(name: str, key: str, value) -> None:
        if value is not None:
            col.setdefault(name, {}).setdefault(key, []).append(value)

    speedups = []
    for s in runs:
        for name in ("one", "two"):
            r = s.get(name)
            if not r:
                continue
            gib = r["bytes"] / GiB
            add(name, "mbps", r["bytes"] / r["seconds"] / 1e6)
            add(name, "seconds", r["seconds"])
            add(name, "seconds_per_gib", r["seconds"] / gib)
            add(name, "cpu_client", r["cpu_client"] / gib)
            if r.get("cpu_partners"):
                add(name, "cpu_partners", sum(r["cpu_partners"]) / gib)
                add(name, "cpu", (r["cpu_client"] + sum(r["cpu_partners"])) / gib)
            add(name, "others_cores", r.get("others_cores"))
            phases = (r.get("recover") or {}).get("phases") if isinstance(r.get("recover"), dict) else None
            for phase, secs in (phases or {}).items():
                add(name, f"phase_{phase}", secs)
        if s.get("one") and s.get("two"):
            speedups.append(s["one"]["seconds"] / s["two"]["seconds"])
    summary = {name: {k: stats.summarize(v) for k, v in keys.items()} for name, keys in col.items()}
    summary["speedup"] = stats.summarize(speedups)
    return summary


def summarize(out: dict) -> dict:
    """Medians (min, max) of each figure over the runs, on loopback and (key "uplink") through
    limited uplinks; the ratio two/one of each run's times."""
    summary = _summarize_runs(out.get("runs", []))
    summary["uplink"] = _summarize_runs(out.get("uplink_runs", []))
    return summary


def _table(summary: dict, title: str, size: str) -> list[str]:
    rows = [[title, "throughput", "seconds", "CPU s/GiB: recover + partners", "other load"]]
    for name, label in (("one", f"bpfs recover of {size} from one partner"),
                        ("two", f"bpfs recover of {size} from two partners")):
        per = summary.get(name)
        if not per:
            continue
        cpu = "n/a"
        if per.get("cpu"):
            cpu = (f"{stats.num(per['cpu']['median'])} = {stats.num(per['cpu_client']['median'])} + "
                   f"{stats.num(per['cpu_partners']['median'])}")
        others = f"{per['others_cores']['median']:.2f} cores" if per.get("others_cores") else "n/a"
        rows.append([label, stats.cell(per.get("mbps"), "MB/s"), stats.cell(per.get("seconds"), "s"), cpu, others])
    if len(rows) == 1:
        return []
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    for name in ("one", "two"):
        per = summary.get(name) or {}
        steps = [(k[len("phase_"):], v["median"]) for k, v in per.items() if k.startswith("phase_")]
        if steps:
            lines.append(f"  steps ({name}): " + ", ".join(f"{k} {v:.1f} s" for k, v in steps))
    sp = summary.get("speedup")
    if sp:
        met = "met" if sp["median"] >= AIM_SPEEDUP else "NOT met"
        lines.append(f"  two partners / one: {stats.cell(sp, 'x')} (aim >= {AIM_SPEEDUP:.1f}x: {met})")
    return lines


def report_lines(rep: dict) -> list[str]:
    summary = rep.get("summary") or summarize(rep)
    lines = _table(summary, "recovery over loopback", human_bytes(rep["bytes"]))
    if not lines:
        return ["no recovery results"]
    for name in ("one", "two"):
        per = (summary.get(name) or {}).get("seconds_per_gib")
        if per:
            met = "met" if per["median"] < AIM_SECONDS_PER_GIB else "NOT met"
            lines.append(f"  recovery from {name} partner{'s' if name == 'two' else ''}: {per['median']:.1f} s per "
                         f"GiB (aim < {AIM_SECONDS_PER_GIB:.0f} s: {met})")
    cores = os.cpu_count() or 1
    two = summary.get("two") or {}
    if two.get("cpu") and two.get("seconds_per_gib"):
        floor = two["cpu"]["median"] / cores
        lines.append(f"  on loopback the partners share this machine's {cores} cores with `bpfs recover`: at "
                     f"{stats.num(two['cpu']['median'])} CPU s per GiB at both ends together, no recovery from two "
                     f"partners here can take less than {floor:.1f} s per GiB")
    lines.append("CPU: `bpfs recover` (with the processes it reaped) + the partner daemons serving it, per GiB "
                 "of data. Other load = CPU the rest of the machine used meanwhile, in cores.")
    up = summary.get("uplink") or {}
    if up.get("one") or up.get("two"):
        lines.append("")
        lines += _table(up, f"partners behind {rep['uplink'] / 1e6:.0f} MB/s uplinks",
                        human_bytes(rep["uplink_bytes"]))
        lines.append("(each partner reached only through a forwarder that passes at most that many bytes per "
                     "second towards the recovering store, as a home uplink would: the network, not this "
                     "machine's CPU, sets the pace)")
    return lines


def print_report(rep: dict, runs: int) -> None:
    stats.print_standalone("bpfs recovery from one partner and from two", rep, runs, report_lines(rep))


# -- standalone -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB (unless --gib is given)")
    p.add_argument("--gib", type=float, metavar="X", help="data size in GiB (default 1, or 0.25 with --quick)")
    p.add_argument("--runs", type=int, default=3, metavar="N", help="repeat N times (default 3)")
    p.add_argument("--uplink", type=float, default=UPLINK / 1e6, metavar="MB_S",
                   help=f"also recover from partners behind uplinks of this many MB/s (default {UPLINK / 1e6:.0f}; "
                        "0: not)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also save the results as JSON")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/bpfs-bench"), metavar="DIR",
                   help="where the stores and mounts go (default /var/tmp/bpfs-bench)")
    p.add_argument("--shaper", nargs=3, metavar=("LISTEN", "TARGET", "RATE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.shaper:
        run_shaper(args.shaper[0], args.shaper[1], int(args.shaper[2]))
        return 0
    gib = args.gib if args.gib is not None else (0.25 if args.quick else 1.0)
    nbytes = int(gib * GiB) // MiB * MiB
    if nbytes < MiB or args.runs < 1:
        p.error("--gib must give at least 1 MiB and --runs must be at least 1")
    rep: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    interrupted = run_standalone(args.workdir, rep, lambda tmp, cleanup: run_recovery(
        tmp, nbytes, args.runs, cleanup, log_stderr, out=rep, uplink=int(args.uplink * 1e6)), summarize)
    if "bytes" in rep:
        print_report(rep, args.runs)
    if args.json:
        save_json(rep, args.json)
    return exit_status(rep, interrupted)


if __name__ == "__main__":
    sys.exit(main())
