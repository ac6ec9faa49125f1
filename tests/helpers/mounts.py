"""Mounts: the mount table (/proc/self/mountinfo), unmounting the hard way, tearing down a
store's daemons, the ``Mount`` object (a store and a mountpoint driven through the real CLI),
and throw-away tmpfs mounts."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.helpers.cli import BpfsError, bpfs_env, run_bpfs
from tests.helpers.procs import kill_pid, pid_alive, pids_mentioning, thread_states

FUSE_AVAILABLE = os.path.exists("/dev/fuse")
FUSE_SKIP_REASON = "/dev/fuse is missing: FUSE mounts are impossible on this machine"


def _unescape_mountinfo(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mount_entries() -> list[tuple[str, str]]:
    """(mountpoint, fstype) for every mount visible to this process."""
    res = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            res.append((_unescape_mountinfo(parts[4]), parts[sep + 1]))
    return res


def is_mounted(path) -> bool:
    p = os.path.abspath(os.fspath(path))
    return any(mp == p for mp, _ in mount_entries())


def fuse_mounted(path) -> bool:
    p = os.path.abspath(os.fspath(path))
    return any(mp == p and fs.startswith("fuse") for mp, fs in mount_entries())


def abort_fuse_connection(path) -> bool:
    """Abort the FUSE connection of the mount at `path` (what `umount -f` does to a FUSE mount):
    every request waiting on it fails at once. False when there is none to abort."""
    p = os.path.abspath(os.fspath(path))
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            if _unescape_mountinfo(parts[4]) == p and parts[sep + 1].startswith("fuse"):
                abort = f"/sys/fs/fuse/connections/{parts[2].split(':')[1]}/abort"
                if not os.path.exists(abort):  # the control file system is not mounted here by default
                    subprocess.run(["mount", "-t", "fusectl", "fusectl", "/sys/fs/fuse/connections"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
                try:
                    with open(abort, "w") as a:
                        a.write("1")
                    return True
                except OSError:
                    return False
    return False


def read_daemon_json(store) -> dict:
    with open(os.path.join(store, "daemon.json")) as f:
        return json.load(f)


def force_unmount(mnt) -> None:
    """Unmount whatever is mounted at mnt, the hard way."""
    mnt = os.path.abspath(os.fspath(mnt))
    for cmd in (["fusermount3", "-uz", mnt], ["umount", "-l", mnt]):
        if not is_mounted(mnt):
            return
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)


def cleanup_mount(mnt, store, env=None) -> None:
    """Best-effort teardown: bpfs umount, fall back to fusermount3 -uz, kill daemons."""
    mnt = os.path.abspath(os.fspath(mnt))
    if is_mounted(mnt):
        try:
            run_bpfs("umount", mnt, env=env, check=False, timeout=60)
        except BpfsError:
            pass
    force_unmount(mnt)
    pids = set()
    try:
        pids.add(int(read_daemon_json(store)["pid"]))
    except Exception:
        pass
    pids.update(pids_mentioning(os.path.abspath(os.fspath(store))))
    for pid in pids:
        if pid != os.getpid() and pid_alive(pid):
            kill_pid(pid)
    force_unmount(mnt)


class Mount:
    """A bpfs store and a mountpoint, driven through the real CLI."""

    def __init__(self, store: Path, mnt: Path, env: dict | None = None):
        self.store = Path(store)
        self.mnt = Path(mnt)
        self.env = env or bpfs_env()

    def path(self, *parts) -> Path:
        return self.mnt.joinpath(*parts)

    def log_tail(self, n: int = 60) -> str:
        """The last lines of the daemon's log in the store (if it keeps one), for failure messages."""
        logs = sorted(self.store.glob("log/*.log")) if self.store.exists() else []
        out = []
        for p in logs:
            try:
                lines = p.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                continue
            out.append(f"--- {p} (last {len(lines)} lines) ---\n" + "\n".join(lines))
        return "\n".join(out)

    def _run(self, *args, check, timeout):
        try:
            return run_bpfs(*args, env=self.env, check=check, timeout=timeout)
        except BpfsError as e:
            raise BpfsError(f"{e}\n{self.log_tail()}") from None

    def mount(self, *extra, check=True, timeout=120) -> subprocess.CompletedProcess:
        self.mnt.mkdir(parents=True, exist_ok=True)
        cp = self._run("mount", self.store, self.mnt, *extra, check=check, timeout=timeout)
        if check:
            assert fuse_mounted(self.mnt), \
                f"`bpfs mount` exited 0 but {self.mnt} is not a FUSE mount; stderr={cp.stderr!r}"
        return cp

    def umount(self, check=True, timeout=120) -> subprocess.CompletedProcess:
        cp = self._run("umount", self.mnt, check=check, timeout=timeout)
        if check:
            assert not is_mounted(self.mnt), f"`bpfs umount` exited 0 but {self.mnt} is still mounted"
        return cp

    def remount(self) -> None:
        self.umount()
        self.mount()

    def daemon_pid(self) -> int:
        return int(read_daemon_json(self.store)["pid"])

    def is_mounted(self) -> bool:
        return fuse_mounted(self.mnt)

    def kill_daemon(self, unmount: bool = True) -> int:
        """kill -9 the daemon; with unmount, also detach the dead mount.  Returns the killed pid.

        Pass unmount=False while other processes still use the mount: after a lazy
        unmount their next open() would silently land in the directory underneath.
        Call force_unmount(self.mnt) once they are done.
        """
        pid = self.daemon_pid()
        kill_pid(pid, timeout=30)
        if pid_alive(pid):
            # Seen twice in about ten CI runs under load: the killed daemon does not finish dying
            # until its FUSE connection goes (one of its threads in the kernel, state R, last
            # in futex_wait); the cause is not found yet (see the issue notes). Abort the
            # connection, as an administrator's `umount -f` would, say so, and go on: what the
            # tests check is the data a kill -9 leaves, and that is on the drive already.
            states = thread_states(pid)
            aborted = abort_fuse_connection(self.mnt)
            kill_pid(pid, timeout=30)
            print(f"daemon {pid} outlived SIGKILL for 30 s; FUSE connection aborted: {aborted}; threads then: "
                  f"{states}")
        assert not pid_alive(pid), f"daemon {pid} survived SIGKILL: {thread_states(pid)}"
        if unmount:
            force_unmount(self.mnt)
            assert not is_mounted(self.mnt)
        return pid

    def verify(self, *extra, check=False, timeout=600) -> subprocess.CompletedProcess:
        return run_bpfs("verify", self.store, *extra, env=self.env, check=check, timeout=timeout)

    def cleanup(self) -> None:
        cleanup_mount(self.mnt, self.store, self.env)


def mount_tmpfs(d: Path, size: str = "64m") -> None:
    """Mount a fresh tmpfs of ``size`` at the existing directory ``d`` (needs root)."""
    cp = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(d)],
                        capture_output=True, text=True)
    assert cp.returncode == 0, f"cannot mount a tmpfs (tests need root): {cp.stderr}"


def unmount_tmpfs(d: Path, fuse_below: Path) -> None:
    """Unmount the tmpfs at ``d``: first every FUSE mount below ``fuse_below`` (a bpfs mount whose
    store lives on it must go first), and kill what still runs from it."""
    for mp, fs in mount_entries():
        if fs.startswith("fuse") and mp.startswith(str(fuse_below)):
            force_unmount(mp)
    for pid in pids_mentioning(str(d)):
        kill_pid(pid)
    subprocess.run(["umount", str(d)], capture_output=True)
    if is_mounted(d):
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
