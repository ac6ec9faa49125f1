"""How the mount's FUSE loop waits for the kernel's next request: a short poll, then sleep.

pyfuse3 serves requests on the trio loop: a worker task takes its read lock, waits until
/dev/fuse is readable (`trio.lowlevel.wait_readable`), reads one request and runs its
handler. A serial workload (`tar -x`, `rm -rf`, `stat` of every file, `ls -lR`) sends the
next request a few microseconds after the last reply, but by then the daemon has gone to
sleep in epoll, and waking it (and the application's wait for the reply, which the kernel
then has to wake in turn) costs more than bpfs's whole work for the request. Measured on
this 2-core VM with a one-file pyfuse3 file system answering getxattr (ENODATA): 48-58 us per
request, against 27-29 us for gocryptfs; bpfs's own handlers add 4-9 us to that.

`install()` gives pyfuse3 a wait that first polls the descriptor without blocking for up to
`spin` seconds (50 us by default), and sleeps in trio's epoll only when nothing came in
that time. The same file system then answers in 18-22 us per request. pyfuse3 keeps its own
logic: the read lock, its worker tasks, its exit checks. Only the wait changes, through the
`pyfuse3.trio` hook that pyfuse3.asyncio uses to swap the whole event loop.

The cost is CPU while the daemon is otherwise idle: at most `spin` per quiet spell, so a
mount nobody uses burns nothing, and one that is busy was using that core anyway. Each
poll releases the GIL, so worker threads (hashing, sealing, pack writes) run beside it.
Where the poll does not pay (a sequential 1 MiB write: the application's next request
comes after the kernel has copied its megabyte, later than the poll waits), it backs off:
after `MISSES_BEFORE_BACKOFF` polls in a row that found nothing, only every `PROBE_EVERY`-th
wait polls, until one finds a request again. `BPFS_FUSE_SPIN_US=0` turns the poll off
(pyfuse3's plain wait).
"""

from __future__ import annotations

import os
import select
import time
from types import SimpleNamespace

import pyfuse3
import trio

DEFAULT_SPIN_US = 50
SPIN_ENV = "BPFS_FUSE_SPIN_US"
MAX_SPIN_US = 10_000  # a longer poll would only burn CPU: a sleeping wake-up costs about 30 us
MISSES_BEFORE_BACKOFF = 8
PROBE_EVERY = 16


def spin_from_environment() -> float:
    """The poll time in seconds: BPFS_FUSE_SPIN_US if set (0 turns it off), else the default."""
    raw = os.environ.get(SPIN_ENV, "").strip()
    if not raw:
        return DEFAULT_SPIN_US / 1e6
    try:
        us = int(raw)
    except ValueError:
        raise ValueError(f"{SPIN_ENV} must be a whole number of microseconds, not {raw!r}") from None
    if not 0 <= us <= MAX_SPIN_US:
        raise ValueError(f"{SPIN_ENV} must be between 0 and {MAX_SPIN_US}, not {us}")
    return us / 1e6


class PollingWait:
    """`wait_readable(fd)`: poll for up to `spin` seconds, then wait through trio.

    `hits` counts the waits a request ended during the poll, `sleeps` those that went to
    trio's epoll, `skipped` those of them that did not poll because the poll was backing off
    (for tests and benchmarks).
    """

    def __init__(self, spin: float):
        self.spin = spin
        self.hits = 0
        self.sleeps = 0
        self.skipped = 0
        self._misses = 0  # polls in a row that found nothing
        self._pollers: dict[int, select.poll] = {}

    def _poller(self, fd: int) -> select.poll:
        poller = self._pollers.get(fd)
        if poller is None:
            poller = self._pollers[fd] = select.poll()
            poller.register(fd, select.POLLIN)
        return poller

    async def wait_readable(self, fd: int) -> None:
        misses = self._misses
        if self.spin > 0 and (misses < MISSES_BEFORE_BACKOFF or misses % PROBE_EVERY == 0):
            poll = self._poller(fd).poll
            clock = time.perf_counter
            deadline = clock() + self.spin
            while True:
                if poll(0):  # a request, or an error (unmounted): the read that follows tells which
                    self.hits += 1
                    self._misses = 0
                    return
                if clock() >= deadline:
                    break
        elif self.spin > 0:
            self.skipped += 1
        self._misses = misses + 1
        self.sleeps += 1
        await trio.lowlevel.wait_readable(fd)


class _Trio(SimpleNamespace):
    """trio as pyfuse3 sees it: the real module but for `lowlevel.wait_readable`."""

    def __getattr__(self, name: str):
        return getattr(trio, name)


class _Lowlevel(SimpleNamespace):
    def __getattr__(self, name: str):
        return getattr(trio.lowlevel, name)


def install(spin: float | None = None) -> PollingWait | None:
    """Make pyfuse3 wait for requests with a `PollingWait` (None: pyfuse3's wait is kept,
    when the poll is off or this pyfuse3 has no such hook)."""
    if spin is None:
        spin = spin_from_environment()
    if spin <= 0 or getattr(pyfuse3, "trio", None) is not trio:
        return None
    waiter = PollingWait(spin)
    pyfuse3.trio = _Trio(lowlevel=_Lowlevel(wait_readable=waiter.wait_readable))  # type: ignore[attr-defined]
    return waiter


def uninstall() -> None:
    """pyfuse3 waits through trio again."""
    if isinstance(getattr(pyfuse3, "trio", None), _Trio):
        pyfuse3.trio = trio  # type: ignore[attr-defined]
