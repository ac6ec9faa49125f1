"""The FUSE loop's wait for the next request (bpfs/fuseloop.py): a short poll before sleeping.

On a real mount: a serial stream of requests is found by the poll, `BPFS_FUSE_SPIN_US=0`
turns it off, a bad value is refused before the passphrase, and the rest of the daemon
(its control socket, the committer behind fsync) keeps running while the stream lasts.
"""

from __future__ import annotations

import errno
import json
import os
import re
import threading
import time

import pytest

from tests.helpers.cli import bpfs_env, one_line_error, run_bpfs
from tests.helpers.mounts import is_mounted

POLL_LINE = re.compile(r"FUSE requests: (\d+) found by polling, (\d+) after sleeping")


def _serial_requests(path, n: int) -> None:
    """n FUSE requests one after another: getxattr of a name the file does not have."""
    for _ in range(n):
        try:
            os.getxattr(path, "user.absent")
        except OSError as e:
            assert e.errno == errno.ENODATA, e


def _poll_counts(m) -> list[tuple[int, int]]:
    log = "\n".join(p.read_text(errors="replace") for p in sorted(m.store.glob("log/*.log")))
    return [(int(a), int(b)) for a, b in POLL_LINE.findall(log)]


def test_a_serial_stream_is_found_by_polling_and_zero_turns_the_poll_off(make_mount):
    m = make_mount(name="mnt-poll")
    m.mount()
    try:
        f = m.path("f")
        f.write_bytes(b"x")
        _serial_requests(f, 3000)
    finally:
        m.umount()
    counts = _poll_counts(m)
    assert len(counts) == 1, m.log_tail()
    hits, sleeps = counts[0]
    # the 3,000 serial requests (and the mount's own) were served; with the application
    # answering within microseconds, the poll found some of them (without it, none)
    assert hits + sleeps >= 3000, counts
    assert hits > 0, counts

    m.env = bpfs_env(BPFS_FUSE_SPIN_US="0")
    m.mount()
    try:
        _serial_requests(m.path("f"), 200)
        assert m.path("f").read_bytes() == b"x"
    finally:
        m.umount()
    assert len(_poll_counts(m)) == 1, "with the poll off, pyfuse3's own wait serves (and nothing is counted)"


@pytest.mark.parametrize("value", ["fast", "-1", "10001"])
def test_a_bad_poll_time_is_refused_in_one_line_before_anything_happens(make_mount, value):
    m = make_mount(name="mnt-badpoll")
    cp = run_bpfs("mount", m.store, m.mnt, check=False, env=bpfs_env(passphrase=None, BPFS_FUSE_SPIN_US=value))
    msg = one_line_error(cp)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    assert "BPFS_FUSE_SPIN_US" in msg and "passphrase" not in cp.stderr.lower(), cp.stderr
    assert not is_mounted(m.mnt)


def test_the_daemon_keeps_serving_everything_else_during_a_stream_of_requests(make_mount):
    """The poll never yields to trio's scheduler by itself: pyfuse3's read lock does, once per
    request. While one thread keeps the FUSE loop busy with serial requests, `bpfs status` (the
    daemon's control socket) answers and an fsync (which waits for the committer task) returns."""
    m = make_mount(name="mnt-busy")
    m.mount()
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0]

    def stream():
        f = m.path("busy")
        try:
            while not stop.is_set():
                _serial_requests(f, 100)
                done[0] += 100
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    m.path("busy").write_bytes(b"b")
    t = threading.Thread(target=stream)
    t.start()
    try:
        while done[0] < 500 and t.is_alive():  # the stream is running
            time.sleep(0.01)
        before = done[0]
        for i in range(3):
            status = json.loads(run_bpfs("status", m.store, "--json", env=m.env, timeout=60).stdout)
            assert status["daemon"] is True, status
            data = os.urandom(64 << 10)
            fd = os.open(m.path(f"synced{i}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            assert m.path(f"synced{i}").read_bytes() == data
        assert done[0] > before, "the stream stopped while the rest was served"
    finally:
        stop.set()
        t.join(60)
        m.umount()
    assert not errors, errors
    (hits, sleeps), = _poll_counts(m)
    assert hits > 0, (hits, sleeps)
