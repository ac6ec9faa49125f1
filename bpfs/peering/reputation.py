"""Reputation: what we have seen of each partner, its score and its trust level.

Owns the evidence model (`Health`, one per partner, kept as JSON in the ledger's `health` table)
and the rules that turn evidence into a score and a trust level. The rules are pure functions
of the evidence and a clock (`assess`, `score`), so they are tested without a network; the
`Reputations` book loads, updates and saves the evidence as events arrive from the auditor
(proofs passed and failed, response times) and from the links (dials that worked or failed,
time connected).

Evidence, older counting less:
  - audits: a Beta distribution over proof outcomes, as Storj scores its audits. Each pack proof
    updates alpha (passed) or beta (failed) after multiplying both by LAMBDA (0.99), so the last
    ~100 proofs carry most of the weight; the audit score is alpha / (alpha + beta), starting at
    1 (alpha 1, beta 0) for a partner with no evidence yet;
  - reachability: per day, seconds observed and seconds the partner was connected, dials that
    worked and failed, and proof response times, for the last WINDOW_DAYS (30) days;
  - times: first and last passed audit, last failure, last contact, and since when the partner
    has been unreachable (a dial failed and none worked since).

Score (0..1, for ranking and display): 0.7 x audit score + 0.2 x uptime over 30 days + 0.1 x
speed, where speed = 1 / (1 + mean proof round trip / 2 s); no reachability evidence counts as
full uptime, so a new partner starts at 1.0.

Trust levels, first that applies:
  failed    unreachable for longer than `repair_after`, or an audit score below `fail_score`,
            or at least 2 of our packs there failing and more than `fail_fraction` of them.
            Sticky: it lasts until none of this holds *and* an audit has passed since, every proof
            of it (or the partner holds nothing of ours to audit and is reachable again).
  suspect   a pack there failing (not repaired yet), a failed audit in the last 7 days, or
            unreachable for longer than `suspect_after`;
  unknown   paired, never passed an audit;
  trusted   passed audits for at least 30 days, uptime over 30 days of at least 95 %, audit
            score at least 0.99, no failure in 30 days;
  verified  otherwise: identity proven on every connection, audits passing.
Only `failed` takes a partner out of good standing: its copies stop counting, it loses its
assignment, and its share goes to other partners (the replicator's repair). A hardware-anchored
level (a partner whose storage is attested, e.g. by a TPM) is future work.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields

LAMBDA = 0.99  # forgetting factor per pack proof
WINDOW_DAYS = 30
DAY = 86400.0
SUSPECT_AFTER_FAILURE = 7 * DAY
TRUSTED_AFTER = 30 * DAY
TRUSTED_UPTIME = 0.95
TRUSTED_SCORE = 0.99
SPEED_SCALE = 2.0  # seconds: a proof round trip this long halves the speed part

UNKNOWN, VERIFIED, TRUSTED, SUSPECT, FAILED = "unknown", "verified", "trusted", "suspect", "failed"
LEVELS = (TRUSTED, VERIFIED, UNKNOWN, SUSPECT, FAILED)  # best first

# day bucket fields
_DAY, _UP, _OBSERVED, _DIAL_OK, _DIAL_FAILED, _RT_SUM, _RT_COUNT = range(7)


@dataclass
class Health:
    """Everything we have seen of one partner (times are unix seconds; 0 = never).

    Attributes:
      alpha, beta: the Beta distribution over proof outcomes (with forgetting).
      proofs_passed, proofs_failed, audits, audits_failed: counts since pairing.
      first_pass_at, last_pass_at: the first and last audit in which a proof passed.
      last_clean_at: the last audit in which every proof passed.
      last_audit_at, last_failure_at: the last audit, and the last one with a failed proof.
      last_contact_at: the last time a connection to or from it worked.
      unreachable_since: the first failed dial since the last contact (0: reachable).
      failed_since: when it last became `failed` (0: not failed); failed_reason says why.
      days: per day of the last WINDOW_DAYS days, [day, seconds up, seconds observed, dials ok,
            dials failed, sum of proof round trips, proof round trips].
    """

    alpha: float = 1.0
    beta: float = 0.0
    proofs_passed: int = 0
    proofs_failed: int = 0
    audits: int = 0
    audits_failed: int = 0
    first_pass_at: float = 0.0
    last_pass_at: float = 0.0
    last_clean_at: float = 0.0
    last_audit_at: float = 0.0
    last_failure_at: float = 0.0
    last_contact_at: float = 0.0
    unreachable_since: float = 0.0
    failed_since: float = 0.0
    failed_reason: str = ""
    days: list = field(default_factory=list)

    def to_doc(self) -> dict:
        return asdict(self)

    @classmethod
    def from_doc(cls, doc: dict | None) -> "Health":
        if not doc:
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


@dataclass(frozen=True)
class Standing:
    """A partner's trust level now, why, and whether its copies count."""

    level: str
    reason: str = ""

    @property
    def good(self) -> bool:
        return self.level != FAILED


# ----- recording evidence -------------------------------------------------------------------------
def _bucket(h: Health, now: float) -> list:
    day = int(now // DAY)
    if not h.days or h.days[-1][_DAY] != day:
        h.days.append([day, 0.0, 0.0, 0, 0, 0.0, 0])
        h.days[:] = [d for d in h.days if d[_DAY] > day - WINDOW_DAYS]
    return h.days[-1]


def record_proofs(h: Health, now: float, passed: int, failed: int, round_trip: float | None = None) -> None:
    """One audit's outcome: `passed` and `failed` pack proofs, and its round trip."""
    for _ in range(passed):
        h.alpha, h.beta = LAMBDA * h.alpha + 1.0, LAMBDA * h.beta
    for _ in range(failed):
        h.alpha, h.beta = LAMBDA * h.alpha, LAMBDA * h.beta + 1.0
    h.proofs_passed += passed
    h.proofs_failed += failed
    h.audits += 1
    h.last_audit_at = now
    if passed:
        h.last_pass_at = now
        h.first_pass_at = h.first_pass_at or now
    if failed:
        h.audits_failed += 1
        h.last_failure_at = now
    elif passed:
        h.last_clean_at = now
    if round_trip is not None:
        b = _bucket(h, now)
        b[_RT_SUM] += round_trip
        b[_RT_COUNT] += 1
    record_contact(h, now, True, dialled=False)


def record_contact(h: Health, now: float, ok: bool, *, dialled: bool = True) -> None:
    """A connection to the partner worked (`ok`) or a dial failed."""
    if dialled:
        b = _bucket(h, now)
        b[_DIAL_OK if ok else _DIAL_FAILED] += 1
    if ok:
        h.last_contact_at = now
        h.unreachable_since = 0.0
    elif not h.unreachable_since:
        h.unreachable_since = now


def record_presence(h: Health, now: float, seconds: float, up: bool) -> None:
    """`seconds` of observation during which the partner was connected (`up`) or not."""
    b = _bucket(h, now)
    b[_OBSERVED] += seconds
    if up:
        b[_UP] += seconds


# ----- reading it -----------------------------------------------------------------------------------
def _recent(h: Health, now: float) -> list:
    day = int(now // DAY)
    return [d for d in h.days if d[_DAY] > day - WINDOW_DAYS]


def audit_score(h: Health) -> float:
    return h.alpha / (h.alpha + h.beta) if h.alpha + h.beta > 0 else 1.0


def uptime(h: Health, now: float) -> float | None:
    """Fraction of the observed time of the last 30 days the partner was connected (None: not observed)."""
    days = _recent(h, now)
    observed = sum(d[_OBSERVED] for d in days)
    return sum(d[_UP] for d in days) / observed if observed > 0 else None


def dial_success(h: Health, now: float) -> float | None:
    days = _recent(h, now)
    ok, failed = sum(d[_DIAL_OK] for d in days), sum(d[_DIAL_FAILED] for d in days)
    return ok / (ok + failed) if ok + failed else None


def response_time(h: Health, now: float) -> float | None:
    """Mean proof round trip (seconds) over the last 30 days."""
    days = _recent(h, now)
    n = sum(d[_RT_COUNT] for d in days)
    return sum(d[_RT_SUM] for d in days) / n if n else None


def score(h: Health, now: float) -> float:
    up = uptime(h, now)
    rt = response_time(h, now)
    speed = 1.0 if rt is None else 1.0 / (1.0 + rt / SPEED_SCALE)
    return 0.7 * audit_score(h) + 0.2 * (1.0 if up is None else up) + 0.1 * speed


def assess(h: Health, now: float, policy, *, failing: int, held: int) -> Standing:
    """The trust level from the evidence. `failing`: our packs there whose last audit failed and
    that were not repaired yet; `held`: packs it holds for us that count (not failing).
    `policy` has repair_after, suspect_after (seconds), fail_score and fail_fraction."""
    reasons = []
    away = now - h.unreachable_since if h.unreachable_since else 0.0
    if h.unreachable_since and away >= policy.repair_after:
        reasons.append(f"unreachable for {_span(away)} (repair after {_span(policy.repair_after)})")
    s = audit_score(h)
    if s < policy.fail_score:
        reasons.append(f"audit score {s:.2f} below {policy.fail_score:g}")
    if failing >= 2 and failing > policy.fail_fraction * (failing + held):
        reasons.append(f"{failing} of {failing + held} packs failed their audit")
    if reasons:
        return Standing(FAILED, "; ".join(reasons))
    if h.failed_since:
        passed_since = h.last_clean_at > h.failed_since
        nothing_to_prove = held == 0 and failing == 0 and not h.unreachable_since
        if not (passed_since or nothing_to_prove):
            return Standing(FAILED, (h.failed_reason or "failed") + "; waiting for an audit to pass")
    if failing:
        return Standing(SUSPECT, f"{failing} pack(s) failed their audit, being repaired")
    if h.last_failure_at and now - h.last_failure_at < SUSPECT_AFTER_FAILURE:
        return Standing(SUSPECT, f"an audit failed {_span(now - h.last_failure_at)} ago")
    if h.unreachable_since and away >= policy.suspect_after:
        return Standing(SUSPECT, f"unreachable for {_span(away)}")
    if not h.proofs_passed or not h.first_pass_at:
        return Standing(UNKNOWN, "not audited yet")
    up = uptime(h, now)
    if (now - h.first_pass_at >= TRUSTED_AFTER and (up is None or up >= TRUSTED_UPTIME) and s >= TRUSTED_SCORE
            and not (h.last_failure_at and now - h.last_failure_at < TRUSTED_AFTER)):
        return Standing(TRUSTED, f"audits passing for {_span(now - h.first_pass_at)}")
    return Standing(VERIFIED, "audits passing")


def settle(h: Health, standing: Standing, now: float) -> bool:
    """Remember when a partner became failed (or stopped being so); True if that changed."""
    if standing.level == FAILED and not h.failed_since:
        h.failed_since, h.failed_reason = now, standing.reason
        return True
    if standing.level != FAILED and h.failed_since:
        h.failed_since, h.failed_reason = 0.0, ""
        return True
    return False


def _span(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", DAY), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size:
            value = seconds / size
            return f"{value:.0f} {unit}" if value >= 10 or math.isclose(value, round(value)) else f"{value:.1f} {unit}"
    return f"{seconds:.0f} s"


def summary(h: Health, standing: Standing, now: float) -> dict:
    """What `bpfs reputation` shows of one partner."""
    up, dials, rt = uptime(h, now), dial_success(h, now), response_time(h, now)
    return {"level": standing.level, "reason": standing.reason, "score": round(score(h, now), 4),
            "audit_score": round(audit_score(h), 4), "uptime": None if up is None else round(up, 4),
            "dial_success": None if dials is None else round(dials, 4),
            "response_time": None if rt is None else round(rt, 4),
            "proofs_passed": h.proofs_passed, "proofs_failed": h.proofs_failed, "audits": h.audits,
            "audits_failed": h.audits_failed, "first_pass_at": h.first_pass_at or None,
            "last_audit_at": h.last_audit_at or None, "last_failure_at": h.last_failure_at or None,
            "last_contact_at": h.last_contact_at or None, "unreachable_since": h.unreachable_since or None}


class Reputations:
    """Each partner's `Health`, loaded from and saved to the ledger as evidence arrives."""

    def __init__(self, ledger, policy, *, clock=time.time):
        self.ledger = ledger
        self.policy = policy
        self._clock = clock
        self._cache: dict[str, Health] = {}

    def health(self, peer: str) -> Health:
        h = self._cache.get(peer)
        if h is None:
            h = self._cache[peer] = Health.from_doc(self.ledger.health(peer))
        return h

    def save(self, peer: str) -> None:
        self.ledger.put_health(peer, self.health(peer).to_doc())

    def forget(self, peer: str) -> None:
        self._cache.pop(peer, None)

    def proofs(self, peer: str, passed: int, failed: int, round_trip: float | None) -> None:
        record_proofs(self.health(peer), self._clock(), passed, failed, round_trip)
        self.save(peer)

    def contact(self, peer: str, ok: bool, *, dialled: bool = True) -> None:
        h = self.health(peer)
        was = h.unreachable_since
        record_contact(h, self._clock(), ok, dialled=dialled)
        if dialled or bool(was) != bool(h.unreachable_since):
            self.save(peer)

    def presence(self, peer: str, seconds: float, up: bool) -> None:
        record_presence(self.health(peer), self._clock(), seconds, up)
        self.save(peer)

    def standing(self, peer: str, *, failing: int, held: int) -> Standing:
        """The partner's level now; a change into or out of `failed` is remembered."""
        h, now = self.health(peer), self._clock()
        standing = assess(h, now, self.policy, failing=failing, held=held)
        if settle(h, standing, now):
            self.save(peer)
            standing = assess(h, now, self.policy, failing=failing, held=held)
        return standing
