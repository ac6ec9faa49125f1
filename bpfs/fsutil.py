"""Small file-system helpers: private files and folders, atomic replacement, durable renames, and
this user's run-time folder (/run/bpfs for root, /tmp/bpfs-UID otherwise)."""

from __future__ import annotations

import os


def make_private_dir(path: str) -> None:
    """Create `path` (and parents) with mode 0700, or tighten an existing one."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private_file(path: str, data: bytes, exclusive: bool = False) -> None:
    """Write `data` to `path` with mode 0600, durably and atomically (temp file + rename)."""
    if exclusive and os.path.lexists(path):
        raise FileExistsError(path)
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if exclusive:
        os.link(tmp, path)  # fails if another process created `path` meanwhile
        os.unlink(tmp)
    else:
        os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def run_dir(*parts: str) -> str:
    """A path in this user's run-time folder (not created here)."""
    base = "/run/bpfs" if os.geteuid() == 0 else f"/tmp/bpfs-{os.geteuid()}"
    return os.path.join(base, *parts)


def compact_lmdb(env, path: str) -> None:
    """Rewrite the LMDB environment `env` (a folder at `path`) with its live pages only, replacing
    its data file atomically; the caller closes `env` first thing afterwards and reopens it.

    LMDB never clears a freed page: after records are rewritten (a format upgrade that seals or
    re-keys them), their old bytes stay readable in the file until the page is reused. A compact
    copy holds none of them. Only for an environment no other process has open.
    """
    import shutil

    tmp = path.rstrip("/") + ".compact"
    shutil.rmtree(tmp, ignore_errors=True)
    os.mkdir(tmp, 0o700)
    try:
        env.copy(tmp, compact=True)
        fd = os.open(os.path.join(tmp, "data.mdb"), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(os.path.join(tmp, "data.mdb"), 0o600)
        os.replace(os.path.join(tmp, "data.mdb"), os.path.join(path, "data.mdb"))
        fsync_dir(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
