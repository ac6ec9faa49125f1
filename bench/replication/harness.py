"""The set-up of the replication benchmark, untimed: the stores and their daemons (``BpfsPair``: A, B
and, for the recovery from two partners, C), the QUIC library and UDP I/O mode they run with
(``quic_env``, checked in the running daemons by ``daemon_transport``), the private sshd of the rsync
reference (``Sshd``), the source data and copying it into a mount."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from bench import proc
from bench.cleanup import Cleanup, force_unmount
from bench.config import BLOCK, MiB
from bench.targets import REPO, bpfs_command, bpfs_env, store_log_tail

SYNC_TIMEOUT = 3600
QUOTA = "4G"
LIBRARIES = ("aioquic", "qh3")  # TransportConfig.quic_library (BPFS_QUIC)
OFFLOADS = ("on", "off")  # UDP GSO / GRO (TransportConfig.udp_offload; BPFS_UDP_OFFLOAD=0 turns it off)


class ReplicationError(RuntimeError):
    """A step went wrong: wrong data recovered, a command that reported failure, ..."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def make_source(path: Path, total: int, seed: int = 2024) -> str:
    """Write ``total`` incompressible bytes (seeded, no repeated block) to a plain file; its SHA-256."""
    import numpy as np  # here: the rest of the package (the report, its tests) does without the bench extra

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


def copy_into(src: Path, dst: Path) -> None:
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


# -- the QUIC library and UDP I/O mode of every bpfs process --------------------------------------

def quic_env(library: str, offload: str) -> dict[str, str]:
    """The environment that makes a bpfs process (and the daemons it starts, which inherit it) use
    ``library`` ("aioquic" or "qh3") with UDP GSO / GRO ``offload`` ("on" or "off")."""
    if library not in LIBRARIES or offload not in OFFLOADS:
        raise ValueError(f"library must be one of {LIBRARIES} and offload one of {OFFLOADS}: {library!r}, {offload!r}")
    return {"BPFS_QUIC": library, "BPFS_UDP_OFFLOAD": "1" if offload == "on" else "0"}


def library_available(library: str) -> str:
    """'' if bpfs can use ``library`` here, else why not (qh3 is an optional extra, pinned exactly)."""
    try:
        from bpfs.net import library as lib

        lib.load_library(library)
    except (ImportError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return ""


def daemon_transport(pid: int) -> dict:
    """What a running bpfs daemon really uses, from /proc: its BPFS_QUIC and BPFS_UDP_OFFLOAD, and
    whether qh3's native module is mapped into it (aioquic's always is: bpfs.net imports it either
    way). Keys: 'BPFS_QUIC', 'BPFS_UDP_OFFLOAD' (None when unset), 'qh3_loaded' (None if unreadable)."""
    res: dict = {"BPFS_QUIC": None, "BPFS_UDP_OFFLOAD": None, "qh3_loaded": None}
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                key, _, value = item.decode(errors="replace").partition("=")
                if key in ("BPFS_QUIC", "BPFS_UDP_OFFLOAD"):
                    res[key] = value
        with open(f"/proc/{pid}/maps") as f:
            res["qh3_loaded"] = any("/qh3/_hazmat" in line for line in f)
    except OSError:
        pass
    return res


def transport_mismatch(pid: int, name: str, library: str, offload: str) -> str:
    """'' if daemon ``pid`` runs ``library`` with ``offload`` as asked, else what differs."""
    got = daemon_transport(pid)
    want = quic_env(library, offload)
    wrong = [f"{k}={got[k]!r}" for k in want if got[k] != want[k]]
    if got["qh3_loaded"] is not None and got["qh3_loaded"] != (library == "qh3"):
        wrong.append("qh3 " + ("loaded" if got["qh3_loaded"] else "not loaded"))
    if not wrong:
        return ""
    return f"{name}'s daemon (pid {pid}) asked for {library}, offload {offload}: " + ", ".join(wrong)


# -- bpfs: the stores, the partnerships; the timed sync and recovery are in measure.py -------------

class BpfsPair:
    """Stores A (mounted) and B (``bpfs serve``) in ``base``, and C (served too, inviting A) with
    ``third=True``; everything undone by ``destroy``. ``env`` goes to every bpfs command, and so to
    the daemons they start (``quic_env``: the QUIC library and UDP I/O mode)."""

    def __init__(self, base: Path, cleanup: Cleanup, env: dict | None = None, third: bool = False):
        self.base = base
        self.cleanup = cleanup
        self.env = dict(env or {})
        self.third = third
        self.a, self.b, self.new = base / "A", base / "B", base / "NEW"
        self.c, self.new2 = base / "C", base / "NEW2"
        self.mnt_a, self.mnt_new = base / "mntA", base / "mntNEW"
        self.a_id = self.b_id = self.c_id = self.recovery_secret = None
        self.port: int | None = None
        self.port_c: int | None = None
        self.pid_a = self.pid_b = self.pid_c = None
        self.mounted: list[Path] = []
        self.serving = False
        self.problems: list[str] = []

    def bpfs(self, *args: str, timeout: float = 600, env: dict | None = None):
        # no broker: everything here is reached by address (a recovery also asks the brokers it
        # knows, which would add a wait for one that does not answer on this machine)
        return proc.run(bpfs_command(*args), env={**bpfs_env(), "BPFS_BROKER": "none", **self.env, **(env or {})},
                        cwd=REPO, timeout=timeout)

    @staticmethod
    def daemon_pid(store: Path) -> int | None:
        try:
            with open(store / "daemon.json") as f:
                return int(json.load(f)["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _serve(self, store: Path) -> tuple[int, int]:
        """``bpfs serve STORE --listen 127.0.0.1:0``: (its daemon's pid, its port)."""
        self.bpfs("serve", str(store), "--listen", "127.0.0.1:0", timeout=120)
        pid = self.daemon_pid(store)
        if pid is None:
            raise ReplicationError(f"`bpfs serve` returned but {store.name}/daemon.json has no readable pid")
        self.cleanup.add_pid(pid)
        info = json.loads(self.bpfs("id", "--store", str(store), "--json", timeout=60).stdout)
        addrs = [a for a in info.get("addresses") or [] if a.startswith("127.0.0.1:")]
        if not addrs:
            raise ReplicationError(f"`bpfs id --store {store.name} --json` gives no 127.0.0.1 address: {info}")
        return pid, int(addrs[0].rsplit(":", 1)[1])

    def setup(self) -> None:
        """init A and B (and C), serve B (and C), invite A, mount A: everything before the data goes in."""
        self.base.mkdir(parents=True)
        a = json.loads(self.bpfs("init", str(self.a), "--kdf", "interactive", "--json", timeout=120).stdout)
        b = json.loads(self.bpfs("init", str(self.b), "--kdf", "interactive", "--json", timeout=120).stdout)
        self.a_id, self.recovery_secret, self.b_id = a["peer_id"], a["recovery_secret"], b["peer_id"]
        self.serving = True  # from here on destroy() tries `bpfs stop B` (and C)
        self.pid_b, self.port = self._serve(self.b)
        self.bpfs("pair", str(self.b), "--accept", self.a_id, "--offer", QUOTA, "--ask", QUOTA, timeout=120)
        if self.third:
            c = json.loads(self.bpfs("init", str(self.c), "--kdf", "interactive", "--json", timeout=120).stdout)
            self.c_id = c["peer_id"]
            self.pid_c, self.port_c = self._serve(self.c)
            self.bpfs("pair", str(self.c), "--accept", self.a_id, "--offer", QUOTA, "--ask", QUOTA, timeout=120)
        self.pid_a = self.mount(self.a, self.mnt_a, "--listen", "127.0.0.1:0")

    def pair_and_sync(self, port: int, peer: str) -> float:
        """Untimed helper: ``bpfs pair A --direct 127.0.0.1:PORT --expect PEER``, ``bpfs sync A``; seconds."""
        t0 = time.perf_counter()
        self.bpfs("pair", str(self.a), "--direct", f"127.0.0.1:{port}", "--expect", peer, "--offer", QUOTA,
                  "--ask", QUOTA, "--yes", timeout=120)
        self.bpfs("sync", str(self.a), "--timeout", str(SYNC_TIMEOUT), timeout=SYNC_TIMEOUT + 60)
        return time.perf_counter() - t0

    def mount(self, store: Path, mnt: Path, *extra: str) -> int:
        mnt.mkdir(exist_ok=True)
        self.bpfs("mount", str(store), str(mnt), *extra, timeout=120)
        if not proc.is_mounted(mnt):
            raise ReplicationError(f"`bpfs mount` succeeded but {mnt} is not a mount point")
        self.mounted.append(mnt)
        self.cleanup.add_mount(mnt, lambda: self.bpfs("umount", str(mnt), timeout=600))
        pid = self.daemon_pid(store)
        if pid is None:
            raise ReplicationError(f"{store.name} mounted, but daemon.json has no readable pid")
        self.cleanup.add_pid(pid)
        return pid

    def umount(self, mnt: Path) -> None:
        self.bpfs("umount", str(mnt), timeout=600)
        self.mounted.remove(mnt)
        self.cleanup.forget_mount(mnt)

    def log_tail(self, lines: int = 15) -> str:
        return store_log_tail((self.a, self.b, self.c, self.new, self.new2), lines)

    def destroy(self) -> None:
        for mnt in list(reversed(self.mounted)):
            try:
                self.umount(mnt)
            except Exception as e:  # noqa: BLE001 - cleanup goes on
                self.problems.append(f"`bpfs umount {mnt.name}` failed: {str(e).splitlines()[0]}")
            if proc.is_mounted(mnt):
                force_unmount(str(mnt))
            self.cleanup.forget_mount(mnt)
            if mnt in self.mounted:
                self.mounted.remove(mnt)
        for name, store in (("B", self.b), ("C", self.c)):
            if self.serving and (store / "daemon.json").exists():
                try:
                    self.bpfs("stop", str(store), timeout=120)
                except Exception as e:  # noqa: BLE001
                    self.problems.append(f"`bpfs stop {name}` failed: {str(e).splitlines()[0]}")
        for pid in (self.pid_a, self.pid_b, self.pid_c):
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


# -- rsync over ssh to a private sshd (the timed rsync is in measure.py) ----------------------------

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
            self.port = free_port()
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
