"""Running commands, reading the mount table, dropping caches, reading a daemon's peak RSS.

The mount table, whether a process is alive and the size of a folder are the test suite's
helpers (tests/helpers/), the same code the tests rely on.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from tests.helpers.files import dir_apparent_size
from tests.helpers.mounts import is_mounted as is_mounted
from tests.helpers.mounts import mount_entries
from tests.helpers.procs import pid_alive as pid_alive


class CommandError(RuntimeError):
    """A command exited non-zero or timed out; the message holds its stderr."""


def run(argv: list[str], *, env: dict | None = None, cwd: str | Path | None = None,
        timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``argv`` and return its CompletedProcess (stdout/stderr as text).

    Output goes to temporary files rather than pipes: a mount command may leave a
    daemon behind that inherits the pipes, and waiting for EOF on them would hang.
    The child gets its own session, so a Ctrl-C at the terminal reaches only this
    harness, which then unmounts things in order (see ``cleanup``).
    """
    full_env = None if env is None else {**os.environ, **env}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                  env=full_env, cwd=cwd, timeout=timeout,
                                  start_new_session=True)
        except subprocess.TimeoutExpired:
            err.seek(0)
            tail = _tail(err.read().decode(errors="replace"))
            raise CommandError(f"timed out after {timeout:.0f}s: {' '.join(argv)}"
                               + (f"\n{tail}" if tail else "")) from None
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        msg = _tail(stderr or stdout)
        raise CommandError(f"exit {proc.returncode}: {' '.join(argv)}" + (f"\n{msg}" if msg else ""))
    return result


def _tail(text: str, lines: int = 4) -> str:
    """The last few non-empty lines of a command's output, for error messages."""
    kept = [line for line in text.strip().splitlines() if line.strip()]
    if len(kept) > lines:
        kept = [f"[... {len(kept) - lines} more lines]"] + kept[-lines:]
    return "\n".join(kept)


def mountpoints() -> list[str]:
    """All mount points, from /proc/self/mountinfo (works for dead FUSE mounts too)."""
    return [point for point, _fstype in mount_entries()]


# is_mounted(path): True if ``path`` is a mount point, read from the mount table (without stat'ing
# it: a dead FUSE mount hangs or fails); from tests/helpers/mounts.py.


def mounts_under(path: str | Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    base = os.path.abspath(path)
    found = [m for m in mountpoints() if m == base or m.startswith(base + "/")]
    return sorted(set(found), key=len, reverse=True)


def drop_caches() -> bool:
    """sync, then drop the page, dentry and inode caches. False if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def vm_hwm(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of ``pid`` in bytes, None if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far (all its threads), None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# pid_alive(pid): True while any thread of the process is alive (not a zombie); from
# tests/helpers/procs.py.


def tree_bytes(path: str | Path) -> int:
    """Sum of the sizes of all regular files under ``path`` (apparent size, not blocks)."""
    return dir_apparent_size(path)
