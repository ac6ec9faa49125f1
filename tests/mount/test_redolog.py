"""The redo log that makes close() survive a killed daemon without an fsync per file.

A unit test of the log file format (torn and corrupt batches end the replay), and an
end-to-end test: files closed (never fsync'd) before kill -9 are intact after the next
mount, and a log torn at any point (as by a power loss mid-write) still mounts cleanly.
"""

from __future__ import annotations

import os
import random
import subprocess

from tests.helpers.files import sha256_bytes, sha256_file
from tests.helpers.procs import wait_until

from bpfs.redolog import DELETE, PUT, RedoLog

TABLES = ("meta", "inodes")


def test_saved_batches_replay_in_order_and_a_torn_tail_is_dropped(tmp_path):
    path = str(tmp_path / "log")
    log = RedoLog(path, TABLES)
    log.put("inodes", b"k1", b"v1")
    log.delete("meta", b"k0")
    log.save()
    log.put("inodes", b"k2", b"v2")
    mark = log.mark()
    log.put("inodes", b"gone", b"rolled back")
    log.rollback(mark)
    log.save()
    log.put("inodes", b"never", b"saved")  # not saved: not in the file
    assert list(log.saved_records()) == [
        ("inodes", PUT, b"k1", b"v1"), ("meta", DELETE, b"k0", b""), ("inodes", PUT, b"k2", b"v2")]
    whole = os.path.getsize(path)
    for cut in range(whole - 1, 0, -7):  # a power loss can leave any prefix on the disk
        with open(path, "r+b") as f:
            f.truncate(cut)
        records = list(RedoLog(path, TABLES).saved_records())
        assert records in ([], [("inodes", PUT, b"k1", b"v1"), ("meta", DELETE, b"k0", b"")]), (cut, records)
    log.checkpointed()
    assert os.path.getsize(path) == 0 and list(log.saved_records()) == []


def test_corrupt_batch_ends_the_replay(tmp_path):
    path = str(tmp_path / "log")
    log = RedoLog(path, TABLES)
    for i in range(3):
        log.put("inodes", b"k%d" % i, b"v" * 100)
        log.save()
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40  # inside the second batch
    open(path, "wb").write(data)
    assert list(RedoLog(path, TABLES).saved_records()) == [("inodes", PUT, b"k0", b"v" * 100)]


def test_closed_files_survive_kill9_and_a_torn_log_still_mounts(mounted, make_mount, tmp_path):
    rng = random.Random(5)
    expect = {}
    for i in range(40):
        data = rng.randbytes(rng.choice([0, 100, 5000, 300_000]))
        (mounted.mnt / f"f{i}").write_bytes(data)  # closed, never fsync'd
        expect[f"f{i}"] = sha256_bytes(data)
    log = mounted.store / "index.redo"
    assert log.stat().st_size > 0, "closes left nothing in the redo log: are they fsync'ing instead?"
    mounted.kill_daemon()
    # the same crashed store, as a power loss would have left it: the log torn mid-batch
    torn_store = tmp_path / "torn-store"
    subprocess.run(["cp", "-a", str(mounted.store), str(torn_store)], check=True)
    torn_log = torn_store / "index.redo"
    torn_log.write_bytes(torn_log.read_bytes()[: torn_log.stat().st_size * 2 // 3])

    mounted.mount()
    for name, sha in expect.items():
        assert sha256_file(mounted.mnt / name) == sha, f"{name} closed before kill -9 is not intact"
    assert wait_until(lambda: log.stat().st_size == 0, timeout=10), "replayed log was not checkpointed"
    mounted.umount()
    assert mounted.verify("--read-data").returncode == 0

    torn = make_mount(store=torn_store, name="mnt-torn")
    torn.mount()
    present = [name for name in expect if (torn.mnt / name).exists()]
    for name in present:  # an earlier, consistent state: each file whole or absent
        assert sha256_file(torn.mnt / name) == expect[name], f"{name} has wrong bytes after a torn log"
    torn.umount()
    cp = torn.verify("--read-data")
    assert cp.returncode == 0, cp.stdout + cp.stderr
