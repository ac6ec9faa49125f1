"""Write buffers (`bpfs.data.buffers`) with a stand-in for the chunk pipeline: how a writer is held
back, and what it is told, when the drains of its buffer fail. The mount tests cover the real
pipeline (tests/mount); a drain that fails on every try is hard to bring about there."""

from __future__ import annotations

import errno

import pytest
import trio

from bpfs.data.buffers import BUFFER_LIMIT, DRAIN_AT, MAX_DRAINS, Buffers

MiB = 1 << 20


def test_a_writer_held_back_by_failing_drains_is_told_once_not_kept_waiting(tmp_path):
    """Past BUFFER_LIMIT a writer waits for its buffer's background drains. When they fail (a disk
    error), the writer gets the error, as a drain in its own task would have given it, instead of
    starting drain after drain while it waits; its bytes stay buffered for the next try."""
    calls: list[bool] = []

    async def failing_persist(ino, buf, final):
        calls.append(final)
        await trio.lowlevel.checkpoint()
        raise OSError(errno.EIO, "disk error")

    async def main():
        buffers = Buffers(failing_persist, str(tmp_path))
        async with trio.open_nursery() as nursery:
            buffers.nursery = nursery
            written = 0
            with trio.fail_after(10), pytest.raises(OSError) as err:
                while written < 4 * BUFFER_LIMIT:
                    await buffers.write(1, written, b"x" * MiB)
                    written += MiB
            assert err.value.errno == errno.EIO
            assert DRAIN_AT <= written < 4 * BUFFER_LIMIT
            assert 0 < len(calls) <= 2 * MAX_DRAINS  # the drains in flight, not one after another
            assert buffers.get(1).buffered() == written + MiB  # the refused write's bytes too, as before
            nursery.cancel_scope.cancel()

    trio.run(main)
