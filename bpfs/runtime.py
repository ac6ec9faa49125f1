"""Assembling a running store: the one place that opens a store and wires its parts together.

A running store is the unlocked, locked-for-us store (`store.StoreFolder`: index, packs, keys),
its file data (`data.FileData`, with its lanes and the room it keeps free), the mount's
operations (`fs.BpfsOperations`, which also destroy the inodes a crash left orphaned), and, on
demand, the partner service (`peering.service.PartnerService`) fed by the store's side of
replication. The daemon (`bpfs mount`, `bpfs serve`) and the CLI commands that run a partner
service in their own process when no daemon does (`bpfs pair`, `unpair`, `sync`, `challenge`)
both build it here, so the two cannot drift apart.

What this module does not do: serve FUSE, fork, handle signals or report readiness (that is
`daemon`), or parse arguments (that is `cli`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import trio

from .config import Config, load_config
from .data import FileData
from .fs import BpfsOperations
from .history import RetentionPolicy
from .lanes import load_priority_patterns
from .peering import control
from .peering.service import PartnerService, ReplicationSource, start_service
from .snapview import SnapshotViews
from .store import StoreFolder

log = logging.getLogger(__name__)


def space_reserve(store_dir: str) -> int:
    """Room kept free for the index, its redo log and compaction: 2% of the drive, 4-256 MiB."""
    st = os.statvfs(store_dir)
    return min(max(st.f_blocks * st.f_frsize // 50, 4 << 20), 256 << 20)


class RunningStore:
    """An open store with its parts wired together, for one process.

    Attributes:
      opened: the store itself (`StoreFolder`: the lock, the index, the pack files, the keys).
      config: the store's `config.toml`.
      data: file data (`FileData`): write buffers, chunking, reads, compaction, the committer.
      views: the mount's read-only `.snapshots` folder (`SnapshotViews`), or None.
      ops: the FUSE operations over `data` (`BpfsOperations`); also what a repair uses to
        destroy inodes that were unlinked while open when the last process stopped.
      service: the partner service once `start_partners` started it, else None. Counting a
        file's copies for the mount (`copies`) asks it.
    """

    def __init__(self, store_dir: str, keys, *, snapshot_views: bool = False, show_snapshots: bool = False):
        self.service: PartnerService | None = None
        self.views: SnapshotViews | None = None
        self.opened = StoreFolder(store_dir, keys)
        try:
            self.config: Config = load_config(store_dir)
            self.data = FileData(self.opened.index, self.opened.packs, keys, space_reserve(store_dir),
                                  priority_patterns=load_priority_patterns(store_dir),
                                  max_file_size=self.config.max_file_size)
            opened = self.opened
            self.views = SnapshotViews(store_dir, opened.index, opened.packs, keys) if snapshot_views else None
            self.ops = BpfsOperations(opened.index, self.data, store_dir, copies=self.copies, views=self.views,
                                      show_snapshots=show_snapshots)
        except BaseException:
            self.close()
            raise

    @property
    def dir(self) -> str:
        return self.opened.dir

    @property
    def keys(self):
        return self.opened.keys

    def repair(self) -> dict:
        """Bring the store to a clean state after an unclean stop (see `StoreFolder.repair_after_crash`)."""
        repaired = self.opened.repair_after_crash(self.ops.destroy_inode)
        if any(repaired.values()):
            log.info("cleaned up after an unclean stop: %s", repaired)
        return repaired

    def copies(self, pack_ids, changed_ns):
        """How many partners hold all of `pack_ids` (the mount's `user.bpfs.copies`); None while
        no partner service runs."""
        return self.service.copies(pack_ids, changed_ns) if self.service is not None else None

    def partner_service(self, address: str | None, brokers=None) -> PartnerService:
        """A partner service for this store listening on `address` (not yet started)."""
        source = ReplicationSource(self.opened.index, self.opened.packs, self.keys, self.data,
                             RetentionPolicy.of(self.config))
        return PartnerService(self.dir, self.keys, self.config, source, listen=address, brokers=brokers)

    async def start_partners(self, nursery, listen: str | None, *, explicit: bool, brokers=None,
                             surviving: bool = False, quiet_fallback: bool = False) -> PartnerService:
        """Start the partner service in `nursery` (see `peering.service.start_service`)."""
        self.service = await start_service(nursery, lambda address: self.partner_service(address, brokers),
                                           listen, explicit=explicit, surviving=surviving,
                                           quiet_fallback=quiet_fallback)
        return self.service

    async def serve_control(self, nursery) -> str:
        """Start the control socket (`bpfs status`, `sync`, ... ask the daemon through it); its path."""
        assert self.service is not None, "start_partners first"
        return await nursery.start(control.serve, self.service.operations(), control.socket_path(self.dir))

    def close(self, release_lock: bool = True) -> None:
        """Close the snapshot views (after the FUSE session: no request uses them any more) and
        the store."""
        try:
            if self.views is not None:
                self.views.close()
        finally:
            self.opened.close(release_lock=release_lock)


def run_with_partners(store_dir: str, keys, fn: Callable, brokers=None):
    """Run `await fn(service)` with a partner service of this process on the unlocked store, then
    commit and close it. For CLI commands when no daemon serves the store."""

    async def main():
        running = RunningStore(store_dir, keys)
        try:
            running.repair()
            result = None
            async with running.data.background() as nursery:
                service = await running.start_partners(nursery, running.config.listen, explicit=False,
                                                       brokers=brokers, quiet_fallback=True)
                try:
                    result = await fn(service)
                finally:
                    nursery.cancel_scope.cancel()
            await running.data.sync()
            return result
        finally:
            running.close()

    return trio.run(main)
