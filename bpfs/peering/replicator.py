"""The replicator: which of our packs and roots go to which partner, and when.

Owns the per-partner upload loops, the bandwidth limit, the daily window, `sync`, and the
progress figures `status` shows. What to send comes from a `Source` (the store's side, see
`service.StoreSource`): the sealed packs in the index's outbox (committed, with nothing still
writing into them), the latest signed root and the packs it needs, and tombstones of deleted packs.

Policy:
  - Each pack goes to the first `replicas` active partners (in pairing order): with the default
    (2) and two partners, both hold everything, so either one alone can bring the store back.
    Partners beyond that are spares: unpairing an assigned partner makes the next one assigned,
    and it receives everything.
  - Priority packs (outbox value b"\\x01": keys, wallets, ... see `config`) go first, then by id.
  - A root goes to a partner only once it holds every pack that root needs: a partner never holds
    a root it could not serve a recovery from.
  - A pack deleted here (freed or compacted) is released at a partner only after that partner
    confirmed a root newer than the deletion: until then the root it holds may still need it.
    The partner keeps released packs for its grace period.
  - Resuming: before uploading a pack the partner is asked how much of it it holds (`Have`), and
    the upload continues from there; what a partner confirmed complete is in the ledger (`sent`),
    reconciled with the partner's own list on every new connection.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field

import trio

from ..config import Config, in_window
from ..errors import first_error
from ..net.quic import TransportError
from ..net.rpc import RemoteError, request
from . import protocol as P
from .ledger import Ledger, Partner
from .links import Links, Unreachable

log = logging.getLogger("bpfs.peering.replicator")

PARALLEL_PACKS = 4  # uploads in flight per partner (each one piece at a time)
REQUEST_TIMEOUT = 60.0
IDLE_RECHECK = 30.0
ERROR_PAUSE = 2.0
QUOTA_PAUSE = 60.0


class SyncTimeout(Exception):
    pass


@dataclass
class Progress:
    """What `status` shows of one partner."""

    peer_id: str
    replicated_packs: int = 0
    replicated_bytes: int = 0
    pending_packs: int = 0
    pending_bytes: int = 0
    sent_bytes: int = 0  # piece bytes sent (acknowledged) by this process since it started
    root_generation: int = 0
    state: str = "idle"  # idle | sending | offline | quota full | waiting for window | error
    last_error: str | None = None
    _window: collections.deque = field(default_factory=collections.deque, repr=False)

    def record(self, nbytes: int, now: float) -> None:
        self.sent_bytes += nbytes
        self._window.append((now, nbytes))
        while self._window and now - self._window[0][0] > 10.0:
            self._window.popleft()

    def rate(self, now: float) -> float:
        while self._window and now - self._window[0][0] > 10.0:
            self._window.popleft()
        if not self._window:
            return 0.0
        span = max(1.0, now - self._window[0][0])
        return sum(n for _, n in self._window) / span

    def as_dict(self, now: float) -> dict:
        rate = self.rate(now)
        return {"peer_id": self.peer_id, "replicated_packs": self.replicated_packs,
                "replicated_bytes": self.replicated_bytes, "pending_packs": self.pending_packs,
                "pending_bytes": self.pending_bytes, "sent_bytes": self.sent_bytes, "rate": round(rate),
                "eta": round(self.pending_bytes / rate) if rate > 0 and self.pending_bytes else (
                    0 if not self.pending_bytes else None),
                "root_generation": self.root_generation, "state": self.state, "last_error": self.last_error}


class ByteLimiter:
    """A token bucket over bytes for all uploads together (0 = no limit)."""

    def __init__(self, rate: int):
        self.rate = rate
        self._tokens = float(rate)
        self._stamp = trio.current_time()
        self._lock = trio.Lock()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            while True:
                now = trio.current_time()
                self._tokens = min(float(self.rate), self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= min(n, self.rate):
                    self._tokens -= n  # may go negative for a piece larger than a second's worth
                    return
                await trio.sleep((min(n, self.rate) - self._tokens) / self.rate)


class Replicator:
    def __init__(self, identity, ledger: Ledger, links: Links, source, config: Config, *, wall_clock=time.time):
        self.identity = identity
        self.ledger = ledger
        self.links = links
        self.source = source
        self.config = config
        self.limiter = ByteLimiter(config.upload_limit)
        self._clock = wall_clock
        self._wake = trio.Event()
        self._held: dict[str, set[int]] = {}
        self._reconciled: dict[str, object] = {}  # peer -> the connection we reconciled on
        self.progress: dict[str, Progress] = {}
        self._forced = 0  # syncs waiting: they ignore the daily window
        self._running: dict[str, trio.CancelScope] = {}

    # ----- who gets what ---------------------------------------------------------------------------
    def assigned(self) -> list[Partner]:
        active = sorted((p for p in self.ledger.partners() if p.active), key=lambda p: p.paired_at)
        return active[:self.config.replicas]

    def wake(self) -> None:
        self._wake.set()
        self._wake = trio.Event()

    def held(self, peer: str) -> set[int]:
        held = self._held.get(peer)
        if held is None:
            held = self._held[peer] = self.ledger.sent(peer, P.PACK)
        return held

    # ----- running ----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Keep one upload loop per assigned partner, following pairing changes."""
        async with trio.open_nursery() as nursery:
            while True:
                wanted = {p.peer_id for p in self.assigned()}
                for peer in list(self._running):
                    if peer not in wanted:
                        self._running.pop(peer).cancel()
                for peer in wanted - set(self._running):
                    scope = trio.CancelScope()
                    self._running[peer] = scope
                    nursery.start_soon(self._partner_loop, peer, scope)
                await self._wait_wake(IDLE_RECHECK)

    async def _wait_wake(self, timeout: float) -> None:
        wake = self._wake
        with trio.move_on_after(timeout):
            await wake.wait()

    async def _partner_loop(self, peer: str, scope: trio.CancelScope) -> None:
        prog = self.progress.setdefault(peer, Progress(peer))
        with scope:
            while True:
                partner = self.ledger.partner(peer)
                if partner is None or not partner.active:
                    return
                try:
                    if not self._forced and not in_window(self.config.window, _minute_now()):
                        prog.state = "waiting for window"
                        self._count_pending(partner, prog)
                        await self._wait_wake(60.0)
                        continue
                    conn = await self.links.get(peer, partner.addresses)
                    partner.last_seen = self._clock()
                    if self._reconciled.get(peer) is not conn:
                        await self._reconcile(conn, partner)
                        self._reconciled[peer] = conn
                    worked = await self._push(conn, partner, prog)
                    self.ledger.put_partner(partner)
                    prog.last_error = None
                    if not worked:
                        prog.state = "idle"
                        await self._wait_wake(IDLE_RECHECK)
                except Unreachable as e:
                    prog.state, prog.last_error = "offline", str(e)
                    self._count_pending(partner, prog)
                    await self._wait_wake(max(0.5, e.retry_at - trio.current_time()))
                except RemoteError as e:
                    quota = e.code == P.Refusal.QUOTA
                    prog.state = "quota full" if quota else "error"
                    prog.last_error = e.message
                    log.warning("%s refused: %s", peer, e.message)
                    await self._wait_wake(QUOTA_PAUSE if quota else ERROR_PAUSE)
                except (TransportError, trio.TooSlowError, OSError) as e:
                    prog.state, prog.last_error = "error", str(e) or type(e).__name__
                    log.info("replicating to %s: %s", peer, prog.last_error)
                    if not isinstance(e, OSError):
                        self.links.drop(peer)  # a timed-out request: the next round dials afresh
                    await trio.sleep(ERROR_PAUSE)
                except Exception as e:  # a bug: log it, keep the others (and the mount) going
                    prog.state, prog.last_error = "error", f"internal error: {type(e).__name__}"
                    log.exception("replicating to %s failed", peer)
                    await trio.sleep(ERROR_PAUSE * 5)

    async def _reconcile(self, conn, partner: Partner) -> None:
        """The partner's own list of our complete packs replaces what the ledger remembers (it may
        have lost data, or we may be a recovered store), restricted to packs we still have."""
        complete, after = set(), 0
        while True:
            reply = await request(conn, P.ListHeld(P.PACK, after, P.MAX_IDS), registry=P.PARTNER)
            complete.update(i for i, done in zip(reply.ids, reply.complete, strict=True) if done)
            if len(reply.ids) < P.MAX_IDS:
                break
            after = reply.ids[-1]
        usage = await request(conn, P.Usage(), registry=P.PARTNER)
        partner.root_generation = usage.root_generation
        self.ledger.replace_sent(partner.peer_id, P.PACK, complete)
        self._held[partner.peer_id] = complete

    def _count_pending(self, partner: Partner, prog: Progress) -> list[tuple[int, int, int]]:
        packs = self.source.replicable()
        held = self.held(partner.peer_id)
        todo = sorted(((prio, pid, size) for pid, (prio, size) in packs.items() if pid not in held),
                      key=lambda t: (-t[0], t[1]))
        prog.pending_packs = len(todo)
        prog.pending_bytes = sum(t[2] for t in todo)
        prog.replicated_packs = sum(1 for pid in packs if pid in held)
        prog.replicated_bytes = sum(size for pid, (_, size) in packs.items() if pid in held)
        prog.root_generation = partner.root_generation
        return todo

    async def _push(self, conn, partner: Partner, prog: Progress) -> bool:
        """One round: packs, then the root, then releases. True if anything was sent."""
        todo = self._count_pending(partner, prog)
        worked = False
        if todo:
            prog.state = "sending"
            await self._upload_packs(conn, partner, prog, todo)
            worked = True
            self._count_pending(partner, prog)
        root = self.source.latest_root()
        if root is not None and root.generation > partner.root_generation and root.needed <= self.held(partner.peer_id):
            prog.state = "sending"
            await self._upload(conn, partner, prog, P.ROOT, root.generation, _BytesObject(root.blob))
            partner.root_generation = prog.root_generation = root.generation
            self.ledger.put_partner(partner)
            worked = True
            log.info("%s holds our root generation %d", partner.peer_id, root.generation)
        worked |= await self._release(conn, partner)
        return worked

    async def _upload_packs(self, conn, partner: Partner, prog: Progress, todo) -> None:
        queue = [pid for _, pid, _ in todo]
        have: dict[int, int] = {}
        for i in range(0, len(queue), P.MAX_IDS):
            ids = queue[i:i + P.MAX_IDS]
            reply = await request(conn, P.Have(P.PACK, ids), registry=P.PARTNER)
            have.update(zip(ids, reply.sizes, strict=True))
        pending = iter(queue)
        held = self.held(partner.peer_id)

        async def worker():
            for pid in pending:
                try:
                    obj = self.source.open_pack(pid)
                except FileNotFoundError:
                    continue  # deleted meanwhile: nothing to send
                with obj:
                    await self._upload(conn, partner, prog, P.PACK, pid, obj, have.get(pid, 0))
                held.add(pid)
                self.ledger.mark_sent(partner.peer_id, P.PACK, [pid])

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(PARALLEL_PACKS, len(queue))):
                    nursery.start_soon(worker)
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None

    async def _upload(self, conn, partner: Partner, prog: Progress, kind: int, obj_id: int, obj,
                      held: int = 0) -> None:
        total = obj.size
        digest = P.digest_hasher()
        if held >= total:
            held = max(0, total - P.PIECE)  # resend the last piece, with the digest, to finish
        if held:
            await trio.to_thread.run_sync(_hash_prefix, obj, held, digest)
        offset = held
        while True:
            data = await trio.to_thread.run_sync(obj.read, offset, min(P.PIECE, total - offset))
            digest.update(data)
            last = offset + len(data) >= total
            await self.limiter.take(len(data))
            ack = await request(conn, P.PutPiece(kind, obj_id, total, offset, data,
                                                 digest.digest() if last else None),
                                registry=P.PARTNER, timeout=REQUEST_TIMEOUT)
            prog.record(len(data), trio.current_time())
            if ack.complete:
                return
            if ack.held != offset + len(data):
                raise TransportError(f"partner holds {ack.held} bytes of {kind}/{obj_id}, expected "
                                     f"{offset + len(data)}")
            offset = ack.held
            if last:
                raise TransportError("partner did not complete an object it has whole")

    async def _release(self, conn, partner: Partner) -> bool:
        tombs = self.source.tombstones()
        if not tombs:
            return False
        held = self.held(partner.peer_id)
        ids = sorted(pid for pid, gen in tombs.items() if pid in held and partner.root_generation > gen)
        for i in range(0, len(ids), P.MAX_IDS):
            batch = ids[i:i + P.MAX_IDS]
            holder_raw = partner.raw_id
            sig = self.identity.sign(P.release_message(holder_raw, batch))
            await request(conn, P.Release(batch, sig), registry=P.PARTNER)
            held.difference_update(batch)
            self.ledger.mark_sent(partner.peer_id, P.PACK, batch, held=False)
        still_held = set()
        for p in self.ledger.partners():
            if p.active:
                still_held |= self.held(p.peer_id)
        self.source.forget_tombstones([pid for pid in tombs if pid not in still_held])
        return bool(ids)

    # ----- sync and status ------------------------------------------------------------------------------
    def synced(self, generation: int) -> tuple[bool, list[str]]:
        """Whether every assigned partner holds root `generation` (and so every pack it needs)."""
        behind = []
        for p in self.assigned():
            if p.root_generation < generation:
                prog = self.progress.get(p.peer_id)
                behind.append(f"{p.peer_id}: " + (f"{prog.pending_packs} packs ({prog.pending_bytes} bytes) "
                                                  f"pending, {prog.state}" if prog else "not started")
                              + (f" ({prog.last_error})" if prog and prog.last_error else ""))
        return not behind, behind

    async def sync(self, generation: int, timeout: float | None) -> None:
        """Wait until every assigned partner confirmed root `generation`. SyncTimeout otherwise."""
        if not self.assigned():
            raise SyncTimeout("no partners: pair with one first (bpfs pair)")
        self._forced += 1
        try:
            for p in self.assigned():
                self.links.retry_now(p.peer_id)
            self.wake()
            with trio.move_on_after(timeout if timeout is not None else float("inf")):
                while True:
                    done, _ = self.synced(generation)
                    if done:
                        return
                    full = [p for p in self.assigned() if (prog := self.progress.get(p.peer_id)) is not None
                            and prog.state == "quota full"]
                    if full:  # waiting would not help: the partner refuses until quotas change
                        prog = self.progress[full[0].peer_id]
                        raise SyncTimeout(f"{full[0].peer_id} refuses more of our data: {prog.last_error}")
                    await trio.sleep(0.1)
            raise SyncTimeout("not replicated yet: " + "; ".join(self.synced(generation)[1]))
        finally:
            self._forced -= 1

    def status(self) -> list[dict]:
        now = trio.current_time()
        out = []
        for p in self.assigned():
            prog = self.progress.setdefault(p.peer_id, Progress(p.peer_id))
            self._count_pending(p, prog)
            out.append(prog.as_dict(now))
        return out


class _BytesObject:
    def __init__(self, blob: bytes):
        self.blob = blob
        self.size = len(blob)

    def read(self, offset: int, length: int) -> bytes:
        return self.blob[offset:offset + length]


def _hash_prefix(obj, length: int, digest) -> None:
    offset = 0
    while offset < length:
        data = obj.read(offset, min(P.PIECE, length - offset))
        if not data:
            raise OSError("object shorter than expected")
        digest.update(data)
        offset += len(data)


def _minute_now() -> int:
    t = time.localtime()
    return t.tm_hour * 60 + t.tm_min


