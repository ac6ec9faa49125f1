"""Which of our roots a recovery recovers: fetching, opening and comparing the partners' roots.

Owns, for `recovery`: turning what the partners list (`sources.RootRow`) into opened roots
(`RootBook`: each (generation, digest) fetched once, from whichever partner lists it, its bytes
checked against the digest listed and then opened with our keys: signed by our identity, its
manifest sealed for us), choosing one (the newest valid root, or the one `--at` names: a
generation, or a name as `.snapshots/` shows it, `history.snapshot_names`), the warnings where
partners disagree (another root for a generation, an older newest root: what a rollback looks
like), which partners count as ours (they hold a root that verified, or the chosen root's
partner list names them), and `RecoveryError`, the one-line error a recovery ends with.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from ..errors import BpfsError
from ..history import snapshot_name, snapshot_names
from ..net.rpc import RemoteError
from . import protocol as P
from .sources import Finder, RootRow, Source, SourceDown, SourceGone

if TYPE_CHECKING:
    from ..snapshot import SnapshotManifest

OPEN_PARALLEL = 8  # roots fetched and opened at once
_NAME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ)(?:-g(\d+))?$")


class RecoveryError(BpfsError):
    """A recovery cannot go on (one line for the user). `transient`: a later run may get further."""

    transient = False


def parse_at(text: str | None):
    """`--at`: ("generation", N) or ("name", "2026-12-07T08-05-23Z", generation or None)."""
    if text is None:
        return None
    text = text.strip()
    if text.isdigit() and int(text) > 0:
        return ("generation", int(text))
    m = _NAME.match(text)
    if not m:
        raise RecoveryError(f"--at {text!r}: expected a generation number or a snapshot name such as "
                            "2026-12-07T08-05-23Z (optionally with -gGENERATION)", exit_code=2)
    return ("name", m.group(1), int(m.group(2)) if m.group(2) else None)


@dataclass
class OpenedRoot:
    """One of our roots that verified: its generation, its digest, the signed bytes and the manifest
    opened from them."""

    generation: int
    digest: bytes
    blob: bytes
    manifest: SnapshotManifest


class RootBook:
    """Roots fetched from partners and opened with our keys, each (generation, digest) once.

    Attributes:
      opened: (generation, digest) -> OpenedRoot; invalid: (generation, digest) -> why not.
    """

    def __init__(self, keys, warn):
        self.keys = keys
        self.warn = warn
        self.opened: dict[tuple[int, bytes], OpenedRoot] = {}
        self.invalid: dict[tuple[int, bytes], str] = {}
        self._locks: dict[tuple[int, bytes], trio.Lock] = {}

    async def open(self, holders: list[Source], row: RootRow) -> OpenedRoot | None:
        """Fetch root `row` from one of `holders` (each listing it with that digest) and open it."""
        from ..snapshot import SnapshotError, open_manifest

        key = (row.generation, row.digest)
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            if key in self.opened or key in self.invalid:
                return self.opened.get(key)
            names = ", ".join(s.peer_id for s in holders)
            for s in holders:
                try:
                    blob = await s.fetch_object(P.ROOT, row.generation, row.size)
                except (SourceDown, SourceGone) as e:
                    self.warn(f"could not fetch root generation {row.generation} from {s.peer_id}: {e}")
                    continue
                except (RemoteError, ValueError) as e:
                    self.warn(f"{s.peer_id} lists root generation {row.generation} but does not serve it: "
                                      f"{getattr(e, 'message', e)}")
                    continue
                if P.object_digest(blob) != row.digest:
                    self.warn(f"{s.peer_id} served root generation {row.generation} with other bytes than "
                                      "it lists (damaged copy): ignored")
                    continue
                try:
                    manifest = await trio.to_thread.run_sync(open_manifest, self.keys, blob)
                except SnapshotError as e:
                    self.invalid[key] = str(e)
                    self.warn(f"root generation {row.generation} at {names} does not verify ({e}): "
                                      "ignored")
                    return None
                if manifest.generation != row.generation:
                    self.invalid[key] = "its generation is not the one listed"
                    self.warn(f"root generation {row.generation} at {names} is of generation "
                                      f"{manifest.generation}: ignored")
                    return None
                opened = self.opened[key] = OpenedRoot(row.generation, row.digest, blob, manifest)
                return opened
            return None

    async def open_many(self, wanted: dict[tuple[int, bytes], list[Source]], rows: dict) -> None:
        limiter = trio.CapacityLimiter(OPEN_PARALLEL)

        async def one(key):
            async with limiter:
                await self.open(wanted[key], rows[key])

        async with trio.open_nursery() as nursery:
            for key in wanted:
                nursery.start_soon(one, key)


def holders_of(sources: list[Source], include_released: bool = False):
    """(generation, digest) -> the sources listing it, and -> its row."""
    holders: dict[tuple[int, bytes], list[Source]] = {}
    rows: dict[tuple[int, bytes], RootRow] = {}
    for s in sources:
        for row in s.roots.values():
            if row.released and not include_released:
                continue
            key = (row.generation, row.digest)
            holders.setdefault(key, []).append(s)
            rows.setdefault(key, row)
    return holders, rows


def partner_rows(manifest) -> list[dict]:
    if not manifest.partners:
        return []
    try:
        rows = json.loads(manifest.partners)
    except ValueError:
        return []
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("peer_id"), str)] if isinstance(rows, list) \
        else []


async def newest_root(finder: Finder, book: RootBook) -> OpenedRoot:
    """The newest valid root the partners found so far hold (their newest roots compete first)."""
    sources = finder.live()
    holders, rows = holders_of(sources)
    if not rows:
        raise no_partner(finder, "holds a snapshot of this store")
    chosen = None
    for key in sorted(rows, key=lambda k: k[0], reverse=True):
        if not any(s.newest_root() is not None and (s.newest_root().generation, s.newest_root().digest) == key
                   for s in holders[key]):
            continue  # only partners' newest roots compete; an older one is history
        chosen = await book.open(holders[key], rows[key])
        if chosen is not None:
            break
    if chosen is None:
        for key in sorted(rows, key=lambda k: k[0], reverse=True):  # every newest root was bad
            chosen = await book.open(holders[key], rows[key])
            if chosen is not None:
                break
    if chosen is None:
        raise RecoveryError("no partner holds a snapshot of this store that verifies with this recovery secret")
    return chosen


async def root_at(book: RootBook, holders, rows, at) -> OpenedRoot:
    if at[0] == "generation":
        keys = [k for k in rows if k[0] == at[1]]
        what = f"generation {at[1]}"
    else:  # named as `.snapshots/` names them (history.snapshot_names)
        _, name, gen = at
        what = name + (f"-g{gen}" if gen is not None else "")
        names = snapshot_names(sorted({(k[0], rows[k].created) for k in rows}))
        keys = [k for k in rows if names[k[0]] == what]
        if not keys and gen is not None:
            keys = [k for k in rows if k[0] == gen and snapshot_name(rows[k].created) == name]
    for key in keys:
        opened = await book.open(holders[key], rows[key])
        if opened is not None:
            return opened
    available = snapshot_names(sorted({(k[0], rows[k].created) for k in rows}))
    shown = ", ".join(f"{g} ({n})" for g, n in sorted(available.items(), reverse=True)[:12])
    kind = "generation" if at[0] == "generation" else "name"
    raise RecoveryError(f"--at {what}: no partner holds a valid snapshot of that {kind} (available: "
                        f"{shown or 'none'})", exit_code=2 if not keys else 1)


def warn_disagreement(sources: list[Source], newest: OpenedRoot, warn) -> None:
    """One warning per partner that holds another root for the newest generation, holds none, or
    serves an older newest root than another partner (a partner that missed syncs, or one rolling
    us back: the newest valid root wins either way)."""
    chosen = newest
    best = [s.peer_id for s in sources if (mine := s.newest_root()) is not None
            and mine.generation >= chosen.generation]
    for s in sources:
        row = s.roots.get(chosen.generation)
        if row is not None and not row.released and row.digest != chosen.digest:
            warn(f"{s.peer_id} holds another root than ours for generation {chosen.generation} (not ours, "
                 "or damaged): not used")
        theirs = s.newest_root()
        if theirs is None:
            warn(f"{s.peer_id} ({s.found}) holds no snapshot of this store")
        elif theirs.generation < chosen.generation:
            warn(f"{s.peer_id} serves snapshot generation {theirs.generation} "
                         f"({snapshot_name(theirs.created)}) as its newest, older than generation "
                         f"{chosen.generation} at {', '.join(best) or 'another partner'}: it missed later syncs, or "
                         "it is rolling us back; using generation " + str(chosen.generation))


def no_partner(finder: Finder, what: str) -> RecoveryError:
    why = "; ".join(finder.failures[:6]) or "nothing to ask: give --from HOST:PORT, or a broker"
    if len(finder.failures) > 6:
        why += f"; and {len(finder.failures) - 6} more"
    return RecoveryError(f"no partner that {what} could be reached ({why})")


def keep_proven(finder: Finder, verified: set, chosen: OpenedRoot, warn) -> None:
    """Keep the partners that proved to be ours: they hold a root that verified ((generation,
    digest) in `verified`), or the chosen root's partner list names them (a connection proved
    their peer id)."""
    listed = {r["peer_id"] for r in partner_rows(chosen.manifest)}
    for s in list(finder.live()):
        holds = any((g, r.digest) in verified for g, r in s.roots.items())
        if not holds and s.peer_id not in listed:
            warn(f"{s.peer_id} ({s.found}) holds no verified snapshot of this store and is not in its "
                         "partner list: not used")
            finder.drop(s.peer_id, "is not a partner of this store")


