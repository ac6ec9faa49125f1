"""Unmount and remove everything the benchmark created, on normal exit, error, Ctrl-C or SIGTERM.

Usage::

    with Cleanup() as cleanup:
        cleanup.add_dir(tmp)                   # removed at the end (only when nothing is mounted below it)
        cleanup.add_mount(mnt, unmount_fn)     # unmount_fn() tried first, then fusermount -u, then -uz
        cleanup.add_pid(pid)                   # a daemon we started: SIGTERM/SIGKILL if still alive at the end
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable

from bench import proc


def _start_time(pid: int) -> str | None:
    # Field 22 of /proc/PID/stat: tells a reused pid from the process we meant.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def force_unmount(path: str) -> None:
    """fusermount -u, then a lazy unmount if the first did not work."""
    for args in (["fusermount3", "-u", path], ["fusermount3", "-uz", path], ["umount", "-l", path]):
        if not proc.is_mounted(path):
            return
        try:
            proc.run(args, timeout=30, check=False)
        except proc.CommandError:
            pass


class Cleanup:
    """Registry of mounts, daemon pids and directories to undo, in reverse order."""

    def __init__(self, log: Callable[[str], None] | None = None):
        self._mounts: list[tuple[str, Callable[[], None]]] = []
        self._pids: list[tuple[int, str | None]] = []
        self._dirs: list[str] = []
        self._old_handlers: dict = {}
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    # -- registration -----------------------------------------------------------------
    def add_mount(self, path: str | Path, unmount: Callable[[], None]) -> None:
        self._mounts.append((os.path.abspath(path), unmount))

    def forget_mount(self, path: str | Path) -> None:
        path = os.path.abspath(path)
        self._mounts = [(p, fn) for p, fn in self._mounts if p != path]

    def add_pid(self, pid: int) -> None:
        self._pids.append((pid, _start_time(pid)))

    def add_dir(self, path: str | Path) -> None:
        self._dirs.append(os.path.abspath(path))

    # -- context manager --------------------------------------------------------------
    def __enter__(self) -> "Cleanup":
        # SIGINT explicitly too: a shell starting us in the background leaves it ignored.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, _raise_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        # A second Ctrl-C must not leave half-unmounted state behind: ignore signals meanwhile.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, signal.SIG_IGN)
        try:
            self.run()
        finally:
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)

    # -- the work ---------------------------------------------------------------------
    def unmount_all(self) -> None:
        """Unmount every registered mount that is still mounted, newest first."""
        while self._mounts:
            path, unmount = self._mounts.pop()
            if not proc.is_mounted(path):
                continue
            try:
                unmount()
            except Exception as e:  # noqa: BLE001 - cleanup must go on
                self.log(f"cleanup: unmounting {path} failed: {e}")
            if proc.is_mounted(path):
                force_unmount(path)
            if proc.is_mounted(path):
                self.log(f"cleanup: {path} is still mounted")

    def run(self) -> None:
        self.unmount_all()
        # Anything still mounted below our directories (e.g. registered too late).
        for d in self._dirs:
            for m in proc.mounts_under(d):
                self.log(f"cleanup: unmounting leftover {m}")
                force_unmount(m)
        for pid, started in self._pids:
            self._stop(pid, started)
        self._pids.clear()
        for d in reversed(self._dirs):
            if not os.path.exists(d):
                continue
            left = proc.mounts_under(d)
            if left:
                self.log(f"cleanup: not removing {d}: still mounted: {', '.join(left)}")
                continue
            shutil.rmtree(d, ignore_errors=True)
        self._dirs.clear()

    def _stop(self, pid: int, started: str | None) -> None:
        if not proc.pid_alive(pid) or _start_time(pid) != started:
            return
        self.log(f"cleanup: daemon pid {pid} still running after unmount, sending SIGTERM")
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if not proc.pid_alive(pid):
                return
            time.sleep(0.1)
        self.log(f"cleanup: daemon pid {pid} ignored SIGTERM, sending SIGKILL")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
