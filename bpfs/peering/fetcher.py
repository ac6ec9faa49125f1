"""Fetching packs from partners in parallel, each one verified before it counts.

Owns the transfer of a set of packs (`Job`s) from the partners that hold them (`sources.Source`)
into STORE/packs: every partner at once, PER_PARTNER packs per partner (one 1 MiB piece in flight
each), each pack written to ID.pack.part (continued from its size after an interruption),
fdatasync'ed, then checked before it is renamed into place:
  - its size, and its tree root (`packtree.root_of_file`) against the root the rebuilt index
    recorded for it (a cheap whole-pack check: our own signed snapshot carries that root);
  - every chunk the index places in it, authenticated (decrypted under its id, length checked).
A partner whose copy fails a check (or that lists the pack with another digest than ours, or says
it lost it) is not asked for that pack again; the pack is taken from another partner. A copy put
together from two partners (one dropped mid-pack) that fails is fetched again whole from one, so
the blame lands where it belongs. A connection that drops is redialled with backoff by its
`Source` while the other partners take over its packs; a partner that stays away (`SourceGone`)
leaves its packs to the others. A pack no reachable partner could give is reported in
`FetchResult.failed` with the reason, never guessed at.

Scheduling: each partner has a queue of the packs it holds, in id order; a worker takes the next
pack still pending; a pack put back (its partner dropped, a bad copy) goes to the front of every
other holder's queue. At the end, when fewer packs are left than the partners could fetch at
once, each partner takes only its share of them. A partner with nothing left to do takes a second
copy of a pack another partner is far too slow with (or silent on: it died mid-pack) into a file
of its own; the first copy in wins and the other fetch is cancelled, so a slow partner never holds
up the end of a recovery. Nothing here knows about snapshots or the index: the caller gives each
job's expected size, root and chunk list.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from ..crypto import padme
from ..errors import IntegrityError
from ..fsutil import fsync_dir, make_private_dir
from ..net.codec import ErrorCode
from ..net.rpc import RemoteError
from ..packtree import root_of_file
from . import protocol as P
from .sources import Source, SourceDown, SourceGone

log = logging.getLogger(__name__)

PER_PARTNER = 4  # packs fetched at once from one partner
BUSY_PAUSE = 1.0  # after a partner said it is busy (rate limited), before asking it again
STEAL_AFTER = 5.0  # a pack this far from done at its partner's pace is fetched from an idle one too
STEAL_CHECK = 1.0  # how often an idle partner looks for such a pack
SPEED_WEIGHT = 0.3  # of the newest piece in a partner's speed estimate
_PENDING, _ACTIVE, _DONE, _FAILED = "pending", "active", "done", "failed"
_UNKNOWN = "?"  # a contributor to a part file left by an earlier run


@dataclass
class Job:
    """One pack to fetch.

    Attributes:
      pack_id: our pack id.
      size: its size in bytes (None: as its holders list it).
      root: its tree root as our snapshot recorded it (None: unknown; chunks still authenticate).
      entries: the chunks in it, [(chunk id, offset, sealed length, plain length)], or a function
        returning them (called on the event loop's thread: it may read the index).
    """

    pack_id: int
    size: int | None
    root: bytes | None
    entries: list | Callable[[], list]

    def chunk_list(self) -> list:
        return self.entries() if callable(self.entries) else self.entries


@dataclass
class FetchResult:
    """What a fetch did.

    Attributes:
      done: packs now in place; failed: pack -> why it could not be had.
      bytes: piece bytes received this run; packs_bytes: bytes of the packs completed this run.
      by_source: peer id -> piece bytes received from it.
      present: bytes of partial packs an earlier run left (counted as done by `progress`).
      unreachable: packs that failed only because their holders could not be reached (a later
        run may get them), as opposed to bad or missing copies everywhere.
    """

    done: set = field(default_factory=set)
    failed: dict = field(default_factory=dict)
    bytes: int = 0
    packs_bytes: int = 0
    present: int = 0
    by_source: dict = field(default_factory=dict)
    unreachable: set = field(default_factory=set)


class _BadCopy(Exception):
    pass


class _Again(Exception):
    """Put the pack back without blaming the partner (a copy put together from several failed)."""


class Fetcher:
    """Fetch `jobs` from `sources` into the files `path_of(pack_id)` names (see the module docstring).

    Attributes:
      result: the `FetchResult` (filled in as packs complete).
    """

    def __init__(self, keys, jobs: list[Job], sources: list[Source], path_of: Callable[[int], str], *,
                 per_partner: int = PER_PARTNER, progress: Callable[[int], None] = lambda n: None,
                 warn: Callable[[str], None] = lambda line: None):
        self.keys = keys
        self.jobs = {j.pack_id: j for j in jobs}
        self.sources = [s for s in sources if not s.dead and s.packs is not None]
        self.path_of = path_of
        self.per_partner = per_partner
        self.progress = progress
        self.warn = warn
        self.result = FetchResult()
        self.state: dict[int, str] = {}
        self.holders: dict[int, list[Source]] = {}
        self.excluded: dict[int, dict[str, str]] = collections.defaultdict(dict)  # pack -> peer -> why
        self.whole: set[int] = set()  # fetch from offset 0, from one partner (a mixed copy failed)
        self.contrib: dict[int, set[str]] = {}
        self.queues: dict[str, collections.deque] = {}
        self.remaining = 0
        self._gone: set[str] = set()
        self._lost: set[str] = set()  # partners whose connection dropped (warned once each)
        self._changed = trio.Event()
        self._scope: trio.CancelScope | None = None
        self.fetching: dict[int, dict[str, trio.CancelScope]] = {}  # pack -> peer -> its fetch (one, or two)
        self.at: dict[tuple[int, str], tuple] = {}  # (pack, peer) -> (offset, size, piece asked at, started)
        self.speed: dict[str, float] = {}  # peer -> bytes per second of one request, recently
        self.open: set[int] = set()  # packs pending or being fetched
        self.busy: collections.Counter = collections.Counter()  # peer -> packs it is fetching now
        self.can: collections.Counter = collections.Counter()  # peer -> open packs it may still give
        self._plan()

    # ----- planning -------------------------------------------------------------------------------
    def _plan(self) -> None:
        for d in {os.path.dirname(self.path_of(pid)) for pid in self.jobs}:  # second copies a crash left
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            for name in names:
                if ".pack.part-" in name:
                    _unlink(os.path.join(d, name))
        foreign: dict[str, int] = collections.Counter()
        for s in self.sources:
            self.queues[s.peer_id] = collections.deque()
        for pid in sorted(self.jobs):
            job = self.jobs[pid]
            try:
                self.result.present += min(os.stat(self.path_of(pid) + ".part").st_size, job.size or 1 << 62)
            except FileNotFoundError:
                pass
            holders = []
            for s in self.sources:
                assert s.packs is not None  # self.sources are the listed ones (__init__)
                held = s.packs.get(pid)
                if held is None:
                    continue
                size, digest = held
                if (job.root is not None and digest != job.root) or (job.size is not None and size != job.size):
                    foreign[s.peer_id] += 1
                    self.excluded[pid][s.peer_id] = f"{s.peer_id} holds another copy (digest or size differs)"
                    continue
                holders.append(s)
                self.queues[s.peer_id].append(pid)
                self.can[s.peer_id] += 1
            self.holders[pid] = holders
            if holders:
                self.state[pid] = _PENDING
                self.remaining += 1
                self.open.add(pid)
            else:
                self._fail(pid, "no partner we reached holds it" if not self.excluded[pid] else
                           "; ".join(self.excluded[pid].values()))
        for peer, n in foreign.items():
            self.warn(f"{peer} holds {n} of our packs with another digest or size than our snapshot "
                      "records (damaged, or not ours): they are taken from other partners")

    def _leave_open(self, pid: int) -> None:
        self.remaining -= 1
        self.open.discard(pid)
        for h in self.holders.get(pid, ()):
            if h.peer_id not in self.excluded.get(pid, ()):
                self.can[h.peer_id] -= 1

    def _fail(self, pid: int, why: str, unreachable: bool = False) -> None:
        if self.state.get(pid) in (_PENDING, _ACTIVE):
            self._leave_open(pid)
        self.state[pid] = _FAILED
        self.result.failed[pid] = why
        if unreachable:
            self.result.unreachable.add(pid)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        if self.remaining <= 0 and self._scope is not None:
            self._scope.cancel()  # workers still redialling a partner that went away have nothing to do

    def _usable(self, pid: int, s: Source) -> bool:
        return not s.dead and s.peer_id not in self.excluded.get(pid, ())

    def _next(self, s: Source) -> int | None:
        q = self.queues[s.peer_id]
        while q:
            pid = q.popleft()
            if self.state.get(pid) == _PENDING and s.peer_id not in self.excluded.get(pid, ()):
                return pid
        return None

    def _over_share(self, s: Source) -> bool:
        """At the end, when fewer packs are left than all partners could fetch at once, a partner
        takes no more than its share of them (the others would be idle while it fetches several)."""
        if self.remaining > self.per_partner * len(self.sources) or not self.busy[s.peer_id]:
            return False
        useful = {h.peer_id for pid in self.open for h in self.holders[pid] if self._usable(pid, h)}
        return len(useful) > 1 and self.busy[s.peer_id] >= -(-len(self.open) // len(useful))

    def _could_use(self, s: Source) -> bool:
        """Whether `s` may still get work: a pack it holds is pending or being fetched elsewhere."""
        return self.can[s.peer_id] > 0

    def _requeue(self, pid: int) -> None:
        """Back to pending, first in every usable holder's queue; failed if none is left."""
        live = [h for h in self.holders[pid] if self._usable(pid, h)]
        if not live:
            dead = [h for h in self.holders[pid] if h.dead and h.peer_id not in self.excluded[pid]]
            reasons = list(self.excluded[pid].values()) + [f"{h.peer_id} is unreachable" for h in dead]
            self._fail(pid, "; ".join(reasons) or "no partner holds it", unreachable=bool(dead))
        else:
            self.state[pid] = _PENDING
            for h in live:
                self.queues[h.peer_id].appendleft(pid)
        self._wake()

    def _attempt_failed(self, pid: int, s: Source, exclude: str | None = None) -> None:
        """An attempt at `pid` from `s` ended without the pack: `s` is not asked for it again if
        `exclude` says why; the pack goes back to pending unless another copy is still coming."""
        if exclude is not None:
            if s.peer_id not in self.excluded[pid] and pid in self.open:
                self.can[s.peer_id] -= 1
            self.excluded[pid][s.peer_id] = f"{s.peer_id}: {exclude}"
            others = any(self._usable(pid, h) for h in self.holders[pid])
            self.warn(f"pack {pid:012x} from {s.peer_id}: {exclude}" + ("; taking it from another partner"
                                                                          if others else ""))
        self.fetching.get(pid, {}).pop(s.peer_id, None)
        if self.state.get(pid) == _ACTIVE and not self.fetching.get(pid):
            self._requeue(pid)

    def _completed(self, pid: int, s: Source) -> None:
        self.fetching.get(pid, {}).pop(s.peer_id, None)
        for scope in self.fetching.pop(pid, {}).values():
            scope.cancel()  # the other copy of it being fetched (a stalled partner's) is not needed
        self.state[pid] = _DONE
        self._leave_open(pid)
        self.result.done.add(pid)
        self._wake()

    def _source_gone(self, s: Source, why) -> None:
        if s.peer_id in self._gone:
            return
        self._gone.add(s.peer_id)
        self.warn(f"giving up on {s.peer_id} for this run: {why}")
        for pid, holders in self.holders.items():
            if s in holders and self.state.get(pid) == _PENDING:
                if not any(self._usable(pid, h) for h in holders):
                    self._requeue(pid)  # fails it: nobody left
        self._wake()

    # ----- stalled partners -----------------------------------------------------------------------
    def _note_piece(self, s: Source, nbytes: int, seconds: float) -> None:
        rate = nbytes / max(seconds, 1e-4)
        old = self.speed.get(s.peer_id)
        self.speed[s.peer_id] = rate if old is None else (1 - SPEED_WEIGHT) * old + SPEED_WEIGHT * rate

    def _steal(self, s: Source) -> int | None:
        """A pack another partner is fetching so slowly (or not at all: it went away) that `s`,
        idle, would bring it well before: fetched again from `s`, the first copy in wins."""
        mine = self.speed.get(s.peer_id) or max(self.speed.values(), default=0.0)
        if mine <= 0:
            return None
        now = trio.current_time()
        best, best_left = None, 0.0
        for pid, fetchers in self.fetching.items():
            if self.state.get(pid) != _ACTIVE or len(fetchers) != 1 or s.peer_id in fetchers \
                    or s not in self.holders[pid] or not self._usable(pid, s):
                continue
            (other,) = fetchers
            offset, size, asked_at, started = self.at.get((pid, other), (0, 0, now, now))
            if now - started < STEAL_AFTER:
                continue
            rate = self.speed.get(other, 0.0)
            waited = now - asked_at
            if rate <= 0 or waited * rate > P.PIECE:  # this piece is late: judge by how late
                rate = min(rate, P.PIECE / waited) if rate > 0 else P.PIECE / max(waited, 1e-3)
            left = (size - offset) / rate
            if left > STEAL_AFTER and left > 2 * size / mine and left > best_left:
                best, best_left = pid, left
        return best

    # ----- running ----------------------------------------------------------------------------------
    async def run(self) -> FetchResult:
        if self.remaining:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                for s in self.sources:
                    for _ in range(min(self.per_partner, max(1, len(self.queues[s.peer_id])))):
                        nursery.start_soon(self._worker, s)
        for pid, st in self.state.items():  # a worker-less leftover (every holder's workers ended)
            if st in (_PENDING, _ACTIVE):
                self._fail(pid, "no partner holding it could be used", unreachable=True)
        return self.result

    async def _worker(self, s: Source) -> None:
        while self.remaining > 0 and not s.dead:
            try:
                await s.ensure()
            except SourceGone as e:
                self._source_gone(s, e)
                return
            pid, second = (self._next(s) if not self._over_share(s) else None), False
            if pid is None and not self.busy[s.peer_id]:
                pid, second = self._steal(s), True
            if pid is None:
                if not self._could_use(s):
                    return
                with trio.move_on_after(STEAL_CHECK):
                    await self._changed.wait()
                continue
            if second:
                log.info("pack %012x is slow to come from %s: fetching it from %s too", pid,
                         next(iter(self.fetching[pid])), s.peer_id)
            self.state[pid] = _ACTIVE
            scope = trio.CancelScope()
            self.fetching.setdefault(pid, {})[s.peer_id] = scope
            self.busy[s.peer_id] += 1
            try:
                with scope:
                    await self._fetch(s, pid, second)
            except _BadCopy as e:
                self._attempt_failed(pid, s, str(e))
            except RemoteError as e:
                if e.code in (ErrorCode.RATE_LIMITED, ErrorCode.INTERNAL):  # busy: not the copy's fault
                    self._attempt_failed(pid, s)
                    await trio.sleep(BUSY_PAUSE)
                else:
                    self._attempt_failed(pid, s, f"refused: {e.message}")
            except (SourceDown, _Again) as e:
                log.info("fetching pack %012x from %s: %s", pid, s.peer_id, e)
                self._attempt_failed(pid, s)
                if isinstance(e, SourceDown) and s.peer_id not in self._lost:
                    self._lost.add(s.peer_id)
                    self.warn(f"lost the connection to {s.peer_id} ({s.error}): redialling it; meanwhile the other "
                              "partners take over its packs")
            except SourceGone as e:
                self._attempt_failed(pid, s)
                self._source_gone(s, e)
                return
            except BaseException:
                self.fetching.get(pid, {}).pop(s.peer_id, None)
                if self.state.get(pid) == _ACTIVE and not self.fetching.get(pid):
                    self.state[pid] = _PENDING
                raise
            else:
                if scope.cancelled_caught or self.state.get(pid) == _DONE:
                    self.fetching.get(pid, {}).pop(s.peer_id, None)  # the other copy came in first
                else:
                    self._completed(pid, s)
            finally:
                self.at.pop((pid, s.peer_id), None)
                self.busy[s.peer_id] -= 1
                self._wake()

    async def _fetch(self, s: Source, pid: int, second: bool = False) -> None:
        """Fetch `pid` from `s` into its part file (a second copy, racing a stalled one: its own
        file, from the start), check it, and put it in place. `progress` hears of every byte
        written, and of every byte thrown away again (negative), so it counts what is kept."""
        job = self.jobs[pid]
        assert s.packs is not None  # self.sources are the listed ones (__init__)
        size = job.size if job.size is not None else s.packs[pid][0]
        path = self.path_of(pid)
        part = path + (".part" if not second else f".part-{s.peer_id[:6]}")
        make_private_dir(os.path.dirname(path))
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        placed, held = False, 0  # held: bytes in `part` (counted by `progress`)
        try:
            try:
                held = offset = os.fstat(fd).st_size if not second else 0
                if offset > size or pid in self.whole or second:
                    os.ftruncate(fd, 0)
                    self.progress(-held)
                    held = offset = 0
                if not second:
                    if offset == 0:
                        self.contrib[pid] = {s.peer_id}
                    else:
                        self.contrib.setdefault(pid, {_UNKNOWN}).add(s.peer_id)
                started = trio.current_time()
                while offset < size:
                    asked = trio.current_time()
                    self.at[(pid, s.peer_id)] = (offset, size, asked, started)
                    reply = await s.call(P.GetPiece(P.PACK, pid, offset, min(P.PIECE, size - offset)))
                    data = reply.data
                    if not data:
                        raise _BadCopy(f"its copy is short ({offset} of {size} bytes)")
                    self._note_piece(s, len(data), trio.current_time() - asked)
                    await trio.to_thread.run_sync(_pwrite_all, fd, data, offset)
                    offset += len(data)
                    held = offset
                    self.result.bytes += len(data)
                    self.result.by_source[s.peer_id] = self.result.by_source.get(s.peer_id, 0) + len(data)
                    self.progress(len(data))
                await trio.to_thread.run_sync(os.fdatasync, fd)
            finally:
                os.close(fd)
            entries = job.chunk_list()
            bad = await trio.to_thread.run_sync(check_pack, self.keys, part, size, job.root, entries)
            if bad:
                os.unlink(part)
                self.progress(-held)
                held = 0
                contributors = self.contrib.pop(pid, {_UNKNOWN}) if not second else {s.peer_id}
                if contributors != {s.peer_id}:  # put together from several copies: whose is bad?
                    if pid in self.whole:
                        raise _BadCopy(bad)
                    self.whole.add(pid)
                    self.warn(f"pack {pid:012x} does not verify ({bad}); fetching it again whole from one partner")
                    raise _Again("a copy from several partners failed")
                raise _BadCopy(bad)
            if self.state.get(pid) == _DONE:
                return  # the other copy came in first (the finally below throws this one away)
            os.replace(part, path)
            placed = True
            fsync_dir(os.path.dirname(path))
            self.contrib.pop(pid, None)
            self.result.packs_bytes += size
            others = [p for p in self.fetching.get(pid, {}) if p != s.peer_id]
            if not others:  # a first copy left by a fetch that ended (it cleans up after itself otherwise)
                primary = path + ".part"
                if second and os.path.exists(primary):
                    self.progress(-min(size, os.stat(primary).st_size))
                    _unlink(primary)
        finally:
            if not placed and held and (second or self.state.get(pid) == _DONE):
                _unlink(part)
                self.progress(-held)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def check_pack(keys, path: str, size: int, root: bytes | None, entries) -> str | None:
    """Why the pack file at `path` is not the pack we sealed (None: it is). Blocking."""
    actual = os.stat(path).st_size
    if actual != size:
        return f"it has {actual} bytes, not {size}"
    if root is not None and root_of_file(path, size)[0] != root:
        return "its tree root is not the one our snapshot recorded (damaged or another pack)"
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for cid, offset, sealed_length, length in entries:
            sealed = os.pread(fd, sealed_length, offset)
            if len(sealed) != sealed_length:
                return f"chunk {cid[:6].hex()} lies beyond its end"
            try:
                plain = keys.data.open(sealed, cid)
            except IntegrityError:
                return f"chunk {cid[:6].hex()} fails authentication"
            if len(plain) != padme(length):
                return f"chunk {cid[:6].hex()} has the wrong length"
    finally:
        os.close(fd)
    return None
