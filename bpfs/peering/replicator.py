"""The replicator: which of our packs and roots go to which partner, and when.

Owns the per-partner upload loops, the bandwidth limit, the daily window, `sync`, and the
progress figures `status` shows. What to send comes from a `Source` (the store's side, see
`service.ReplicationSource`): the sealed packs in the outbox (`bpfs.outbox`: committed, with nothing
still writing into them), the retained signed roots and the packs they need, and tombstones of
deleted packs.

Policy:
  - Each pack goes to the first `replicas` active partners in good standing (in pairing order;
    see `reputation`): with the default (2) and two partners, both hold everything, so either one
    alone can bring the store back. Partners beyond that are spares: when an assigned partner
    fails (unreachable for `repair_after`, or failing audits) or is unpaired, the next one is
    assigned and receives everything; short outages move nothing. A failed partner that comes
    back and passes an audit is assigned again; once the assigned partners hold the latest root,
    what a spare no longer needed holds is released (signed, and kept there for the grace period).
  - What counts as held is `holdings`': acknowledged by digest, and no failed audit since. A pack
    that failed an audit is sent again to the same partner as a repair upload while the partner
    is in good standing (otherwise its share is elsewhere).
  - Priority packs (outbox value b"\\x01": keys, wallets, ... see `config`) go first, then by id.
  - A root goes to a partner only once it holds every pack that root needs: a partner never holds
    a root it could not serve a recovery from.
  - A pack deleted here (freed or compacted) is released at a partner only after that partner
    confirmed a root newer than the deletion: until then the root it holds may still need it.
    The partner keeps released packs for its grace period.
  - Resuming: before uploading a pack the partner is asked how much of it it holds (`Have`), and
    the upload continues from there; what a partner confirmed complete is in the ledger (`sent`),
    reconciled with the partner's own list, digest by digest, on every new connection.
  - `sync` succeeds when the target is met: min(`replicas`, partners paired) partners in good
    standing hold the latest root and every pack it needs. It fails at once, saying why, when too
    few partners are in good standing to meet it.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field

import trio

from ..config import Config, format_size, in_window
from ..errors import first_error
from ..net.quic import TransportError
from ..net.rpc import RemoteError, request
from . import protocol as P
from .holdings import Holdings
from .ledger import Ledger, Partner
from .links import Links, Unreachable
from ..rendezvous.beacon import free_slot
from .reputation import Standing

log = logging.getLogger(__name__)

PARALLEL_PACKS = 4  # uploads in flight per partner (each one piece at a time)
REQUEST_TIMEOUT = 60.0
IDLE_RECHECK = 30.0
IDLE_POLL = 0.5  # how often an idle partner loop looks for packs sealed meanwhile
LIMITED_RECENTLY = 3.0  # the bandwidth limit held an upload back this recently: `status` says so
ERROR_PAUSE = 2.0
QUOTA_PAUSE = 60.0


class SyncTimeout(Exception):
    """`sync` did not meet its replica target, or cannot: the text says why (for the user)."""


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
    state: str = "connecting"  # see `partner_state`
    reason: str | None = None  # why it waits (window, bandwidth limit, backoff, quota), for `status`
    last_error: str | None = None
    in_flight: dict[int, int] = field(default_factory=dict)  # pack id -> bytes of it the partner holds
    limited_at: float = float("-inf")  # when the bandwidth limit last held an upload back
    failing_packs: int = 0  # packs that failed an audit there and are not repaired yet
    root_alarm: str | None = None  # the partner holds a root we did not make, or refused ours
    foreign_root: int = 0  # the newest such root's generation (0: none)
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

    def in_flight_bytes(self) -> int:
        """Bytes of pending packs the partner already holds (uploads under way or resumed)."""
        return sum(self.in_flight.values())

    def as_dict(self, now: float) -> dict:
        """`progress` counts bytes: whole packs held plus what the partner acknowledged of packs
        under way, so it moves as pieces arrive. An estimate only while sending at a known rate."""
        rate = self.rate(now)
        moving = min(self.in_flight_bytes(), self.pending_bytes)
        total = self.replicated_bytes + self.pending_bytes
        left = self.pending_bytes - moving
        return {"peer_id": self.peer_id, "replicated_packs": self.replicated_packs,
                "replicated_bytes": self.replicated_bytes, "pending_packs": self.pending_packs,
                "pending_bytes": self.pending_bytes, "in_flight_bytes": moving, "sent_bytes": self.sent_bytes,
                "progress": (self.replicated_bytes + moving) / total if total else 1.0, "rate": round(rate),
                "eta": 0 if not self.pending_bytes else (
                    round(left / rate) if rate > 0 and self.state == "sending" else None),
                "root_generation": self.root_generation, "state": self.state, "reason": self.reason,
                "last_error": self.last_error, "failing_packs": self.failing_packs, "root_alarm": self.root_alarm}


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
    """Sends our packs and roots to the partners assigned to hold them.

    Attributes:
      holdings: what counts as held by each partner (shared with the auditor).
      progress: what `status` shows per partner.
    """

    def __init__(self, identity, ledger: Ledger, links: Links, source, config: Config, *, holdings: Holdings,
                 standing, wall_clock=time.time):
        self.identity = identity
        self.ledger = ledger
        self.links = links
        self.source = source
        self.config = config
        self.holdings = holdings
        self._standing = standing  # peer id -> reputation.Standing
        self.limiter = ByteLimiter(config.upload_limit)
        self._clock = wall_clock
        self._wake = trio.Event()
        self._reconciled: dict[str, object] = {}  # peer -> the connection we reconciled on
        self.progress: dict[str, Progress] = {}
        self._forced = 0  # syncs waiting: they ignore the daily window
        self._running: dict[str, trio.CancelScope] = {}
        self._last_assigned: list[str] | None = None

    # ----- who gets what ---------------------------------------------------------------------------
    def active(self) -> list[Partner]:
        return sorted((p for p in self.ledger.partners() if p.active), key=lambda p: p.paired_at)

    def standing(self, peer: str) -> Standing:
        return self._standing(peer)

    def assigned(self) -> list[Partner]:
        """The partners that hold everything: the first `replicas` in good standing, then, only
        when there are too few of those, failed ones (sent to as best effort: their copies do
        not count, but a repair may bring them back into good standing)."""
        active = self.active()
        good = [p for p in active if self.standing(p.peer_id).good]
        failed = [p for p in active if p not in good]
        return (good + failed)[:self.config.replicas]

    def counting(self) -> list[Partner]:
        """The assigned partners whose copies count (in good standing)."""
        return [p for p in self.assigned() if self.standing(p.peer_id).good]

    def target(self) -> int:
        """How many partners must hold each pack: `replicas`, or all partners when fewer are paired."""
        return min(self.config.replicas, len(self.active()))

    def shortfall(self) -> str | None:
        """Why the target cannot be met now (too few partners in good standing), or None."""
        active, assigned = self.active(), self.counting()
        if len(assigned) >= self.target():
            return None
        failed = [f"{p.peer_id} ({self.standing(p.peer_id).reason})" for p in active
                  if not self.standing(p.peer_id).good]
        return (f"only {len(assigned)} of the {self.target()} partners the target needs are in good standing; "
                f"failed: {', '.join(failed)}; pair with another partner to repair")

    def wake(self) -> None:
        self._wake.set()
        self._wake = trio.Event()

    def held(self, peer: str) -> set[int]:
        return self.holdings.held(peer)

    # ----- running ----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Keep one upload loop per assigned partner, following pairing changes."""
        async with trio.open_nursery() as nursery:
            while True:
                self._note_assignment()
                wanted = {p.peer_id for p in self.assigned()}
                for peer in list(self._running):
                    if peer not in wanted:
                        self._running.pop(peer).cancel()
                for peer in wanted - set(self._running):
                    scope = trio.CancelScope()
                    self._running[peer] = scope
                    nursery.start_soon(self._partner_loop, peer, scope)
                try:
                    await self._release_surplus()
                except (Unreachable, TransportError, RemoteError, trio.TooSlowError, OSError) as e:
                    log.info("releasing a spare's copies: %s", e)
                await self._wait_wake(min(IDLE_RECHECK, max(1.0, self.config.audit_interval)))

    def _note_assignment(self) -> None:
        """Say plainly in the log when a partner stops or starts counting as holding our data."""
        now = [p.peer_id for p in self.counting()]
        before, self._last_assigned = self._last_assigned, now
        if before is None or before == now:
            return
        for peer in before:
            if peer not in now:
                st = self.standing(peer)
                log.warning("%s no longer holds a share of our data%s", peer,
                            f" ({st.level}: {st.reason})" if not st.good else "")
        for peer in now:
            if peer not in before:
                log.info("%s holds a share of our data: everything is sent to it", peer)
        if self.shortfall():
            log.warning("the replica target cannot be met: %s", self.shortfall())

    async def _wait_wake(self, timeout: float) -> None:
        wake = self._wake
        with trio.move_on_after(timeout):
            await wake.wait()

    async def _wait_idle(self, partner: Partner, prog: Progress) -> None:
        """Nothing to send: wait for a wake, IDLE_RECHECK, or a pack sealed meanwhile (looked for
        every IDLE_POLL seconds; the outbox's read is cached per commit), so that an idle partner
        never has packs pending for long."""
        wake = self._wake
        with trio.move_on_after(IDLE_RECHECK):
            while not wake.is_set():
                with trio.move_on_after(IDLE_POLL):
                    await wake.wait()
                held = self.held(partner.peer_id)
                if any(pid not in held for pid in self.source.outbox.pending()):
                    return

    async def _partner_loop(self, peer: str, scope: trio.CancelScope) -> None:
        prog = self.progress.setdefault(peer, Progress(peer))
        with scope:
            while True:
                partner = self.ledger.partner(peer)
                if partner is None or not partner.active:
                    return
                try:
                    if not self._forced and not in_window(self.config.window, _minute_now()):
                        prog.state, prog.reason = "waiting for window", _window_reason(self.config.window)
                        self._count_pending(partner, prog)
                        await self._wait_wake(60.0)
                        continue
                    if self.links.connection(peer) is None and prog.state not in ("offline", "connecting"):
                        prog.state, prog.reason = "connecting", None
                    conn = await self.links.get(peer, partner.addresses)
                    partner.last_seen = self._clock()
                    if self._reconciled.get(peer) is not conn:
                        await self._reconcile(conn, partner)
                        self._reconciled[peer] = conn
                    worked = await self._push(conn, partner, prog)
                    self.ledger.update_partner(peer, last_seen=partner.last_seen,
                                               root_generation=partner.root_generation,
                                               root_created=partner.root_created)
                    prog.last_error = None
                    if not worked:
                        prog.state, prog.reason = "idle", None
                        await self._wait_idle(partner, prog)
                except Unreachable as e:
                    prog.state, prog.reason, prog.last_error = "offline", None, str(e)
                    self._count_pending(partner, prog)
                    await self._wait_wake(max(0.5, e.retry_at - trio.current_time()))
                except RemoteError as e:
                    quota = e.code == P.Refusal.QUOTA
                    prog.state = "quota full" if quota else "error"
                    prog.reason = (f"the partner is full (its quota for us is used up); asking again in "
                                   f"{QUOTA_PAUSE:.0f} s" if quota else f"backing off after an error; retrying in "
                                   f"{ERROR_PAUSE:.0f} s")
                    prog.last_error = e.message
                    log.warning("%s refused: %s", peer, e.message)
                    await self._wait_wake(QUOTA_PAUSE if quota else ERROR_PAUSE)
                except (TransportError, trio.TooSlowError, OSError) as e:
                    prog.state, prog.last_error = "error", str(e) or type(e).__name__
                    prog.reason = f"backing off after an error; retrying in {ERROR_PAUSE:.0f} s"
                    log.info("replicating to %s: %s", peer, prog.last_error)
                    if not isinstance(e, OSError):
                        self.links.drop(peer)  # a timed-out request: the next round dials afresh
                    await trio.sleep(ERROR_PAUSE)
                except Exception as e:  # a bug: log it, keep the others (and the mount) going
                    prog.state, prog.last_error = "error", f"internal error: {type(e).__name__}"
                    prog.reason = f"backing off after an error; retrying in {ERROR_PAUSE * 5:.0f} s"
                    log.exception("replicating to %s failed", peer)
                    await trio.sleep(ERROR_PAUSE * 5)

    async def _reconcile(self, conn, partner: Partner) -> None:
        """The partner's own list of our complete packs, each with the digest it accepted it by,
        replaces what the ledger remembers (it may have lost data, or we may be a recovered store):
        a pack counts only when that digest is our root of it, and not while it is failing."""
        listed: dict[int, bytes] = {}
        after = 0
        while True:
            reply = await request(conn, P.ListHeld(P.PACK, after, P.MAX_IDS), registry=P.PARTNER)
            if len(reply.digests) != len(reply.ids):
                raise TransportError("the partner's listing does not match itself")
            listed.update((i, bytes(d)) for i, done, d in zip(reply.ids, reply.complete, reply.digests, strict=True)
                          if done)
            if len(reply.ids) < P.MAX_IDS:
                break
            after = reply.ids[-1]
        await self._reconcile_roots(conn, partner)
        await self._send_beacon(conn, partner)
        tombs = self.source.outbox.tombstones()
        known = set(self.source.outbox.pending()) | set(tombs)
        confirmed = set()
        for pid, digest in listed.items():
            if pid in tombs:
                confirmed.add(pid)  # deleted here, still there: held until released (no proof needed)
            elif pid in known:
                root = await self.source.pack_root(pid)
                if root is not None and root[0] == digest:
                    confirmed.add(pid)
        self.holdings.reconcile(partner.peer_id, confirmed, known)

    async def _send_beacon(self, conn, partner: Partner) -> None:
        """Give the partner a recovery beacon slot of its own and the key whose verifiers it
        announces for us, so that a recovery finds it through a broker (`rendezvous.beacon`)."""
        if partner.beacon_slot is None:
            taken = {p.beacon_slot for p in self.ledger.partners() if p.beacon_slot is not None and p.active}
            partner.beacon_slot = free_slot(taken)
            if partner.beacon_slot is None:
                return  # every slot is taken: found by address or pair key only
            partner.beacon_sent = False
        if not partner.beacon_sent:
            await request(conn, P.Beacon(self.source.beacon_key(partner.beacon_slot)), registry=P.PARTNER)
            partner.beacon_sent = True
            self.ledger.update_partner(partner.peer_id, beacon_slot=partner.beacon_slot, beacon_sent=True)

    async def _reconcile_roots(self, conn, partner: Partner) -> None:
        """Which of our roots the partner holds, checked digest by digest. A root of ours held
        with another digest, or a root newer than any we made (signed with our key all the
        same), is an alarm in `status`; our next snapshot then takes a generation above it, so
        the partner's newest root is ours again."""
        prog = self.progress.setdefault(partner.peer_id, Progress(partner.peer_id))
        theirs: dict[int, bytes] = {}
        after = 0
        while True:
            reply = await request(conn, P.ListRoots(after, P.MAX_IDS), registry=P.PARTNER)
            theirs.update((g, bytes(d)) for g, d, released in zip(reply.generations, reply.digests, reply.released,
                                                                  strict=True) if not released)
            if len(reply.generations) < P.MAX_IDS:
                break
            after = reply.generations[-1]
        ours = {r.generation: r for r in self.source.retained()}
        made = self.source.generation()
        held, alarms = set(), []
        prog.foreign_root = 0
        stale = set()  # ours, no longer retained here: to release there
        for gen, digest in sorted(theirs.items()):
            root = ours.get(gen)
            if root is not None:
                if root.digest == digest:
                    held.add(gen)
                else:
                    alarms.append(f"holds another root than ours for generation {gen}")
                    prog.foreign_root = max(prog.foreign_root, gen)
            elif gen >= made:
                alarms.append(f"holds root generation {gen}, which this store did not make (signed with its key: "
                              "was the key used elsewhere?)")
                prog.foreign_root = max(prog.foreign_root, gen)
            else:
                stale.add(gen)
        if prog.foreign_root >= made:
            self.source.raise_generation(prog.foreign_root + 1)
        prog.root_alarm = "; ".join(alarms) or None
        if alarms:
            log.warning("%s %s", partner.peer_id, prog.root_alarm)
        self.ledger.replace_sent(partner.peer_id, P.ROOT, held | stale)
        newest = max(held, default=0)
        if newest != partner.root_generation:
            partner.root_generation = newest
            partner.root_created = ours[newest].created_ns if newest in ours else 0

    def _count_pending(self, partner: Partner, prog: Progress) -> list[tuple[int, int, int]]:
        packs = self.source.outbox.pending()
        held = self.held(partner.peer_id)
        todo = sorted(((q.priority, pid, q.size) for pid, q in packs.items() if pid not in held),
                      key=lambda t: (not t[0], t[1]))
        prog.pending_packs = len(todo)
        prog.pending_bytes = sum(t[2] for t in todo)
        prog.replicated_packs = sum(1 for pid in packs if pid in held)
        prog.replicated_bytes = sum(q.size for pid, q in packs.items() if pid in held)
        prog.root_generation = partner.root_generation
        prog.failing_packs = len(self.holdings.failing(partner.peer_id))
        return todo

    async def _push(self, conn, partner: Partner, prog: Progress) -> bool:
        """One round: packs, then the root, then releases. True if anything was sent."""
        todo = self._count_pending(partner, prog)
        worked = False
        if todo:
            prog.state, prog.reason = "sending", None
            await self._upload_packs(conn, partner, prog, todo)
            worked = True
            self._count_pending(partner, prog)
        worked |= await self._send_roots(conn, partner, prog)
        worked |= await self._release_roots(conn, partner)
        worked |= await self._release(conn, partner)
        return worked

    async def _send_roots(self, conn, partner: Partner, prog: Progress) -> bool:
        """Every retained root the partner lacks, newest first, once it holds every pack that root
        needs (an older root whose packs went from here before the partner got them stays away)."""
        sent = self.ledger.sent(partner.peer_id, P.ROOT)
        held = self.held(partner.peer_id)
        worked = False
        for root in self.source.retained():
            if root.generation in sent or not root.needed <= held:
                continue
            prog.state, prog.reason = "sending", None
            try:
                await self._upload(conn, partner, prog, P.ROOT, root.generation, _BytesObject(root.blob),
                                   digest=P.object_digest(root.blob))
            except RemoteError as e:
                if e.code != P.Refusal.ROLLBACK:
                    raise
                prog.root_alarm = f"refused our root generation {root.generation}: {e.message}"
                log.warning("%s %s", partner.peer_id, prog.root_alarm)
                continue
            sent.add(root.generation)
            self.ledger.mark_sent(partner.peer_id, P.ROOT, [root.generation])
            worked = True
            if root.generation > partner.root_generation:
                partner.root_generation = prog.root_generation = root.generation
                partner.root_created = root.created_ns
                self.ledger.update_partner(partner.peer_id, root_generation=root.generation,
                                           root_created=root.created_ns)
                log.info("%s holds our root generation %d", partner.peer_id, root.generation)
        return worked

    async def _release_roots(self, conn, partner: Partner) -> bool:
        """Roots the partner holds that we no longer keep (the retention policy thinned them) are
        released there: signed, and kept by the partner for its grace period."""
        sent = self.ledger.sent(partner.peer_id, P.ROOT)
        gone = sorted(sent - {r.generation for r in self.source.retained()})
        for i in range(0, len(gone), P.MAX_IDS):
            batch = gone[i:i + P.MAX_IDS]
            sig = self.identity.sign(P.release_message(partner.raw_id, P.ROOT, batch))
            await request(conn, P.Release(P.ROOT, batch, sig), registry=P.PARTNER)
            self.ledger.mark_sent(partner.peer_id, P.ROOT, batch, held=False)
        return bool(gone)

    async def _upload_packs(self, conn, partner: Partner, prog: Progress, todo) -> None:
        queue = [pid for _, pid, _ in todo]
        have: dict[int, int] = {}
        for i in range(0, len(queue), P.MAX_IDS):
            ids = queue[i:i + P.MAX_IDS]
            reply = await request(conn, P.Have(P.PACK, ids), registry=P.PARTNER)
            have.update(zip(ids, reply.sizes, strict=True))
        pending = iter(queue)
        failing = self.holdings.failing(partner.peer_id)

        async def worker():
            for pid in pending:
                root = await self.source.pack_root(pid)
                if root is None:
                    continue  # deleted meanwhile: nothing to send
                try:
                    obj = self.source.outbox.upload(pid)
                except FileNotFoundError:
                    continue
                repair = pid in failing
                if obj.size != root[1]:
                    log.error("our pack %012x has %d bytes, %d when it was sealed: not sent (bpfs verify "
                              "names what it damaged)", pid, obj.size, root[1])
                    continue
                await self._upload(conn, partner, prog, P.PACK, pid, obj, 0 if repair else have.get(pid, 0),
                                   digest=root[0], repair=repair)
                if repair:
                    log.info("repaired pack %012x at %s", pid, partner.peer_id)
                self.holdings.acknowledged(partner.peer_id, [pid])
                prog.in_flight.pop(pid, None)

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(min(PARALLEL_PACKS, len(queue))):
                    nursery.start_soon(worker)
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
        finally:
            prog.in_flight.clear()

    async def _upload(self, conn, partner: Partner, prog: Progress, kind: int, obj_id: int, obj, held: int = 0,
                      *, digest: bytes, repair: bool = False) -> None:
        """Send `obj` from byte `held` on; its last piece carries `digest` (its tree root). The
        partner holding all of it already gets an empty last piece, just to confirm the digest."""
        total = obj.size
        offset = min(held, total)
        while True:
            if kind == P.PACK:
                prog.in_flight[obj_id] = offset  # `status` counts it: progress moves piece by piece
            data = await trio.to_thread.run_sync(obj.read, offset, min(P.PIECE, total - offset)) if offset < total \
                else b""
            last = offset + len(data) >= total
            asked = trio.current_time()
            await self.limiter.take(len(data))
            if self.limiter.rate > 0 and trio.current_time() - asked > 0.05:
                prog.limited_at = trio.current_time()
            ack = await request(conn, P.PutPiece(kind, obj_id, total, offset, data, digest if last else None,
                                                 repair),
                                registry=P.PARTNER, timeout=REQUEST_TIMEOUT)
            prog.record(len(data), trio.current_time())
            if ack.complete:
                if kind == P.PACK:
                    prog.in_flight[obj_id] = total
                return
            if ack.held != offset + len(data):
                raise TransportError(f"partner holds {ack.held} bytes of {kind}/{obj_id}, expected "
                                     f"{offset + len(data)}")
            offset = ack.held
            if last:
                raise TransportError("partner did not complete an object it has whole")

    async def _release(self, conn, partner: Partner) -> bool:
        """Packs deleted here are released at the partner once it holds a newer root and no
        retained snapshot needs them (history stays recoverable from every partner)."""
        tombs = self.source.outbox.tombstones()
        if not tombs:
            return False
        held = self.held(partner.peer_id)
        history = self.source.needed_by_history()
        ids = sorted(pid for pid, gen in tombs.items()
                     if pid in held and partner.root_generation > gen and pid not in history)
        for i in range(0, len(ids), P.MAX_IDS):
            batch = ids[i:i + P.MAX_IDS]
            sig = self.identity.sign(P.release_message(partner.raw_id, P.PACK, batch))
            await request(conn, P.Release(P.PACK, batch, sig), registry=P.PARTNER)
            self.holdings.released(partner.peer_id, batch)
        still_held = set()
        for p in self.ledger.partners():
            if p.active:
                still_held |= self.held(p.peer_id)
        self.source.outbox.forget_tombstones([pid for pid in tombs if pid not in still_held])
        return bool(ids)

    async def _release_surplus(self) -> None:
        """Once the assigned partners hold the latest root, what other partners still hold of ours
        (a spare that stood in for a partner that came back) is released there: signed, and kept by
        them for their grace period."""
        assigned = self.assigned()
        root = self.source.latest_root()
        if root is None or self.shortfall() or not self.synced(root.generation)[0]:
            return
        names = {p.peer_id for p in assigned}
        for p in self.active():
            held = sorted(self.held(p.peer_id))
            if p.peer_id in names or not held or (conn := self.links.connection(p.peer_id)) is None:
                continue
            for i in range(0, len(held), P.MAX_IDS):
                batch = held[i:i + P.MAX_IDS]
                sig = self.identity.sign(P.release_message(p.raw_id, P.PACK, batch))
                await request(conn, P.Release(P.PACK, batch, sig), registry=P.PARTNER, timeout=REQUEST_TIMEOUT)
                self.holdings.released(p.peer_id, batch)
            log.info("released %d packs at %s, no longer needed there (it keeps them for its grace period)",
                     len(held), p.peer_id)

    # ----- sync and status ------------------------------------------------------------------------------
    def holds_root(self, p: Partner, generation: int) -> bool:
        """Whether `p` holds root `generation` (or newer) as its newest, and, as counted, every pack
        the latest root needs."""
        root = self.source.latest_root()
        needed = root.needed if root is not None else set()
        prog = self.progress.get(p.peer_id)
        foreign = prog.foreign_root if prog is not None else 0
        return p.root_generation >= generation > foreign and needed <= self.held(p.peer_id)

    def synced(self, generation: int) -> tuple[bool, list[str]]:
        """Whether the target is met: enough partners in good standing hold root `generation` and
        every pack it needs."""
        behind: list[str] = []
        if short := self.shortfall():
            behind.append(short)
        assigned = {p.peer_id for p in self.assigned()}
        now = trio.current_time()
        for p in self.counting():
            if not self.holds_root(p, generation):
                prog = self.progress.get(p.peer_id)
                if prog is None:
                    behind.append(f"{p.peer_id}: not contacted yet")
                    continue
                state, reason = partner_state(True, p.peer_id in assigned, prog,
                                              connected=self.links.connection(p.peer_id) is not None,
                                              unreachable=self.links.unreachable(p.peer_id),
                                              limit=self.limiter.rate, now=now)
                pending = (f"{prog.pending_packs} pack{'s' if prog.pending_packs != 1 else ''} "
                           f"({format_size(prog.pending_bytes)}) to send" if prog.pending_packs
                           else "the snapshot to send")
                why = reason or prog.last_error
                behind.append(f"{p.peer_id}: {pending}, {state}" + (f": {why}" if why else ""))
        return not behind, behind

    async def sync(self, generation: int, timeout: float | None) -> None:
        """Wait until the target is met for root `generation`. SyncTimeout otherwise, at once when
        too few partners are in good standing to meet it."""
        if not self.active():
            raise SyncTimeout("no partners: pair with one first (bpfs pair)")
        if self.shortfall():
            raise SyncTimeout(f"the replica target cannot be met: {self.shortfall()}")
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
                    if self.shortfall():
                        raise SyncTimeout(f"the replica target cannot be met: {self.shortfall()}")
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
        """Per active partner: progress, whether it is assigned, and its trust level."""
        now = trio.current_time()
        assigned = {p.peer_id for p in self.assigned()}
        out = []
        for p in self.active():
            prog = self.progress.setdefault(p.peer_id, Progress(p.peer_id))
            self._count_pending(p, prog)
            row = prog.as_dict(now)
            state, reason = partner_state(True, p.peer_id in assigned, prog,
                                          connected=self.links.connection(p.peer_id) is not None,
                                          unreachable=self.links.unreachable(p.peer_id),
                                          limit=self.limiter.rate, now=now)
            st = self.standing(p.peer_id)
            row.update(assigned=p.peer_id in assigned, trust=st.level, trust_reason=st.reason, counts=st.good,
                       roots_held=len(self.ledger.sent(p.peer_id, P.ROOT)), state=state, reason=reason)
            if state != "sending" and row["eta"]:
                row.update(eta=None)  # an estimate means something only while bytes move
            out.append(row)
        return out


class _BytesObject:
    def __init__(self, blob: bytes):
        self.blob = blob
        self.size = len(blob)

    def read(self, offset: int, length: int) -> bytes:
        return self.blob[offset:offset + length]


def _window_reason(window: tuple[int, int] | None) -> str:
    if window is None:
        return "the upload window is closed"
    start, end = window
    return (f"outside the upload window {start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d} "
            "(bpfs.toml; bpfs sync ignores it)")


def partner_state(active: bool, assigned: bool, prog: Progress | None, *, connected: bool,
                  unreachable: bool = False, limit: int = 0, now: float = 0.0) -> tuple[str, str | None]:
    """The one word `bpfs peers` and `bpfs status` both show for a partner, and why it waits.

    ended (unpaired) | offline (the last dial failed, or no daemon runs to know) | connecting |
    sending | idle (reachable, nothing to send) | waiting for window | quota full | error (backing
    off) | not assigned (a spare: it receives our data when an assigned partner fails). A partner
    whose round found nothing to do is idle while its connection is closed for silence; one with
    packs pending is never idle."""
    if not active:
        return "ended", None
    if prog is None:
        return ("connected", None) if connected else ("offline", None)
    if not assigned:
        if unreachable and not connected:
            return "offline", None
        return "not assigned", "a spare: it receives our data when an assigned partner fails"
    state, reason = prog.state, prog.reason
    if state == "idle" and prog.pending_packs:
        state = "sending"  # sealed since the last round: the loop takes it up within IDLE_POLL
    if state == "sending" and limit > 0 and now - prog.limited_at < LIMITED_RECENTLY:
        reason = f"held back by the bandwidth limit ({format_size(limit)}/s, upload_limit in bpfs.toml)"
    return state, reason


def _minute_now() -> int:
    t = time.localtime()
    return t.tm_hour * 60 + t.tm_min


