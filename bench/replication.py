"""Replication and recovery over loopback: bpfs next to the raw aioquic ceiling and rsync over ssh.

Run: ``python -m bench.replication [--quick] [--runs N] [--gib X]`` (as root: it drops the
page cache before each timed transfer and starts a private sshd); ``python -m bench``
runs it too (workload ``replication``). Each run, in a fresh directory:

- bpfs replication: two new stores, B served by ``bpfs serve B --listen 127.0.0.1:0``, A
  mounted with ``--listen 127.0.0.1:0``; B invites A (``pair B --accept A --offer 4G --ask 4G``).
  The data (incompressible, generated from a seed) is copied into A's mount and fsync'ed
  into packs while A has no partner yet, so nothing replicates early. Timed: ``bpfs pair A
  --direct 127.0.0.1:PORT --expect B --yes`` then ``bpfs sync A`` (A's mount daemon does the
  replication); throughput = data bytes / seconds. CPU: user + system time of A's mount
  daemon and B's serve daemon over that interval, per GiB of data.
- raw aioquic ceiling: ``bench/quic_ceiling.py``'s process mode (one stream, sender here,
  receiver in a child process, bpfs.net transport) moving the same number of bytes, with the
  datagram size and congestion control of bpfs's ``TransportConfig`` defaults.
- rsync: ``rsync -a`` of the same data as a plain file over ssh to a private sshd on
  127.0.0.1 (throwaway host and client keys, default ciphers). CPU: the client (rsync + ssh)
  and the sshd side (its session and the remote rsync), per GiB.
- bpfs recovery: A is unmounted (its disk is "lost"), then timed: ``bpfs recover NEW --from
  127.0.0.1:PORT --expect B`` (recovery secret in BPFS_RECOVERY); CPU of the recover process
  and of B's daemon. Checked afterwards, untimed: NEW mounts and the file's SHA-256 matches.

The order of bpfs / ceiling / rsync rotates from run to run. Medians over runs are printed
with min-max, and the ratios bpfs/ceiling, bpfs/rsync and recovery time against the aim.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np

from bench import proc, stats
from bench.cleanup import Cleanup, force_unmount
from bench.config import BLOCK, GiB, MiB, human_bytes
from bench.targets import REPO, bpfs_command, bpfs_env, store_log_tail

#: The aims of the issue: replication within 2x of the raw aioquic ceiling, 1 GiB recovered in < 60 s.
AIM_CEILING_RATIO = 0.5
AIM_RECOVERY_SECONDS_PER_GIB = 60.0
#: Other load (cores) above which the report says the wall-clock figures were disturbed.
BUSY_CORES = 0.5
SYNC_TIMEOUT = 3600
QUOTA = "4G"
COLUMNS = ("bpfs", "ceiling", "rsync")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class ReplicationError(RuntimeError):
    """A step went wrong: wrong data recovered, a command that reported failure, ..."""


# -- small helpers ------------------------------------------------------------------------------

def _cpu_with_children(pid: int) -> float | None:
    """utime + stime + cutime + cstime of ``pid`` (its own CPU and that of the children it reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def _busy() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, /proc/stat), for the contention figure."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return float("nan")


def _others(res: dict, busy0: float, measured: float) -> None:
    """Record how much CPU other processes took during the transfer (cores busy on average)."""
    other = _busy() - busy0 - measured
    if other == other:  # not NaN
        res["others_cores"] = max(0.0, other) / res["seconds"]


def _children_cpu() -> float:
    """CPU seconds of this process's terminated and waited-for children so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _has_children(pid: int) -> bool:
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                if f.read().strip():
                    return True
    except OSError:
        return False
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def make_source(path: Path, total: int, seed: int = 2024) -> str:
    """Write ``total`` incompressible bytes (seeded, no repeated block) to a plain file; its SHA-256."""
    rng = np.random.default_rng(seed)
    h = hashlib.sha256()
    with open(path, "wb", buffering=0) as f:
        left = total
        while left:
            block = rng.bytes(min(left, BLOCK))
            f.write(block)
            h.update(block)
            left -= len(block)
        os.fsync(f.fileno())
    return h.hexdigest()


def _copy_into(src: Path, dst: Path) -> None:
    """Copy a plain file into a mount in 1 MiB writes, fsync, close: its data is in the packs."""
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            while n := fin.readinto(buf):
                out = view[:n]
                while out:
                    out = out[os.write(fd, out):]
            os.fsync(fd)
        finally:
            os.close(fd)


def _cold() -> bool:
    """sync and drop the page cache (False if not permitted)."""
    return proc.drop_caches()


# -- bpfs: two stores, a partnership, sync, recovery -----------------------------------------------

class BpfsPair:
    """Stores A (mounted) and B (``bpfs serve``) in ``base``; everything undone by ``destroy``."""

    def __init__(self, base: Path, cleanup: Cleanup):
        self.base = base
        self.cleanup = cleanup
        self.a, self.b, self.new = base / "A", base / "B", base / "NEW"
        self.mnt_a, self.mnt_new = base / "mntA", base / "mntNEW"
        self.a_id = self.b_id = self.recovery_secret = None
        self.port: int | None = None
        self.pid_a = self.pid_b = None
        self.mounted: list[Path] = []
        self.serving = False
        self.problems: list[str] = []

    def _bpfs(self, *args: str, timeout: float = 600, env: dict | None = None):
        # no broker: everything here is reached by address (a recovery also asks the brokers it
        # knows, which would add a wait for one that does not answer on this machine)
        return proc.run(bpfs_command(*args), env={**bpfs_env(), "BPFS_BROKER": "none", **(env or {})}, cwd=REPO,
                        timeout=timeout)

    @staticmethod
    def _pid(store: Path) -> int | None:
        try:
            with open(store / "daemon.json") as f:
                return int(json.load(f)["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def setup(self) -> None:
        """init A and B, serve B, invite A, mount A: everything before the data goes in."""
        self.base.mkdir(parents=True)
        a = json.loads(self._bpfs("init", str(self.a), "--kdf", "interactive", "--json", timeout=120).stdout)
        b = json.loads(self._bpfs("init", str(self.b), "--kdf", "interactive", "--json", timeout=120).stdout)
        self.a_id, self.recovery_secret, self.b_id = a["peer_id"], a["recovery_secret"], b["peer_id"]
        self.serving = True  # from here on destroy() tries `bpfs stop B`
        self._bpfs("serve", str(self.b), "--listen", "127.0.0.1:0", timeout=120)
        self.pid_b = self._pid(self.b)
        if self.pid_b:
            self.cleanup.add_pid(self.pid_b)
        info = json.loads(self._bpfs("id", "--store", str(self.b), "--json", timeout=60).stdout)
        addrs = [a for a in info.get("addresses") or [] if a.startswith("127.0.0.1:")]
        if not addrs:
            raise ReplicationError(f"`bpfs id --store B --json` gives no 127.0.0.1 address: {info}")
        self.port = int(addrs[0].rsplit(":", 1)[1])
        if self.pid_b is None:
            raise ReplicationError("`bpfs serve` returned but B/daemon.json has no readable pid")
        self._bpfs("pair", str(self.b), "--accept", self.a_id, "--offer", QUOTA, "--ask", QUOTA, timeout=120)
        self.pid_a = self._mount(self.a, self.mnt_a, "--listen", "127.0.0.1:0")

    def _mount(self, store: Path, mnt: Path, *extra: str) -> int:
        mnt.mkdir(exist_ok=True)
        self._bpfs("mount", str(store), str(mnt), *extra, timeout=120)
        if not proc.is_mounted(mnt):
            raise ReplicationError(f"`bpfs mount` succeeded but {mnt} is not a mount point")
        self.mounted.append(mnt)
        self.cleanup.add_mount(mnt, lambda: self._bpfs("umount", str(mnt), timeout=600))
        pid = self._pid(store)
        if pid is None:
            raise ReplicationError(f"{store.name} mounted, but daemon.json has no readable pid")
        self.cleanup.add_pid(pid)
        return pid

    def _umount(self, mnt: Path) -> None:
        self._bpfs("umount", str(mnt), timeout=600)
        self.mounted.remove(mnt)
        self.cleanup.forget_mount(mnt)

    def replicate(self, nbytes: int) -> dict:
        """Timed: pair A with B, then ``bpfs sync A``. CPU of both daemons over that time."""
        cold = _cold()
        ca0, cb0 = proc.cpu_seconds(self.pid_a), proc.cpu_seconds(self.pid_b)
        busy0, cc0 = _busy(), _children_cpu()
        t0 = time.perf_counter()
        self._bpfs("pair", str(self.a), "--direct", f"127.0.0.1:{self.port}", "--expect", self.b_id,
                   "--offer", QUOTA, "--ask", QUOTA, "--yes", timeout=120)
        t1 = time.perf_counter()
        out = self._bpfs("sync", str(self.a), "--timeout", str(SYNC_TIMEOUT), "--json",
                         timeout=SYNC_TIMEOUT + 60)
        t2 = time.perf_counter()
        ca1, cb1 = proc.cpu_seconds(self.pid_a), proc.cpu_seconds(self.pid_b)
        res = {"seconds": t2 - t0, "pair_seconds": t1 - t0, "sync_seconds": t2 - t1, "bytes": nbytes,
               "cold": cold, "cpu_cli": _children_cpu() - cc0}
        if None not in (ca0, ca1, cb0, cb1):
            res.update(cpu_a=ca1 - ca0, cpu_b=cb1 - cb0)
            _others(res, busy0, res["cpu_a"] + res["cpu_b"] + res["cpu_cli"])
        try:
            res["sync"] = json.loads(out.stdout)
        except ValueError:
            res["sync"] = out.stdout.strip()
        try:
            st = json.loads(self._bpfs("status", str(self.a), "--json", timeout=60).stdout)
            part = [p for p in st.get("partners", []) if p.get("peer_id") == self.b_id]
            if part:
                res["wire_bytes"] = part[0].get("replicated_bytes")
                if part[0].get("pending_bytes"):
                    self.problems.append(f"after `bpfs sync` exited 0, status shows "
                                         f"{part[0]['pending_bytes']} bytes still pending")
        except (proc.CommandError, ValueError) as e:
            self.problems.append(f"`bpfs status A --json` after sync: {e}")
        return res

    def recover(self, nbytes: int, digest: str, name: str) -> dict:
        """Unmount A, then timed: ``bpfs recover NEW``; then (untimed) mount NEW and check the file."""
        self._umount(self.mnt_a)
        cold = _cold()
        cb0, cc0, busy0 = proc.cpu_seconds(self.pid_b), _children_cpu(), _busy()
        t0 = time.perf_counter()
        out = self._bpfs("recover", str(self.new), "--from", f"127.0.0.1:{self.port}", "--expect", self.b_id,
                         "--kdf", "interactive", "--json", timeout=SYNC_TIMEOUT,
                         env={"BPFS_RECOVERY": self.recovery_secret})
        seconds = time.perf_counter() - t0
        cb1, cc1 = proc.cpu_seconds(self.pid_b), _children_cpu()
        res = {"seconds": seconds, "bytes": nbytes, "cold": cold, "cpu_client": cc1 - cc0}
        if cb0 is not None and cb1 is not None:
            res["cpu_b"] = cb1 - cb0
            _others(res, busy0, res["cpu_b"] + res["cpu_client"])
        try:
            res["recover"] = json.loads(out.stdout)
        except ValueError:
            res["recover"] = out.stdout.strip()
        # The check: the recovered store mounts and gives the same bytes.
        self._mount(self.new, self.mnt_new, "--listen", "none")
        try:
            got, size = _sha256_file(self.mnt_new / name)
        finally:
            self._umount(self.mnt_new)
        if size != nbytes or got != digest:
            raise ReplicationError(f"recovered {name} differs: {size} bytes, sha256 {got[:16]}..., "
                                   f"expected {nbytes} bytes, {digest[:16]}...")
        res["checked"] = True
        return res

    def log_tail(self, lines: int = 15) -> str:
        return store_log_tail((self.a, self.b, self.new), lines)

    def destroy(self) -> None:
        for mnt in list(reversed(self.mounted)):
            try:
                self._umount(mnt)
            except Exception as e:  # noqa: BLE001 - cleanup goes on
                self.problems.append(f"`bpfs umount {mnt.name}` failed: {str(e).splitlines()[0]}")
            if proc.is_mounted(mnt):
                force_unmount(str(mnt))
            self.cleanup.forget_mount(mnt)
            if mnt in self.mounted:
                self.mounted.remove(mnt)
        if self.serving and (self.b / "daemon.json").exists():
            try:
                self._bpfs("stop", str(self.b), timeout=120)
            except Exception as e:  # noqa: BLE001
                self.problems.append(f"`bpfs stop B` failed: {str(e).splitlines()[0]}")
        for pid in (self.pid_a, self.pid_b):
            if pid and proc.pid_alive(pid):
                for _ in range(50):
                    if not proc.pid_alive(pid):
                        break
                    time.sleep(0.1)
                else:
                    self.problems.append(f"daemon pid {pid} still alive after umount/stop; killing it")
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        if not proc.mounts_under(self.base):
            shutil.rmtree(self.base, ignore_errors=True)


# -- the raw aioquic ceiling ----------------------------------------------------------------------

def quic_ceiling(nbytes: int) -> dict:
    """bench/quic_ceiling.py's process mode with bpfs's default datagram size and congestion control."""
    import trio

    from bench import quic_ceiling as qc
    from bpfs.net.quic import TransportConfig

    cfg = TransportConfig()
    args = argparse.Namespace(datagram=cfg.max_datagram_size, cc=cfg.congestion_control)
    total = -(-nbytes // qc.CHUNK) * qc.CHUNK
    busy0, own0, cc0, t0 = _busy(), time.process_time(), _children_cpu(), time.perf_counter()
    r = trio.run(qc._process_mode, args, total)
    whole = {"seconds": time.perf_counter() - t0}  # with the receiver's start-up and the handshake
    _others(whole, busy0, time.process_time() - own0 + _children_cpu() - cc0)
    if not r["ok"]:
        raise ReplicationError("quic ceiling: the payload's SHA-256 differs at the receiver")
    res = {"seconds": r["wall"], "bytes": total, "cpu_send": r["cpu_send"], "cpu_recv": r["cpu_recv"],
           "datagram": args.datagram, "cc": args.cc,
           "cpu_wait": (r["sched_send"][1] + r["sched_recv"][1]) / r["wall"]}
    if "others_cores" in whole:
        res["others_cores"] = whole["others_cores"]
    return res


# -- rsync over ssh to a private sshd -------------------------------------------------------------

class Sshd:
    """An sshd on 127.0.0.1:PORT with throwaway host and client keys in ``base``, as a child process."""

    def __init__(self, base: Path, cleanup: Cleanup):
        self.base = base
        self.cleanup = cleanup
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.user = getpass.getuser()
        self.key = base / "client_ed25519"

    @staticmethod
    def available() -> tuple[bool, str]:
        missing = [t for t in ("rsync", "ssh", "ssh-keygen") if not shutil.which(t)]
        if not Sshd._binary():
            missing.append("sshd (Debian: openssh-server)")
        return (not missing, "missing: " + ", ".join(missing) if missing else "")

    @staticmethod
    def _binary() -> str | None:
        return shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/bin/sshd")
                                             if os.access(p, os.X_OK)), None)

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o700)
        for name in ("host_ed25519", "client_ed25519"):
            proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bpfs-bench", "-f",
                      str(self.base / name)], timeout=60)
        shutil.copy(self.base / "client_ed25519.pub", self.base / "authorized_keys")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation directory
        last = ""
        for _attempt in range(5):
            self.port = _free_port()
            cfg = self.base / "sshd_config"
            cfg.write_text("\n".join([
                f"ListenAddress 127.0.0.1:{self.port}",
                f"HostKey {self.base / 'host_ed25519'}",
                f"AuthorizedKeysFile {self.base / 'authorized_keys'}",
                "PidFile none", "AuthenticationMethods publickey", "PubkeyAuthentication yes",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
                "StrictModes no", "PermitRootLogin prohibit-password", f"AllowUsers {self.user}",
                "X11Forwarding no", "PrintMotd no", "PrintLastLog no", "LogLevel ERROR", ""]))
            log = open(self.base / "sshd.log", "ab")
            self.proc = subprocess.Popen([self._binary(), "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
            log.close()
            self.cleanup.add_pid(self.proc.pid)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                r = proc.run(self.ssh_argv() + [f"{self.user}@127.0.0.1", "true"], timeout=30, check=False)
                if r.returncode == 0:
                    return
                last = (r.stderr or r.stdout).strip()
                time.sleep(0.2)
            self.stop()
            try:
                last = (self.base / "sshd.log").read_text(errors="replace").strip() or last
            except OSError:
                pass
        raise ReplicationError(f"sshd on 127.0.0.1 did not come up: {proc._tail(last)}")

    def ssh_argv(self) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-p", str(self.port), "-i", str(self.key), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR"]

    def rsync(self, src: Path, dest: Path, nbytes: int) -> dict:
        """Timed: ``rsync -a SRC USER@127.0.0.1:DEST`` (a new DEST). CPU of both ends."""
        cold = _cold()
        cs0, cc0, busy0 = _cpu_with_children(self.proc.pid), _children_cpu(), _busy()
        t0 = time.perf_counter()
        proc.run(["rsync", "-a", "-e", " ".join(self.ssh_argv()), str(src), f"{self.user}@127.0.0.1:{dest}/"],
                 timeout=SYNC_TIMEOUT)
        seconds = time.perf_counter() - t0
        cc1 = _children_cpu()
        deadline = time.monotonic() + 5  # let sshd reap its session, so its CPU is counted
        while _has_children(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        cs1 = _cpu_with_children(self.proc.pid)
        res = {"seconds": seconds, "bytes": nbytes, "cold": cold, "cpu_client": cc1 - cc0}
        if cs0 is not None and cs1 is not None:
            res["cpu_server"] = cs1 - cs0
            _others(res, busy0, res["cpu_client"] + res["cpu_server"])
        got = dest / src.name
        if not got.is_file() or got.stat().st_size != nbytes:
            raise ReplicationError(f"rsync: {got} missing or of the wrong size")
        return res

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# -- the runs -------------------------------------------------------------------------------------

def run_replication(tmp: Path, nbytes: int, runs: int, cleanup: Cleanup, log: Callable[[str], None] = _log,
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
                        r = sample["rsync"] = sshd.rsync(src, dest, nbytes)
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
        _copy_into(src, pair.mnt_a / src.name)
        os.sync()
        step = "replication (pair --direct, sync)"
        r = sample["bpfs"] = pair.replicate(nbytes)
        log(f"  run {run} bpfs sync    {nbytes / r['seconds'] / 1e6:8.1f} MB/s  ({r['seconds']:.2f} s: "
            f"pair {r['pair_seconds']:.2f} s, sync {r['sync_seconds']:.2f} s)")
        step = "recovery"
        r = sample["recovery"] = pair.recover(nbytes, digest, src.name)
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


# -- summary and report ---------------------------------------------------------------------------

def _per_gib(cpu: float, nbytes: int) -> float:
    return cpu / (nbytes / GiB)


def summarize(out: dict) -> dict:
    """Medians (with min, max) of throughput, seconds and CPU s/GiB per column; the ratios."""
    col: dict[str, dict[str, list[float]]] = {}

    def add(name: str, key: str, value: float | None) -> None:
        if value is not None:
            col.setdefault(name, {}).setdefault(key, []).append(value)

    def sides(name: str, r: dict, a: float | None, b: float | None) -> None:
        """CPU s/GiB of each end and in total, the CPU-bound rate, the other load on the machine."""
        if a is None or b is None:
            return
        add(name, "cpu_a", _per_gib(a, r["bytes"]))
        add(name, "cpu_b", _per_gib(b, r["bytes"]))
        add(name, "cpu", _per_gib(a + b, r["bytes"]))
        if max(a, b) > 0:
            add(name, "idle_mbps", r["bytes"] / max(a, b) / 1e6)
        add(name, "others_cores", r.get("others_cores"))

    for s in out["runs"]:
        if "bpfs" in s:
            r = s["bpfs"]
            add("bpfs", "mbps", r["bytes"] / r["seconds"] / 1e6)
            add("bpfs", "seconds", r["seconds"])
            add("bpfs", "sync_seconds", r["sync_seconds"])
            sides("bpfs", r, r.get("cpu_a"), r.get("cpu_b"))
            if r.get("wire_bytes"):
                add("bpfs", "wire_overhead", r["wire_bytes"] / r["bytes"] - 1)
        if "recovery" in s:
            r = s["recovery"]
            add("recovery", "mbps", r["bytes"] / r["seconds"] / 1e6)
            add("recovery", "seconds", r["seconds"])
            add("recovery", "seconds_per_gib", r["seconds"] / (r["bytes"] / GiB))
            sides("recovery", r, r["cpu_client"], r.get("cpu_b"))
        if "ceiling" in s:
            r = s["ceiling"]
            add("ceiling", "mbps", r["bytes"] / r["seconds"] / 1e6)
            add("ceiling", "seconds", r["seconds"])
            sides("ceiling", r, r["cpu_send"], r["cpu_recv"])
        if "rsync" in s:
            r = s["rsync"]
            add("rsync", "mbps", r["bytes"] / r["seconds"] / 1e6)
            add("rsync", "seconds", r["seconds"])
            sides("rsync", r, r["cpu_client"], r.get("cpu_server"))
    summary = {name: {k: stats.summarize(v) for k, v in keys.items()} for name, keys in col.items()}
    ratios = {}
    bpfs = summary.get("bpfs", {})
    for other in ("ceiling", "rsync"):
        r = stats.ratio(bpfs.get("mbps"), summary.get(other, {}).get("mbps"))
        if r is not None:
            ratios[f"bpfs/{other}"] = r
        r = stats.ratio(bpfs.get("cpu"), summary.get(other, {}).get("cpu"))
        if r is not None:
            ratios[f"bpfs/{other} cpu"] = r
        r = stats.ratio(bpfs.get("idle_mbps"), summary.get(other, {}).get("idle_mbps"))
        if r is not None:
            ratios[f"bpfs/{other} idle"] = r
    rec = summary.get("recovery", {}).get("seconds_per_gib")
    if rec:
        ratios["recovery/aim"] = rec["median"] / AIM_RECOVERY_SECONDS_PER_GIB
    summary["ratios"] = ratios
    return summary


def report_lines(rep: dict) -> list[str]:
    """The printed section: one row per column, then the ratios against the aims."""
    summary = rep.get("summary") or summarize(rep)
    size = human_bytes(rep["bytes"])
    rows = [["transfer over loopback", "throughput", "seconds", "CPU s/GiB (sender + receiver)",
             "CPU-bound", "other load"]]
    names = {"bpfs": f"bpfs replication of {size} (pair + sync)",
             "ceiling": "raw aioquic ceiling (1 stream{dg})",
             "rsync": "rsync -a over ssh",
             "recovery": f"bpfs recovery of {size} (recover)"}
    for name in ("bpfs", "ceiling", "rsync", "recovery"):
        per = summary.get(name)
        if not per:
            continue
        label = names[name]
        if name == "ceiling":
            dg = next((s["ceiling"] for s in rep["runs"] if "ceiling" in s), None)
            label = label.format(dg=f", {dg['datagram']} B datagrams, {dg['cc']}" if dg else "")
        cpu = "n/a"
        if per.get("cpu"):
            cpu = (f"{stats.num(per['cpu']['median'])} = {stats.num(per['cpu_a']['median'])} + "
                   f"{stats.num(per['cpu_b']['median'])}")
        elif per.get("cpu_a"):
            cpu = f"{stats.num(per['cpu_a']['median'])} + n/a"
        idle = f"{stats.num(per['idle_mbps']['median'])} MB/s" if per.get("idle_mbps") else "n/a"
        others = f"{per['others_cores']['median']:.2f} cores" if per.get("others_cores") else "n/a"
        rows.append([label, stats.cell(per.get("mbps"), "MB/s"), stats.cell(per.get("seconds"), "s"), cpu, idle, others])
    if len(rows) == 1:
        return ["no replication results"]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("CPU: bpfs = A's mount daemon + B's serve daemon; ceiling = sender + receiver process; "
                 "rsync = client (rsync, ssh) + sshd side; recovery = `bpfs recover` + B's daemon.")
    lines.append("CPU-bound = data / CPU time of the busier end: the rate with an idle core per end. "
                 "Other load = CPU the rest of the machine used meanwhile (other processes, kernel "
                 "threads), in cores; when it is high, compare CPU s/GiB rather than throughput.")
    ratios = summary.get("ratios", {})
    parts = []
    if "bpfs/ceiling" in ratios:
        met = "met" if ratios["bpfs/ceiling"] >= AIM_CEILING_RATIO else "NOT met"
        parts.append(f"bpfs/ceiling {ratios['bpfs/ceiling']:.2f} (aim >= {AIM_CEILING_RATIO:.2f}, "
                     f"within 2x: {met})")
    if "bpfs/rsync" in ratios:
        parts.append(f"bpfs/rsync {ratios['bpfs/rsync']:.2f}")
    cpu_parts = [f"{k.replace(' cpu', '')} {v:.2f}" for k, v in ratios.items() if k.endswith(" cpu")]
    idle_parts = [f"{k.replace(' idle', '')} {v:.2f}" for k, v in ratios.items() if k.endswith(" idle")]
    if parts:
        lines.append("throughput ratios: " + ", ".join(parts))
    if idle_parts:
        lines.append("CPU-bound throughput ratios: " + ", ".join(idle_parts))
    if cpu_parts:
        lines.append("CPU s/GiB ratios (lower is better for bpfs): " + ", ".join(cpu_parts))
    rec = summary.get("recovery", {}).get("seconds_per_gib")
    if rec:
        met = "met" if rec["median"] < AIM_RECOVERY_SECONDS_PER_GIB else "NOT met"
        line = f"recovery: {rec['median']:.1f} s per GiB (aim < {AIM_RECOVERY_SECONDS_PER_GIB:.0f} s per GiB: {met})"
        per = summary["recovery"]
        if per.get("others_cores") and per["others_cores"]["median"] > BUSY_CORES and per.get("idle_mbps"):
            line += (f"; the machine was busy with other work ({per['others_cores']['median']:.2f} cores), "
                     f"CPU-bound: {GiB / 1e6 / per['idle_mbps']['median']:.1f} s per GiB")
        lines.append(line)
    bp = summary.get("bpfs", {})
    extra = []
    if bp.get("sync_seconds"):
        extra.append(f"of the bpfs time, `bpfs sync` alone {bp['sync_seconds']['median']:.2f} s")
    if bp.get("wire_overhead"):
        extra.append(f"bytes replicated (packs) = data + {100 * bp['wire_overhead']['median']:.1f} %")
    if extra:
        lines.append("; ".join(extra))
    return lines


def print_report(rep: dict, runs: int) -> None:
    stats.print_standalone("bpfs replication and recovery", rep, runs, report_lines(rep))


# -- standalone -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replication", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB (unless --gib is given)")
    p.add_argument("--gib", type=float, metavar="X", help="data size in GiB (default 1, or 0.25 with --quick)")
    p.add_argument("--runs", type=int, default=3, metavar="N", help="repeat N times (default 3)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also save the results as JSON")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/bpfs-bench"), metavar="DIR",
                   help="where the stores, mounts and sshd keys go (default /var/tmp/bpfs-bench)")
    args = p.parse_args(argv)
    gib = args.gib if args.gib is not None else (0.25 if args.quick else 1.0)
    nbytes = int(gib * GiB) // MiB * MiB
    if nbytes < MiB or args.runs < 1:
        p.error("--gib must give at least 1 MiB and --runs must be at least 1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    rep: dict = {}
    interrupted = False
    with Cleanup(_log) as cleanup:
        tmp = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
        cleanup.add_dir(tmp)
        (tmp / "bench.pid").write_text(f"{os.getpid()}\n")
        rep["loadavg_start"] = os.getloadavg()
        try:
            run_replication(tmp, nbytes, args.runs, cleanup, _log, out=rep)
        except KeyboardInterrupt:
            interrupted = True
            _log("interrupted: cleaning up")
            rep.setdefault("notes", []).append("interrupted: the results are incomplete")
            if "runs" in rep:
                rep["summary"] = summarize(rep)
        rep["loadavg_end"] = os.getloadavg()
    if "bytes" in rep:
        print_report(rep, args.runs)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rep, indent=2, default=str) + "\n")
    if interrupted:
        return 130
    return 1 if rep.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
