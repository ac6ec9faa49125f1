"""The partner service of one store: what a daemon (mount or serve) runs beside the filesystem.

Owns the QUIC endpoint of the store, the accept loop (every authenticated connection is served
by the holder; partners' connections are also adopted as links), the replicator, the auditor and
the partners' reputations, the periodic snapshot, and the operations the CLI asks for: invite,
probe, pair, unpair, peers, status, sync, challenge, reputation. It also answers how many
partners in good standing hold a file (`copies`, the mount's `user.bpfs.copies`).
The same object serves a daemon (asked through `control`) and a CLI command run without a
daemon (in-process), so both behave the same.

`ReplicationSource` is the store side of replication: it reads the *committed* index (an LMDB read
transaction) so nothing half-written is ever sent, and makes snapshots (in the mount daemon after
flushing every buffered write, holding the data store's apply lock).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import TypeVar

import trio

from ..config import Config, ConfigError, format_address, parse_address
from ..errors import BpfsError, first_error
from ..index import LANE_PRIORITY
from ..outbox import Outbox
from ..net.quic import Endpoint, NoAnswer, RelayPath, TransportConfig, TransportError, WrongPeer, open_endpoint
from ..net.rpc import RemoteError, request
from .. import snapshot as snap
from ..history import RetentionPolicy, snapshot_names
from . import protocol as P
from .protocol import PARTNER_IDLE_TIMEOUT
from .auditor import Auditor
from .holder import Holder
from .holdings import Holdings
from .ledger import ENDED, Ledger, Partner
from .links import Links, Unreachable
from .replicator import Replicator, SyncTimeout, partner_state
from .reputation import Reputations, summary
from ..rendezvous.beacon import beacon_key, beacon_lookup_key
from ..rendezvous.brokers import BrokerClient
from ..rendezvous.codepair import CodePairing
from ..rendezvous.dialer import Dialer, NoRoute, lookup_key_for
from ..rendezvous.pairing import DEFAULT_WORDS
from ..rendezvous.wire import LookupKey, pair_lookup_key

log = logging.getLogger(__name__)
_T = TypeVar("_T")

INVITE_VALID = 7 * 86400.0
CODE_INVITE_VALID = 20 * 60.0  # an invitation made by a pairing by code: the code's life and then some
PAIR_TIMEOUT = 20.0


class PeeringError(BpfsError):
    """A partner operation that failed (pairing, unpairing, sync, ...): one line and an exit code,
    for the CLI."""


@dataclass
class RootInfo:
    """One of our retained snapshots' signed root: its generation, bytes, the packs it needs,
    when it was made, and its digest (as partners acknowledge it)."""

    generation: int
    blob: bytes
    needed: set
    created_ns: int = 0
    digest: bytes = b""


class ReplicationSource:
    """The store side of replication: what to send, snapshots, and counts read from the index.

    Attributes:
      index, packs, keys: the open store.
      data: the mount's `FileData` (None for a store served without a mount).
      outbox: the packs that replicate (`bpfs.outbox`).
      policy: which snapshots to keep (`history.RetentionPolicy`).
    """

    def __init__(self, index, packs, keys, data=None, policy: RetentionPolicy | None = None):
        self.index, self.packs, self.keys, self.data = index, packs, keys, data
        self.policy = policy or RetentionPolicy()
        self.outbox = Outbox(index, packs)
        self._roots: dict[int, RootInfo] = {}
        self._manifests: dict[int, snap.SnapshotManifest] = {}
        self._reserved_at_snapshot = 0  # packs.replicable_reserved when the last snapshot was taken

    def known_pack_root(self, pack_id: int) -> tuple[bytes, int] | None:
        """(tree root, size) of a pack as recorded in the index, if it is."""
        return self.index.get_pack_root(pack_id)

    async def pack_root(self, pack_id: int) -> tuple[bytes, int] | None:
        """(tree root, size) of one of our packs: recorded when it was sealed, or (for a pack
        written before a crash) hashed from its file now and recorded. None if it is gone."""
        known = self.index.get_pack_root(pack_id)
        if known is not None:
            return known
        if self.index.get_pack(pack_id) is None:
            return None
        try:
            root, size = await trio.to_thread.run_sync(self.packs.root_of, pack_id)
        except Exception:  # IntegrityError: missing; OSError: unreadable
            log.error("pack %012x cannot be read to hash it: it is not sent", pack_id)
            return None
        if self.index.get_pack(pack_id) is not None and self.index.get_pack_root(pack_id) is None:
            self.index.put_pack_root(pack_id, root, size)
        return root, size

    def retained(self) -> list[RootInfo]:
        """Every retained snapshot's root, newest first (each opened once)."""
        gens = snap.retained_generations(self.index)
        for gen in set(self._roots) - set(gens):
            del self._roots[gen]
            self._manifests.pop(gen, None)
        for gen in gens:
            if gen not in self._roots:
                blob = snap.retained_root(self.index, gen)
                assert blob is not None  # one of retained_generations
                manifest = snap.open_manifest(self.keys, blob)
                needed = set(manifest.packs) | {c.pack for c in manifest.chunks}
                self._roots[gen] = RootInfo(manifest.generation, blob, needed, manifest.created_ns,
                                            P.object_digest(blob))
        return [self._roots[g] for g in reversed(gens)]

    def manifest_of(self, generation: int) -> "snap.SnapshotManifest":
        """The manifest of a retained snapshot (opened once)."""
        cached = self._manifests.get(generation)
        if cached is None:
            cached = self._manifests[generation] = snap.open_manifest(self.keys, snap.retained_root(self.index, generation))
        return cached

    def latest_root(self) -> RootInfo | None:
        roots = self.retained()
        return roots[0] if roots else None

    def needed_by_history(self) -> set[int]:
        """Every pack some retained snapshot needs: none of these is released at a partner."""
        out: set[int] = set()
        for root in self.retained():
            out |= root.needed
        return out

    def root_created(self, generation: int) -> int:
        """When our retained snapshot of this generation was made (ns), 0 if it is not retained."""
        root = next((r for r in self.retained() if r.generation == generation), None)
        return root.created_ns if root is not None else 0

    def beacon_key(self, slot: int) -> bytes:
        """The key the partner in recovery beacon slot `slot` announces verifiers of for us
        (`rendezvous.beacon`)."""
        return beacon_key(self.keys, slot)

    def generation(self) -> int:
        """The index's generation counter: every root we made is of a lower generation."""
        return self.index.generation

    def raise_generation(self, floor: int) -> None:
        """Make our next snapshot's generation at least `floor` (above a root a partner holds)."""
        if self.index.generation < floor:
            log.warning("raising our generation to %d, above a root a partner holds", floor)
            self.index.put_counter("generation", floor)

    def changed_since_snapshot(self, partners: bytes | None = None) -> bool:
        """Whether a new snapshot would differ from the newest: the index changed, or (given
        `partners`, see `partner_list`) who the partners are or how to find them did (a recovery
        reads the list from the newest snapshot: a partner paired since must be in it)."""
        retained = snap.retained_generations(self.index)
        if self.index.dirty or not retained or self.index.generation > retained[-1] + 1:
            return True
        return partners is not None and _partner_keys(partners) != _partner_keys(
            self.manifest_of(retained[-1]).partners or b"")

    def snapshot_due(self, partners: bytes, batch_bytes: int, batch_delay: float, now_ns: int | None = None) -> bool:
        """Whether the periodic snapshot should be taken now: something changed, and enough of
        it to be worth a root of its own. Small changes are batched, so that a partner cannot
        count small files or tell when each was written: a root goes out once `batch_bytes` of
        new data went into packs that replicate since the last one (or a priority pack holds
        any), once the newest root is `batch_delay` old, or when the partners changed. `bpfs
        sync` does not wait (`snapshot`)."""
        if not self.changed_since_snapshot(partners):
            return False
        retained = snap.retained_generations(self.index)
        if not retained or self.packs.replicable_reserved - self._reserved_at_snapshot >= batch_bytes \
                or self.packs.open_bytes(LANE_PRIORITY):
            return True
        newest = self.manifest_of(retained[-1])
        if _partner_keys(partners) != _partner_keys(newest.partners or b""):
            return True
        now_ns = time.time_ns() if now_ns is None else now_ns
        return now_ns - newest.created_ns >= batch_delay * 1e9

    async def snapshot(self, partners: bytes = b"") -> int:
        """Flush everything written so far, then snapshot the index if it changed; the generation.
        `partners`: the partner list the snapshot carries (JSON, see `partner_list`)."""
        if self.data is not None:
            await self.data.flush_all()
            async with self.data.quiet():
                return self._export(partners)
        return self._export(partners)

    def _export(self, partners: bytes) -> int:
        if self.changed_since_snapshot(partners or None):
            self._reserved_at_snapshot = self.packs.replicable_reserved
            started = time.monotonic()
            manifest = snap.export_snapshot(self.index, self.keys, self.packs, policy=self.policy, partners=partners)
            stats = manifest.stats
            if self.data is not None:
                self.data.note_packs(sparse=stats["sparse_packs"])  # data the released snapshots alone held
            log.info("snapshot generation %d: %d new metadata chunks of %d, %.3f s%s", manifest.generation,
                     stats["new_chunks"], stats["chunks"], time.monotonic() - started,
                     f"; released snapshots {stats['released_snapshots']}" if stats["released_snapshots"] else "")
            return manifest.generation
        return snap.retained_generations(self.index)[-1]

    def commit(self) -> None:
        if self.data is None and self.index.dirty:
            if self.packs.has_unsynced:
                self.packs.sync()
            self.packs.record_roots(self.index)
            self.index.commit()

    def count_below_target(self, holders: list[tuple[frozenset, int]], target: int) -> dict:
        """Files (and their bytes) that fewer than `target` of `holders` (packs counted as held,
        when their root was made) hold: every pack of the file, and a root made after its last
        change. Files kept local (a .backupignore, or larger than max_file_size) are counted
        apart. Blocking: reads every file's records of the last checkpoint."""
        files = nbytes = below = below_bytes = local = local_bytes = 0
        for attr, packs, kept_local in self.index.committed_files():
            if kept_local:
                local, local_bytes = local + 1, local_bytes + attr.size
                continue
            files, nbytes = files + 1, nbytes + attr.size
            if sum(1 for held, made in holders if made >= attr.ctime_ns and held.issuperset(packs)) < target:
                below, below_bytes = below + 1, below_bytes + attr.size
        return {"files": files, "bytes": nbytes, "below_target_files": below, "below_target_bytes": below_bytes,
                "local_files": local, "local_bytes": local_bytes, "target": target}


def _running(part: _T | None) -> _T:
    """A part `PartnerService.run` sets up (its endpoint, nursery, links, dialer, ...): the loops it
    starts and the operations (served once it is ready) use them only while it runs."""
    if part is None:
        raise RuntimeError("the partner service is not running")
    return part


class PartnerService:
    """The partner service of one store (see the module docstring): `run` it in the daemon's nursery;
    `operations()` are what the CLI may call, through `control` or in-process."""

    def __init__(self, store_dir: str, keys, config: Config, source: ReplicationSource | None, *,
                 listen: str | None, transport: TransportConfig | None = None, brokers=None):
        self.store_dir = store_dir
        self.keys = keys
        self.identity = keys.identity
        self.config = config
        self.source = source
        self.listen = listen
        self.brokers = config.brokers if brokers is None else brokers
        self.broker: BrokerClient | None = None
        self.dialer: Dialer | None = None
        self.codes: CodePairing | None = None
        self.transport = transport or TransportConfig(max_data=32 << 20, max_stream_data=8 << 20,
                                                      socket_buffer=8 << 20, idle_timeout=PARTNER_IDLE_TIMEOUT)
        self.ledger = Ledger(store_dir, keys)
        self.holdings = Holdings(self.ledger)
        self.reputations = Reputations(self.ledger, config)
        self.endpoint: Endpoint | None = None
        self.links: Links | None = None
        self.replicator: Replicator | None = None
        self.auditor: Auditor | None = None
        self.durability: dict = {}  # the last count of files below the replica target (`status`)
        self._nursery: trio.Nursery | None = None
        self.holder = Holder(store_dir, self.identity, self.ledger, config, listen_port=self._listen_port,
                             on_paired=self._paired, on_unpaired=self._partners_changed,
                             on_beacon=self._announce_again)
        self.ready = trio.Event()
        self._paired_event = trio.Event()
        self._known_hosts: set[str] = set()
        self._known_hosts_at = float("-inf")
        self._admitting_cached, self._admitting_at = False, float("-inf")

    def _listen_port(self) -> int:
        return self.endpoint.local_address[1] if self.endpoint is not None and self.listen else 0

    def _changed(self, partner: Partner | None = None) -> None:
        if self.replicator is not None:
            self.replicator.wake()

    def _partners_changed(self, partner: Partner | None = None) -> None:
        self._admitting_at = float("-inf")
        self._changed()
        if self.broker is not None:
            self.broker.changed()  # who may look us up changed: announce again
        self._paired_event.set()
        self._paired_event = trio.Event()

    def standing(self, peer: str):
        """The partner's trust level now (`reputation.Standing`)."""
        return self.reputations.standing(peer, failing=len(self.holdings.failing(peer)),
                                         held=len(self.holdings.held(peer)))

    def _contact(self, peer: str, ok: bool, dialled: bool) -> None:
        """A dial to a partner worked or failed, or it connected to us: reachability evidence."""
        p = self.ledger.partner(peer)
        if p is None or not p.active:
            return
        away = self.reputations.health(peer).unreachable_since
        self.reputations.contact(peer, ok, dialled=dialled)
        if ok and away:
            log.info("%s is reachable again", peer)
            if self.auditor is not None:
                self.auditor.soon(peer)  # it is used again once it passes an audit
            self._changed()

    def copies(self, pack_ids, changed_ns: int) -> tuple[int, int]:
        """(partners in good standing that hold every one of these packs and a root made after
        `changed_ns`, the replica target): how safe a file last changed then is."""
        if self.replicator is None:
            return 0, 0
        n = 0
        for p in self.replicator.active():
            if p.root_created >= changed_ns and self.holdings.held(p.peer_id).issuperset(pack_ids) \
                    and self.standing(p.peer_id).good:
                n += 1
        return n, self.replicator.target()

    def _holders(self) -> list[tuple[frozenset, int]]:
        if self.replicator is None:
            return []
        return [(frozenset(self.holdings.held(p.peer_id)), p.root_created) for p in self.replicator.active()
                if self.standing(p.peer_id).good]

    async def _durability_loop(self) -> None:
        """Count the files and bytes below the replica target for `status`, whenever what decides
        it changed. It reads every file's extents, so it waits ten times as long as the last count
        took (at least DURABILITY_GAP seconds) before counting again."""
        seen, gap = None, DURABILITY_GAP
        while True:
            holders = self._holders()
            target = _running(self.replicator).target()
            key = (_running(self.source).index.generation, target, tuple((len(h), c) for h, c in holders))
            if key != seen:
                started = time.monotonic()
                result = await trio.to_thread.run_sync(_running(self.source).count_below_target, holders, target)
                took = time.monotonic() - started
                result["seconds"], result["at"] = round(took, 3), time.time()
                self.durability, seen = result, key
                gap = max(DURABILITY_GAP, 10 * took)
            await trio.sleep(gap)

    def _paired(self, partner: Partner, conn) -> None:
        """A peer paired with us on `conn` (a stranger's connection until then): adopt it as the link."""
        if self.links is not None:
            self.links.adopt(conn)
        self._partners_changed(partner)

    def _pair_keys(self) -> list[bytes]:
        """The pair keys of partners (and pending pairings by code) that may look us up."""
        keys = [p.pair_key for p in self.ledger.partners() if p.active and p.pair_key]
        now = time.time()
        keys += [inv.pair_key for inv in self.ledger.invites() if inv.pair_key and inv.expires > now]
        return [bytes.fromhex(k) for k in dict.fromkeys(keys)]

    def _lookup_keys(self) -> list[LookupKey]:
        """Who may find us through a broker: one lookup key per pairing, and the recovery beacons
        our partners gave us to announce for them (`rendezvous.beacon`). The broker client makes
        the verifiers for its broker and the current days (`wire.LookupKey`)."""
        keys = [pair_lookup_key(k, self.identity.public_key) for k in self._pair_keys()]
        for p in self.ledger.partners():
            if p.active and p.beacon:
                try:
                    keys.append(beacon_lookup_key(bytes.fromhex(p.beacon)))
                except ValueError:
                    log.warning("the recovery beacon %s gave us is malformed: not announced", p.peer_id)
        return keys

    def _admitting(self) -> bool:
        """Whether the endpoint takes new incoming connections: only with a reason, that is a
        partner in the ledger (active, or unpaired and still holding or held), an invitation not
        yet expired, or a pairing by code in progress. A store without any of these answers no
        one (`docs`: a fresh store is not reachable from the network until it pairs)."""
        if self.broker is not None and self.broker.holding:
            return True
        now = time.monotonic()
        if now - self._admitting_at > ADMITTING_TTL:
            wall = time.time()
            self._admitting_cached = bool(self.ledger.partners()) or any(
                inv.expires > wall for inv in self.ledger.invites())
            self._admitting_at = now
        return self._admitting_cached

    def _known_host(self, ip: str) -> bool:
        """Whether `ip` is where an active partner was last seen or is dialled: its handshakes get
        room in a flood (`net.quic`). The ledger is read at most every KNOWN_HOSTS_TTL seconds."""
        now = time.monotonic()
        if now - self._known_hosts_at > KNOWN_HOSTS_TTL:
            hosts = set()
            for p in self.ledger.partners():
                if p.active:
                    for a in p.addresses:
                        try:
                            hosts.add(parse_address(a)[0])
                        except ConfigError:  # an address the ledger holds but we cannot read
                            continue
            self._known_hosts, self._known_hosts_at = hosts, now
        return ip in self._known_hosts

    def _announce_again(self) -> None:
        if self.broker is not None:
            self.broker.changed()

    async def _dial_partner(self, peer: str, addresses: list[str]):
        p = self.ledger.partner(peer)
        key = None
        if p is not None:
            try:
                key = lookup_key_for(p.pair_key, p.public_key)
            except ValueError:
                log.warning("the pair key recorded for %s is malformed: it is not looked up", peer)
        return await _running(self.dialer).reach(peer, addresses, key)

    @property
    def addresses(self) -> list[str]:
        if self.endpoint is None or not self.listen:
            return []
        host, port = self.endpoint.local_address
        if host in ("0.0.0.0", "::"):
            return [format_address((a, port)) for a in _local_addresses(host == "::")]
        return [format_address((host, port))]

    # ----- running ------------------------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        host, port = parse_address(self.listen) if self.listen else ("0.0.0.0", 0)
        try:
            cm = open_endpoint(self.identity, host, port, config=self.transport, listen=bool(self.listen),
                               known_host=self._known_host, admitting=self._admitting)
            async with cm as ep:
                self.endpoint = ep
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    self.broker = BrokerClient(self.identity, ep, self.brokers, addresses=lambda: self.addresses,
                                               lookup_keys=self._lookup_keys, standing=lambda: bool(self._pair_keys()))
                    self.dialer = Dialer(ep, self.broker)
                    self.codes = CodePairing(self.broker, self.identity, invite=self._code_invite,
                                             uninvite=self._code_uninvite, pair_with=self._code_pair_with,
                                             wait_paired=self._wait_paired)
                    nursery.start_soon(_guarded, "talking to brokers", self.broker.run)
                    nursery.start_soon(_guarded, "pairing by code", self.codes.run)
                    self.links = Links(ep, nursery, self._serve_connection, self._dial_partner,
                                       on_contact=self._contact)
                    if self.listen:  # --listen none: nothing to accept, and nothing to say about it
                        nursery.start_soon(_guarded, "accepting connections", self._accept_loop)
                    nursery.start_soon(_guarded, "sweeping hosted data", self.holder.run_sweeper)
                    if self.source is not None:
                        self.replicator = Replicator(self.identity, self.ledger, self.links, self.source, self.config,
                                                     holdings=self.holdings, standing=self.standing)
                        self.auditor = Auditor(self.ledger, self.links, self.holdings, self.reputations,
                                               self.source.known_pack_root, self.config, on_change=self._changed)
                        nursery.start_soon(_guarded, "replicating", self.replicator.run)
                        nursery.start_soon(_guarded, "auditing partners", self.auditor.run)
                        nursery.start_soon(_guarded, "snapshots", self._snapshot_loop)
                        nursery.start_soon(_guarded, "counting copies", self._durability_loop)
                    self.ready.set()
                    task_status.started(self.addresses)
                    await trio.sleep_forever()
        finally:
            self.ledger.close()

    async def run_surviving(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """`run` for a daemon: once started, a failure is logged and never ends the mount."""
        try:
            await self.run(task_status=task_status)
        except Exception:
            if not self.ready.is_set():  # failed to start (the port is taken?): the caller decides
                raise
            log.exception("the partner service failed: partners are not served until the next start")

    async def _accept_loop(self) -> None:
        async for conn in _running(self.endpoint):
            _running(self._nursery).start_soon(self._serve_connection, conn)

    async def _serve_connection(self, conn) -> None:
        try:
            await self._serve_connection_unguarded(conn)
        except Exception as e:  # one connection's failure must not end the others (or the mount)
            err = first_error(e)
            if isinstance(err, TransportError):
                log.debug("connection %r ended: %s", conn, err)
            else:
                log.exception("serving %r failed", conn)
            conn.close()

    async def _serve_connection_unguarded(self, conn) -> None:
        p = self.ledger.partner(conn.peer_id)
        if p is not None and p.active:
            if not conn.is_client and not isinstance(conn.remote_address, RelayPath):
                p.observed = format_address(conn.remote_address)
                p.last_seen = time.time()
                self.ledger.put_partner(p)
            _running(self.links).adopt(conn)
            self._changed()
        await self.holder.dispatcher.serve_connection(conn)

    async def _snapshot_loop(self) -> None:
        """A signed root at most every `snapshot_interval` while the index changes."""
        while True:
            await trio.sleep(self.config.snapshot_interval)
            try:
                partners = partner_list(self.ledger)
                if any(p.active for p in self.ledger.partners()) and _running(self.source).snapshot_due(
                        partners, self.config.batch_bytes, self.config.batch_delay):
                    await _running(self.source).snapshot(partners)
                    self._changed()
                _running(self.source).commit()
            except Exception:
                log.exception("periodic snapshot failed")

    # ----- operations (the CLI's, through control or in-process) --------------------------------------
    def operations(self) -> dict:
        """What the CLI may ask the running daemon for (`control`), by name."""
        return {"id": self.op_id, "invite": self.op_invite, "probe": self.op_probe, "pair": self.op_pair,
                "unpair": self.op_unpair, "peers": self.op_peers, "status": self.op_status, "sync": self.op_sync,
                "challenge": self.op_challenge, "reputation": self.op_reputation, "snapshots": self.op_snapshots,
                "code_open": self.op_code_open, "code_wait": self.op_code_wait, "code_join": self.op_code_join,
                "code_decide": self.op_code_decide, "code_cancel": self.op_code_cancel}

    def op_id(self) -> dict:
        b = self.broker
        return {"peer_id": self.identity.peer_id, "addresses": self.addresses,
                "broker": str(b.broker) if b is not None and b.conn is not None else None,
                "observed": b.observed if b is not None and b.conn is not None else None}

    def op_invite(self, peer: str, offer: int, ask: int) -> dict:
        check_peer_id(peer)
        if peer == self.identity.peer_id:
            raise PeeringError("that is this store's own peer id", exit_code=2)
        inv = self.holder.invite(peer, offer, ask, INVITE_VALID)
        self._admitting_at = float("-inf")  # an invited peer may connect now
        return {"peer_id": peer, "offer": offer, "ask": ask, "expires": inv.expires}

    async def op_probe(self, address: str) -> dict:
        """Connect and report the peer id there, for the user to confirm (nothing is exchanged)."""
        conn = await self._dial(address, None)
        peer = conn.peer_id
        await conn.aclose()
        return {"peer_id": peer}

    async def _dial(self, address: str, expect: str | None):
        addr = parse_address(address)
        try:
            with trio.fail_after(PAIR_TIMEOUT):
                return await _running(self.endpoint).connect(addr, expected_peer=expect)
        except trio.TooSlowError:
            raise PeeringError(f"no bpfs store answered at {format_address(addr)} within {PAIR_TIMEOUT:.0f} s") \
                from None
        except NoAnswer as e:
            raise PeeringError(f"no bpfs store answered at {format_address(addr)} within {e.waited:.0f} s (a store "
                               "without partners answers only while it expects a pairing: run `bpfs pair --accept "
                               f"{self.identity.peer_id}` there first)") from None
        except WrongPeer as e:
            raise PeeringError(f"the store at {format_address(addr)} has peer id {e.peer_id}, not {expect} "
                               "(check --expect: nothing was paired)") from None
        except TransportError as e:
            raise PeeringError(f"could not connect to {format_address(addr)}: {e}") from None

    async def op_pair(self, address: str, expect: str, offer: int, ask: int) -> dict:
        check_peer_id(expect)
        if expect == self.identity.peer_id:
            raise PeeringError("that is this store's own peer id", exit_code=2)
        conn = await self._dial(address, expect)
        host, port = parse_address(address)
        return await self._pair_over(conn, expect, offer, ask, os.urandom(32), format_address((host, port)))

    async def _pair_over(self, conn, expect: str, offer: int, ask: int, pair_key: bytes,
                         address: str | None) -> dict:
        """Send the pairing request on `conn` (authenticated as `expect`) and record the partnership."""
        try:
            reply = await request(conn, P.PairRequest(offer, ask, self._listen_port(), pair_key),
                                  registry=P.PARTNER, timeout=PAIR_TIMEOUT)
        except RemoteError as e:
            await conn.aclose()
            raise PeeringError(f"{expect} refused to pair: {e.message}") from None
        except (TransportError, trio.TooSlowError) as e:
            await conn.aclose()
            raise PeeringError(f"pairing with {expect} failed: {e or type(e).__name__}") from None
        old = self.ledger.partner(expect)
        # The address the user gave is the one we dial (it may be a port forward); the port the
        # partner says it listens on is the fallback, for when that address stops working.
        announced = None
        if address is not None and reply.listen_port:
            announced = format_address((parse_address(address)[0], reply.listen_port))
        partner = Partner(expect, conn.peer_public_key.hex(), address,
                          we_keep=reply.keep_for_me, they_keep=reply.keep_for_you, last_seen=time.time(),
                          observed=announced if announced != address else None, pair_key=pair_key.hex())
        if old is not None:
            partner.root_generation = old.root_generation if old.active else 0
            partner.paired_at = old.paired_at if old.active else partner.paired_at
        self.ledger.put_partner(partner)
        _running(self._nursery).start_soon(self.holder.dispatcher.serve_connection, conn)
        _running(self.links).adopt(conn)
        self._partners_changed()
        return {"peer_id": expect, "address": partner.address, "we_keep": partner.we_keep,
                "they_keep": partner.they_keep, "path": _path(conn)}

    # ----- pairing by code (see rendezvous.codepair) -----------------------------------------------
    def _code_invite(self, peer: str, offer: int, ask: int, pair_key: bytes) -> None:
        self.holder.invite(peer, offer, ask, CODE_INVITE_VALID, pair_key)
        self._partners_changed()

    def _code_uninvite(self, peer: str) -> None:
        self.ledger.take_invite(peer, time.time())
        self._partners_changed()

    async def _code_pair_with(self, peer: str, offer: int, ask: int, pair_key: bytes, public_key: bytes) -> dict:
        try:
            conn = await _running(self.dialer).reach(peer, [], pair_lookup_key(pair_key, public_key))
        except NoRoute as e:
            raise PeeringError(f"could not reach {peer}: {e}") from None
        address = None if isinstance(conn.remote_address, RelayPath) else format_address(conn.remote_address)
        return await self._pair_over(conn, peer, offer, ask, pair_key, address)

    async def _wait_paired(self, peer: str, timeout: float) -> dict:
        with trio.move_on_after(timeout):
            while True:
                p = self.ledger.partner(peer)
                if p is not None and p.active and p.pair_key:
                    conn = _running(self.links).connection(peer)
                    return {"peer_id": peer, "address": p.address, "we_keep": p.we_keep, "they_keep": p.they_keep,
                            "path": _path(conn)}
                await self._paired_event.wait()
        raise PeeringError(f"{peer} agreed but did not reach this store within {timeout:.0f} s (is one of "
                           "you offline, or is UDP blocked?)")

    async def op_code_open(self, offer: int, ask: int, words: int = DEFAULT_WORDS) -> dict:
        return await _running(self.codes).open(offer, ask, words)

    async def op_code_wait(self, session: str) -> dict:
        return await _running(self.codes).wait(session)

    async def op_code_join(self, code: str, offer: int, ask: int) -> dict:
        return await _running(self.codes).join(code, offer, ask)

    async def op_code_decide(self, session: str, accept: bool) -> dict:
        return await _running(self.codes).decide(session, bool(accept))

    async def op_code_cancel(self, session: str) -> dict:
        return await _running(self.codes).cancel(session)

    async def op_unpair(self, peer: str) -> dict:
        p = self.ledger.partner(peer)
        if p is None:
            raise PeeringError(f"not paired with {peer}", exit_code=2)
        told = False
        if p.active:
            try:
                with trio.fail_after(PAIR_TIMEOUT):
                    conn = await _running(self.links).get(peer, p.addresses)
                    await request(conn, P.Unpair("unpaired by its owner"), registry=P.PARTNER)
                told = True
            except (TransportError, trio.TooSlowError) as e:
                log.info("could not tell %s about the unpairing: %s", peer, e)
            p = self.ledger.update_partner(peer, state=ENDED, ended_at=time.time()) or p
            _running(self.links).drop(peer)
            self._changed()
        return {"peer_id": peer, "told": told, "grace_days": self.config.grace_days,
                "held_by_them": self._held_by(peer), "held_for_them": self.holder.held_for(peer)}

    def op_peers(self) -> list[dict]:
        status = {}
        if self.replicator is not None:
            status = {s["peer_id"]: s for s in self.replicator.status()}
        out = []
        for p in sorted(self.ledger.partners(), key=lambda p: p.paired_at):
            conn = self.links.connection(p.peer_id) if self.links is not None else None
            row = status.get(p.peer_id)  # the same state as `status` (replicator.partner_state decides both)
            state, reason = (row["state"], row["reason"]) if row is not None and p.active else \
                partner_state(p.active, True, None, connected=conn is not None)
            out.append({"peer_id": p.peer_id, "address": p.address, "state": state, "reason": reason,
                        "connected": conn is not None, "path": _path(conn), "we_keep": p.we_keep,
                        "they_keep": p.they_keep, "held_for_them": self.holder.held_for(p.peer_id),
                        "held_by_them": row["replicated_bytes"] if row is not None else self._held_by(p.peer_id),
                        "last_seen": p.last_seen, "paired_at": p.paired_at, "ended_at": p.ended_at,
                        "root_generation": p.root_generation,
                        "received_bytes": self.holder.received_bytes.get(p.peer_id, 0),
                        **self._trust_fields(p)})
        return out

    def _held_by(self, peer: str) -> int:
        """Bytes of our packs `peer` holds as counted (an unpaired partner keeps them for its grace
        period: `peers` shows them until then)."""
        if self.source is None:
            return 0
        pending = self.source.outbox.pending()
        return sum(pending[pid].size for pid in self.holdings.held(peer) if pid in pending)

    def _trust_fields(self, p: Partner) -> dict:
        if not p.active:
            return {"trust": "ended", "trust_reason": "", "score": None}
        st = self.standing(p.peer_id)
        score = summary(self.reputations.health(p.peer_id), st, time.time())["score"]
        return {"trust": st.level, "trust_reason": st.reason, "score": score}

    def op_status(self) -> dict:
        root = self.source.latest_root() if self.source is not None else None
        rows = self.replicator.status() if self.replicator is not None else []
        for row in rows:
            row["path"] = _path(_running(self.links).connection(row["peer_id"]))
        b = self.broker
        rep = self.replicator
        return {"peer_id": self.identity.peer_id, "latest_generation": root.generation if root else 0,
                "partners": rows, "broker": str(b.broker) if b is not None and b.conn is not None else None,
                "replicas": self.config.replicas, "target": rep.target() if rep else 0,
                "shortfall": rep.shortfall() if rep else None, "durability": self.durability}

    async def op_challenge(self, peer: str, packs: int | None = None, leaves: int | None = None) -> dict:
        """Audit a partner now: every pack it holds for us (or `packs` of them)."""
        check_peer_id(peer)
        if self.auditor is None:
            raise PeeringError("this daemon does not audit partners")
        p = self.ledger.partner(peer)
        if p is None or not p.active:
            raise PeeringError(f"not paired with {peer}", exit_code=2)
        try:
            result = await self.auditor.challenge(peer, packs, leaves or 4)
        except Unreachable as e:
            raise PeeringError(str(e)) from None
        except (TransportError, trio.TooSlowError) as e:
            raise PeeringError(f"could not reach {peer} to audit it: {e or 'no answer'}") from None
        except RemoteError as e:
            raise PeeringError(f"{peer} refused the audit: {e.message}") from None
        self._changed()
        st = self.standing(peer)
        return {**result.as_dict(), "trust": st.level, "trust_reason": st.reason,
                "held": len(self.holdings.held(peer)), "failing": len(self.holdings.failing(peer))}

    def op_snapshots(self) -> list[dict]:
        """Retained snapshots, oldest first: name, generation, when, files, bytes, which partners
        hold each."""
        if self.source is None:
            return []
        held = {p.peer_id: self.ledger.sent(p.peer_id, P.ROOT) for p in self.ledger.partners() if p.active}
        manifests = [self.source.manifest_of(r.generation) for r in reversed(self.source.retained())]
        names = snapshot_names((m.generation, m.created_ns) for m in manifests)
        return [{"name": names[m.generation], "generation": m.generation, "created": m.created_ns / 1e9,
                 "files": m.files, "bytes": m.file_bytes,
                 "partners": sorted(peer for peer, gens in held.items() if m.generation in gens)} for m in manifests]

    def op_reputation(self) -> list[dict]:
        """Partners by score, with what makes it up."""
        assigned = {p.peer_id for p in self.replicator.assigned()} if self.replicator else set()
        return reputation_rows(self.ledger, self.holdings, self.reputations, assigned,
                               self.auditor.plan_for if self.auditor is not None else None)

    async def op_sync(self, timeout: float | None) -> dict:
        if self.replicator is None:
            raise PeeringError("this daemon does not replicate")
        if not self.replicator.active():
            raise PeeringError("no partners: pair with one first (bpfs pair --direct ...)")
        started = time.monotonic()
        generation = await _running(self.source).snapshot(partner_list(self.ledger))
        _running(self.source).commit()
        self._changed()
        for _ in range(SYNC_SPOT_CHECKS):
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
            try:
                await self.replicator.sync(generation, left)
            except SyncTimeout as e:
                raise PeeringError(f"sync timed out: {e}") from None
            if not await self._spot_check():
                break
        else:
            raise PeeringError("sync: partners keep failing their audits; see bpfs status and bpfs reputation")
        return {"generation": generation, "partners": [p.peer_id for p in self.replicator.counting()],
                "seconds": round(time.monotonic() - started, 3)}

    async def _spot_check(self) -> bool:
        """Before `sync` says the data is safe, each partner counted on proves a scheduled audit's
        worth of packs now (so a partner that lost everything since its last audit is caught
        here, not an hour later). True if any proof failed (what failed is being repaired)."""
        failed = False
        for p in _running(self.replicator).counting():
            count = max(1, round(_running(self.auditor).plan_for(p.peer_id).per_audit))
            try:
                result = await _running(self.auditor).audit(p.peer_id, _running(self.auditor).choose(p.peer_id, count))
            except (Unreachable, TransportError, trio.TooSlowError) as e:
                log.info("sync: could not audit %s: %s", p.peer_id, e or type(e).__name__)
                continue
            except RemoteError as e:
                log.info("sync: %s refused an audit: %s", p.peer_id, e.message)
                continue
            failed |= bool(result.failures)
        return failed


RESTART_PAUSE = 5.0
KNOWN_HOSTS_TTL = 10.0  # seconds the partners' hosts are cached for the endpoint's admission
ADMITTING_TTL = 2.0  # seconds "do we take incoming connections at all" is cached (changes reset it)
DURABILITY_GAP = 2.0
SYNC_SPOT_CHECKS = 3  # rounds of replicate-then-audit a sync makes before it gives up


async def start_service(nursery, make_service, listen: str | None, *, explicit: bool,
                        surviving: bool = False, quiet_fallback: bool = False) -> PartnerService:
    """Start `make_service(listen)` in `nursery` and return it. If its UDP port is taken and the
    user did not choose the address, fall back to a free port on the same host (and log it: a
    warning, or with `quiet_fallback` only at info level, for a command's short-lived service
    whose port nobody needs to know: its warning was a second line on the command's stderr); an
    address the user chose fails with a one-line error."""
    attempts = [listen] if explicit or listen is None else [listen, f"{listen.rsplit(':', 1)[0]}:0"]
    for i, address in enumerate(attempts):
        service = make_service(address)
        try:
            await nursery.start(service.run_surviving if surviving else service.run)
            return service
        except BaseException as e:
            err = first_error(e)
            if not isinstance(err, OSError):
                raise
            if i + 1 == len(attempts):
                raise PeeringError(f"cannot listen for partners on {address}: {err.strerror or err} "
                                   "(choose another with --listen HOST:PORT, or --listen none)") from None
            log.log(logging.INFO if quiet_fallback else logging.WARNING,
                    "cannot listen on %s (%s): using a free port instead", address, err.strerror or err)
    raise AssertionError("unreachable")


PARTNER_LIST_FIELDS = ("peer_id", "public_key", "address", "observed", "we_keep", "they_keep", "pair_key", "paired_at")


def partner_list(ledger: Ledger) -> bytes:
    """The active partners as a snapshot carries them (sealed in its manifest): enough for a
    recovered store to know, find and use all of them again."""
    from dataclasses import asdict

    rows = [{k: v for k, v in asdict(p).items() if k in PARTNER_LIST_FIELDS} for p in ledger.partners() if p.active]
    return json.dumps(rows, sort_keys=True).encode()


def _partner_keys(blob: bytes) -> set[tuple]:
    """What of a partner list a recovery needs (who, the pair key to find them, the address):
    `observed` and the like change all the time and make no new snapshot on their own."""
    try:
        rows = json.loads(blob) if blob else []
    except ValueError:
        return set()
    return {(r.get("peer_id"), r.get("pair_key"), r.get("address")) for r in rows if isinstance(r, dict)} \
        if isinstance(rows, list) else set()


def reputation_rows(ledger: Ledger, holdings: Holdings, reputations: Reputations, assigned: set[str],
                    plan_for=None) -> list[dict]:
    """What `bpfs reputation` shows: active partners by score, with what makes it up."""
    now = time.time()
    rows = []
    for p in ledger.partners():
        if not p.active:
            continue
        failing, held = len(holdings.failing(p.peer_id)), len(holdings.held(p.peer_id))
        st = reputations.standing(p.peer_id, failing=failing, held=held)
        row = {"peer_id": p.peer_id, **summary(reputations.health(p.peer_id), st, now),
               "assigned": p.peer_id in assigned, "held_packs": held, "failing_packs": failing}
        if plan_for is not None:
            plan = plan_for(p.peer_id)
            row["audit_plan"] = {"packs_per_audit": round(plan.per_audit, 2), "packs_per_day": plan.per_day,
                                 "meets_detection_target": plan.meets_target, "within_budget": plan.within_budget,
                                 "bytes_per_month": plan.bytes_per_month}
        rows.append(row)
    return sorted(rows, key=lambda r: -r["score"])


async def _guarded(what: str, fn) -> None:
    """Run a background task forever: a bug in it is logged and the task restarted, and never
    takes the daemon (or its mount) down."""
    while True:
        try:
            await fn()
            return
        except Exception:
            log.exception("%s failed; restarting in %.0f s", what, RESTART_PAUSE)
        await trio.sleep(RESTART_PAUSE)


def check_peer_id(peer: str) -> None:
    from ..identity import parse_peer_id

    try:
        parse_peer_id(peer)
    except Exception:
        raise PeeringError(f"not a peer id: {peer!r}", exit_code=2) from None


def _local_addresses(v6: bool) -> list[str]:
    """Addresses of this machine's interfaces (for `bpfs id`), loopback last."""
    import socket

    out: list[str] = []
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            # (typeshed's sockaddr has an int first for a Python built without IPv6; never here)
            fam, addr = info[0], info[4][0]
            if fam == (socket.AF_INET6 if v6 else socket.AF_INET) and addr not in out:
                out.append(addr)  # type: ignore[arg-type]
    except OSError:
        pass
    loop = "::1" if v6 else "127.0.0.1"
    return [a for a in out if a != loop and not a.startswith("127.")] + [loop]


def _path(conn) -> str | None:
    """How a partner's connection runs: "direct", "via relay", or None (not connected)."""
    if conn is None:
        return None
    return "via relay" if isinstance(conn.remote_address, RelayPath) else "direct"
