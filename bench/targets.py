"""The filesystems under test: the raw disk (a plain directory), gocryptfs and bpfs.

Each ``Target`` is one fresh instance in its own directory: ``create()`` then
``mount()``; workloads use ``root``; ``remount_cold()`` unmounts, drops the
kernel caches and mounts again; ``destroy()`` unmounts and deletes everything.
bpfs is driven only through its CLI (``python -m bpfs init/mount/umount``).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from bench import proc
from bench.cleanup import Cleanup, force_unmount
from bench.config import PASSPHRASE
from tests.helpers import cli as test_cli

#: The repository root (parent of the bench package): bpfs is imported from here.
REPO = test_cli.REPO


class Target:
    """One instance of a filesystem, living in ``base``."""

    name = "?"

    def __init__(self, base: Path, cleanup: Cleanup):
        self.base = Path(base)
        self.cleanup = cleanup
        self.mounted = False
        self.cold_ok = True  # False once dropping the caches was refused
        self.problems: list[str] = []  # odd things seen that did not stop the run

    @property
    def root(self) -> Path:
        """The directory the workloads write into."""
        raise NotImplementedError

    def create(self) -> None:
        self.base.mkdir(parents=True, exist_ok=False)

    def mount(self) -> None:
        self.mounted = True

    def umount(self) -> None:
        self.mounted = False

    def remount_cold(self) -> None:
        """Unmount, drop page/dentry/inode caches, mount again."""
        self.umount()
        if not proc.drop_caches():
            self.cold_ok = False
        self.mount()

    def store_bytes(self) -> int:
        """Bytes this instance keeps on the underlying disk (sum of file sizes)."""
        raise NotImplementedError

    def log_tail(self, lines: int = 30) -> str:
        """The end of the filesystem daemon's log, if it keeps one ('' otherwise)."""
        return ""

    def daemon_cpu(self) -> float | None:
        """CPU seconds used so far by the current filesystem daemon (None: not known)."""
        return None

    def destroy(self) -> None:
        """Unmount (forcefully if need be) and delete the instance; raises if unmounting failed."""
        try:
            if self.mounted:
                self.umount()
        finally:
            self.mounted = False
            if proc.is_mounted(self.root):
                force_unmount(str(self.root))
            self.cleanup.forget_mount(self.root)
            if not proc.mounts_under(self.base):
                shutil.rmtree(self.base, ignore_errors=True)


class Raw(Target):
    """A plain directory on the disk."""

    name = "raw"

    @property
    def root(self) -> Path:
        return self.base / "dir"

    def create(self) -> None:
        super().create()
        self.root.mkdir()

    def store_bytes(self) -> int:
        return proc.tree_bytes(self.root)


class FuseTarget(Target):
    """Common part of the FUSE targets: a mount point, registered with the cleanup."""

    @property
    def root(self) -> Path:
        return self.base / "mnt"

    def create(self) -> None:
        super().create()
        self.root.mkdir()

    def _mounted(self) -> None:
        if not proc.is_mounted(self.root):
            raise proc.CommandError(f"{self.name}: mount command succeeded but {self.root} is not a mount point")
        self.mounted = True
        self.cleanup.add_mount(self.root, self._unmount_quietly)

    def _unmount_quietly(self) -> None:
        self._do_umount()

    def umount(self) -> None:
        if not self.mounted:
            return
        self._do_umount()
        self.mounted = False
        self.cleanup.forget_mount(self.root)
        if proc.is_mounted(self.root):
            raise proc.CommandError(f"{self.name}: still mounted after unmount: {self.root}")

    def _do_umount(self) -> None:
        raise NotImplementedError


class Gocryptfs(FuseTarget):
    """gocryptfs with a fast scrypt setting (the KDF is not what we measure)."""

    name = "gocryptfs"

    @property
    def cipher(self) -> Path:
        return self.base / "cipher"

    def create(self) -> None:
        super().create()
        self.cipher.mkdir()
        proc.run(["gocryptfs", "-init", "-q", "-extpass", f"echo {PASSPHRASE}", "-scryptn", "10",
                  str(self.cipher)], timeout=120)

    def mount(self) -> None:
        proc.run(["gocryptfs", "-q", "-extpass", f"echo {PASSPHRASE}", str(self.cipher), str(self.root)],
                 timeout=120)
        self._mounted()

    def _do_umount(self) -> None:
        proc.run(["fusermount3", "-u", str(self.root)], timeout=300)
        # gocryptfs exits on its own once unmounted; give it a moment so the next
        # mount of the same cipher dir does not race with the old process.
        for _ in range(50):
            if not proc.is_mounted(self.root):
                break
            time.sleep(0.1)

    def store_bytes(self) -> int:
        return proc.tree_bytes(self.cipher)


def bpfs_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bpfs", *args]


def bpfs_env() -> dict:
    """The environment of a bpfs command: the tests' (this checkout first on PYTHONPATH), with the
    bench's passphrase."""
    return test_cli.bpfs_env(PASSPHRASE)


def store_log_tail(stores, lines: int) -> str:
    """The last `lines` of every daemon log of these store folders, each under a heading."""
    out = []
    for store in stores:
        for path in sorted((Path(store) / "log").glob("*.log")):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {Path(store).name}/log/{path.name}\n" + "\n".join(text))
    return "\n".join(out)


def bpfs_available() -> tuple[bool, str]:
    """(True, '') if ``python -m bpfs --help`` works, else (False, why)."""
    try:
        proc.run(bpfs_command("--help"), env=bpfs_env(), cwd=REPO, timeout=60)
        return True, ""
    except proc.CommandError as e:
        return False, str(e).splitlines()[-1]


class Bpfs(FuseTarget):
    """bpfs through its CLI; records the daemon's peak RSS (VmHWM) before each unmount."""

    name = "bpfs"
    extra_env: dict[str, str] = {}  # added to every bpfs command's environment (a variant's settings)

    def __init__(self, base: Path, cleanup: Cleanup):
        super().__init__(base, cleanup)
        self.pid: int | None = None
        self.last_hwm: int | None = None  # VmHWM read just before the last unmount

    @property
    def store(self) -> Path:
        return self.base / "store"

    def _bpfs(self, *args: str, timeout: float = 600):
        return proc.run(bpfs_command(*args), env={**bpfs_env(), **self.extra_env}, cwd=REPO, timeout=timeout)

    def create(self) -> None:
        super().create()
        self._bpfs("init", str(self.store), "--kdf", "interactive", timeout=120)

    def _daemon_pid(self) -> int | None:
        try:
            with open(self.store / "daemon.json") as f:
                return int(json.load(f)["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def mount(self) -> None:
        self._bpfs("mount", str(self.store), str(self.root), timeout=120)
        self._mounted()
        self.pid = self._daemon_pid()
        if self.pid is None:
            self.problems.append("mounted, but STORE/daemon.json has no readable pid")
        else:
            self.cleanup.add_pid(self.pid)

    def _do_umount(self) -> None:
        self._bpfs("umount", str(self.root), timeout=600)

    def umount(self) -> None:
        if not self.mounted:
            return
        pid = self._daemon_pid() or self.pid
        self.last_hwm = proc.vm_hwm(pid) if pid else None
        super().umount()
        if pid and proc.pid_alive(pid):
            self.problems.append(f"`bpfs umount` returned while daemon pid {pid} was still alive")
            for _ in range(100):
                if not proc.pid_alive(pid):
                    break
                time.sleep(0.1)
        if (self.store / "daemon.json").exists():
            self.problems.append("STORE/daemon.json still present after `bpfs umount`")

    def store_bytes(self) -> int:
        return proc.tree_bytes(self.store)

    def daemon_cpu(self) -> float | None:
        return proc.cpu_seconds(self.pid) if self.pid else None

    def store_breakdown(self) -> dict[str, int]:
        """Bytes per top-level entry of STORE (packs, index, key.json, log, ...)."""
        out = {}
        for entry in sorted(self.store.iterdir()):
            out[entry.name] = proc.tree_bytes(entry) if entry.is_dir() else entry.stat().st_size
        return out

    def log_tail(self, lines: int = 30) -> str:
        """The end of the daemon's log (STORE/log/*.log), for error reports."""
        out = []
        for path in sorted((self.store / "log").glob("*.log")):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)


CLASSES = {"raw": Raw, "gocryptfs": Gocryptfs, "bpfs": Bpfs}


def make(name: str, base: Path, cleanup: Cleanup) -> Target:
    return CLASSES[name](base, cleanup)
