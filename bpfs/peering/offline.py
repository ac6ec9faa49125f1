"""What can be said about partners and snapshots without a daemon: `bpfs peers`, `status`,
`reputation` and `snapshots` when none runs, and `bpfs pair --accept` written straight to the
ledger.

Read from the partner ledger and (without keys) the outbox's counts; nothing here connects to
anyone. A daemon's answers come through the control socket instead (`control`), with the same
rows plus what only a running service knows (connection state, rates).

These commands take no passphrase, so they open the ledger without keys: they show what the
ledger keeps in the clear (ids, quotas, states, times, holdings, trust) and not what it seals
(a partner's addresses, pair key and beacon: `address` is null and `sealed` true in `bpfs
peers`). Asking for the passphrase instead would make `bpfs status` and `peers` unusable in
scripts and cron jobs for the sake of one column a running daemon shows anyway.
"""

from __future__ import annotations

import os
import time

from .. import keyfile
from ..config import load_config
from ..outbox import offline_counts
from ..store import key_path
from . import protocol as P
from .holdings import Holdings
from .ledger import Invite, Ledger
from .reputation import Reputations
from .replicator import partner_state
from .service import INVITE_VALID, check_peer_id, reputation_rows


def own_id(store: str) -> str:
    return keyfile.read_public(key_path(store))["peer_id"]


def invite(store: str, peer: str, offer: int, ask: int) -> dict:
    """Let `peer` pair with this store (`bpfs pair --accept` without a daemon)."""
    check_peer_id(peer)
    ledger = Ledger(store)
    try:
        ledger.put_invite(Invite(peer, offer, ask, time.time() + INVITE_VALID))
    finally:
        ledger.close()
    return {"peer_id": peer, "offer": offer, "ask": ask}


def offline_peers(store: str) -> list[dict]:
    """The rows of `bpfs peers`."""
    ledger = Ledger(store)
    try:
        sizes, _ = offline_counts(store)
        holdings, reps = Holdings(ledger), Reputations(ledger, load_config(store))
        rows = []
        for p in sorted(ledger.partners(), key=lambda p: p.paired_at):
            held_for = sum(rec.total for _, _, _, rec in ledger.all_hosted(p.raw_id))
            held_by = sum(sizes.get(pid, 0) for pid in ledger.sent(p.peer_id, P.PACK))
            st = reps.standing(p.peer_id, failing=len(holdings.failing(p.peer_id)),
                               held=len(holdings.held(p.peer_id))) if p.active else None
            rows.append({"peer_id": p.peer_id, "address": p.address, "sealed": ledger.sealed,
                         "state": partner_state(p.active, True, None, connected=False)[0], "reason": None,
                         "connected": False, "path": None,
                         "we_keep": p.we_keep, "they_keep": p.they_keep, "held_for_them": held_for,
                         "held_by_them": held_by, "last_seen": p.last_seen, "paired_at": p.paired_at,
                         "ended_at": p.ended_at, "root_generation": p.root_generation,
                         "trust": st.level if st else "ended", "trust_reason": st.reason if st else ""})
        return rows
    finally:
        ledger.close()


def offline_reputation(store: str) -> list[dict]:
    """The rows of `bpfs reputation`."""
    ledger = Ledger(store)
    try:
        config = load_config(store)
        holdings, reps = Holdings(ledger), Reputations(ledger, config)
        active = sorted((p for p in ledger.partners() if p.active), key=lambda p: p.paired_at)
        good = [p.peer_id for p in active if reps.standing(p.peer_id, failing=len(holdings.failing(p.peer_id)),
                                                             held=len(holdings.held(p.peer_id))).good]
        return reputation_rows(ledger, holdings, reps, set(good[:config.replicas]))
    finally:
        ledger.close()


def offline_status(store: str) -> dict:
    """What `bpfs status` shows: per assigned partner, what it holds and what is pending."""
    ledger = Ledger(store)
    try:
        sizes, latest = offline_counts(store)
        replicas = load_config(store).replicas
        active = sorted((p for p in ledger.partners() if p.active), key=lambda p: p.paired_at)[:replicas]
        out = []
        for p in active:
            sent = ledger.sent(p.peer_id, P.PACK)
            done = [pid for pid in sizes if pid in sent]
            todo = [pid for pid in sizes if pid not in sent]
            out.append({"peer_id": p.peer_id, "replicated_packs": len(done),
                        "replicated_bytes": sum(sizes[i] for i in done), "pending_packs": len(todo),
                        "pending_bytes": sum(sizes[i] for i in todo), "sent_bytes": 0, "rate": 0, "eta": None,
                        "root_generation": p.root_generation,
                        "state": partner_state(True, True, None, connected=False)[0], "reason": None,
                        "last_error": None})
        return {"peer_id": own_id(store), "latest_generation": latest, "partners": out}
    finally:
        ledger.close()


def offline_snapshots(store: str, keys) -> list[dict]:
    """The rows of `bpfs snapshots`, read from the index (read-only) and the partner ledger."""
    from .. import snapshot
    from ..history import snapshot_names
    from ..index import Index

    index = Index(os.path.join(store, "index"), keys, readonly=True)
    try:
        manifests = [snapshot.open_manifest(keys, blob) for _, blob in snapshot.retained_roots(index)]
    finally:
        index.close()
    held: dict[str, set[int]] = {}
    if os.path.isdir(os.path.join(store, "partners")):
        ledger = Ledger(store, keys)
        try:
            held = {p.peer_id: ledger.sent(p.peer_id, P.ROOT) for p in ledger.partners() if p.active}
        finally:
            ledger.close()
    names = snapshot_names((m.generation, m.created_ns) for m in manifests)
    return [{"name": names[m.generation], "generation": m.generation, "created": m.created_ns / 1e9,
             "files": m.files, "bytes": m.file_bytes,
             "partners": sorted(peer for peer, gens in held.items() if m.generation in gens)}
            for m in sorted(manifests, key=lambda m: m.generation)]
