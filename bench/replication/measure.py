"""The measurements of the replication benchmark: the timed transfers (bpfs pair + sync, bpfs
recover, the raw aioquic ceiling, rsync over ssh), the CPU they cost at each end and the load of
the rest of the machine meanwhile, and the runs that rotate them (``run_replication``)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
import traceback
from pathlib import Path
from typing import Callable

from bench import proc
from bench.cleanup import Cleanup
from bench.config import human_bytes
from bench.replication.harness import (QUOTA, SYNC_TIMEOUT, BpfsPair, ReplicationError, Sshd, copy_into, make_source,
                                       sha256_file)
from bench.replication.report import summarize
from bench.standalone import log_stderr

COLUMNS = ("bpfs", "ceiling", "rsync")


# -- CPU and load -------------------------------------------------------------------------------

def cpu_with_children(pid: int) -> float | None:
    """utime + stime + cutime + cstime of ``pid`` (its own CPU and that of the children it reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def busy() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, /proc/stat), for the contention figure."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return float("nan")


def others(res: dict, busy0: float, measured: float) -> None:
    """Record how much CPU other processes took during the transfer (cores busy on average)."""
    other = busy() - busy0 - measured
    if other == other:  # not NaN
        res["others_cores"] = max(0.0, other) / res["seconds"]


def children_cpu() -> float:
    """CPU seconds of this process's terminated and waited-for children so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def has_children(pid: int) -> bool:
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                if f.read().strip():
                    return True
    except OSError:
        return False
    return False


def go_cold() -> bool:
    """sync and drop the page cache (False if not permitted)."""
    return proc.drop_caches()


# -- the timed transfers ------------------------------------------------------------------------

def replicate(pair: BpfsPair, nbytes: int) -> dict:
    """Timed: pair A with B, then ``bpfs sync A``. CPU of both daemons over that time."""
    cold = go_cold()
    ca0, cb0 = proc.cpu_seconds(pair.pid_a), proc.cpu_seconds(pair.pid_b)
    busy0, cc0 = busy(), children_cpu()
    t0 = time.perf_counter()
    pair.bpfs("pair", str(pair.a), "--direct", f"127.0.0.1:{pair.port}", "--expect", pair.b_id,
              "--offer", QUOTA, "--ask", QUOTA, "--yes", timeout=120)
    t1 = time.perf_counter()
    out = pair.bpfs("sync", str(pair.a), "--timeout", str(SYNC_TIMEOUT), "--json",
                    timeout=SYNC_TIMEOUT + 60)
    t2 = time.perf_counter()
    ca1, cb1 = proc.cpu_seconds(pair.pid_a), proc.cpu_seconds(pair.pid_b)
    res = {"seconds": t2 - t0, "pair_seconds": t1 - t0, "sync_seconds": t2 - t1, "bytes": nbytes,
           "cold": cold, "cpu_cli": children_cpu() - cc0}
    if None not in (ca0, ca1, cb0, cb1):
        res.update(cpu_a=ca1 - ca0, cpu_b=cb1 - cb0)
        others(res, busy0, res["cpu_a"] + res["cpu_b"] + res["cpu_cli"])
    try:
        res["sync"] = json.loads(out.stdout)
    except ValueError:
        res["sync"] = out.stdout.strip()
    try:
        st = json.loads(pair.bpfs("status", str(pair.a), "--json", timeout=60).stdout)
        part = [p for p in st.get("partners", []) if p.get("peer_id") == pair.b_id]
        if part:
            res["wire_bytes"] = part[0].get("replicated_bytes")
            if part[0].get("pending_bytes"):
                pair.problems.append(f"after `bpfs sync` exited 0, status shows "
                                     f"{part[0]['pending_bytes']} bytes still pending")
    except (proc.CommandError, ValueError) as e:
        pair.problems.append(f"`bpfs status A --json` after sync: {e}")
    return res


def recover(pair: BpfsPair, nbytes: int, digest: str, name: str) -> dict:
    """Unmount A, then timed: ``bpfs recover NEW``; then (untimed) mount NEW and check the file."""
    pair.umount(pair.mnt_a)
    cold = go_cold()
    cb0, cc0, busy0 = proc.cpu_seconds(pair.pid_b), children_cpu(), busy()
    t0 = time.perf_counter()
    out = pair.bpfs("recover", str(pair.new), "--from", f"127.0.0.1:{pair.port}", "--expect", pair.b_id,
                    "--kdf", "interactive", "--json", timeout=SYNC_TIMEOUT,
                    env={"BPFS_RECOVERY": pair.recovery_secret})
    seconds = time.perf_counter() - t0
    cb1, cc1 = proc.cpu_seconds(pair.pid_b), children_cpu()
    res = {"seconds": seconds, "bytes": nbytes, "cold": cold, "cpu_client": cc1 - cc0}
    if cb0 is not None and cb1 is not None:
        res["cpu_b"] = cb1 - cb0
        others(res, busy0, res["cpu_b"] + res["cpu_client"])
    try:
        res["recover"] = json.loads(out.stdout)
    except ValueError:
        res["recover"] = out.stdout.strip()
    # The check: the recovered store mounts and gives the same bytes.
    pair.mount(pair.new, pair.mnt_new, "--listen", "none")
    try:
        got, size = sha256_file(pair.mnt_new / name)
    finally:
        pair.umount(pair.mnt_new)
    if size != nbytes or got != digest:
        raise ReplicationError(f"recovered {name} differs: {size} bytes, sha256 {got[:16]}..., "
                               f"expected {nbytes} bytes, {digest[:16]}...")
    res["checked"] = True
    return res


# -- the raw aioquic ceiling ----------------------------------------------------------------------

def quic_ceiling(nbytes: int) -> dict:
    """bench/quic_ceiling.py's process mode with bpfs's default datagram size and congestion control."""
    import trio

    from bench import quic_ceiling as qc
    from bpfs.net.quic import TransportConfig

    cfg = TransportConfig()
    args = argparse.Namespace(datagram=cfg.max_datagram_size, cc=cfg.congestion_control)
    total = -(-nbytes // qc.CHUNK) * qc.CHUNK
    busy0, own0, cc0, t0 = busy(), time.process_time(), children_cpu(), time.perf_counter()
    r = trio.run(qc._process_mode, args, total)
    whole = {"seconds": time.perf_counter() - t0}  # with the receiver's start-up and the handshake
    others(whole, busy0, time.process_time() - own0 + children_cpu() - cc0)
    if not r["ok"]:
        raise ReplicationError("quic ceiling: the payload's SHA-256 differs at the receiver")
    res = {"seconds": r["wall"], "bytes": total, "cpu_send": r["cpu_send"], "cpu_recv": r["cpu_recv"],
           "datagram": args.datagram, "cc": args.cc,
           "cpu_wait": (r["sched_send"][1] + r["sched_recv"][1]) / r["wall"]}
    if "others_cores" in whole:
        res["others_cores"] = whole["others_cores"]
    return res


def rsync(sshd: Sshd, src: Path, dest: Path, nbytes: int) -> dict:
    """Timed: ``rsync -a SRC USER@127.0.0.1:DEST`` (a new DEST). CPU of both ends."""
    cold = go_cold()
    cs0, cc0, busy0 = cpu_with_children(sshd.proc.pid), children_cpu(), busy()
    t0 = time.perf_counter()
    proc.run(["rsync", "-a", "-e", " ".join(sshd.ssh_argv()), str(src), f"{sshd.user}@127.0.0.1:{dest}/"],
             timeout=SYNC_TIMEOUT)
    seconds = time.perf_counter() - t0
    cc1 = children_cpu()
    deadline = time.monotonic() + 5  # let sshd reap its session, so its CPU is counted
    while has_children(sshd.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    cs1 = cpu_with_children(sshd.proc.pid)
    res = {"seconds": seconds, "bytes": nbytes, "cold": cold, "cpu_client": cc1 - cc0}
    if cs0 is not None and cs1 is not None:
        res["cpu_server"] = cs1 - cs0
        others(res, busy0, res["cpu_client"] + res["cpu_server"])
    got = dest / src.name
    if not got.is_file() or got.stat().st_size != nbytes:
        raise ReplicationError(f"rsync: {got} missing or of the wrong size")
    return res


# -- the runs -------------------------------------------------------------------------------------

def run_replication(tmp: Path, nbytes: int, runs: int, cleanup: Cleanup, log: Callable[[str], None] = log_stderr,
                    out: dict | None = None) -> dict:
    """Fill ``out`` (returned) with {'bytes', 'runs': [...], 'errors': [...], 'problems': [...], ...}."""
    out = out if out is not None else {}
    out.update(bytes=nbytes, runs=[], errors=[], problems=[], notes=[])
    base = tmp / "replication"
    base.mkdir(parents=True, exist_ok=True)
    cleanup.add_dir(base)
    columns = list(COLUMNS)
    ok, why = Sshd.available()
    if not ok:
        out["notes"].append(f"rsync reference left out: {why}")
        log(out["notes"][-1])
        columns.remove("rsync")
    if os.geteuid() != 0:
        out["notes"].append("not root: the page cache cannot be dropped before the transfers")
    if os.environ.get("BPFS_UDP_OFFLOAD", "1") == "0":  # (inherited by the daemons and the ceiling)
        out["notes"].append("BPFS_UDP_OFFLOAD=0: UDP GSO / GRO off, one datagram per system call")

    src = base / "src" / "data.bin"
    src.parent.mkdir()
    log(f"replication: writing {human_bytes(nbytes)} of random data to {src}")
    digest = make_source(src, nbytes)
    out["sha256"] = digest

    sshd = None
    if "rsync" in columns:
        sshd = Sshd(base / "sshd", cleanup)
        try:
            sshd.start()
        except Exception as e:  # noqa: BLE001 - the other columns still run
            out["errors"].append({"target": "rsync", "run": "-", "step": "start sshd", "error": str(e)})
            log(f"  rsync: could not start sshd: {e}")
            columns.remove("rsync")
            sshd.stop()
            sshd = None
    try:
        for run in range(1, runs + 1):
            log(f"replication and recovery, run {run}/{runs}")
            sample: dict = {"run": run}
            out["runs"].append(sample)
            shift = (run - 1) % len(columns)
            for name in columns[shift:] + columns[:shift]:
                if name == "bpfs":
                    _bpfs_run(base / f"bpfs-run{run}", src, digest, nbytes, run, cleanup, log, sample, out)
                elif name == "ceiling":
                    try:
                        r = sample["ceiling"] = quic_ceiling(nbytes)
                        log(f"  run {run} quic ceiling {r['bytes'] / r['seconds'] / 1e6:8.1f} MB/s  "
                            f"({r['seconds']:.2f} s)")
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:  # noqa: BLE001
                        _error(out, "ceiling", run, "transfer", e, log)
                else:
                    dest = base / f"rsync-run{run}"
                    dest.mkdir()
                    try:
                        r = sample["rsync"] = rsync(sshd, src, dest, nbytes)
                        log(f"  run {run} rsync        {nbytes / r['seconds'] / 1e6:8.1f} MB/s  "
                            f"({r['seconds']:.2f} s)")
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:  # noqa: BLE001
                        _error(out, "rsync", run, "transfer", e, log)
                    finally:
                        shutil.rmtree(dest, ignore_errors=True)
    finally:
        if sshd is not None:
            sshd.stop()
        shutil.rmtree(src.parent, ignore_errors=True)
    out["summary"] = summarize(out)
    return out


def _error(out: dict, target: str, run, step: str, e: BaseException, log, daemon_log: str = "") -> None:
    msg = f"{type(e).__name__}: {e}"
    out["errors"].append({"target": target, "run": run, "step": step, "error": msg,
                          "traceback": traceback.format_exc(), "daemon_log": daemon_log})
    log(f"  run {run} {target}: FAILED in {step}: {msg}")


def _bpfs_run(base: Path, src: Path, digest: str, nbytes: int, run: int, cleanup: Cleanup, log,
              sample: dict, out: dict) -> None:
    pair = BpfsPair(base, cleanup)
    step = "setup (init, serve, pair --accept, mount)"
    try:
        pair.setup()
        step = "copy the data into A's mount"
        copy_into(src, pair.mnt_a / src.name)
        os.sync()
        step = "replication (pair --direct, sync)"
        r = sample["bpfs"] = replicate(pair, nbytes)
        log(f"  run {run} bpfs sync    {nbytes / r['seconds'] / 1e6:8.1f} MB/s  ({r['seconds']:.2f} s: "
            f"pair {r['pair_seconds']:.2f} s, sync {r['sync_seconds']:.2f} s)")
        step = "recovery"
        r = sample["recovery"] = recover(pair, nbytes, digest, src.name)
        log(f"  run {run} bpfs recover {nbytes / r['seconds'] / 1e6:8.1f} MB/s  ({r['seconds']:.2f} s), "
            "recovered file checked")
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - recorded, the other columns go on
        _error(out, "bpfs", run, step, e, log, pair.log_tail())
    finally:
        try:
            pair.destroy()
        finally:
            for p in pair.problems:
                if p not in out["problems"]:
                    out["problems"].append(p)
