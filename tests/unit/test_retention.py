"""The retention policy (bpfs.history.keep), with a clock the test moves: pure, no store.

Snapshots are (generation, creation time in ns). The rules are restic's `forget --keep-*`:
within a duration of the newest, the newest per day / ISO week / month for the last N of each
that have snapshots, and the last N; a snapshot any rule keeps is kept.
"""

from __future__ import annotations

import datetime

from bpfs.history import RetentionPolicy, held_by, keep, snapshot_name, snapshot_names

NS = 10**9
HOUR = 3600 * NS
DAY = 24 * HOUR


def at(year, month, day, hour=12, minute=0) -> int:
    return int(datetime.datetime(year, month, day, hour, minute, tzinfo=datetime.timezone.utc).timestamp()) * NS


def every(start_ns: int, step_ns: int, count: int, first_gen: int = 1) -> list[tuple[int, int]]:
    return [(first_gen + i, start_ns + i * step_ns) for i in range(count)]


def test_the_default_policy_on_a_year_of_snapshots_every_5_minutes():
    """Snapshots every 5 minutes for a year (105,120 of them): the last 24 hours are all kept,
    then one a day for 30 days, one a week for 8 weeks, one a month for 12 months."""
    start = at(2025, 12, 1, 0, 2)
    snaps = every(start, 5 * 60 * NS, 365 * 288)
    kept = keep(snaps, RetentionPolicy())
    newest_t = snaps[-1][1]
    times = {g: t for g, t in snaps}
    within = {g for g, t in snaps if newest_t - t <= DAY}
    assert within <= kept and len(within) == 289
    older = sorted(times[g] for g in kept - within)
    days = {datetime.datetime.fromtimestamp(t / NS, datetime.timezone.utc).date() for t in older}
    # 30 daily (the newest day's is within the 24 h), plus weekly and monthly ones further back
    assert 30 <= len(kept - within) <= 30 + 8 + 12
    assert len(days) == len(older), "two snapshots kept from one day, outside the last 24 hours"
    oldest = min(times[g] for g in kept)
    assert newest_t - oldest >= 330 * DAY, "12 monthly snapshots reach back about a year"


def test_each_kept_snapshot_is_the_newest_of_its_day():
    snaps = every(at(2026, 3, 1, 0, 30), 6 * HOUR, 40)  # 4 a day for 10 days
    policy = RetentionPolicy(keep_within=0, keep_daily=5, keep_weekly=0, keep_monthly=0, keep_last=1)
    kept = keep(snaps, policy)
    by_day: dict = {}
    for g, t in snaps:
        by_day.setdefault(datetime.datetime.fromtimestamp(t / NS, datetime.timezone.utc).date(), []).append(g)
    newest_days = sorted(by_day)[-5:]
    assert kept == {max(by_day[d]) for d in newest_days}


def test_a_deletion_then_a_sync_never_thins_away_the_snapshot_before_it():
    """Whatever keep_* says beyond it, the snapshot taken just before the newest stays while it
    is within keep_within (a day by default), and keep_last keeps it in any case."""
    snaps = [(10, at(2026, 12, 7, 8, 0)), (11, at(2026, 12, 7, 8, 5))]  # before and after an rm -rf
    assert keep(snaps, RetentionPolicy()) == {10, 11}
    minimal = RetentionPolicy(keep_within=0, keep_daily=0, keep_weekly=0, keep_monthly=0, keep_last=2)
    assert keep(snaps, minimal) == {10, 11}


def test_the_reference_is_the_newest_snapshot_not_the_clock():
    """A store switched off for a month keeps what it had: nothing depends on today's date."""
    snaps = every(at(2020, 1, 1), HOUR, 48)
    assert keep(snaps, RetentionPolicy(keep_within=DAY / NS, keep_daily=0, keep_weekly=0, keep_monthly=0,
                                       keep_last=1)) == {g for g, _ in snaps[-25:]}


def test_weekly_and_monthly_buckets():
    weekly = RetentionPolicy(keep_within=0, keep_daily=0, keep_weekly=3, keep_monthly=0, keep_last=1)
    snaps = every(at(2026, 1, 5), DAY, 35)  # a Monday: 5 ISO weeks
    kept = keep(snaps, weekly)
    assert len(kept) == 3
    weeks = {datetime.datetime.fromtimestamp(t / NS, datetime.timezone.utc).isocalendar()[1] for g, t in snaps
             if g in kept}
    assert len(weeks) == 3
    monthly = RetentionPolicy(keep_within=0, keep_daily=0, keep_weekly=0, keep_monthly=2, keep_last=1)
    snaps = every(at(2026, 1, 15), 10 * DAY, 9)  # January to April
    kept = keep(snaps, monthly)
    months = sorted({datetime.datetime.fromtimestamp(t / NS, datetime.timezone.utc).month for g, t in snaps
                     if g in kept})
    assert months == [3, 4]


def test_a_chunk_is_held_by_the_snapshots_between_its_birth_and_its_retirement():
    assert held_by(born=10, died=20, retained=[11])
    assert held_by(born=10, died=20, retained=[20])
    assert not held_by(born=10, died=20, retained=[10])  # stored after snapshot 10 was made
    assert not held_by(born=10, died=20, retained=[21, 30])  # gone before these
    assert not held_by(born=10, died=20, retained=[])


def test_names_are_utc_seconds_made_unique():
    t = at(2026, 12, 7, 8, 5) + 23 * NS
    assert snapshot_name(t) == "2026-12-07T08-05-23Z"
    assert snapshot_names([(5, t), (6, t + 1), (7, t + NS)]) == {5: "2026-12-07T08-05-23Z",
                                                                 6: "2026-12-07T08-05-23Z-g6",
                                                                 7: "2026-12-07T08-05-24Z"}
