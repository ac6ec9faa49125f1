"""A store on the drive: its layout, creation, locking, and repair after a crash.

Layout (folder 0700, files 0600):
  key.json      wrapped root secret and public identity (see keyfile)
  index/        LMDB environment (see index)
  index.redo    index changes since the last LMDB checkpoint (see redolog)
  packs/        sealed chunk containers (see packs)
  lock          flock'ed by the one process that has the store open for writing
  daemon.json   pid and mount point of the running mount daemon
  log/          the daemon's log (no names, no keys)
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import time

from . import keyfile
from .errors import BpfsError, StoreBusy, StoreNotFound
from .fsutil import make_private_dir, write_private_file
from .index import ROOT_INO, Attr, Index
from .packs import PackFiles

KEY_FILE = "key.json"
DAEMON_FILE = "daemon.json"


def default_store_path() -> str:
    return os.environ.get("BPFS_STORE") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "bpfs", "store")


def key_path(store_dir: str) -> str:
    return os.path.join(store_dir, KEY_FILE)


def require_store(store_dir: str) -> str:
    store_dir = os.path.abspath(store_dir)
    if not os.path.isfile(key_path(store_dir)):
        raise StoreNotFound(f"no bpfs store at {store_dir}")
    return store_dir


def create_store(store_dir: str, passphrase: bytes, profile: str, root: bytes | None = None) -> keyfile.KeyRing:
    """Create an empty store: key file, index with a root directory, packs folder."""
    store_dir = os.path.abspath(store_dir)
    if os.path.exists(key_path(store_dir)):
        raise BpfsError(f"{store_dir} already holds a bpfs store", exit_code=2)
    if os.path.exists(store_dir) and (not os.path.isdir(store_dir) or os.listdir(store_dir)):
        raise BpfsError(f"{store_dir} exists and is not an empty folder", exit_code=2)
    make_private_dir(store_dir)
    keys = keyfile.create(key_path(store_dir), passphrase, profile, root)
    for sub in ("index", "packs", "log"):
        make_private_dir(os.path.join(store_dir, sub))
    index = Index(os.path.join(store_dir, "index"), keys)
    try:
        now = time.time_ns()
        index.put_attr(Attr(ROOT_INO, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), 2, 0, 0, 0,
                            now, now, now, ROOT_INO))
        index.commit()
    finally:
        index.close()
    return keys


def _try_lock(store_dir: str) -> int | None:
    """The store's lock file, flock'ed exclusively by us; None if another process holds it."""
    fd = os.open(os.path.join(store_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


class StoreLock:
    """Exclusive ownership of a store by one process, released when it exits."""

    def __init__(self, store_dir: str):
        self.store_dir = store_dir
        fd = _try_lock(store_dir)
        if fd is None:
            info = read_daemon_info(store_dir)
            where = f" (mounted at {info['mountpoint']} by pid {info['pid']})" if info else ""
            raise StoreBusy(f"store {store_dir} is in use by another bpfs process{where}")
        self.fd = fd

    def release(self) -> None:
        os.close(self.fd)


def is_locked(store_dir: str) -> bool:
    fd = _try_lock(store_dir)
    if fd is None:
        return True
    os.close(fd)
    return False


def read_daemon_info(store_dir: str) -> dict | None:
    try:
        with open(os.path.join(store_dir, DAEMON_FILE)) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def write_daemon_info(store_dir: str, mountpoint: str | None, **extra) -> None:
    doc = {"pid": os.getpid(), "mountpoint": mountpoint, "store": store_dir, **extra}
    write_private_file(os.path.join(store_dir, DAEMON_FILE), json.dumps(doc).encode())


def clear_daemon_info(store_dir: str) -> None:
    try:
        os.unlink(os.path.join(store_dir, DAEMON_FILE))
    except FileNotFoundError:
        pass


class StoreFolder:
    """A store opened for writing by this process: lock, index and packs."""

    def __init__(self, store_dir: str, keys: keyfile.KeyRing):
        self.dir = require_store(store_dir)
        self.keys = keys
        self.lock = StoreLock(self.dir)
        try:
            make_private_dir(os.path.join(self.dir, "packs"))
            self.index = Index(os.path.join(self.dir, "index"), keys)
            self.packs = PackFiles(self.dir)
        except BaseException:
            self.lock.release()
            raise

    def repair_after_crash(self, destroy_inode) -> dict:
        """Bring the store to a clean state after an unclean stop; return what was done."""
        index = self.index
        report = {"replayed_records": index.replayed, "orphans": 0, "sealed_packs": 0, "dead_packs": 0,
                  "stray_packs": 0}
        for ino in index.orphans():
            destroy_inode(ino)
            report["orphans"] += 1
        for pack_id, rec in list(index.all_packs()):
            if not rec.sealed:  # was open: seal it in its lane (local packs never go to the outbox)
                index.seal_pack(pack_id, rec)
                report["sealed_packs"] += 1
            if rec.live_chunks <= 0:
                index.delete_pack(pack_id)
                self.packs.delete(pack_id)
                report["dead_packs"] += 1
        known = {pack_id for pack_id, _ in index.all_packs()}
        for pack_id in self.packs.ids_on_disk() - known:
            # created just before a crash, its id never committed: nothing refers to it
            self.packs.delete(pack_id)
            report["stray_packs"] += 1
        index.commit()
        return report

    def close(self, release_lock: bool = True) -> None:
        try:
            self.packs.seal_open(self.index)
            self.packs.sync()  # finishes the trees of the packs just sealed
            self.packs.record_roots(self.index)
            self.index.commit()
            self.index.close()
            self.packs.close()
        finally:
            if release_lock:
                self.lock.release()
