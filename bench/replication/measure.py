"""The measurements of the replication benchmark: the timed transfers (bpfs pair + sync, bpfs
recover from one partner and from two, the raw QUIC ceiling, rsync over ssh), the CPU they cost at
each end and the load of the rest of the machine meanwhile, and the runs that rotate them over the
combinations of QUIC library and UDP I/O mode (``run_replication``)."""

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
from bench.replication.harness import (LIBRARIES, OFFLOADS, QUOTA, SYNC_TIMEOUT, BpfsPair, ReplicationError, Sshd,
                                       copy_into, library_available, make_source, quic_env, sha256_file,
                                       transport_mismatch)
from bench.replication.report import combo_key, summarize
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
    check_transport(pair, res)
    return res


def check_transport(pair: BpfsPair, res: dict) -> None:
    """Untimed: whether the running daemons use the library and UDP I/O mode ``pair.env`` asked for
    (``res['transport_checked']``); what differs goes to the pair's problems."""
    library, offload = pair.env.get("BPFS_QUIC"), pair.env.get("BPFS_UDP_OFFLOAD")
    if library is None or offload is None:
        return
    mode = "off" if offload == "0" else "on"
    wrong = [w for w in (transport_mismatch(pid, name, library, mode)
                         for pid, name in ((pair.pid_a, "A"), (pair.pid_b, "B"), (pair.pid_c, "C")) if pid) if w]
    pair.problems.extend(w for w in wrong if w not in pair.problems)
    res["transport_checked"] = not wrong


def recover_into(pair: BpfsPair, target: Path, nbytes: int, partner_pids: list[int]) -> dict:
    """Timed (A unmounted): ``bpfs recover TARGET --from B --expect B --json``; further partners come
    from the recovered snapshot's partner list, and the packs from all of them at once. CPU of the
    recover process and of each partner daemon (``partner_pids``: B first), and which partners
    sent bytes (``res['partners']``, from the command's JSON)."""
    cold = go_cold()
    c0 = [proc.cpu_seconds(pid) for pid in partner_pids]
    cc0, busy0 = children_cpu(), busy()
    t0 = time.perf_counter()
    out = pair.bpfs("recover", str(target), "--from", f"127.0.0.1:{pair.port}", "--expect", pair.b_id,
                    "--kdf", "interactive", "--json", timeout=SYNC_TIMEOUT,
                    env={"BPFS_RECOVERY": pair.recovery_secret})
    seconds = time.perf_counter() - t0
    c1 = [proc.cpu_seconds(pid) for pid in partner_pids]
    res = {"seconds": seconds, "bytes": nbytes, "cold": cold, "cpu_client": children_cpu() - cc0,
           "asked_partners": len(partner_pids)}
    if None not in c0 and None not in c1:
        res["cpu_partners"] = [b - a for a, b in zip(c0, c1)]
        res["cpu_b"] = res["cpu_partners"][0]
        others(res, busy0, res["cpu_client"] + sum(res["cpu_partners"]))
    try:
        doc = json.loads(out.stdout)
        res["recover"] = {k: doc.get(k) for k in ("generation", "partners", "bytes_this_run", "phases", "seconds")}
        res["partners"] = len(doc.get("partners") or [])
        if res["partners"] != len(partner_pids):
            pair.problems.append(f"recovery with {len(partner_pids)} partner(s) holding everything received "
                                 f"bytes from {res['partners']}")
    except ValueError:
        res["recover"] = out.stdout.strip()
    return res


def check_recovered(pair: BpfsPair, target: Path, name: str, nbytes: int, digest: str) -> None:
    """Untimed: the recovered store mounts (``--listen none``) and gives the same bytes."""
    mnt = pair.base / f"mnt{target.name}"
    pair.mount(target, mnt, "--listen", "none")
    try:
        got, size = sha256_file(mnt / name)
    finally:
        pair.umount(mnt)
    if size != nbytes or got != digest:
        raise ReplicationError(f"recovered {name} in {target.name} differs: {size} bytes, sha256 {got[:16]}..., "
                               f"expected {nbytes} bytes, {digest[:16]}...")


def recover(pair: BpfsPair, nbytes: int, digest: str, name: str) -> dict:
    """Unmount A, then timed: ``bpfs recover NEW`` from B; then (untimed) mount NEW and check the file."""
    pair.umount(pair.mnt_a)
    res = recover_into(pair, pair.new, nbytes, [pair.pid_b])
    check_recovered(pair, pair.new, name, nbytes, digest)
    res["checked"] = True
    return res


def recover_one_and_two(pair: BpfsPair, nbytes: int, digest: str, name: str, log, label: str) -> dict:
    """With A mounted and paired with B only, C serving and inviting A (``BpfsPair(third=True)``):
    unmount A; timed: recovery into NEW from B alone; then, untimed, mount A again, write a small
    file (so that a new snapshot lists C among A's partners), pair A with C and sync, unmount A;
    timed: recovery into NEW2 from B (C found in the snapshot's partner list). Both checked at the
    end. Returns {'one': ..., 'two': ..., 'replicate_c_seconds': ...}; a failure raises with
    whatever was measured in ``.partial``."""
    res: dict = {}
    try:
        pair.umount(pair.mnt_a)
        r = res["one"] = recover_into(pair, pair.new, nbytes, [pair.pid_b])
        log(f"  {label} bpfs recover from one partner  {nbytes / r['seconds'] / 1e6:8.1f} MB/s  "
            f"({r['seconds']:.2f} s)")
        pair.pid_a = pair.mount(pair.a, pair.mnt_a, "--listen", "127.0.0.1:0")
        (pair.mnt_a / "after-pairing-C.txt").write_text("C holds everything too\n")
        res["replicate_c_seconds"] = pair.pair_and_sync(pair.port_c, pair.c_id)
        pair.umount(pair.mnt_a)
        r = res["two"] = recover_into(pair, pair.new2, nbytes, [pair.pid_b, pair.pid_c])
        log(f"  {label} bpfs recover from two partners {nbytes / r['seconds'] / 1e6:8.1f} MB/s  "
            f"({r['seconds']:.2f} s; bytes from {r.get('partners', '?')} partners)")
        check_recovered(pair, pair.new, name, nbytes, digest)
        res["one"]["checked"] = True
        check_recovered(pair, pair.new2, name, nbytes, digest)
        res["two"]["checked"] = True
    except Exception as e:
        e.partial = res  # type: ignore[attr-defined]
        raise
    return res


# -- the raw QUIC ceiling -------------------------------------------------------------------------

def quic_ceiling(nbytes: int, library: str = "aioquic", offload: str = "on") -> dict:
    """bench/quic_ceiling.py's process mode with bpfs's default datagram size and congestion control,
    the QUIC library ``library`` at both ends and UDP GSO / GRO ``offload`` ("on" / "off"). The
    datagrams per system call of each end are recorded: they show the I/O mode really used."""
    import trio

    from bench import quic_ceiling as qc
    from bpfs.net.quic import TransportConfig

    cfg = TransportConfig()
    # every option of quic_ceiling.py's parser that its process mode reads, at its default
    args = argparse.Namespace(datagram=cfg.max_datagram_size, cc=cfg.congestion_control, library=library,
                              offload=offload, connect=None, listen=None, seconds=None, send_buffer=None,
                              samples=False, mode="process")
    total = -(-nbytes // qc.CHUNK) * qc.CHUNK
    # the environment too (this process and the receiver it starts): BPFS_UDP_OFFLOAD=0 here would
    # turn offload off whatever --offload says, and BPFS_QUIC is what a bare TransportConfig takes
    saved = {k: os.environ.get(k) for k in ("BPFS_QUIC", "BPFS_UDP_OFFLOAD")}
    os.environ.update(quic_env(library, offload))
    try:
        busy0, own0, cc0, t0 = busy(), time.process_time(), children_cpu(), time.perf_counter()
        r = trio.run(qc._process_mode, args, total)
        whole = {"seconds": time.perf_counter() - t0}  # with the receiver's start-up and the handshake
        others(whole, busy0, time.process_time() - own0 + children_cpu() - cc0)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not r["ok"]:
        raise ReplicationError("quic ceiling: the payload's SHA-256 differs at the receiver")
    res = {"seconds": r["wall"], "bytes": total, "cpu_send": r["cpu_send"], "cpu_recv": r["cpu_recv"],
           "datagram": args.datagram, "cc": "cubic" if library == "qh3" else args.cc,  # qh3's core: CUBIC only
           "library": library, "offload": offload,
           "cpu_wait": (r["sched_send"][1] + r["sched_recv"][1]) / r["wall"]}
    send_calls, sent, _, _ = r.get("udp_send") or (0, 0, 0, 0)
    _, _, recv_calls, received = r.get("udp_recv") or (0, 0, 0, 0)
    if send_calls and recv_calls:
        res["send_per_call"], res["recv_per_read"] = sent / send_calls, received / recv_calls
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

def combinations(libraries, offloads) -> list[tuple[str, str]]:
    """(library, offload) pairs in the order given: every offload mode of the first library, then
    of the next."""
    return [(lib, off) for lib in libraries for off in offloads]


def plan_run(items: list, run: int, runs: int) -> list:
    """The order of one run: ``items`` rotated so that, over ``runs`` runs, each starts about as
    far along as the others (with as many runs as items, each item starts one run)."""
    if not items:
        return []
    shift = ((run - 1) * len(items)) // max(1, runs) % len(items)
    return items[shift:] + items[:shift]


def run_replication(tmp: Path, nbytes: int, runs: int, cleanup: Cleanup, log: Callable[[str], None] = log_stderr,
                    out: dict | None = None, *, libraries=LIBRARIES, offloads=OFFLOADS,
                    recovery: bool = True) -> dict:
    """Fill ``out`` (returned) with {'bytes', 'runs': [...], 'errors': [...], 'problems': [...], ...}.

    Per run, for each (library, offload) of ``libraries`` x ``offloads``: bpfs replication and the
    raw ceiling; rsync once. With ``recovery``, the bpfs replication of each library in the first
    offload mode listed is followed by its recoveries from one partner and from two."""
    out = out if out is not None else {}
    out.update(bytes=nbytes, runs=[], errors=[], problems=[], notes=[])
    libraries = list(dict.fromkeys(libraries))
    offloads = list(dict.fromkeys(offloads))
    for lib in list(libraries):
        why = library_available(lib)
        if why:
            out["notes"].append(f"{lib} left out: {why}")
            log(out["notes"][-1])
            libraries.remove(lib)
    combos = combinations(libraries, offloads)
    out.update(libraries=libraries, offloads=offloads, combos=[combo_key(lib, off) for lib, off in combos],
               recovery_offload=offloads[0] if recovery and offloads else None)
    base = tmp / "replication"
    base.mkdir(parents=True, exist_ok=True)
    cleanup.add_dir(base)
    items: list[tuple[str, str | None, str | None]] = []
    for lib, off in combos:
        items += [("bpfs", lib, off), ("ceiling", lib, off)]
    ok, why = Sshd.available()
    if not ok:
        out["notes"].append(f"rsync reference left out: {why}")
        log(out["notes"][-1])
    else:
        items.append(("rsync", None, None))
    if os.geteuid() != 0:
        out["notes"].append("not root: the page cache cannot be dropped before the transfers")
    if not combos:
        out["summary"] = summarize(out)
        return out

    src = base / "src" / "data.bin"
    src.parent.mkdir()
    log(f"replication: writing {human_bytes(nbytes)} of random data to {src}")
    digest = make_source(src, nbytes)
    out["sha256"] = digest

    sshd = None
    if ok:
        sshd = Sshd(base / "sshd", cleanup)
        try:
            sshd.start()
        except Exception as e:  # noqa: BLE001 - the other columns still run
            out["errors"].append({"target": "rsync", "run": "-", "step": "start sshd", "error": str(e)})
            log(f"  rsync: could not start sshd: {e}")
            items = [i for i in items if i[0] != "rsync"]
            sshd.stop()
            sshd = None
    try:
        for run in range(1, runs + 1):
            log(f"replication and recovery, run {run}/{runs}: {', '.join(out['combos'])}")
            sample: dict = {"run": run, "combos": {}}
            out["runs"].append(sample)
            for what, lib, off in plan_run(items, run, runs):
                if what == "rsync":
                    _rsync_run(base / f"rsync-run{run}", sshd, src, nbytes, run, log, sample, out)
                    continue
                assert lib is not None and off is not None
                key = combo_key(lib, off)
                per = sample["combos"].setdefault(key, {})
                label = f"run {run} {key:12s}"
                if what == "bpfs":
                    with_recovery = recovery and off == offloads[0]
                    _bpfs_run(base / f"bpfs-{lib}-{off}-run{run}", src, digest, nbytes, run, cleanup, log, per, out,
                              lib, off, with_recovery)
                else:
                    try:
                        r = per["ceiling"] = quic_ceiling(nbytes, lib, off)
                        calls = (f", {r['send_per_call']:.1f} datagrams a send call, {r['recv_per_read']:.1f} a read"
                                 if "send_per_call" in r else "")
                        log(f"  {label} quic ceiling {r['bytes'] / r['seconds'] / 1e6:8.1f} MB/s  "
                            f"({r['seconds']:.2f} s{calls})")
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:  # noqa: BLE001
                        _error(out, f"ceiling {key}", run, "transfer", e, log)
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


def _rsync_run(dest: Path, sshd: Sshd | None, src: Path, nbytes: int, run: int, log, sample: dict, out: dict) -> None:
    if sshd is None:
        return
    dest.mkdir()
    try:
        r = sample["rsync"] = rsync(sshd, src, dest, nbytes)
        log(f"  run {run} rsync        {nbytes / r['seconds'] / 1e6:8.1f} MB/s  ({r['seconds']:.2f} s)")
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001
        _error(out, "rsync", run, "transfer", e, log)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def _bpfs_run(base: Path, src: Path, digest: str, nbytes: int, run: int, cleanup: Cleanup, log,
              per: dict, out: dict, library: str = "aioquic", offload: str = "on", with_recovery: bool = True) -> None:
    """One fresh set of stores with ``library`` and ``offload``: the timed replication, then (with
    ``with_recovery``) the recoveries from one partner and from two. Results into ``per``."""
    key = combo_key(library, offload)
    label = f"run {run} {key:12s}"
    pair = BpfsPair(base, cleanup, env=quic_env(library, offload), third=with_recovery)
    step = "setup (init, serve, pair --accept, mount)"
    try:
        pair.setup()
        step = "copy the data into A's mount"
        copy_into(src, pair.mnt_a / src.name)
        os.sync()
        step = "replication (pair --direct, sync)"
        r = per["bpfs"] = replicate(pair, nbytes)
        log(f"  {label} bpfs sync    {nbytes / r['seconds'] / 1e6:8.1f} MB/s  ({r['seconds']:.2f} s: "
            f"pair {r['pair_seconds']:.2f} s, sync {r['sync_seconds']:.2f} s)")
        if with_recovery:
            step = "recovery from one partner, then from two"
            try:
                rec = recover_one_and_two(pair, nbytes, digest, src.name, log, label)
            except Exception as e:
                for k, v in getattr(e, "partial", {}).items():
                    per[f"recovery_{k}" if k in ("one", "two") else k] = v
                raise
            per.update(recovery_one=rec["one"], recovery_two=rec["two"],
                       replicate_c_seconds=rec["replicate_c_seconds"])
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - recorded, the other columns go on
        _error(out, f"bpfs {key}", run, step, e, log, pair.log_tail())
    finally:
        try:
            pair.destroy()
        finally:
            for p in pair.problems:
                if p not in out["problems"]:
                    out["problems"].append(p)
