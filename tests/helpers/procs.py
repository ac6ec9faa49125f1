"""Processes, read from /proc: is one still alive (any thread), why has it not died yet, which
ones mention a path or hold /dev/fuse; killing one and waiting; waiting for a condition."""

from __future__ import annotations

import os
import signal
import time


def pid_alive(pid: int) -> bool:
    """True if any thread of process ``pid`` is still running (not zombie/dead).

    A multi-threaded process whose main thread has exited shows as a zombie
    while other threads (which keep its file descriptors open) still run, so
    every task is checked.
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state not in ("Z", "X", "x"):
            return True
    return False


def thread_states(pid: int) -> str:
    """Each live thread's state, kernel wait channel and (root) kernel stack: why a process
    has not died yet."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return "gone"
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/stat") as f:
                stat_line = f.read()
            state = stat_line.rsplit(")", 1)[1].split()[0]
            name = stat_line[stat_line.index("(") + 1:stat_line.rindex(")")]
            with open(f"{base}/wchan") as f:
                wchan = f.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        if state in ("Z", "X", "x"):
            continue
        try:
            with open(f"{base}/stack") as f:
                stack = " <- ".join(line.split()[-1] for line in f.read().splitlines()[:6])
        except OSError:
            stack = "?"
        out.append(f"tid {tid} ({name}) state {state} wchan {wchan}: {stack}")
    return "; ".join(out) or "no live threads"


def pids_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line mentions ``text`` (a unique tmp path)."""
    res = []
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if text.encode() in cmd and pid_alive(int(d)):
            res.append(int(d))
    return res


def fuse_fd_holders() -> list[tuple[int, str]]:
    """(pid, cmdline) of every process holding /dev/fuse open."""
    res = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{d}/fd"):
                try:
                    if os.readlink(f"/proc/{d}/fd/{fd}") == "/dev/fuse":
                        with open(f"/proc/{d}/cmdline", "rb") as f:
                            res.append((int(d), f.read().replace(b"\0", b" ").decode(errors="replace")[:200]))
                        break
                except OSError:
                    pass
        except OSError:
            pass
    return res


def process_report(pid: int) -> str:
    """State, wchan and kernel stack of a process (for diagnosing hangs)."""
    out = []
    for what in ("status", "wchan", "syscall", "stack"):
        try:
            with open(f"/proc/{pid}/{what}") as f:
                txt = f.read()
            if what == "status":
                txt = "".join(line for line in txt.splitlines(True) if line.startswith(("State", "PPid")))
            out.append(f"{what}: {txt.strip()}")
        except OSError as e:
            out.append(f"{what}: <{e}>")
    try:
        fds = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        out.append(f"fds: {fds}")
    except OSError:
        pass
    return "\n".join(out)


def kill_pid(pid: int, timeout: float = 60) -> None:
    """SIGKILL and wait until the process is gone. A thread inside fdatasync on a busy disk is
    in uninterruptible sleep and dies only when the call returns: seconds under CI's I/O load."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.05)


def wait_until(pred, timeout: float = 10, interval: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()
