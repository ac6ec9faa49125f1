"""The outbox: which of the store's packs replicate to partners, and which partners may drop.

Owns reading the index's `outbox`, `packs` and `tombstones` tables for the partner layer, so that
table names and key encodings stay here and in `index`: the packs waiting to replicate (sealed,
committed, nothing writing into them any more), each with its lane's priority and its size; the
packs deleted here that partners may still hold (tombstones); and reading a pack's bytes for an
upload through `packs.PackFiles`. Writing the outbox is the index's (`Index.seal_pack` queues a
sealed pack that is not local; deleting a queued pack leaves a tombstone).

It reads the *committed* index (an LMDB read view), so nothing half-written is ever offered. A
CLI command without a daemon may read the same without keys (`offline_counts`): these tables
are plain.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import lmdb

from .index import OUTBOX_PRIORITY, Index, PackRecord
from .packs import PackFiles


@dataclass(frozen=True, slots=True)
class QueuedPack:
    """A pack waiting to replicate: sent first when `priority` (keys, wallets, ...), its size."""

    priority: bool
    size: int


class PackUpload:
    """One pack's bytes for an upload, read through the store's pack files.

    Attributes:
      pack_id, size: the pack and its size on the drive.
    """

    def __init__(self, packs: PackFiles, pack_id: int):
        self._packs = packs
        self.pack_id = pack_id
        self.size = os.stat(packs.path(pack_id)).st_size

    def read(self, offset: int, length: int) -> bytes:
        """Blocking; IntegrityError if the pack is shorter than it was."""
        return self._packs.read(self.pack_id, offset, length) if length else b""


class Outbox:
    """The packs of one open store that replicate (see the module docstring).

    Attributes:
      index, packs: the store's index and pack files.
    """

    def __init__(self, index: Index, packs: PackFiles):
        self.index, self.packs = index, packs
        self._cache: dict[int, QueuedPack] = {}
        self._cache_txn: int | None = None

    def pending(self) -> dict[int, QueuedPack]:
        """pack id -> QueuedPack, of sealed packs to replicate, as last committed."""
        txn_id = self.index.env.info()["last_txnid"]
        if txn_id != self._cache_txn:
            out = {}
            with self.index.read_view() as records:
                queued = {int.from_bytes(k, "big"): v == OUTBOX_PRIORITY for k, v in records("outbox")}
                for key, raw in records("packs"):
                    pid = int.from_bytes(key, "big")
                    if pid in queued:
                        out[pid] = QueuedPack(queued[pid], PackRecord.unpack(raw).size)
            self._cache, self._cache_txn = out, txn_id
        return {pid: q for pid, q in self._cache.items() if not self.packs.busy(pid)}

    def upload(self, pack_id: int) -> PackUpload:
        """The pack's bytes (FileNotFoundError: deleted meanwhile)."""
        return PackUpload(self.packs, pack_id)

    def tombstones(self) -> dict[int, int]:
        """pack id -> generation it was deleted at, of packs partners may still hold."""
        with self.index.read_view() as records:
            return {int.from_bytes(k, "big"): int.from_bytes(v, "big") for k, v in records("tombstones")}

    def forget_tombstones(self, ids) -> None:
        """No partner holds these any more."""
        for pid in ids:
            self.index.delete_tombstone(pid)


def offline_counts(store_dir: str) -> tuple[dict[int, int], int]:
    """(pack id -> size of the packs to replicate, the newest retained snapshot's generation),
    read without keys from the index of a store no daemon holds."""
    env = lmdb.open(os.path.join(store_dir, "index"), readonly=True, lock=False, max_dbs=32, subdir=True)
    try:
        with env.begin() as txn:
            queued = {bytes(k) for k, _ in txn.cursor(db=env.open_db(b"outbox", txn=txn, create=False))}
            sizes = {int.from_bytes(k, "big"): PackRecord.unpack(v).size
                     for k, v in txn.cursor(db=env.open_db(b"packs", txn=txn, create=False)) if bytes(k) in queued}
            latest = 0
            for k, _ in txn.cursor(db=env.open_db(b"snapshots", txn=txn, create=False)):
                if k[:1] == b"r":
                    latest = max(latest, int.from_bytes(k[1:], "big"))
    finally:
        env.close()
    return sizes, latest
