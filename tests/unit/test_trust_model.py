"""Storage audits and trust, as pure models: no FUSE, no network.

- `peering.reputation`: every trust level and its boundary (`assess`), the stickiness of
  `failed` (`settle`), the Beta audit score with forgetting, uptime / dials / response time over
  the 30-day window, the score, and the `Reputations` book over a real LMDB ledger.
- `peering.auditor`: the schedule math (`detection_draws`, `plan`) at large and small partners,
  a Monte-Carlo check that the default plan finds a 1 % loss within a day, and `judge` on real
  proofs (`packtree`) of real files.
- `peering.holder._prove_all`: the holder's answers from real files, with and without the proof
  sidecar, for missing, released, incomplete, resized and damaged packs.

Times are plain floats (an injected clock), the policy is a default `Config()`.
"""

from __future__ import annotations

import math
import os
import random
import time

import pytest

from bpfs import packtree as T
from bpfs.config import Config
from bpfs.identity import Identity
from bpfs.peering import auditor as A
from bpfs.peering import holder as H
from bpfs.peering import protocol as P
from bpfs.peering import reputation as R
from bpfs.peering.ledger import HostedRecord, Ledger, Outcome

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
DAY = R.DAY
HOUR = 3600.0
POLICY = Config()
# Midnight (UTC, as reputation's day buckets count days) plus an hour: day boundaries are clear.
T0 = (1_800_000_000 // int(DAY)) * DAY + HOUR


def level(h: R.Health, now: float, *, failing: int = 0, held: int = 10) -> str:
    return R.assess(h, now, POLICY, failing=failing, held=held).level


def clean_history(now: float, passes: int = 500) -> R.Health:
    """A partner that passed `passes` proofs (50 per audit) and was always reachable."""
    h = R.Health()
    while passes > 0:
        R.record_proofs(h, now, min(50, passes), 0, 0.05)
        passes -= 50
    return h


# ===== reputation.assess: the levels and their boundaries ==========================================
def test_policy_defaults_are_the_documented_ones():
    # The boundaries below are written against these; a changed default should be a conscious change.
    assert (POLICY.suspect_after, POLICY.repair_after) == (12 * HOUR, 3 * DAY)
    assert (POLICY.fail_score, POLICY.fail_fraction) == (0.9, 0.1)


def test_unknown_until_a_proof_passes():
    h = R.Health()
    assert level(h, T0) == R.UNKNOWN
    R.record_contact(h, T0, True)  # reachable, identity proven: still never audited
    R.record_presence(h, T0, 600, True)
    assert level(h, T0 + 1) == R.UNKNOWN
    R.record_proofs(h, T0 + 2, 0, 0)  # an audit that checked nothing (all released)
    assert level(h, T0 + 3) == R.UNKNOWN
    R.record_proofs(h, T0 + 4, 1, 0)
    assert level(h, T0 + 5) == R.VERIFIED


def test_verified_after_a_passing_audit_and_not_trusted_before_30_days():
    h = R.Health()
    R.record_proofs(h, T0, 3, 0, 0.1)
    assert h.first_pass_at == h.last_pass_at == T0
    assert level(h, T0) == R.VERIFIED
    for day in range(1, 30):
        R.record_proofs(h, T0 + day * DAY, 3, 0, 0.1)
    assert level(h, T0 + 30 * DAY - 1) == R.VERIFIED


def _thirty_good_days(uptime_fraction: float = 1.0) -> R.Health:
    h = R.Health()
    for day in range(31):
        now = T0 + day * DAY
        R.record_proofs(h, now, 24, 0, 0.05)
        R.record_presence(h, now, DAY * uptime_fraction, True)
        R.record_presence(h, now, DAY * (1 - uptime_fraction), False)
    return h


def test_trusted_after_30_days_of_passing_audits_with_good_uptime():
    h = _thirty_good_days()
    assert R.audit_score(h) >= R.TRUSTED_SCORE
    assert level(h, T0 + 30 * DAY) == R.TRUSTED  # the boundary itself (>=)
    assert level(h, T0 + 30 * DAY - 1) == R.VERIFIED
    # no reachability evidence counts as full uptime
    h2 = R.Health()
    R.record_proofs(h2, T0, 500, 0)
    R.record_proofs(h2, T0 + 30 * DAY, 5, 0)
    assert R.uptime(h2, T0 + 30 * DAY) is None
    assert level(h2, T0 + 30 * DAY) == R.TRUSTED


def test_not_trusted_with_poor_uptime_a_low_score_or_a_recent_failure():
    assert level(_thirty_good_days(0.96), T0 + 30 * DAY) == R.TRUSTED
    assert level(_thirty_good_days(0.90), T0 + 30 * DAY) == R.VERIFIED  # uptime < 95 %
    h = R.Health()
    for day in range(31):
        if day == 22:
            R.record_proofs(h, T0 + day * DAY, 0, 1)  # one failure, 8 days before day 30
        R.record_proofs(h, T0 + day * DAY + 1, 24, 0, 0.05)
        R.record_presence(h, T0 + day * DAY + 1, DAY, True)
    assert R.audit_score(h) >= R.TRUSTED_SCORE
    assert level(h, T0 + 30 * DAY) == R.VERIFIED  # not suspect any more, but not trusted within 30 days
    assert level(h, T0 + 22 * DAY + 30 * DAY - 1) == R.VERIFIED
    assert level(h, T0 + 22 * DAY + 30 * DAY) == R.TRUSTED
    h = _thirty_good_days()
    h.beta = h.alpha * 0.02  # audit score ~0.98 < 0.99, no failure on record
    assert level(h, T0 + 30 * DAY) == R.VERIFIED


def test_suspect_with_a_failing_pack():
    h = clean_history(T0)
    assert level(h, T0 + 1, failing=1, held=0) == R.SUSPECT  # one failing pack is never "failed"
    assert level(h, T0 + 1, failing=1, held=100) == R.SUSPECT
    assert level(h, T0 + 1, failing=0, held=100) == R.VERIFIED


@pytest.mark.parametrize("failing, held, expected", [
    (2, 18, R.SUSPECT),  # 2 of 20 = 10 %: not more than fail_fraction
    (2, 17, R.FAILED),  # 2 of 19 > 10 %
    (3, 27, R.SUSPECT),  # exactly 10 %
    (4, 27, R.FAILED),
    (2, 0, R.FAILED),  # everything it holds fails
    (9, 100, R.SUSPECT),
])
def test_failed_when_at_least_two_packs_and_more_than_fail_fraction_fail(failing, held, expected):
    assert level(clean_history(T0), T0 + 1, failing=failing, held=held) == expected


def test_suspect_for_7_days_after_a_failed_audit():
    h = clean_history(T0)
    R.record_proofs(h, T0 + 10, 19, 1)
    assert h.last_failure_at == T0 + 10
    assert R.audit_score(h) > POLICY.fail_score
    assert level(h, T0 + 10) == R.SUSPECT
    assert level(h, T0 + 10 + R.SUSPECT_AFTER_FAILURE - 1) == R.SUSPECT
    assert level(h, T0 + 10 + R.SUSPECT_AFTER_FAILURE) == R.VERIFIED


def test_unreachable_suspect_then_failed():
    h = clean_history(T0)
    R.record_contact(h, T0 + 100, False)
    assert h.unreachable_since == T0 + 100
    R.record_contact(h, T0 + 200, False)  # later failed dials do not move the start
    assert h.unreachable_since == T0 + 100
    assert level(h, T0 + 100 + POLICY.suspect_after - 1) == R.VERIFIED
    assert level(h, T0 + 100 + POLICY.suspect_after) == R.SUSPECT
    assert level(h, T0 + 100 + POLICY.repair_after - 1) == R.SUSPECT
    st = R.assess(h, T0 + 100 + POLICY.repair_after, POLICY, failing=0, held=10)
    assert st.level == R.FAILED and not st.good and "unreachable" in st.reason
    R.record_contact(h, T0 + 300, True)  # (without settle, coming back undoes it at once)
    assert h.unreachable_since == 0
    assert level(h, T0 + 100 + POLICY.repair_after) == R.VERIFIED


def test_failed_when_the_audit_score_is_below_fail_score():
    on_the_line = R.Health(alpha=0.9, beta=0.1, proofs_passed=1, first_pass_at=T0, last_pass_at=T0)
    assert R.audit_score(on_the_line) == pytest.approx(POLICY.fail_score)
    assert level(on_the_line, T0) != R.FAILED
    below = R.Health(alpha=0.89, beta=0.11, proofs_passed=1, first_pass_at=T0, last_pass_at=T0)
    st = R.assess(below, T0, POLICY, failing=0, held=10)
    assert st.level == R.FAILED and "audit score" in st.reason


def test_every_standing_but_failed_is_good():
    assert [R.Standing(lv).good for lv in R.LEVELS] == [True, True, True, True, False]


# ===== settle: failed is sticky ===================================================================
def _fail_by_absence(h: R.Health) -> float:
    """Make the partner unreachable long enough to fail; settle it; return when."""
    R.record_contact(h, T0 + 10, False)
    now = T0 + 10 + POLICY.repair_after
    st = R.assess(h, now, POLICY, failing=0, held=10)
    assert st.level == R.FAILED
    assert R.settle(h, st, now) is True
    assert h.failed_since == now and "unreachable" in h.failed_reason
    assert R.settle(h, st, now + 1) is False  # already remembered: no change, the start stays
    assert h.failed_since == now
    return now


def test_failed_stays_until_an_audit_passes_after_it():
    h = clean_history(T0)
    failed_at = _fail_by_absence(h)
    R.record_contact(h, failed_at + 60, True)  # back: the cause is gone ...
    st = R.assess(h, failed_at + 120, POLICY, failing=0, held=10)
    assert st.level == R.FAILED and "waiting for an audit to pass" in st.reason  # ... but not trusted yet
    assert R.settle(h, st, failed_at + 120) is False
    R.record_proofs(h, failed_at + 180, 9, 1)  # an audit with a failure is not a passed audit
    assert level(h, failed_at + 200) == R.FAILED
    R.record_proofs(h, failed_at + 300, 10, 0)
    st = R.assess(h, failed_at + 301, POLICY, failing=0, held=10)
    assert st.level == R.SUSPECT  # the failure 2 min ago still makes it suspect, but it counts again
    assert R.settle(h, st, failed_at + 301) is True
    assert h.failed_since == 0 and h.failed_reason == ""
    assert level(h, failed_at + 180 + R.SUSPECT_AFTER_FAILURE) == R.VERIFIED


def test_a_pass_before_it_failed_does_not_clear_failed():
    h = clean_history(T0)
    failed_at = _fail_by_absence(h)
    assert h.last_pass_at < failed_at
    R.record_contact(h, failed_at + 60, True)
    assert level(h, failed_at + 60 + 30 * DAY) == R.FAILED  # time alone does not clear it


def test_failed_by_score_stays_failed_after_the_score_recovers_without_a_pass_since():
    h = clean_history(T0)
    R.record_proofs(h, T0 + 10, 0, 40)
    st = R.assess(h, T0 + 20, POLICY, failing=0, held=10)
    assert st.level == R.FAILED and "audit score" in st.reason
    R.settle(h, st, T0 + 20)
    h.alpha, h.beta = 100.0, 0.0  # the score is fine again, no audit passed since
    assert level(h, T0 + 30) == R.FAILED


def test_holding_nothing_and_reachable_again_is_not_kept_failed():
    h = clean_history(T0)
    failed_at = _fail_by_absence(h)
    # still unreachable, though holding nothing: failed (the cause itself)
    assert level(h, failed_at + 1, failing=0, held=0) == R.FAILED
    R.record_contact(h, failed_at + 60, True)
    assert level(h, failed_at + 61, failing=0, held=0) == R.VERIFIED  # nothing of ours to prove
    assert level(h, failed_at + 61, failing=0, held=1) == R.FAILED  # something to prove: prove it
    assert level(h, failed_at + 61, failing=1, held=0) == R.FAILED
    # away again (briefly: not even suspect by itself): the exception needs it reachable
    R.record_contact(h, failed_at + 100, False)
    assert level(h, failed_at + 101, failing=0, held=0) == R.FAILED


# ===== the Beta audit score and the windowed figures ================================================
def test_a_new_partner_scores_one():
    h = R.Health()
    assert R.audit_score(h) == 1.0 and R.score(h, T0) == pytest.approx(1.0)
    assert R.uptime(h, T0) is None and R.dial_success(h, T0) is None and R.response_time(h, T0) is None


def test_beta_update_with_forgetting_is_exact():
    h = R.Health()
    R.record_proofs(h, T0, 100, 0)
    lam = R.LAMBDA
    alpha = lam ** 100 + (1 - lam ** 100) / (1 - lam)
    assert h.alpha == pytest.approx(alpha) and h.beta == 0.0
    R.record_proofs(h, T0 + 1, 0, 3)
    assert h.alpha == pytest.approx(alpha * lam ** 3)
    assert h.beta == pytest.approx((1 - lam ** 3) / (1 - lam))
    assert (h.proofs_passed, h.proofs_failed, h.audits, h.audits_failed) == (100, 3, 2, 1)
    assert h.last_failure_at == T0 + 1 and h.last_pass_at == T0


def test_score_falls_with_each_failure_and_recovers_with_passes():
    h = clean_history(T0, 300)
    scores = [R.audit_score(h)]
    for i in range(10):
        R.record_proofs(h, T0 + 1 + i, 0, 1)
        scores.append(R.audit_score(h))
    assert all(b < a for a, b in zip(scores, scores[1:]))
    low = scores[-1]
    for i in range(300):
        R.record_proofs(h, T0 + 100 + i, 1, 0)
        assert R.audit_score(h) > low
        low = R.audit_score(h)
    assert R.audit_score(h) > 0.99  # old failures are forgotten (LAMBDA^300 ~ 5 %)


def test_one_failed_proof_after_a_long_clean_history_is_not_a_failure_by_score():
    h = clean_history(T0, 5000)
    R.record_proofs(h, T0 + 1, 0, 1)
    assert R.audit_score(h) > 0.98
    assert level(h, T0 + 2) == R.SUSPECT


def test_losing_everything_in_one_audit_of_20_packs_fails_even_a_long_clean_history():
    h = clean_history(T0, 5000)
    assert R.audit_score(h) > 0.999
    R.record_proofs(h, T0 + 1, 0, 20)
    assert R.audit_score(h) < POLICY.fail_score
    st = R.assess(h, T0 + 2, POLICY, failing=0, held=1000)  # even before the failing packs count
    assert st.level == R.FAILED and "audit score" in st.reason


def test_uptime_over_the_30_day_window():
    h = R.Health()
    R.record_presence(h, T0, 3 * HOUR, True)
    R.record_presence(h, T0 + 10, 1 * HOUR, False)
    assert R.uptime(h, T0) == pytest.approx(0.75)
    # a fully observed later day: both count while within 30 days
    R.record_presence(h, T0 + 5 * DAY, 4 * HOUR, True)
    assert R.uptime(h, T0 + 5 * DAY) == pytest.approx(7 / 8)
    assert R.uptime(h, T0 + 29 * DAY) == pytest.approx(7 / 8)  # day 0 is the 30th day back
    assert R.uptime(h, T0 + 30 * DAY) == pytest.approx(1.0)  # day 0 fell out
    assert R.uptime(h, T0 + 36 * DAY) is None  # nothing observed any more


def test_old_days_are_pruned_from_the_evidence():
    h = R.Health()
    for day in range(100):
        R.record_presence(h, T0 + day * DAY, HOUR, day % 2 == 0)
    assert len(h.days) <= R.WINDOW_DAYS
    assert R.uptime(h, T0 + 99 * DAY) == pytest.approx(0.5)


def test_dial_success_counts_dials_only_within_the_window():
    h = R.Health()
    for ok in (True, True, True, False):
        R.record_contact(h, T0, ok)
    R.record_contact(h, T0, True, dialled=False)  # the partner connected to us: not a dial
    assert R.dial_success(h, T0) == pytest.approx(0.75)
    R.record_contact(h, T0 + 10 * DAY, False)
    assert R.dial_success(h, T0 + 10 * DAY) == pytest.approx(0.6)
    assert R.dial_success(h, T0 + 31 * DAY) == pytest.approx(0.0)
    assert R.dial_success(h, T0 + 41 * DAY) is None


def test_response_time_is_the_mean_round_trip_over_the_window():
    h = R.Health()
    R.record_proofs(h, T0, 5, 0, 0.1)
    R.record_proofs(h, T0 + DAY, 5, 0, 0.3)
    R.record_proofs(h, T0 + DAY, 5, 0, None)  # no round trip known: not counted
    assert R.response_time(h, T0 + DAY) == pytest.approx(0.2)
    assert R.response_time(h, T0 + 30 * DAY) == pytest.approx(0.3)
    assert R.response_time(h, T0 + 31 * DAY) is None


def test_score_combines_audits_uptime_and_speed():
    h = R.Health()
    R.record_proofs(h, T0, 10, 0, R.SPEED_SCALE)  # speed 1/2
    R.record_presence(h, T0, HOUR, True)
    R.record_presence(h, T0, HOUR, False)  # uptime 1/2
    assert R.score(h, T0) == pytest.approx(0.7 * 1.0 + 0.2 * 0.5 + 0.1 * 0.5)


def test_score_stays_within_0_and_1():
    rng = random.Random(7)
    worst = R.Health()
    R.record_proofs(worst, T0, 0, 2000, 1e6)
    R.record_presence(worst, T0, DAY, False)
    assert 0.0 <= R.score(worst, T0) < 0.01
    for trial in range(200):
        h = R.Health()
        now = T0
        for _ in range(rng.randrange(1, 40)):
            now += rng.uniform(0, 3 * DAY)
            kind = rng.randrange(3)
            if kind == 0:
                R.record_proofs(h, now, rng.randrange(50), rng.randrange(50),
                                rng.choice([None, rng.uniform(0, 100)]))
            elif kind == 1:
                R.record_contact(h, now, rng.random() < 0.5, dialled=rng.random() < 0.5)
            else:
                R.record_presence(h, now, rng.uniform(0, DAY), rng.random() < 0.5)
            s = R.score(h, now)
            assert 0.0 <= s <= 1.0, (trial, h)
            assert 0.0 <= R.audit_score(h) <= 1.0
        R.summary(h, R.assess(h, now, POLICY, failing=0, held=1), now)  # renders whatever the evidence


# ===== the Reputations book over a real ledger =======================================================
class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_evidence_and_failed_survive_closing_and_reopening_the_ledger(tmp_path):
    peer = Identity(os.urandom(32)).peer_id
    other = Identity(os.urandom(32)).peer_id
    clock = Clock(T0)
    ledger = Ledger(str(tmp_path))
    try:
        reps = R.Reputations(ledger, POLICY, clock=clock)
        assert reps.health(peer) == R.Health()  # nothing recorded yet: a fresh partner
        reps.proofs(peer, 12, 0, 0.25)
        reps.presence(peer, 600.0, True)
        reps.contact(peer, True)
        reps.proofs(other, 3, 1, 0.5)
        clock.now += HOUR
        reps.contact(peer, False)
        clock.now += POLICY.repair_after
        st = reps.standing(peer, failing=0, held=12)
        assert st.level == R.FAILED
        saved = R.Health.from_doc(reps.health(peer).to_doc())
        assert saved.failed_since == clock.now
        saved_other = R.Health.from_doc(reps.health(other).to_doc())
    finally:
        ledger.close()

    ledger = Ledger(str(tmp_path))
    try:
        reps = R.Reputations(ledger, POLICY, clock=clock)
        h = reps.health(peer)
        assert h == saved
        assert (h.proofs_passed, h.audits, h.first_pass_at) == (12, 1, T0)
        assert R.uptime(h, clock.now) == 1.0 and R.dial_success(h, clock.now) == 0.5
        assert R.response_time(h, clock.now) == pytest.approx(0.25)
        assert reps.health(other) == saved_other
        clock.now += 60
        reps.contact(peer, True)  # back, but failed is remembered across the restart
        assert reps.standing(peer, failing=0, held=12).level == R.FAILED
        clock.now += 60
        reps.proofs(peer, 5, 0, 0.1)
        assert reps.standing(peer, failing=0, held=12).level == R.VERIFIED
        assert reps.health(peer).failed_since == 0
    finally:
        ledger.close()

    ledger = Ledger(str(tmp_path))
    try:
        reps = R.Reputations(ledger, POLICY, clock=clock)
        assert reps.health(peer).failed_since == 0  # the recovery was saved too
        assert reps.health(peer).proofs_passed == 17
        ledger.forget_partner(peer)
        assert ledger.health(peer) is None and ledger.health(other) is not None
    finally:
        ledger.close()


# ===== the schedule ====================================================================================
def test_detection_draws():
    m, buckets = A.detection_draws(100_000, 0.01, 0.99)
    assert 529 <= m <= 530 and buckets == 1  # ln(200) / 0.01: half the miss probability
    # one lost pack in 10 (or 100): every pack in every window, for certain (1.25 passes a window)
    assert A.detection_draws(10, 0.01, 0.99) == (13, A.CERTAIN_BUCKETS)
    assert A.detection_draws(100, 0.01, 0.99) == (125, A.CERTAIN_BUCKETS)
    assert A.detection_draws(0, 0.01, 0.99) == (0, 1)
    # the bound it is built on: d lost packs all missed by m draws (without repeats) w.p. <= (1 - m/n)^d
    for n in (1000, 12_345, 100_000):
        m, _ = A.detection_draws(n, 0.01, 0.99)
        d = math.ceil(0.01 * n)
        assert 2 * m <= n
        assert (1 - m / n) ** d <= 0.005 + 1e-12
        if m > 1:
            assert (1 - (m - 1) / n) ** d > 0.005  # and not one draw more than needed


def test_proof_bytes_is_about_2_6_kib_for_a_16_mib_pack():
    b = A.proof_bytes(16 * MiB)
    assert T.LEAF_SIZE + T.DIGEST_SIZE * 13 < b <= 2.7 * 1024  # measured on the wire: ~2.6 KiB a proof


def test_plan_for_a_large_partner_meets_the_target_within_the_budget():
    cfg = Config()
    n, held = 100_000, 100_000 * 16 * MiB
    pl = A.plan(n, held, cfg)
    assert 529 <= pl.detection_per_day <= 530
    assert pl.coverage_per_day == pytest.approx(n / 30)
    assert pl.per_day == math.ceil(n / 30)  # coverage dominates for very large n
    assert pl.meets_target and pl.within_budget and pl.budget_per_day > pl.per_day
    assert pl.per_audit == pytest.approx(n / 30 / 24)
    assert pl.bytes_per_month == 24 * 30 * (A._AUDIT_OVERHEAD + pl.per_audit * A.proof_bytes(16 * MiB))
    assert pl.bytes_per_month <= cfg.audit_budget * held
    # in between, detection dominates
    mid = A.plan(10_000, 10_000 * 16 * MiB, cfg)
    assert mid.detection_per_day > mid.coverage_per_day
    assert mid.per_day >= mid.detection_per_day and mid.meets_target and mid.within_budget


def test_plan_for_a_small_partner_draws_every_pack_twice_daily():
    pl = A.plan(64, 64 * 16 * MiB, Config())
    assert pl.detection_per_day == 80 and pl.per_day >= 80 and pl.buckets == A.CERTAIN_BUCKETS
    assert pl.meets_target and pl.within_budget
    # 10 packs: the floor of one pack per hourly audit is more than the 1 % budget, and says so
    tiny = A.plan(10, 10 * 16 * MiB, Config())
    assert tiny.per_audit == 1 and tiny.meets_target and not tiny.within_budget


def test_the_budget_caps_tiny_packs_and_says_the_target_is_not_met():
    cfg = Config()
    pl = A.plan(1000, 1000 * 4096, cfg)
    assert pl.budget_per_day < pl.detection_per_day
    assert not pl.meets_target
    assert pl.per_day < pl.detection_per_day
    assert pl.per_audit == 1  # never less than one pack an audit


@pytest.mark.parametrize("n, size", [(5, 0), (1, 1), (1, 16 * MiB), (2, 100), (7, 4096), (500, 64 * MiB),
                                     (3000, 1024), (1_000_000, 16 * MiB)])
def test_per_audit_is_at_least_one_and_bounded(n, size):
    pl = A.plan(n, n * size, Config())
    assert 1 <= pl.per_audit <= min(n, A.MAX_PACKS_PER_AUDIT)
    assert pl.per_day <= n * 24


def test_no_packs_no_plan():
    pl = A.plan(0, 0, Config())
    assert (pl.per_day, pl.per_audit, pl.bytes_per_month, pl.meets_target, pl.within_budget) == (0, 0, 0, True, True)


def test_cycle_draws_every_pack_once_before_repeating():
    cycle = A._Cycle(random.Random(1))
    pool = set(range(50))
    first = [p for _ in range(10) for p in cycle.take(5, pool, set())]
    assert sorted(first) == list(range(50))
    second = [p for _ in range(10) for p in cycle.take(5, pool, set())]
    assert sorted(second) == list(range(50)) and second != first
    # packs gone from the pool are skipped; a small pool gives what it has
    assert sorted(cycle.take(10, {3, 4}, set())) == [3, 4]
    skip = {7}
    got = cycle.take(60, pool, skip)
    assert 7 not in got and len(got) == len(set(got))


def _detection_rate(n: int, trials: int, seed: int = 1000) -> tuple[float, int]:
    """Monte Carlo of the default schedule for a partner holding n packs of 16 MiB: 1 % of them
    (at least one) deleted at a random moment of the secret order, then audits every hour of
    `per_audit` packs drawn by `_Cycle`. Returns (the fraction of trials in which a deleted pack
    was drawn within 24 audits, per_audit)."""
    cfg = Config()
    pl = A.plan(n, n * 16 * MiB, cfg)
    lost_count = max(1, math.ceil(cfg.detect_loss * n))
    audits_per_day = round(cfg.detect_within / cfg.audit_interval)
    cycle_audits = math.ceil(n / pl.per_audit)
    pool = set(range(n))
    detected = 0
    for trial in range(trials):
        rng = random.Random(seed + trial)
        cycle = A._Cycle(rng, pl.buckets)
        for _ in range(rng.randrange(cycle_audits) + cycle_audits):  # the loss falls anywhere in the order
            cycle.take(A.audit_size(pl.per_audit, rng), pool, set())
        lost = set(rng.sample(range(n), lost_count))
        if any(lost.intersection(cycle.take(A.audit_size(pl.per_audit, rng), pool, set())) for _ in range(audits_per_day)):
            detected += 1
    return detected / trials, pl.per_audit


def test_default_plan_detects_a_1_percent_loss_within_a_day_monte_carlo():
    """n = 1000 packs, 10 of them deleted: caught within 24 h in >= 99 % of the trials (asserted
    with room for the sampling error: 2000 trials give a standard error of ~0.2 %)."""
    started = time.monotonic()
    rate, per_audit = _detection_rate(1000, 2000)
    print(f"\nMonte Carlo: n=1000, 10 lost, {per_audit} packs/audit x 24 audits: detected within 24 h "
          f"in {rate:.2%} of 2000 trials ({time.monotonic() - started:.2f} s)")
    assert rate >= 0.97


@pytest.mark.parametrize("n", [24, 64, 100])
def test_default_plan_detects_a_loss_within_a_day_for_small_partners_too(n):
    rate, per_audit = _detection_rate(n, 2000)
    print(f"\nMonte Carlo: n={n}, 1 lost, {per_audit} packs/audit x 24 audits: detected within 24 h in {rate:.2%}")
    assert rate >= 0.97


def test_packs_added_mid_order_are_drawn_like_the_others():
    cycle = A._Cycle(random.Random(3))
    pool = set(range(1000))
    cycle.take(10, pool, set())
    pool |= set(range(1000, 1100))  # 100 new packs: 1 in 11 of the packs now held
    drawn = [p for _ in range(20) for p in cycle.take(10, pool, set())]  # 200 draws: ~18 new ones expected
    assert any(p >= 1000 for p in drawn)


# ===== judge ============================================================================================
NONCE = bytes(range(32))
PACK_ID = 0x1234


def _file(tmp_path, name: str, size: int, seed: int):
    path = tmp_path / name
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return str(path), data


def _proof(data: bytes, pack_id: int, leaves: int, *, sidecar: T.Sidecar, nonce: bytes = NONCE) -> P.PackProof:
    """An honest holder's answer for `data`, built with packtree as the holder does."""
    out_leaves, out_paths = [], []
    for leaf in T.challenge_leaves(nonce, pack_id, len(data), leaves):
        d, sib = T.read_proof(sidecar, leaf, lambda off, ln: data[off:off + ln])
        out_leaves.append(d)
        out_paths.append(sib)
    return P.PackProof(P.ProofStatus.HELD, len(data), out_leaves, out_paths)


@pytest.fixture
def pack(tmp_path):
    size = 3 * T.BLOCK_SIZE + 5 * T.LEAF_SIZE + 123  # 30 leaves, a short last leaf, a partial last block
    path, data = _file(tmp_path, "a.pack", size, 1)
    tree = T.Sidecar.of_file(path)
    assert tree.root == T.root_of_bytes(data)
    return path, data, tree


@pytest.mark.parametrize("leaves", [1, 4, 32])
def test_judge_passes_an_honest_proof(pack, leaves):
    _path, data, tree = pack
    proof = _proof(data, PACK_ID, leaves, sidecar=tree)
    assert judge(proof, tree, len(data), leaves) == Outcome.OK
    # also after the round trip through the wire format
    wire = P.PARTNER.decode(P.PARTNER.encode(P.Proofs([proof])))
    assert judge(wire.proofs[0], tree, len(data), leaves) == Outcome.OK


def judge(proof, tree, size, leaves, pack_id=PACK_ID, nonce=NONCE):
    return A.judge(proof, nonce, pack_id, tree.root, size, leaves)


def test_judge_a_16_mib_pack_proof_fits_the_wire_format(tmp_path):
    path, data = _file(tmp_path, "big.pack", 16 * MiB, 2)
    tree = T.Sidecar.of_file(path)
    proof = _proof(data, 7, 4, sidecar=tree)
    assert all(len(p) == 13 for p in proof.paths)
    wire = P.PARTNER.decode(P.PARTNER.encode(P.Proofs([proof])))
    assert A.judge(wire.proofs[0], NONCE, 7, tree.root, len(data), 4) == Outcome.OK


def test_judge_a_flipped_byte_is_damaged(pack):
    _path, data, tree = pack
    for leaves in (1, 4):
        proof = _proof(data, PACK_ID, leaves, sidecar=tree)
        i = len(proof.leaves) - 1
        bad = bytearray(proof.leaves[i])
        bad[len(bad) // 2] ^= 0x01
        proof.leaves[i] = bytes(bad)
        assert judge(proof, tree, len(data), leaves) == Outcome.DAMAGED
    proof = _proof(data, PACK_ID, 4, sidecar=tree)
    sib = bytearray(proof.paths[0][0])
    sib[0] ^= 0x80
    proof.paths[0][0] = bytes(sib)
    assert judge(proof, tree, len(data), 4) == Outcome.DAMAGED


def test_judge_missing_or_extra_leaves_or_swapped_leaves_are_damaged(pack):
    _path, data, tree = pack
    proof = _proof(data, PACK_ID, 4, sidecar=tree)
    short = P.PackProof(P.ProofStatus.HELD, len(data), proof.leaves[:3], proof.paths[:3])
    assert judge(short, tree, len(data), 4) == Outcome.DAMAGED
    empty = P.PackProof(P.ProofStatus.HELD, len(data), [], [])
    assert judge(empty, tree, len(data), 4) == Outcome.DAMAGED
    no_paths = P.PackProof(P.ProofStatus.HELD, len(data), proof.leaves, proof.paths[:3])
    assert judge(no_paths, tree, len(data), 4) == Outcome.DAMAGED
    swapped = P.PackProof(P.ProofStatus.HELD, len(data), proof.leaves[::-1], proof.paths[::-1])
    assert judge(swapped, tree, len(data), 4) == Outcome.DAMAGED


def test_judge_wrong_size_is_a_wrong_pack(pack):
    _path, data, tree = pack
    proof = _proof(data, PACK_ID, 4, sidecar=tree)
    for size in (len(data) + 1, len(data) - 1, 0):
        wrong = P.PackProof(P.ProofStatus.HELD, size, proof.leaves, proof.paths)
        assert judge(wrong, tree, len(data), 4) == Outcome.WRONG


@pytest.mark.parametrize("status, expected", [
    (P.ProofStatus.MISSING, Outcome.MISSING),
    (P.ProofStatus.NOT_HELD, Outcome.MISSING),
    (P.ProofStatus.INCOMPLETE, Outcome.MISSING),
    (P.ProofStatus.RELEASED, None),
])
def test_judge_statuses(pack, status, expected):
    _path, data, tree = pack
    assert judge(P.PackProof(status, 0, [], []), tree, len(data), 4) == expected
    # what a holder says wins over any leaves it sends along
    honest = _proof(data, PACK_ID, 4, sidecar=tree)
    assert judge(P.PackProof(status, len(data), honest.leaves, honest.paths), tree, len(data), 4) == expected


def test_judge_another_packs_bytes_do_not_pass(tmp_path, pack):
    _path, data, tree = pack
    other_path, other = _file(tmp_path, "b.pack", len(data), 99)  # same size, other bytes
    other_tree = T.Sidecar.of_file(other_path)
    proof = _proof(other, PACK_ID, 4, sidecar=other_tree)  # honest for its own bytes
    assert judge(proof, other_tree, len(other), 4) == Outcome.OK
    assert judge(proof, tree, len(data), 4) == Outcome.DAMAGED
    # our own bytes, but proven for another pack id (other leaves) or another nonce
    for pack_id, nonce in ((PACK_ID + 1, NONCE), (PACK_ID, bytes(32))):
        assert T.challenge_leaves(nonce, pack_id, len(data), 4) != T.challenge_leaves(NONCE, PACK_ID, len(data), 4)
        replay = _proof(data, pack_id, 4, nonce=nonce, sidecar=tree)
        assert judge(replay, tree, len(data), 4) == Outcome.DAMAGED


# ===== the holder's answers from files ==================================================================
class Held:
    """Packs on disk as a holder keeps them (pack + sidecar), with the records and roots."""

    def __init__(self, base):
        self.base = base
        self.records: dict = {}
        self.paths: dict = {}
        self.roots: dict = {}

    def add(self, pid: int, size: int, *, seed: int | None = None, sidecar: bool = True):
        path = os.path.join(self.base, "packs", f"{pid & 0xFF:02x}", f"{pid:012x}.pack")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = random.Random(pid if seed is None else seed).randbytes(size)
        with open(path, "wb") as f:
            f.write(data)
        tree = T.Sidecar.of_file(path)
        if sidecar:
            H._write_sidecar(path, tree)
        self.records[pid] = HostedRecord(size, True, 0, tree.root)
        self.paths[pid] = path
        self.roots[pid] = (tree.root, size)
        return path

    def prove(self, pids, leaves: int = 4, nonce: bytes = NONCE):
        msg = P.Prove(P.AUDIT_VERSION, nonce, list(pids), leaves)
        proofs, rebuilt = H._prove_all(msg, {p: self.records.get(p) for p in pids},
                                       {p: self.paths.get(p, os.path.join(self.base, "nowhere.pack")) for p in pids})
        assert len(proofs) == len(msg.packs)
        # every answer must fit the wire format
        proofs = P.PARTNER.decode(P.PARTNER.encode(P.Proofs(proofs))).proofs
        return proofs, rebuilt

    def judge(self, pid, proof, leaves: int = 4, nonce: bytes = NONCE):
        root, size = self.roots[pid]
        return A.judge(proof, nonce, pid, root, size, leaves)


SIZE = 5 * T.BLOCK_SIZE + 3 * T.LEAF_SIZE + 1000


def test_prove_all_answers_held_packs_with_leaves_that_verify(tmp_path):
    held = Held(str(tmp_path))
    pids = [0x101, 0x202, 0x303]
    for i, pid in enumerate(pids):
        held.add(pid, SIZE + i * 777)
    for leaves in (1, 4, 32):
        proofs, rebuilt = held.prove(pids, leaves)
        assert rebuilt == 0
        for pid, proof in zip(pids, proofs):
            assert proof.status == P.ProofStatus.HELD and proof.size == held.records[pid].total
            assert len(proof.leaves) == min(leaves, T.leaf_count(proof.size))
            assert held.judge(pid, proof, leaves) == Outcome.OK
    # the answers are in the order asked, each for its own pack
    proofs, _ = held.prove(pids[::-1])
    assert [held.judge(pid, pr) for pid, pr in zip(pids[::-1], proofs)] == [Outcome.OK] * 3
    assert held.judge(pids[0], proofs[0]) != Outcome.OK


def test_prove_all_rebuilds_a_lost_sidecar(tmp_path):
    held = Held(str(tmp_path))
    path = held.add(0x42, SIZE)
    tree_path = H._tree_path(path)
    expected = open(tree_path, "rb").read()
    os.unlink(tree_path)
    proofs, rebuilt = held.prove([0x42])
    assert held.judge(0x42, proofs[0]) == Outcome.OK
    assert rebuilt == math.ceil(SIZE / T.BLOCK_SIZE) > 0
    assert os.path.exists(tree_path) and open(tree_path, "rb").read() == expected
    proofs, rebuilt = held.prove([0x42])  # from the rebuilt sidecar: no work again
    assert rebuilt == 0 and held.judge(0x42, proofs[0]) == Outcome.OK


def test_prove_all_rebuilds_a_corrupt_or_mismatched_sidecar(tmp_path):
    held = Held(str(tmp_path))
    path = held.add(0x43, SIZE)
    tree_path = H._tree_path(path)
    good = open(tree_path, "rb").read()
    with open(tree_path, "r+b") as f:  # a flipped byte in a block hash: inconsistent with its root
        f.seek(len(good) - 1)
        f.write(bytes([good[-1] ^ 1]))
    proofs, rebuilt = held.prove([0x43])
    assert rebuilt > 0 and held.judge(0x43, proofs[0]) == Outcome.OK
    assert open(tree_path, "rb").read() == good
    # a consistent sidecar of another size (another object's): rebuilt too
    other = held.add(0x44, SIZE // 2, seed=5)
    os.replace(H._tree_path(other), tree_path)
    proofs, rebuilt = held.prove([0x43])
    assert rebuilt > 0 and held.judge(0x43, proofs[0]) == Outcome.OK


def test_prove_all_statuses(tmp_path):
    held = Held(str(tmp_path))
    for pid in (1, 2, 3, 4, 5):
        held.add(pid, SIZE)
    os.unlink(held.paths[1])  # the bytes are gone
    held.records[2] = HostedRecord(SIZE, True, T0, held.records[2].digest)  # released by the owner
    held.records[3] = HostedRecord(SIZE, False, 0)  # upload in progress
    held.records[4] = None  # never received
    proofs, rebuilt = held.prove([1, 2, 3, 4, 5])
    assert [p.status for p in proofs] == [P.ProofStatus.MISSING, P.ProofStatus.RELEASED, P.ProofStatus.INCOMPLETE,
                                         P.ProofStatus.NOT_HELD, P.ProofStatus.HELD]
    assert proofs[1].size == SIZE
    assert all(not p.leaves and not p.paths for p in proofs[:4])
    assert [held.judge(pid, p) for pid, p in zip((1, 2, 3, 4, 5), proofs)] == [
        Outcome.MISSING, None, Outcome.MISSING, Outcome.MISSING, Outcome.OK]
    assert rebuilt == 0


@pytest.mark.parametrize("delta", [-1, -T.LEAF_SIZE, +1, +T.BLOCK_SIZE])
def test_prove_all_a_file_of_another_size_is_held_without_leaves(tmp_path, delta):
    held = Held(str(tmp_path))
    path = held.add(9, SIZE)
    with open(path, "r+b") as f:
        f.truncate(SIZE + delta)
    proofs, rebuilt = held.prove([9])
    assert proofs[0].status == P.ProofStatus.HELD and proofs[0].size == SIZE + delta
    assert not proofs[0].leaves and not proofs[0].paths and rebuilt == 0
    assert held.judge(9, proofs[0]) == Outcome.WRONG


@pytest.mark.parametrize("keep_sidecar", [True, False])
def test_prove_all_damaged_bytes_fail_the_audit_even_with_a_rebuilt_sidecar(tmp_path, keep_sidecar):
    held = Held(str(tmp_path))
    size = 3 * T.BLOCK_SIZE + 5 * T.LEAF_SIZE + 17
    path = held.add(0x77, size)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    if not keep_sidecar:  # rebuilt from the damaged bytes: consistent with itself, not with our root
        os.unlink(H._tree_path(path))
    leaves = T.leaf_count(size)  # every leaf: the damaged one is among them
    assert leaves <= P.MAX_PROOF_LEAVES
    proofs, rebuilt = held.prove([0x77], leaves)
    assert (rebuilt > 0) == (not keep_sidecar)
    assert proofs[0].status == P.ProofStatus.HELD and len(proofs[0].leaves) == leaves
    assert held.judge(0x77, proofs[0], leaves) == Outcome.DAMAGED
