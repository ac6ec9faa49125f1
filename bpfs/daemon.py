"""The mount daemon: mounting, serving FUSE requests on one trio loop, and a clean stop.

`mount()` checks everything that can fail in the caller's terminal (store, passphrase,
mount point, lock), then forks; the child mounts and reports "ready" or the error through
a pipe, so `bpfs mount` returns only once the mount is usable. A stop (umount, SIGTERM,
SIGINT) persists every buffered byte, commits, and removes daemon.json last, which is how
`bpfs umount` knows the daemon exited cleanly.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import logging.handlers
import os
import resource
import re
import signal
import subprocess
import sys
import time

import pyfuse3
import trio

from . import fuseloop
from .errors import BpfsError, first_error
from .fsutil import make_private_dir, run_dir, write_private_file
from .passphrase import scrub_environment
from .runtime import RunningStore
from .store import clear_daemon_info, is_locked, read_daemon_info, require_store, write_daemon_info

log = logging.getLogger(__name__)

READ_AHEAD_KB = 1024
SNAPDIR_VISIBLE = "snapdir=visible"  # an option of ours (list `.snapshots` in the root), not FUSE's
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def tune_runtime() -> None:
    """Serve large buffers from the heap: mmap'ed 1 MiB buffers page-fault on every use.
    For every process that moves bulk data: the daemon, and `bpfs recover`.

    Setting the mmap threshold turns off glibc's own adjustment of the trim threshold too,
    which then stays at 128 KiB: every freed buffer at the top of the heap went back to the
    kernel and faulted in again at the next write (550,000 page faults per GiB written, a
    third of the daemon's system time). Keeping up to 32 MiB free at the top of each arena
    halves that (about 240,000); 64 MiB ended it but took the daemon's peak RSS past the
    300 MiB budget over four 1 GiB writes (303 MiB, 262 MiB with 32). Two arenas keep the
    memory that worker threads free reusable by the others, so the heap does not grow once
    per thread.
    """
    # Worker threads (hashing, sealing, pwrite) release the GIL and then wait to get it
    # back from the FUSE loop; a shorter switch interval lets them in sooner.
    sys.setswitchinterval(0.0005)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 32 << 20)
        libc.mallopt(M_ARENA_MAX, 2)
    except (OSError, AttributeError):
        pass


PR_SET_DUMPABLE = 4


def _guard_secrets() -> None:
    """The daemon holds the store's keys for its whole life: no core dumps (they would write the
    keys to disk), not dumpable (other processes of the user cannot read its memory or
    /proc/PID/environ), and the passphrase gone from its environment.

    Not done: locking memory out of swap. The keys are Python objects anywhere in the heap, so
    only mlockall() would cover them, and it would also lock every page of the index that LMDB
    maps (a file as large as the index) in RAM; an encrypted swap (the default with full-disk
    encryption) is the way to keep them off a disk in the clear (README, Security model)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    scrub_environment()


def _setup_logging(store_dir: str, foreground: bool, debug: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
    else:
        path = os.environ.get("BPFS_LOG_FILE") or os.path.join(store_dir, "log", "daemon.log")
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=4 << 20, backupCount=2)
        os.chmod(path, 0o600)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    logging.getLogger("quic").setLevel(logging.DEBUG if debug else logging.WARNING)  # aioquic and qh3: per connection


def _decode_mountinfo(field: str) -> str:
    """Undo mountinfo's octal escapes (\\040 for a space) without mangling other bytes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _registry_path(mountpoint: str) -> str:
    """Where a daemon notes which store it mounted at `mountpoint` (for mounts whose fsname or
    subtype the user chose, so mountinfo does not say)."""
    digest = hashlib.blake2b(os.fsencode(mountpoint), digest_size=16).hexdigest()
    return run_dir("mounts", digest)


def _note_mount(mountpoint: str, store_dir: str) -> None:
    path = _registry_path(mountpoint)
    make_private_dir(os.path.dirname(path))
    write_private_file(path, os.fsencode(store_dir))


def _forget_mount(mountpoint: str) -> None:
    try:
        os.unlink(_registry_path(mountpoint))
    except FileNotFoundError:
        pass


def _bpfs_mount(mountpoint: str) -> tuple[str, str] | None:
    """(store, device "major:minor") of the bpfs mount at `mountpoint`, from mountinfo: a FUSE
    mount there of type fuse.bpfs whose source is the store, or of any FUSE type and source that
    a bpfs daemon noted as its own (`-o fsname=`, `subtype=`). The last matching line wins: it
    is the mount on top."""
    try:
        with open(_registry_path(mountpoint), "rb") as f:
            noted = os.fsdecode(f.read())
    except OSError:
        noted = None
    found = None
    with open("/proc/self/mountinfo", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype, source = right.split()[:2]
            if _decode_mountinfo(fields[4]) != mountpoint or not fstype.startswith("fuse"):
                continue
            if noted is not None:
                found = (noted, fields[2])
            elif fstype == "fuse.bpfs":
                found = (_decode_mountinfo(source), fields[2])
    return found


def find_bpfs_mount(mountpoint: str) -> str | None:
    """The store mounted at `mountpoint`, if a bpfs mount is there."""
    found = _bpfs_mount(mountpoint)
    return found[0] if found else None


def _lazy_unmount(mountpoint: str) -> None:
    subprocess.run(["fusermount3", "-uz", mountpoint], capture_output=True)


def check_mountpoint(mountpoint: str, *, nonempty: bool = True) -> str:
    """The mount point as an absolute path, once it is a folder that is not mounted on (a stale
    bpfs mount is cleared); with `nonempty=False` it must also be empty (a mount would hide what
    is there: `bpfs mount` refuses unless `-o nonempty`). BpfsError otherwise."""
    mountpoint = os.path.abspath(mountpoint)
    stale_store = find_bpfs_mount(mountpoint)
    if stale_store is not None:
        if os.path.isdir(stale_store) and is_locked(stale_store):
            raise BpfsError(f"{mountpoint} is already a mount point (bpfs, store {stale_store})", exit_code=3)
        _lazy_unmount(mountpoint)  # left behind by a daemon that was killed
    if not os.path.isdir(mountpoint):
        raise BpfsError(f"mount point {mountpoint} is not a folder", exit_code=2)
    if os.path.ismount(mountpoint):
        raise BpfsError(f"{mountpoint} is already a mount point", exit_code=3)
    if not nonempty:
        try:
            inside = os.listdir(mountpoint)
        except OSError:
            inside = []  # unreadable to us: the mount itself says what is wrong
        if inside:
            raise BpfsError(f"mount point {mountpoint} is not empty: mounting would hide what is in it "
                            "(use an empty folder, or -o nonempty)", exit_code=2)
    return mountpoint


def _set_read_ahead(mountpoint: str) -> None:
    """Raise the mount's read-ahead so sequential reads arrive in 1 MiB requests.

    The device number comes from mountinfo: a stat() of our own mount point from inside
    the daemon would be a FUSE request to ourselves, and a thread blocked in one cannot be
    killed (the kernel waits for the answer uninterruptibly once it is sent).
    """
    found = _bpfs_mount(mountpoint)
    if found is None:
        return
    try:
        with open(f"/sys/class/bdi/{found[1]}/read_ahead_kb", "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError:
        pass  # not root, or no such knob: the kernel's default read-ahead still works


async def _serve(running: RunningStore, mountpoint: str | None, options: set[str], ready, listen: str | None,
                 explicit_listen: bool) -> None:
    store, data, ops = running.opened, running.data, running.ops
    running.repair()
    if mountpoint is not None:
        given = {o.partition("=")[0] for o in options}  # -o fsname=, subtype= replace these defaults
        fuse_options = (set(pyfuse3.default_options) | options
                        | {f"{k}={v}" for k, v in (("fsname", store.dir), ("subtype", "bpfs")) if k not in given})
        _note_mount(mountpoint, store.dir)
        pyfuse3.init(ops, mountpoint, fuse_options)
    try:
        async with data.background():
            async with trio.open_nursery() as services:
                addresses, control_path = [], None
                if "ro" not in options:  # a read-only mount changes nothing in the store, partners' data included
                    service = await running.start_partners(services, listen, explicit=explicit_listen,
                                                           surviving=True)
                    control_path = await running.serve_control(services)
                    addresses = service.addresses
                write_daemon_info(store.dir, mountpoint, control=control_path, addresses=addresses,
                                  peer_id=store.keys.identity.peer_id)
                ready(None)
                log.info("%s %s; partners: %s", "mounted" if mountpoint else "serving", store.dir,
                         ", ".join(addresses) or "not served")
                services.start_soon(data.run_committer)
                services.start_soon(_stop_on_signal, services.cancel_scope, mountpoint is not None)
                if mountpoint is not None:
                    services.start_soon(trio.to_thread.run_sync, _set_read_ahead, mountpoint)
                    waiter = fuseloop.install()
                    try:
                        await pyfuse3.main()
                    finally:
                        fuseloop.uninstall()
                    if waiter is not None:
                        log.info("FUSE requests: %d found by polling, %d after sleeping (%d of them without polling: "
                                 "backing off)", waiter.hits, waiter.sleeps, waiter.skipped)
                    services.cancel_scope.cancel()
                else:
                    await trio.sleep_forever()
            if mountpoint is not None:
                pyfuse3.close(unmount=True)
                _forget_mount(mountpoint)
            await data.flush_all()
            for ino in store.index.orphans():  # nothing is open any more
                ops.destroy_inode(ino)
            try:
                await data.sync()
            except OSError:
                store.index.save()  # the checkpoint failed (drive full?): the redo log keeps it
                raise
    except BaseException:
        if mountpoint is not None:
            try:
                pyfuse3.close(unmount=True)
            except Exception:
                pass
        raise
    log.info("%s %s cleanly", "unmounted" if mountpoint else "stopped serving", mountpoint or store.dir)


async def _stop_on_signal(cancel_scope, mounted: bool) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: stopping", signum)
            if mounted:
                pyfuse3.terminate()
            else:
                cancel_scope.cancel()
            return


def run_daemon(store_dir: str, keys, mountpoint: str | None, options: set[str], foreground: bool,
               debug: bool, ready, listen: str | None = None, explicit_listen: bool = False) -> int:
    """Serve the mount (or, without a mount point, partners only) until stopped; `ready(error)`
    reports the start's outcome once."""
    tune_runtime()
    _setup_logging(store_dir, foreground, debug)
    _guard_secrets()
    show_snapshots = SNAPDIR_VISIBLE in options
    options = options - {SNAPDIR_VISIBLE}
    try:
        # the `.snapshots` folder of a mount (a read-only mount too: it only reads the store)
        running = RunningStore(store_dir, keys, snapshot_views=mountpoint is not None, show_snapshots=show_snapshots)
    except BpfsError as e:
        ready(str(e))
        return e.exit_code
    clean = False
    try:
        trio.run(_serve, running, mountpoint, options, ready, listen, explicit_listen)
        clean = True
    except Exception as e:
        err = first_error(e)  # the error inside, when raised in a nursery
        if isinstance(err, BpfsError):
            log.error("%s", err)
            ready(str(err))
        else:
            log.exception("daemon failed")
            ready(f"{'mount' if mountpoint else 'serve'} failed: {err}")
    finally:
        try:
            running.close(release_lock=False)
        except Exception:
            log.exception("closing the store failed")
            clean = False
        if clean:  # before the lock goes: `bpfs umount` reads it once the lock is free
            clear_daemon_info(store_dir)
        running.opened.lock.release()
    return 0 if clean else 1


def _fork_daemon(store_dir: str, run) -> None:
    """Run `run(ready)` in a detached child; return once it reported ready, raise its error."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        reported: list[bool] = []

        def ready(error):
            if reported:
                return
            reported.append(True)
            os.write(wfd, b"ok\n" if error is None else ("error " + error).encode()[:4000])
            os.close(wfd)

        code = 1
        try:
            code = run(ready)
        finally:
            os._exit(code)
    os.close(wfd)
    message = b""
    while chunk := os.read(rfd, 4096):
        message += chunk
    os.close(rfd)
    if message.startswith(b"ok"):
        return
    os.waitpid(pid, 0)
    text = message.decode(errors="replace").removeprefix("error ").strip() or "the daemon died while starting"
    raise BpfsError(text)


def _foreground_ready(text: str):
    def ready(error):
        print(f"bpfs: {error}" if error else text, file=sys.stderr)
    return ready


PREVIOUS_DAEMON_WAIT = 30.0  # seconds a new daemon waits for one whose mount is gone to let go of the store


def _unmounted_daemon(store_dir: str) -> tuple[str, int] | None:
    """(mount point, pid) of the store's running daemon when its mount is gone (a plain `umount`,
    as systemd's automount does when idle): that daemon is finishing and lets go of the store soon."""
    info = read_daemon_info(store_dir) or {}
    mountpoint, pid = info.get("mountpoint"), info.get("pid")
    if isinstance(mountpoint, str) and isinstance(pid, int) and _process_running(pid) \
            and find_bpfs_mount(mountpoint) is None:
        return mountpoint, pid
    return None


def _check_not_running(store_dir: str) -> None:
    previous = _unmounted_daemon(store_dir) if is_locked(store_dir) else None
    if previous is not None:
        print(f"bpfs: waiting (up to {PREVIOUS_DAEMON_WAIT:.0f} s) for the previous daemon of {store_dir}, "
              f"unmounted from {previous[0]}, to finish", file=sys.stderr, flush=True)
        deadline = time.monotonic() + PREVIOUS_DAEMON_WAIT
        while is_locked(store_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_locked(store_dir):
            raise BpfsError(f"store {store_dir} is still in use by its previous daemon (pid {previous[1]}, unmounted "
                            f"from {previous[0]}) after {PREVIOUS_DAEMON_WAIT:.0f} s; see {store_dir}/log/daemon.log",
                            exit_code=3)
    if is_locked(store_dir):
        info = read_daemon_info(store_dir) or {}
        where = f" at {info.get('mountpoint')}" if info.get("mountpoint") else " (bpfs serve)" if info else ""
        raise BpfsError(f"store {store_dir} is already in use{where}", exit_code=3)


def check_fuse_spin() -> None:
    """A bad BPFS_FUSE_SPIN_US fails in the caller's terminal, not in the daemon's log."""
    try:
        fuseloop.spin_from_environment()
    except ValueError as e:
        raise BpfsError(str(e), exit_code=2) from None


def mount(store_dir: str, mountpoint: str, keys, options: set[str], foreground: bool, debug: bool,
          listen: str | None = None, explicit_listen: bool = False) -> int:
    store_dir = require_store(store_dir)
    mountpoint = check_mountpoint(mountpoint)
    check_fuse_spin()
    _check_not_running(store_dir)
    if foreground:
        ready = _foreground_ready(f"bpfs: mounted {store_dir} at {mountpoint} (foreground; Ctrl-C or bpfs umount "
                                  "to stop)")
        return run_daemon(store_dir, keys, mountpoint, options, True, debug, ready, listen, explicit_listen)
    _fork_daemon(store_dir, lambda ready: run_daemon(store_dir, keys, mountpoint, options, False, debug, ready,
                                                     listen, explicit_listen))
    print(f"bpfs: mounted {store_dir} at {mountpoint}")
    return 0


def serve(store_dir: str, keys, listen: str | None, explicit_listen: bool, foreground: bool, debug: bool) -> int:
    """Serve partners (and replicate) without a mount."""
    store_dir = require_store(store_dir)
    _check_not_running(store_dir)
    if foreground:
        ready = _foreground_ready(f"bpfs: serving {store_dir} (foreground; Ctrl-C or bpfs stop to stop)")
        return run_daemon(store_dir, keys, None, set(), True, debug, ready, listen, explicit_listen)
    _fork_daemon(store_dir, lambda ready: run_daemon(store_dir, keys, None, set(), False, debug, ready, listen,
                                                     explicit_listen))
    info = read_daemon_info(store_dir) or {}
    print(f"bpfs: serving {store_dir} on {', '.join(info.get('addresses') or []) or 'no address'}")
    return 0


def stop(store_dir: str, timeout: float | None = None) -> int:
    """Stop the daemon of a store: unmount a mount, end a serve."""
    store_dir = require_store(store_dir)
    info = read_daemon_info(store_dir)
    if not is_locked(store_dir):
        raise BpfsError(f"no daemon is running for {store_dir}", exit_code=2)
    if info and info.get("mountpoint"):
        return umount(info["mountpoint"], timeout)
    pid = (info or {}).get("pid")
    if not isinstance(pid, int):
        raise BpfsError(f"the store {store_dir} is locked by a process that left no daemon.json")
    os.kill(pid, signal.SIGTERM)
    deadline = None if timeout is None else time.monotonic() + timeout
    while is_locked(store_dir) or _process_running(pid):
        if deadline is not None and time.monotonic() > deadline:
            raise BpfsError(f"the daemon of {store_dir} is still stopping after {timeout:.0f}s")
        time.sleep(0.02)
    if read_daemon_info(store_dir) is not None:
        raise BpfsError(f"the daemon of {store_dir} stopped uncleanly; see {store_dir}/log/daemon.log")
    return 0


def umount(mountpoint: str, timeout: float | None = None) -> int:
    mountpoint = os.path.abspath(mountpoint)
    store_dir = find_bpfs_mount(mountpoint)
    if store_dir is None:
        raise BpfsError(f"{mountpoint} is not a bpfs mount", exit_code=2)
    if not is_locked(store_dir):
        _lazy_unmount(mountpoint)
        raise BpfsError(f"the daemon of {mountpoint} was not running (killed?); removed the stale mount")
    pid = (read_daemon_info(store_dir) or {}).get("pid")
    result = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "fusermount3 failed"
        raise BpfsError(f"cannot unmount {mountpoint}: {reason}")
    deadline = None if timeout is None else time.monotonic() + timeout
    while is_locked(store_dir):
        if deadline is not None and time.monotonic() > deadline:
            raise BpfsError(f"unmounted {mountpoint}, but its daemon is still writing after {timeout:.0f}s")
        time.sleep(0.02)
    while isinstance(pid, int) and _process_running(pid):  # the lock goes a moment before the process
        if deadline is not None and time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if read_daemon_info(store_dir) is not None:
        raise BpfsError(f"the daemon of {mountpoint} stopped uncleanly; see {store_dir}/log/daemon.log")
    return 0


def _process_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False
