"""bpfs.fuseloop without a mount: the poll time's parsing, pyfuse3's hook, and the wait itself on
a real pipe inside trio (tests/mount/test_fuse_loop.py runs it on real mounts)."""

from __future__ import annotations

import os

import pyfuse3
import pytest
import trio

from bpfs import fuseloop


@pytest.mark.parametrize("raw, seconds", [(None, fuseloop.DEFAULT_SPIN_US / 1e6), ("", 50e-6), ("0", 0.0),
                                          (" 200 ", 200e-6), ("10000", 0.01)])
def test_the_poll_time_comes_from_the_environment(monkeypatch, raw, seconds):
    if raw is None:
        monkeypatch.delenv(fuseloop.SPIN_ENV, raising=False)
    else:
        monkeypatch.setenv(fuseloop.SPIN_ENV, raw)
    assert fuseloop.spin_from_environment() == pytest.approx(seconds)


@pytest.mark.parametrize("raw", ["fast", "1.5", "-1", "10001"])
def test_a_bad_poll_time_is_an_error_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv(fuseloop.SPIN_ENV, raw)
    with pytest.raises(ValueError, match=fuseloop.SPIN_ENV):
        fuseloop.spin_from_environment()


def test_install_changes_only_pyfuse3s_wait_and_uninstall_puts_trio_back():
    assert pyfuse3.trio is trio
    assert fuseloop.install(0) is None and pyfuse3.trio is trio  # off: pyfuse3's own wait
    waiter = fuseloop.install(50e-6)
    try:
        assert waiter is not None
        assert pyfuse3.trio.lowlevel.wait_readable == waiter.wait_readable
        # everything else pyfuse3 uses is trio's own
        assert pyfuse3.trio.Lock is trio.Lock and pyfuse3.trio.ClosedResourceError is trio.ClosedResourceError
        assert pyfuse3.trio.lowlevel.current_task is trio.lowlevel.current_task
        assert pyfuse3.trio.lowlevel.notify_closing is trio.lowlevel.notify_closing
        assert fuseloop.install(50e-6) is None, "installed twice"
    finally:
        fuseloop.uninstall()
    assert pyfuse3.trio is trio


def test_the_wait_finds_a_ready_descriptor_by_polling_and_sleeps_through_trio_otherwise():
    waiter = fuseloop.PollingWait(0.005)
    r, w = os.pipe()

    async def main():
        os.write(w, b"1")
        await waiter.wait_readable(r)  # ready already: found by the poll
        assert (waiter.hits, waiter.sleeps) == (1, 0)
        os.read(r, 1)

        ticks = []

        async def other_task():
            for _ in range(5):
                ticks.append(trio.current_time())
                await trio.sleep(0.01)
            os.write(w, b"2")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            with trio.fail_after(10):
                await waiter.wait_readable(r)  # nothing for 40 ms: the poll gives up, trio waits
        assert (waiter.hits, waiter.sleeps) == (1, 1)
        assert len(ticks) == 5, "the other task ran while the wait slept"
        assert os.read(r, 1) == b"2"

    try:
        trio.run(main)
    finally:
        os.close(r)
        os.close(w)


def test_a_poll_of_zero_always_waits_through_trio():
    waiter = fuseloop.PollingWait(0)
    r, w = os.pipe()

    async def main():
        os.write(w, b"1")
        await waiter.wait_readable(r)

    try:
        trio.run(main)
    finally:
        os.close(r)
        os.close(w)
    assert (waiter.hits, waiter.sleeps) == (0, 1)


def test_the_poll_backs_off_after_misses_and_a_found_request_resets_it():
    """Eight polls in a row that find nothing: only every 16th wait polls, until one finds a
    request (a ready pipe), after which every wait polls again."""
    waiter = fuseloop.PollingWait(20e-6)
    r, w = os.pipe()

    async def main():
        async def feed():  # makes each wait end through trio, after the poll gave up
            await trio.sleep(0.002)
            os.write(w, b"x")

        async def one_quiet_wait():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(feed)
                await waiter.wait_readable(r)
            os.read(r, 1)

        for _ in range(fuseloop.MISSES_BEFORE_BACKOFF):
            await one_quiet_wait()
        assert (waiter.hits, waiter.sleeps, waiter.skipped) == (0, 8, 0)
        for _ in range(fuseloop.PROBE_EVERY - fuseloop.MISSES_BEFORE_BACKOFF):
            await one_quiet_wait()
        assert waiter.skipped == fuseloop.PROBE_EVERY - fuseloop.MISSES_BEFORE_BACKOFF
        # the 16th miss polls again (a probe); with a request ready it is found and resets the count
        os.write(w, b"y")
        await waiter.wait_readable(r)
        os.read(r, 1)
        assert waiter.hits == 1
        os.write(w, b"z")
        await waiter.wait_readable(r)
        os.read(r, 1)
        assert waiter.hits == 2 and waiter.skipped == fuseloop.PROBE_EVERY - fuseloop.MISSES_BEFORE_BACKOFF

    try:
        trio.run(main)
    finally:
        os.close(r)
        os.close(w)
