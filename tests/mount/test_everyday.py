"""Everyday use of `bpfs mount` and `make mount` (issue 13): no log noise for a choice the user made,
the passphrase asked once, a stale mount cleared."""

from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest


def test_listen_none_logs_nothing_about_accepting(make_mount):
    """A mount with `--listen none` serves no partner: its log says nothing about accepting
    connections (it said so with a traceback every 5 s)."""
    m = make_mount(name="mnt-quiet")
    m.mount("--listen", "none")
    try:
        time.sleep(12)
        (m.mnt / "f").write_bytes(b"still works")
    finally:
        m.umount()
    log = "\n".join(p.read_text(errors="replace") for p in sorted(m.store.glob("log/*.log")))
    assert log, "the daemon wrote no log"
    assert "not listening" not in log and "accepting connections" not in log, m.log_tail()
    assert "Traceback" not in log, m.log_tail()


def test_mount_over_a_non_empty_folder_is_refused_unless_nonempty(make_mount):
    """Mounting would hide what is in the folder: one line, exit 2, before any passphrase is asked;
    `-o nonempty` mounts anyway, and what was there is back after the unmount."""
    from tests.helpers.cli import bpfs_env, one_line_error, run_bpfs
    from tests.helpers.mounts import is_mounted

    m = make_mount(name="mnt-full")
    (m.mnt / "mine.txt").write_text("was here first")
    cp = run_bpfs("mount", m.store, m.mnt, check=False, env=bpfs_env(passphrase=None))
    msg = one_line_error(cp)
    assert cp.returncode == 2 and "not empty" in msg and "-o nonempty" in msg, cp.stderr
    assert not is_mounted(m.mnt) and (m.mnt / "mine.txt").read_text() == "was here first"
    m.mount("-o", "nonempty", "--listen", "none")
    try:
        assert not (m.mnt / "mine.txt").exists()
    finally:
        m.umount()
    assert (m.mnt / "mine.txt").read_text() == "was here first"


def make_mount_command(store, mnt) -> list[str]:
    """`make mount` with this store and mount point, without its deps/venv steps (they install)."""
    return ["make", "--no-print-directory", "-o", "deps", "-o", "venv", "mount", f"STORE={store}", f"MNT={mnt}"]


def test_make_mount_asks_for_a_new_passphrase_once_and_confirms_it(tmp_path):
    """On a new store `make mount` asks for the passphrase once and for the confirmation, not a
    third time to mount (it asked three times); a passphrase that is too short is refused."""
    from tests.helpers.cli import PASSPHRASE, bpfs_env, run_on_a_terminal
    from tests.helpers.mounts import cleanup_mount, fuse_mounted

    store, mnt = tmp_path / "new" / "store", tmp_path / "mnt"
    env = bpfs_env(passphrase=None, BPFS_LISTEN="none")
    rc, out, asked = run_on_a_terminal(make_mount_command(store, mnt), env, "abc")
    assert rc != 0 and "at least 8" in out and len(asked) == 1, out
    assert not (store / "key.json").exists() and not fuse_mounted(mnt), out
    try:
        rc, out, asked = run_on_a_terminal(make_mount_command(store, mnt), env, PASSPHRASE)
        assert rc == 0, out
        assert [a.strip() for a in asked] == ["New passphrase:", "Passphrase again:"], out
        assert fuse_mounted(mnt) and "Recovery secret:" in out, out
        (mnt / "f").write_bytes(b"in the new store")
    finally:
        cleanup_mount(mnt, store)


def test_make_mount_clears_a_stale_mount(store, tmp_path):
    """A mount whose daemon was killed is left dead ("Transport endpoint is not connected"):
    `make mount` clears it and mounts again, as `bpfs mount` does (it refused)."""
    from tests.helpers.cli import bpfs_env
    from tests.helpers.mounts import Mount, fuse_mounted

    m = Mount(store, tmp_path / "mnt", env=bpfs_env(BPFS_LISTEN="none"))
    try:
        cp = subprocess.run(make_mount_command(store, m.mnt), env=m.env, capture_output=True, text=True, timeout=120)
        assert cp.returncode == 0 and fuse_mounted(m.mnt), cp.stdout + cp.stderr
        m.kill_daemon(unmount=False)
        with pytest.raises(OSError) as dead:
            os.stat(m.mnt)
        assert dead.value.errno == errno.ENOTCONN
        cp = subprocess.run(make_mount_command(store, m.mnt), env=m.env, capture_output=True, text=True, timeout=120)
        assert cp.returncode == 0, cp.stdout + cp.stderr
        assert fuse_mounted(m.mnt) and "is mounted at" in cp.stdout, cp.stdout + cp.stderr
        (m.mnt / "f").write_bytes(b"mounted again")
        m.umount()
    finally:
        m.cleanup()


def test_mount_right_after_a_plain_umount_waits_for_the_old_daemon(make_mount):
    """After a plain `umount MNT` (systemd's automount when idle) the daemon may still be
    finishing and hold the store: a new mount waits for it, saying so once, instead of failing
    "in use". The old daemon is held stopped for 3 s right across the umount to make that sure."""
    import signal
    import threading

    m = make_mount(name="mnt-again")
    m.mount("--listen", "none")
    (m.mnt / "f").write_bytes(b"before the umount")
    pid = m.daemon_pid()
    resume = threading.Timer(3, os.kill, (pid, signal.SIGCONT))
    os.kill(pid, signal.SIGSTOP)
    try:
        cp = subprocess.run(["umount", "--no-canonicalize", str(m.mnt)], capture_output=True, text=True, timeout=30)
        assert cp.returncode == 0, cp.stderr
        resume.start()
        started = time.monotonic()
        cp = m.mount("--listen", "none", check=False)
        assert cp.returncode == 0, cp.stderr + m.log_tail()
        assert time.monotonic() - started >= 2, "the new mount did not wait for the old daemon"
        waits = [line for line in cp.stderr.splitlines() if "wait" in line]
        assert len(waits) == 1 and "previous daemon" in waits[0] and len(cp.stderr.splitlines()) == 1, cp.stderr
        assert (m.mnt / "f").read_bytes() == b"before the umount"
        m.umount()
    finally:
        resume.cancel()
        os.kill(pid, signal.SIGCONT) if os.path.exists(f"/proc/{pid}") else None


def test_mount_init_takes_the_kdf_cost_of_the_new_store(tmp_path):
    """`bpfs mount --init --kdf interactive` makes the new store with that Argon2id cost, as `bpfs
    init --kdf` does (it always used "moderate"); --kdf without --init is a usage error."""
    import json

    import nacl.pwhash

    from tests.helpers.cli import bpfs_env, one_line_error, run_bpfs
    from tests.helpers.mounts import cleanup_mount, fuse_mounted

    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    env = bpfs_env(BPFS_LISTEN="none")
    cp = run_bpfs("mount", store, mnt, "--kdf", "interactive", check=False, env=env)
    assert cp.returncode == 2 and "--init" in one_line_error(cp), cp.stderr
    assert not store.exists() and not fuse_mounted(mnt)
    try:
        run_bpfs("mount", "--init", "--kdf", "interactive", store, mnt, env=env)
        assert fuse_mounted(mnt)
        kdf = json.loads((store / "key.json").read_text())["kdf"]
        assert (kdf["opslimit"], kdf["memlimit"]) == (nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE,
                                                      nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE), kdf
    finally:
        cleanup_mount(mnt, store)


def test_make_mount_takes_the_listen_address(store, tmp_path):
    """`make mount LISTEN=HOST:PORT` mounts with the daemon serving partners there (it had no way
    to say it)."""
    import json
    import socket

    from tests.helpers.cli import bpfs_env, run_bpfs
    from tests.helpers.mounts import Mount, fuse_mounted

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = Mount(store, tmp_path / "mnt", env=bpfs_env())
    try:
        cp = subprocess.run(make_mount_command(store, m.mnt) + [f"LISTEN=127.0.0.1:{port}"], env=m.env,
                            capture_output=True, text=True, timeout=120)
        assert cp.returncode == 0 and fuse_mounted(m.mnt), cp.stdout + cp.stderr
        ident = json.loads(run_bpfs("id", store, "--json", env=m.env).stdout)
        assert ident["addresses"] == [f"127.0.0.1:{port}"], ident
        m.umount()
    finally:
        m.cleanup()
