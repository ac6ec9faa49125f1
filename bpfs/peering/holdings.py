"""Holdings: which of our packs each partner holds, as we count them.

Owns the honest count the replicator, `status`, `sync` and `user.bpfs.copies` rely on. A pack
counts as held by a partner only after the partner acknowledged it by its digest (its tree root:
an upload completing, or a listing whose digest matches ours) and while no audit has failed for
it since. A failed proof takes the pack out of the count at once and marks it failing, so the
replicator sends it again (a repair upload); the repair's acknowledgement, or a later proof that
passes, makes it count again. Backed by the ledger (`sent` and `audits` tables), cached here.
"""

from __future__ import annotations

import time

from .ledger import AuditRecord, Ledger, Outcome


class Holdings:
    """Per partner: the packs that count as held, and the audit record of each pack.

    Attributes:
      ledger: where both are kept (every change is one committed transaction).
    """

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self._held: dict[str, set[int]] = {}
        self._audits: dict[str, dict[int, AuditRecord]] = {}
        self._failing: dict[str, set[int]] = {}

    def held(self, peer: str) -> set[int]:
        """The packs that count as held by `peer` (the live set: callers must not change it)."""
        held = self._held.get(peer)
        if held is None:
            from .protocol import PACK

            held = self._held[peer] = self.ledger.sent(peer, PACK)
        return held

    def audits(self, peer: str) -> dict[int, AuditRecord]:
        records = self._audits.get(peer)
        if records is None:
            records = self._audits[peer] = self.ledger.audits(peer)
            self._failing[peer] = {pid for pid, rec in records.items() if rec.failing}
        return records

    def failing(self, peer: str) -> set[int]:
        """Packs whose last audit at `peer` failed and that were not repaired since (live set)."""
        self.audits(peer)
        return self._failing[peer]

    def _update(self, peer: str, changed: dict[int, AuditRecord]) -> None:
        self.audits(peer).update(changed)
        failing = self._failing[peer]
        for pid, rec in changed.items():
            if rec.failing:
                failing.add(pid)
            else:
                failing.discard(pid)

    def acknowledged(self, peer: str, pack_ids, now: float | None = None) -> None:
        """The partner confirmed these complete by their digest (an upload or a repair finished).
        A pack never audited there gets a record dated now: the coverage period starts."""
        ids = set(pack_ids)
        records = self.audits(peer)
        now = time.time() if now is None else now
        changed = {pid: AuditRecord(records[pid].last_at if pid in records else now, Outcome.OK, 0.0)
                   for pid in ids if pid not in records or records[pid].failing}
        self.ledger.put_audits(peer, changed, held=ids)
        self._update(peer, changed)
        self.held(peer).update(ids)

    def released(self, peer: str, pack_ids) -> None:
        """We released these at the partner (deleted here): they no longer count."""
        ids = set(pack_ids)
        self.ledger.put_audits(peer, {}, not_held=ids)
        self.ledger.forget_audits(peer, ids)
        self.held(peer).difference_update(ids)
        records = self.audits(peer)
        for pid in ids:
            records.pop(pid, None)
        self._failing[peer].difference_update(ids)

    def reconcile(self, peer: str, confirmed: set[int], known: set[int]) -> None:
        """The partner's own listing: `confirmed` are packs it lists complete with the digest we
        recorded, out of the packs we `known`ly still have. Failing ones stay out until repaired."""
        counted = (confirmed & known) - self.failing(peer)
        old = self.held(peer)
        records, now = self.audits(peer), time.time()
        dated = {pid: AuditRecord(now, Outcome.OK, 0.0) for pid in counted if pid not in records}
        self.ledger.put_audits(peer, dated, held=counted - old, not_held=old - counted)
        self._update(peer, dated)
        old.clear()
        old.update(counted)

    def record_audit(self, peer: str, outcomes: dict[int, int], now: float) -> tuple[dict[int, int], set[int]]:
        """Outcomes of one audit (pack -> `Outcome`). Returns (packs that failed now and counted
        until then, with their outcome; packs proven again after failing)."""
        records = self.audits(peer)
        held = self.held(peer)
        changed, newly_failed, recovered = {}, {}, set()
        for pid, outcome in outcomes.items():
            old = records.get(pid)
            if outcome == Outcome.OK:
                changed[pid] = AuditRecord(now, Outcome.OK, 0.0)
                if old is not None and old.failing:
                    recovered.add(pid)
            else:
                changed[pid] = AuditRecord(now, outcome, old.failed_since if old and old.failing else now)
                if pid in held:
                    newly_failed[pid] = outcome
        self.ledger.put_audits(peer, changed, held=recovered, not_held=set(newly_failed))
        self._update(peer, changed)
        held.difference_update(newly_failed)
        held.update(recovered)
        return newly_failed, recovered

    def forget_peer(self, peer: str) -> None:
        self._held.pop(peer, None)
        self._audits.pop(peer, None)
        self._failing.pop(peer, None)
