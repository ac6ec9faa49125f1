"""History: which snapshots a store keeps, and the data they need.

Owns the retention policy (in the manner of restic's `forget --keep-*`) and what follows from it
for chunks. A chunk whose last reference goes (a file deleted or overwritten) is not freed while
a retained snapshot holds it: the file layer marks it *retired* instead (refcount 0, the
generation it died at in the index's `retired` table; see `chunkmap`). A chunk is in snapshot g
exactly when born < g <= died (both are generation counters: it was stored in a transaction
after `born` was committed, and lost its last reference in one after `died`). When snapshots are
released, `thin` frees the retired chunks no retained snapshot holds any more, so their packs
shrink or go (and, once no retained snapshot at a partner needs a pack, the partner is asked to
release it after its grace period: see `peering.replicator`).

Policy (`[history]` in bpfs.toml; defaults): every snapshot of the last `keep_within` (24 h)
before the newest one, the newest of each of the last `keep_daily` (30) days that have
snapshots, of the last `keep_weekly` (8) ISO weeks and `keep_monthly` (12) months, and the
`keep_last` (2) newest whatever their age. Days, weeks and months are UTC. Times are the
snapshots' signed creation times, so a store that was switched off for a month keeps what it
had: the reference is the newest snapshot, not the clock.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

from . import chunkmap
from .index import Index

DAY_NS = 86400 * 10**9


@dataclass(frozen=True)
class RetentionPolicy:
    """Which snapshots to keep (see the module docstring)."""

    keep_within: float = 86400.0  # seconds before the newest snapshot
    keep_daily: int = 30
    keep_weekly: int = 8
    keep_monthly: int = 12
    keep_last: int = 2

    @classmethod
    def of(cls, config) -> "RetentionPolicy":
        return cls(config.keep_within, config.keep_daily, config.keep_weekly, config.keep_monthly, config.keep_last)


def snapshot_name(created_ns: int) -> str:
    """A snapshot's name (in `.snapshots/`, for `bpfs recover --at`): its UTC creation time to
    the second, "2026-12-07T08-05-23Z"."""
    return time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime(created_ns // 1_000_000_000))


def unique_names(named) -> dict[int, str]:
    """generation -> unique name, from (generation, base name) pairs: in generation order,
    a name already taken gets "-g<generation>"."""
    out: dict[int, str] = {}
    taken: set[str] = set()
    for generation, name in sorted(named):
        if name in taken:
            name = f"{name}-g{generation}"
        taken.add(name)
        out[generation] = name
    return out


def snapshot_names(snapshots) -> dict[int, str]:
    """generation -> name of snapshots given as (generation, created ns): the UTC time, and
    "-g<generation>" after it for every one but the oldest of the same second."""
    return unique_names((generation, snapshot_name(created)) for generation, created in snapshots)


def _buckets(created_ns: int) -> tuple[tuple, tuple, tuple]:
    t = datetime.datetime.fromtimestamp(created_ns / 1e9, tz=datetime.timezone.utc)
    iso = t.isocalendar()
    return (t.year, t.month, t.day), (iso[0], iso[1]), (t.year, t.month)


def keep(snapshots: list[tuple[int, int]], policy: RetentionPolicy) -> set[int]:
    """The generations to keep, of `snapshots` given as (generation, created ns)."""
    if not snapshots:
        return set()
    ordered = sorted(snapshots, key=lambda s: (s[1], s[0]), reverse=True)  # newest first
    kept = {g for g, _ in ordered[:max(0, policy.keep_last)]}
    newest = ordered[0][1]
    kept |= {g for g, t in ordered if newest - t <= policy.keep_within * 1e9}
    for position, limit in enumerate((policy.keep_daily, policy.keep_weekly, policy.keep_monthly)):
        seen: set = set()
        for g, t in ordered:
            if len(seen) >= limit:
                break
            bucket = _buckets(t)[position]
            if bucket not in seen:
                seen.add(bucket)
                kept.add(g)  # the newest snapshot of that day, week or month
    return kept


def held_by(born: int, died: int, retained: list[int]) -> bool:
    """Whether a chunk born at `born` and retired at `died` is in one of the `retained` snapshots."""
    return any(born < g <= died for g in retained)


def thin(index: Index, retained: list[int]) -> tuple[list[int], set[int]]:
    """Free the retired chunks that no retained snapshot holds. Returns (packs now empty, whose
    records are gone: delete their files after the commit; packs now less than half alive)."""
    dead, sparse = [], set()
    for cid, died in index.all_retired():
        rec = index.get_chunk(cid)
        if rec is not None and (rec.refs > 0 or held_by(rec.born, died, retained)):
            continue
        index.delete_retired(cid)
        if rec is None:
            continue
        index.delete_chunk(cid, rec.pack)
        change = chunkmap.pack_lost(index, rec.pack, rec.sealed_length)
        if change == chunkmap.DEAD:
            dead.append(rec.pack)
            sparse.discard(rec.pack)
        elif change == chunkmap.SPARSE:
            sparse.add(rec.pack)
    return dead, sparse
