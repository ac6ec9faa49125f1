"""The auditor: asking partners to prove, now, that they still hold our packs.

Owns the audit schedule, the audits themselves (scheduled, and `bpfs challenge` on demand) and
their verification; the outcomes go to `holdings` (what counts as held) and `reputation` (the
partner's evidence). Proofs are checked against the tree root we recorded for each pack
(`packtree`), so an audit needs neither our copy of the pack nor any trust in the partner's
bookkeeping, and works the same after a recovery.

One audit of one partner: a fresh random 32-byte nonce, a choice of packs, and `Prove` requests
of at most MAX_AUDIT_PACKS packs; both sides derive the leaves from the nonce. A pack passes
when every leaf verifies against our root for a copy of the size we recorded. Otherwise it is
missing (the partner says so, or cannot read it), a wrong pack (a copy of another size: another
object's bytes) or damaged (a leaf does not verify). A pack the partner
says we released is not a failure. A malformed or forged answer fails the packs it was for.

The schedule (`plan`): every `audit_interval` (jittered), each partner holding our packs is
audited on enough packs that
  - a partner that silently lost a fraction f (`detect_loss`) of n packs is caught within
    `detect_within` with probability p (`detect_probability`): packs are drawn from a secret
    random order of all packs held, without repeats until every pack was drawn (then a new
    order; packs that arrive meanwhile join the current order at random places), so d = ceil(f n)
    lost packs are all missed by m draws with probability at most (1 - m/n)^d, and
    m = n (1 - (1-p)^(1/d)) draws per window would do (about 460 a day for large n, at f = 1 %,
    p = 99 %). That bound holds for draws within one pass of the order; a window starting
    mid-pass may find a lost pack already drawn before the loss. So the plan aims at half the
    miss probability (530 a day for large n: simulated, it then meets p), and when m is more than
    half of n it makes detection certain instead: the order is kept in 4 parts from one pass to
    the next (shuffled within each part), so a pack is drawn again at most 1.25 passes after it
    was drawn, and 1.25 n draws per window put every pack in every window;
  - every pack is audited within `coverage_days` (n / coverage_days a day at least, and any
    pack not audited for that long goes first);
  - audit traffic stays within `audit_budget` of the bytes held per 30 days (one proof is a
    2 KiB leaf and its path, about 2.6 KiB on the wire for a 16 MiB pack, and each audit costs
    about 400 bytes more): this cap wins, and `plan` says when it keeps the detection target
    from being met (a partner holding little, in small packs). One floor overrides it: each
    audit asks for at least one pack, so total loss is caught at the next audit; for a partner
    holding less than about 200 MiB that floor is more than the budget (`Plan.within_budget`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field

import trio

from ..net.quic import TransportError
from ..net.rpc import RemoteError, request
from ..packtree import DIGEST_SIZE, LEAF_SIZE, challenge_leaves, path_length, verify_proof
from . import protocol as P
from .holdings import Holdings
from .ledger import Outcome
from .links import Unreachable

log = logging.getLogger(__name__)

DAY = 86400.0
MONTH = 30 * DAY
PRESENCE_INTERVAL = 60.0  # seconds between samples of who is connected (uptime)
AUDIT_TIMEOUT = 120.0
MAX_PACKS_PER_AUDIT = 4096  # a scheduled audit never asks for more than this
_PROOF_OVERHEAD = 200  # bytes on the wire per proof beyond the leaf and path (measured: codec and QUIC framing)
_AUDIT_OVERHEAD = 400  # bytes on the wire per audit (request, reply headers, packets and acknowledgements)
CHALLENGE_LEAVES = 4  # leaves per pack asked by `bpfs challenge` (2+ tell damaged from a wrong pack)


# ----- the schedule (pure) ---------------------------------------------------------------------------
def proof_bytes(pack_size: int) -> int:
    """Bytes on the wire for a proof of one leaf of a pack of this size (answer and request)."""
    return LEAF_SIZE + DIGEST_SIZE * path_length(pack_size, 0) + _PROOF_OVERHEAD


@dataclass(frozen=True)
class Plan:
    """How many of a partner's packs to audit, and why.

    Attributes:
      packs: packs held by the partner (n).
      per_day: packs audited per day.
      per_audit: packs per scheduled audit, on average (at least 1; an audit asks for the whole
          number below or above it at random, so that the mean is exact).
      detection_per_day: what the detection target alone needs per day.
      coverage_per_day: what auditing every pack within coverage_days needs per day.
      budget_per_day: the most the audit budget allows per day.
      meets_target: whether the plan draws what the detection target needs.
      within_budget: whether its traffic stays within the audit budget (the floor of one pack
          per audit can exceed it for a partner holding little).
      bytes_per_month: audit traffic per 30 days at this plan.
      buckets: parts of the secret order kept from pass to pass (`_Cycle`).
    """

    packs: int
    per_day: int
    per_audit: float
    detection_per_day: float
    coverage_per_day: float
    budget_per_day: float
    meets_target: bool
    within_budget: bool
    bytes_per_month: int
    buckets: int = 1  # of the secret order (`_Cycle`)


CERTAIN_BUCKETS = 4  # parts of the order kept from pass to pass when every pack must be drawn


def detection_draws(n: int, loss: float, probability: float) -> tuple[int, int]:
    """(draws per detection window from the secret order of n packs, buckets of the order) that
    find at least one of ceil(loss n) lost packs with the given probability wherever the window
    starts (see the module docstring)."""
    if n <= 0:
        return 0, 1
    lost = max(1, math.ceil(loss * n))
    # half the miss probability: a window that straddles two passes loses a little (simulated)
    m = math.ceil(n * (1.0 - ((1.0 - probability) / 2) ** (1.0 / lost)) - 1e-9)
    if 2 * m > n:  # nearly every pack: draw each within any window, for certain
        return math.ceil(n * (1 + 1 / CERTAIN_BUCKETS)), CERTAIN_BUCKETS
    return m, 1


def plan(n: int, held_bytes: int, config) -> Plan:
    if n <= 0:
        return Plan(0, 0, 0, 0.0, 0.0, 0.0, True, True, 0, 1)
    per_proof = proof_bytes(int(held_bytes / n))
    audits_per_day = DAY / config.audit_interval
    draws, buckets = detection_draws(n, config.detect_loss, config.detect_probability)
    detection = draws * DAY / config.detect_within
    coverage = n / config.coverage_days
    budget = max(0.0, config.audit_budget * held_bytes / 30.0 - audits_per_day * _AUDIT_OVERHEAD) / per_proof
    per_day = min(max(detection, coverage), budget, float(n) * audits_per_day)
    per_audit = max(1.0, min(float(n), float(MAX_PACKS_PER_AUDIT), per_day / audits_per_day))
    drawn = per_audit * audits_per_day
    monthly = int(30 * audits_per_day * (_AUDIT_OVERHEAD + per_audit * per_proof))
    return Plan(n, math.ceil(drawn - 1e-9), per_audit, detection, coverage, budget, drawn >= detection - 1e-9,
                monthly <= config.audit_budget * held_bytes, monthly, buckets)


def audit_size(per_audit: float, rng: random.Random) -> int:
    """Packs for one scheduled audit: the mean `per_audit`, rounded up or down at random."""
    whole = math.floor(per_audit)
    return whole + (1 if rng.random() < per_audit - whole else 0)


class _Cycle:
    """A secret random order of a partner's packs, drawn without repeats until all were drawn.

    With `buckets` > 1 the next pass keeps each pack in the same part (of `buckets` equal parts)
    of the order and shuffles only within the parts, so a pack is drawn again at most
    (1 + 1/buckets) passes after it was drawn: the plan sizes the passes so that this is within
    the detection window (certain detection, for partners with few packs). With 1 bucket every
    pass is a fresh shuffle (the probability bound, for partners with many packs).
    """

    def __init__(self, rng: random.Random, buckets: int = 1):
        self._rng = rng
        self.buckets = buckets
        self._seq: list[int] = []  # this pass, in draw order
        self._pos = 0  # what of it is drawn

    def take(self, count: int, pool: set[int], skip: set[int]) -> list[int]:
        """Up to `count` packs of `pool` not in `skip` (which grows by what is taken)."""
        self._join(pool)
        out: list[int] = []
        renewed = False
        while len(out) < count:
            if self._pos >= len(self._seq):
                if renewed:
                    break
                self._renew(pool)
                renewed = True
                continue
            pid = self._seq[self._pos]
            self._pos += 1
            if pid in pool and pid not in skip:
                out.append(pid)
                skip.add(pid)
        return out

    def _renew(self, pool: set[int]) -> None:
        old = [pid for pid in self._seq if pid in pool]
        fresh = sorted(pool - set(old))
        if self.buckets <= 1 or not old:
            seq = old + fresh
            self._rng.shuffle(seq)
        else:
            for pid in fresh:
                old.insert(self._rng.randrange(len(old) + 1), pid)
            size = -(-len(old) // self.buckets)
            seq = []
            for i in range(0, len(old), size):
                part = old[i:i + size]
                self._rng.shuffle(part)
                seq += part
        self._seq, self._pos = seq, 0

    def _join(self, pool: set[int]) -> None:
        """Packs that arrived since the pass began join what is left of it, each at a random
        place, so they are drawn like the others (not only from the next pass on)."""
        if not self._seq:
            return
        known = set(self._seq)
        for pid in sorted(pool - known):
            self._seq.insert(self._rng.randrange(self._pos, len(self._seq) + 1), pid)


# ----- results ---------------------------------------------------------------------------------------
@dataclass
class AuditResult:
    """One audit of one partner."""

    peer_id: str
    checked: int = 0
    passed: int = 0
    failures: dict[int, int] = field(default_factory=dict)  # pack -> Outcome
    released: list[int] = field(default_factory=list)
    unverifiable: int = 0  # packs we have no root for (nothing to check against)
    limited: str | None = None  # the partner's audit limit stopped it early (its message)
    seconds: float = 0.0
    answer_bytes: int = 0

    def as_dict(self) -> dict:
        return {"peer_id": self.peer_id, "checked": self.checked, "passed": self.passed,
                "failed": [{"pack": f"{pid:012x}", "outcome": Outcome.NAMES[o]}
                           for pid, o in sorted(self.failures.items())],
                "released": len(self.released), "unverifiable": self.unverifiable, "limited": self.limited,
                "seconds": round(self.seconds, 3), "answer_bytes": self.answer_bytes}


def judge(proof: P.PackProof, nonce: bytes, pack_id: int, root: bytes, size: int, leaves: int) -> int | None:
    """The outcome of one pack's proof (None: released, not a failure)."""
    if proof.status == P.ProofStatus.RELEASED:
        return None
    if proof.status != P.ProofStatus.HELD:
        return Outcome.MISSING
    if proof.size != size:
        return Outcome.WRONG
    wanted = challenge_leaves(nonce, pack_id, size, leaves)
    if len(proof.leaves) != len(wanted) or len(proof.paths) != len(wanted):
        return Outcome.DAMAGED
    if all(verify_proof(root, size, leaf, bytes(data), [bytes(s) for s in path])
           for leaf, data, path in zip(wanted, proof.leaves, proof.paths, strict=True)):
        return Outcome.OK
    return Outcome.DAMAGED


class Auditor:
    """Audits every partner on its schedule, and on demand (`challenge`).

    Attributes:
      holdings: what counts as held (updated with every outcome).
      reputations: each partner's evidence (proof outcomes, response times, presence).
      last_results: the last audit of each partner.
    """

    def __init__(self, ledger, links, holdings: Holdings, reputations, roots, config, *, on_change=lambda: None,
                 clock=time.time, rng: random.Random | None = None):
        self.ledger = ledger
        self.links = links
        self.holdings = holdings
        self.reputations = reputations
        self._roots = roots  # pack id -> (tree root, size) or None
        self.config = config
        self._on_change = on_change
        self._clock = clock
        self._rng = rng or random.SystemRandom()
        self._cycles: dict[str, _Cycle] = {}
        self._busy: dict[str, trio.Lock] = {}
        self._next: dict[str, float] = {}
        self.last_results: dict[str, AuditResult] = {}

    # ----- choosing -------------------------------------------------------------------------------
    def _pool(self, peer: str) -> set[int]:
        return set(self.holdings.held(peer)) | self.holdings.failing(peer)

    def plan_for(self, peer: str) -> Plan:
        pool = self._pool(peer)
        sizes = [r[1] for r in (self._roots(pid) for pid in pool) if r is not None]
        return plan(len(pool), sum(sizes), self.config)

    def choose(self, peer: str, count: int) -> list[int]:
        """Packs for the next scheduled audit: those not audited within the coverage period
        first, the rest from the partner's secret random order."""
        pool = self._pool(peer)
        now = self._clock()
        records = self.holdings.audits(peer)
        deadline = now - self.config.coverage_days * DAY + 2 * self.config.audit_interval
        overdue = sorted((pid for pid in pool if (rec := records.get(pid)) is None or rec.last_at < deadline),
                         key=lambda pid: records[pid].last_at if pid in records else 0.0)[:count]
        chosen = set(overdue)
        cycle = self._cycles.setdefault(peer, _Cycle(self._rng))
        cycle.buckets = self.plan_for(peer).buckets
        return overdue + cycle.take(count - len(overdue), pool, chosen)

    # ----- running ----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Audit each partner when due; sample who is connected for the uptime figures."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._presence_loop)
            tick = max(0.2, min(5.0, self.config.audit_interval / 10))
            while True:
                now = self._clock()
                for p in self.ledger.partners():
                    if not p.active or not self._pool(p.peer_id):
                        continue
                    due = self._next.get(p.peer_id)
                    if due is None:
                        h = self.reputations.health(p.peer_id)
                        due = self._next[p.peer_id] = max(now + self._rng.uniform(0, min(tick * 4, 30.0)),
                                                          h.last_audit_at + self._interval())
                    lock = self._busy.setdefault(p.peer_id, trio.Lock())
                    if now >= due and not lock.locked():
                        self._next[p.peer_id] = now + self._interval()
                        nursery.start_soon(self._scheduled, p.peer_id)
                await trio.sleep(tick)

    def _interval(self) -> float:
        return self.config.audit_interval * self._rng.uniform(0.9, 1.1)

    def soon(self, peer: str) -> None:
        """Audit this partner at the next tick (it just came back)."""
        self._next[peer] = 0.0

    async def _scheduled(self, peer: str) -> None:
        count = audit_size(self.plan_for(peer).per_audit, self._rng)
        try:
            result = await self.audit(peer, self.choose(peer, count), leaves=1)
        except Unreachable as e:  # the dial that failed is already on its record
            log.info("audit of %s not done: %s", peer, e)
            return
        except (TransportError, trio.TooSlowError, OSError) as e:
            log.info("audit of %s not done: %s", peer, e or type(e).__name__)
            self.reputations.contact(peer, False, dialled=False)  # it stopped answering
            return
        except Exception:
            log.exception("audit of %s failed", peer)
            return
        if result.limited:
            log.info("audit of %s stopped early by its limit: %s", peer, result.limited)

    async def _presence_loop(self) -> None:
        last = self._clock()
        while True:
            await trio.sleep(PRESENCE_INTERVAL)
            now = self._clock()
            for p in self.ledger.partners():
                if p.active:
                    self.reputations.presence(p.peer_id, now - last, self.links.connected(p.peer_id))
            last = now

    async def challenge(self, peer: str, packs: int | None = None, leaves: int = CHALLENGE_LEAVES) -> AuditResult:
        """An audit now (`bpfs challenge`): every pack the partner holds (or `packs` of them)."""
        pool = sorted(self._pool(peer))
        if packs is not None and packs < len(pool):
            pool = sorted(self._rng.sample(pool, packs))
        return await self.audit(peer, pool, leaves=leaves)

    async def audit(self, peer: str, pack_ids: list[int], *, leaves: int = 1) -> AuditResult:
        """Ask `peer` to prove `pack_ids`; record and return the outcome."""
        partner = self.ledger.partner(peer)
        if partner is None or not partner.active:
            raise ValueError(f"not paired with {peer}")
        leaves = max(1, min(leaves, P.MAX_PROOF_LEAVES))
        result = AuditResult(peer)
        lock = self._busy.setdefault(peer, trio.Lock())
        async with lock:
            started = time.monotonic()
            conn = await self.links.get(peer, partner.addresses)
            if not pack_ids:  # nothing to prove: still, the partner must answer
                with trio.fail_after(AUDIT_TIMEOUT):
                    await request(conn, P.Usage(), registry=P.PARTNER)
            nonce = os.urandom(P.NONCE_SIZE)
            todo = []
            for pid in pack_ids:
                root = self._roots(pid)
                if root is None:
                    result.unverifiable += 1
                else:
                    todo.append((pid, root))
            per_request = max(1, min(P.MAX_AUDIT_PACKS, P.MAX_AUDIT_LEAVES // leaves))
            outcomes: dict[int, int] = {}
            round_trips = []
            for i in range(0, len(todo), per_request):
                batch = todo[i:i + per_request]
                sent = time.monotonic()
                try:
                    with trio.fail_after(AUDIT_TIMEOUT):
                        reply = await request(conn, P.Prove(P.AUDIT_VERSION, nonce, [pid for pid, _ in batch], leaves),
                                              registry=P.PARTNER)
                except RemoteError as e:
                    if e.code == P.Refusal.AUDIT_LIMIT:
                        result.limited = e.message
                        break
                    raise
                round_trips.append(time.monotonic() - sent)
                result.answer_bytes += sum(len(d) + DIGEST_SIZE * len(path) for pr in reply.proofs
                                           for d, path in zip(pr.leaves, pr.paths, strict=False))
                if len(reply.proofs) != len(batch):
                    for pid, _ in batch:  # an answer that does not match the question proves nothing
                        outcomes[pid] = Outcome.DAMAGED
                    continue
                for (pid, (root, size)), proof in zip(batch, reply.proofs, strict=True):
                    outcome = judge(proof, nonce, pid, root, size, leaves)
                    if outcome is None:
                        result.released.append(pid)
                    else:
                        outcomes[pid] = outcome
            result.seconds = time.monotonic() - started
        self._record(peer, result, outcomes, round_trips)
        return result

    def _record(self, peer: str, result: AuditResult, outcomes: dict[int, int], round_trips: list[float]) -> None:
        now = self._clock()
        result.checked = len(outcomes)
        result.failures = {pid: o for pid, o in outcomes.items() if o != Outcome.OK}
        result.passed = result.checked - len(result.failures)
        if result.released:
            self.holdings.released(peer, result.released)
        newly_failed, recovered = self.holdings.record_audit(peer, outcomes, now)
        if outcomes:
            rt = sorted(round_trips)[len(round_trips) // 2] if round_trips else None
            self.reputations.proofs(peer, result.passed, len(result.failures), rt)
        self.last_results[peer] = result
        if newly_failed:
            kinds: dict[str, int] = {}
            for outcome in newly_failed.values():
                kinds[Outcome.NAMES[outcome]] = kinds.get(Outcome.NAMES[outcome], 0) + 1
            log.warning("%s failed the audit of %d of %d packs (%s): they no longer count as held there and "
                        "are sent again", peer, len(newly_failed), result.checked,
                        ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        if recovered:
            log.info("%s proved %d packs it had failed before", peer, len(recovered))
        if newly_failed or recovered or result.released:
            self._on_change()
