"""The holder: serving partners' requests, and keeping their objects within what we agreed.

Owns STORE/hosted/PEER_ID/ (packs/XX/ID.pack with its proof sidecar ID.tree, roots/GEN.root,
partial uploads as *.part, repair uploads as *.repair), the quota each partner may use here,
pairing requests, answering storage audits, and deleting released data once its grace period
is over. Every root an owner sends is kept (its history) until the owner releases it; a root made
in the future or with an implausible generation is refused (`protocol`). Everything a partner sends is untrusted: sizes are bounded by the codec,
each object by the quota (refused with a clear message, never dropped silently), pieces must come
in order, a finished object must match its digest, and a root must be signed by its owner and
newer than the one we hold. A partner can only read, list or release its own objects.

Durability: a piece is acknowledged once written (it survives a killed daemon: how far an upload
got is the partial file's size); an object is acknowledged complete only after its digest is
checked and the file fdatasync'ed and renamed, so a complete object survives a power loss too.
The digest is checked from the bytes as they were written, hashed in order piece by piece
(`packtree.InOrderHasher`, for at most MAX_RECEIVING uploads at once), so a pack is not read
back; an upload begun before a restart, or beyond that bound, is hashed from its file. Written
bytes are handed to writeback at once (POSIX_FADV_DONTNEED): they are not read again here.

Audits (`Prove`): for each pack asked about, the leaves the nonce names and their Merkle paths,
from the pack's 16 KiB blocks and its sidecar (the block hashes, written when the pack arrived;
rebuilt from the pack if it is lost). The work per request is bounded (`protocol`), and each
owner has a budget of leaves per hour here; a rebuilt sidecar is charged against it too.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Callable

import trio

from ..config import Config, format_size
from ..fsutil import fsync_dir, make_private_dir
from ..identity import Identity, format_peer_id, parse_peer_id, peer_id_bytes, verify_signature
from ..net.quic import Code, RelayPath
from ..net.rpc import Dispatcher, Reject, TokenBucket
from ..packtree import BLOCK_SIZE, InOrderHasher, Sidecar, challenge_leaves, leaf_count, read_proof
from ..snapshot import SignedRoot, SnapshotError, verify_root
from . import protocol as P
from .ledger import ENDED, HostedRecord, Invite, Ledger, Partner

log = logging.getLogger(__name__)

_DISK_RESERVE = 256 << 20  # never fill the holder's disk past this
SWEEP_INTERVAL = 3600.0
_MAX_PAIR_FRAME = 256
MAX_RECEIVING = 64  # uploads hashed as they arrive (about 75 KiB each for a 16 MiB pack); more are read back
AUDIT_LEAVES_PER_HOUR = 8192  # an owner's audit budget here: leaves proven per hour ...
AUDIT_BURST = 8192  # ... and saved up at most (a `bpfs challenge` of 2,048 packs at 4 leaves)


class Holder:
    """Serves partners' requests (`dispatcher`, for the partner protocol) and keeps what they send under
    STORE/hosted within the quotas in the ledger; `run_sweeper` deletes what the grace period allows."""

    def __init__(self, store_dir: str, identity: Identity, ledger: Ledger, config: Config, *,
                 listen_port: Callable[[], int], on_paired: Callable[[Partner, object], None],
                 on_unpaired: Callable[[Partner], None], on_beacon: Callable[[], None] = lambda: None,
                 clock=time.time):
        self.dir = os.path.join(store_dir, "hosted")
        make_private_dir(self.dir)
        self.identity = identity
        self.ledger = ledger
        self.config = config
        self._listen_port = listen_port
        self._on_paired, self._on_unpaired, self._on_beacon = on_paired, on_unpaired, on_beacon
        self._clock = clock
        self._locks: dict[tuple, trio.Lock] = {}
        self.used: dict[bytes, int] = {}
        self.received_bytes: dict[str, int] = {}  # piece bytes received per partner since start
        for owner, _kind, _obj, rec in ledger.all_hosted():
            self.used[owner] = self.used.get(owner, 0) + rec.total
        self._audit_budget: dict[bytes, TokenBucket] = {}
        self._receiving: OrderedDict[str, _Receiving] = OrderedDict()  # by .part path, oldest first
        self.dispatcher = Dispatcher(P.PARTNER, rate=400.0, burst=800.0, admit=self._admit_frame)
        d = self.dispatcher
        d.handler(P.PairRequest)(self._pair)
        d.handler(P.Unpair)(self._unpair)
        d.handler(P.Usage)(self._usage)
        d.handler(P.Have)(self._have)
        d.handler(P.PutPiece)(self._put_piece)
        d.handler(P.ListHeld)(self._list_held)
        d.handler(P.GetPiece)(self._get_piece)
        d.handler(P.Release)(self._release)
        d.handler(P.GetRoot)(self._get_root)
        d.handler(P.ListRoots)(self._list_roots)
        d.handler(P.Prove)(self._prove)
        d.handler(P.Beacon)(self._beacon)

    def _admit_frame(self, conn, type_id: int, length: int) -> str | None:
        """Strangers may only ask to pair (a small frame); nothing else of theirs is read."""
        if type_id == P.PairRequest.TYPE:  # type: ignore[attr-defined]  # set by the @message decorator
            return None if length <= _MAX_PAIR_FRAME else "oversized pairing request"
        if self.ledger.partner(conn.peer_id) is None:
            return "not paired with you"
        return None

    # ----- paths and bookkeeping ------------------------------------------------------------
    def _owner_dir(self, owner_raw: bytes) -> str:
        return os.path.join(self.dir, format_peer_id(owner_raw))

    def path(self, owner_raw: bytes, kind: int, obj_id: int) -> str:
        if kind == P.PACK:
            return os.path.join(self._owner_dir(owner_raw), "packs", f"{obj_id & 0xFF:02x}", f"{obj_id:012x}.pack")
        return os.path.join(self._owner_dir(owner_raw), "roots", f"{obj_id:016x}.root")

    def held_for(self, peer: str) -> int:
        return self.used.get(parse_peer_id(peer), 0)

    def _lock(self, key) -> trio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = trio.Lock()
        return lock

    def _partner(self, conn, *, writing: bool = False) -> Partner:
        p = self.ledger.partner(conn.peer_id)
        if p is None or (writing and not p.active):
            raise Reject("not paired with you" if p is None else "our partnership has ended",
                         P.Refusal.NOT_PAIRED)
        p.last_seen = self._clock()
        return p

    def _roots(self, owner_raw: bytes) -> list[tuple[int, HostedRecord]]:
        """(generation, record) of the owner's complete roots held, oldest first (released ones too)."""
        return [(obj, rec) for _, kind, obj, rec in self.ledger.all_hosted(owner_raw) if kind == P.ROOT and rec.complete]

    def _root_generation(self, owner_raw: bytes) -> int:
        """The owner's newest root held and not released (0: none)."""
        return max((gen for gen, rec in self._roots(owner_raw) if not rec.released_at), default=0)

    def _newest_root(self, owner_raw: bytes) -> tuple[int, int] | None:
        """(generation, created) of the newest root held, released or not: what a new root must follow."""
        roots = self._roots(owner_raw)
        return (roots[-1][0], roots[-1][1].created) if roots else None

    def _drop(self, owner_raw: bytes, kind: int, obj_id: int, rec: HostedRecord) -> None:
        path = self.path(owner_raw, kind, obj_id)
        self._receiving.pop(path + ".part", None)
        for p in (path, path + ".part", path + ".repair", _tree_path(path)):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self.ledger.delete_hosted(owner_raw, kind, obj_id)
        self.used[owner_raw] = max(0, self.used.get(owner_raw, 0) - rec.total)

    # ----- pairing ------------------------------------------------------------------------------
    async def _pair(self, conn, msg: P.PairRequest):
        now = self._clock()
        relayed = isinstance(conn.remote_address, RelayPath)  # its address is the relay's, not its own
        address = f"{conn.remote_address[0]}:{msg.listen_port}" if msg.listen_port and not relayed else None
        if ":" in conn.remote_address[0] and address:
            address = f"[{conn.remote_address[0]}]:{msg.listen_port}"
        existing = self.ledger.partner(conn.peer_id)
        if existing is not None and existing.active:
            existing.address = address or existing.address
            existing.last_seen = now
            existing.pair_key = bytes(msg.pair_key).hex()
            self.ledger.put_partner(existing)
            return P.PairReply(existing.we_keep, existing.they_keep, self._listen_port())
        invite = self.ledger.take_invite(conn.peer_id, now)
        if invite is None:
            raise Reject(f"not invited: the other side must first run `bpfs pair --accept {conn.peer_id}`",
                         P.Refusal.NOT_INVITED)
        we_keep, they_keep = min(msg.ask, invite.offer), min(msg.offer, invite.ask)
        if we_keep == 0 and they_keep == 0:
            raise Reject("nothing to agree: both quotas would be zero", P.Refusal.BAD_REQUEST)
        if invite.pair_key and invite.pair_key != bytes(msg.pair_key).hex():
            raise Reject("the pairing request does not carry the key the code exchange agreed", P.Refusal.BAD_REQUEST)
        partner = Partner(conn.peer_id, conn.peer_public_key.hex(), address, we_keep, they_keep, last_seen=now,
                          pair_key=bytes(msg.pair_key).hex())
        if existing is not None:  # an ended partnership renewed: keep what it still holds
            partner.root_generation = existing.root_generation
        self.ledger.put_partner(partner)
        log.info("paired with %s: we keep %s of theirs, they keep %s of ours", conn.peer_id,
                 format_size(we_keep), format_size(they_keep))
        self._on_paired(partner, conn)  # the connection it paired on now serves the partnership
        return P.PairReply(we_keep, they_keep, self._listen_port())

    async def _unpair(self, conn, msg: P.Unpair):
        p = self._partner(conn)
        if p.active:
            p.state, p.ended_at = ENDED, self._clock()
            self.ledger.put_partner(p)
            log.info("%s ended our partnership (%s); their data here goes in %.0f days", p.peer_id,
                     msg.reason or "no reason given", self.config.grace_days)
            self._on_unpaired(p)
        return P.Done(1)

    def invite(self, peer: str, offer: int, ask: int, valid_for: float, pair_key: bytes | None = None) -> Invite:
        inv = Invite(peer, offer, ask, self._clock() + valid_for, pair_key.hex() if pair_key else None)
        self.ledger.put_invite(inv)
        return inv

    # ----- reading what we hold -----------------------------------------------------------------
    async def _usage(self, conn, msg: P.Usage):
        p = self._partner(conn)
        self.ledger.put_partner(p)  # last seen
        owner = p.raw_id
        packs = [obj for _, kind, obj, rec in self.ledger.all_hosted(owner) if kind == P.PACK and rec.complete]
        return P.UsageReply(quota=p.we_keep if p.active else 0, used=self.used.get(owner, 0), packs=len(packs),
                            highest_pack=max(packs, default=0), root_generation=self._root_generation(owner))

    def _held(self, owner: bytes, kind: int, obj_id: int) -> tuple[int, bool]:
        rec = self.ledger.hosted(owner, kind, obj_id)
        if rec is None:
            return 0, False
        if rec.complete:
            return rec.total, True
        try:
            return min(os.stat(self.path(owner, kind, obj_id) + ".part").st_size, rec.total), False
        except FileNotFoundError:
            return 0, False

    async def _have(self, conn, msg: P.Have):
        owner = self._partner(conn).raw_id
        held = [self._held(owner, msg.kind, i) for i in msg.ids]
        return P.HaveReply([h[0] for h in held], [h[1] for h in held])

    async def _list_held(self, conn, msg: P.ListHeld):
        owner = self._partner(conn).raw_id
        rows = [(obj, rec) for _, kind, obj, rec in self.ledger.all_hosted(owner)
                if kind == msg.kind and obj > msg.after][:msg.limit]
        return P.HeldList([r[0] for r in rows], [r[1].total for r in rows], [r[1].complete for r in rows],
                          [r[1].digest if r[1].complete else b"" for r in rows])

    async def _get_piece(self, conn, msg: P.GetPiece):
        owner = self._partner(conn).raw_id
        rec = self.ledger.hosted(owner, msg.kind, msg.id)
        if rec is None or not rec.complete:
            raise Reject("not held here", P.Refusal.NOT_FOUND)
        if msg.offset > rec.total:
            raise Reject("offset beyond the object", P.Refusal.BAD_REQUEST)
        path = self.path(owner, msg.kind, msg.id)

        def read() -> bytes:
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.pread(fd, min(msg.length, rec.total - msg.offset), msg.offset)
            finally:
                os.close(fd)

        try:
            return P.PieceData(await trio.to_thread.run_sync(read))
        except FileNotFoundError:
            raise Reject("not held here", P.Refusal.NOT_FOUND) from None

    async def _get_root(self, conn, msg: P.GetRoot):
        owner = self._partner(conn).raw_id
        gen = self._root_generation(owner)
        rec = self.ledger.hosted(owner, P.ROOT, gen) if gen else None
        return P.RootInfo(gen, rec.total if rec else 0, rec.digest if rec else b"", rec.created if rec else 0)

    async def _list_roots(self, conn, msg: P.ListRoots):
        owner = self._partner(conn).raw_id
        rows = [(gen, rec) for gen, rec in self._roots(owner) if gen > msg.after][:msg.limit]
        return P.RootList([g for g, _ in rows], [r.total for _, r in rows], [r.digest for _, r in rows],
                          [r.created for _, r in rows], [bool(r.released_at) for _, r in rows])

    # ----- receiving ------------------------------------------------------------------------------
    async def _put_piece(self, conn, msg: P.PutPiece):
        p = self._partner(conn, writing=True)
        owner = p.raw_id
        if msg.total == 0 or msg.offset + len(msg.data) > msg.total:
            raise Reject("piece outside the object", P.Refusal.BAD_REQUEST)
        self.received_bytes[p.peer_id] = self.received_bytes.get(p.peer_id, 0) + len(msg.data)
        async with self._lock((owner, msg.kind, msg.id)):
            rec = self.ledger.hosted(owner, msg.kind, msg.id)
            if rec is not None and rec.released_at:  # sending it again means the owner wants it kept
                rec.released_at = 0
                self.ledger.put_hosted(owner, msg.kind, msg.id, rec)
            if rec is not None and rec.complete:
                if rec.total != msg.total or (rec.digest and msg.digest and rec.digest != msg.digest):
                    raise Reject("a different object with this id is held", P.Refusal.BAD_REQUEST)
                if msg.repair and msg.kind == P.PACK:
                    return await self._repair_piece(conn, msg, rec)
                return P.PutAck(rec.total, True)
            if msg.kind == P.ROOT and rec is None and msg.offset == 0:
                self._check_root_header(owner, msg.id, msg.data)
            if rec is None:
                if msg.offset != 0:
                    conn.close(Code.PROTOCOL_VIOLATION, "piece out of order")
                    raise Reject("piece out of order", P.Refusal.BAD_REQUEST)
                self._admit(p, msg.total)
                rec = HostedRecord(msg.total, False, 0)
                self.ledger.put_hosted(owner, msg.kind, msg.id, rec)
                self.used[owner] = self.used.get(owner, 0) + msg.total
            elif rec.total != msg.total:
                raise Reject("the object's size changed between pieces", P.Refusal.BAD_REQUEST)
            path = self.path(owner, msg.kind, msg.id)
            part = path + ".part"
            receiving = self._receiving_of(part, msg.offset)
            try:
                size = await trio.to_thread.run_sync(_write_piece, part, msg.offset, msg.data, receiving)
            except _OutOfOrder:
                conn.close(Code.PROTOCOL_VIOLATION, "piece out of order")
                raise Reject("piece out of order", P.Refusal.BAD_REQUEST) from None
            except OSError as e:
                self._receiving.pop(part, None)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise Reject("the partner's disk is full", P.Refusal.NO_SPACE) from None
                raise
            if size < msg.total or msg.digest is None:
                return P.PutAck(size, False)
            return await self._finish(p, msg, rec, path, part)

    def _receiving_of(self, part: str, offset: int) -> "_Receiving | None":
        """The in-order hasher of an upload: a new one at its first piece (the oldest one
        forgotten past MAX_RECEIVING), None for an upload whose start this daemon did not see."""
        receiving = self._receiving.get(part)
        if receiving is None and offset == 0:
            receiving = self._receiving[part] = _Receiving()
            while len(self._receiving) > MAX_RECEIVING:
                self._receiving.popitem(last=False)
        return receiving

    def _admit(self, p: Partner, total: int) -> None:
        used = self.used.get(p.raw_id, 0)
        if used + total > p.we_keep:
            raise Reject(f"quota exceeded: we agreed to keep {format_size(p.we_keep)} of yours, "
                         f"{format_size(used)} is used, this needs {format_size(total)} more", P.Refusal.QUOTA)
        st = os.statvfs(self.dir)
        if st.f_bavail * st.f_frsize < total + _DISK_RESERVE:
            raise Reject("the partner's disk is full", P.Refusal.NO_SPACE)

    async def _repair_piece(self, conn, msg: P.PutPiece, rec: HostedRecord):
        """A piece of a repair upload: the complete copy here failed an audit. The new bytes go to
        a side file and replace the copy only if they hash to the digest it was accepted by."""
        p = self.ledger.partner(conn.peer_id)
        if p is None:  # unpaired meanwhile
            raise Reject("not paired with you", P.Refusal.NOT_PAIRED)
        owner = p.raw_id
        path = self.path(owner, msg.kind, msg.id)
        side = path + ".repair"
        try:
            size = await trio.to_thread.run_sync(_write_piece, side, msg.offset, msg.data)
        except _OutOfOrder:
            conn.close(Code.PROTOCOL_VIOLATION, "piece out of order")
            raise Reject("piece out of order", P.Refusal.BAD_REQUEST) from None
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise Reject("the partner's disk is full", P.Refusal.NO_SPACE) from None
            raise
        if size < msg.total or msg.digest is None:
            return P.PutAck(size, False)
        expected = rec.digest or msg.digest
        tree = await trio.to_thread.run_sync(_tree_and_sync, side)
        if tree.root != expected or msg.digest != expected or tree.size != rec.total:
            _unlink(side)
            raise Reject("the repaired object does not match the digest it was first accepted by: discarded",
                         P.Refusal.BAD_DIGEST)
        await trio.to_thread.run_sync(_install, side, path, tree)
        rec.digest = expected
        self.ledger.put_hosted(owner, msg.kind, msg.id, rec)
        log.info("repaired pack %012x of %s", msg.id, conn.peer_id)
        return P.PutAck(rec.total, True)

    async def _finish(self, p: Partner, msg: P.PutPiece, rec: HostedRecord, path: str, part: str):
        owner = p.raw_id
        checked = await trio.to_thread.run_sync(_tree_and_sync, part, self._receiving.pop(part, None))
        digest = checked.root
        tree = checked if msg.kind == P.PACK else None  # a root needs no proofs: no sidecar
        if digest != msg.digest:
            self._drop(owner, msg.kind, msg.id, rec)
            raise Reject("the object does not match its digest: discarded", P.Refusal.BAD_DIGEST)
        if msg.kind == P.ROOT:
            try:
                blob = await trio.to_thread.run_sync(_read_all, part)
                root = verify_root(bytes.fromhex(p.public_key), blob)
                if root.generation != msg.id:
                    raise SnapshotError("root generation does not match its id")
            except SnapshotError as e:
                self._drop(owner, msg.kind, msg.id, rec)
                raise Reject(f"root refused: {e}", P.Refusal.BAD_ROOT) from None
            why = P.plausible_root(root.generation, root.created_ns, self._newest_root(owner), self._now_ns())
            if why:
                self._drop(owner, msg.kind, msg.id, rec)
                raise Reject(f"root generation {root.generation} refused: {why}", P.Refusal.ROLLBACK)
            rec.created = root.created_ns
        if tree is not None:
            await trio.to_thread.run_sync(_write_sidecar, path, tree)
        os.replace(part, path)
        fsync_dir(os.path.dirname(path))
        rec.complete, rec.digest = True, digest
        self.ledger.put_hosted(owner, msg.kind, msg.id, rec)
        return P.PutAck(rec.total, True)

    def _now_ns(self) -> int:
        return int(self._clock() * 1e9)

    def _check_root_header(self, owner: bytes, generation: int, first_piece: bytes) -> None:
        """Refuse an implausible root at its first piece, before its bytes take up space (the
        whole root is checked again, signature and all, once it is complete)."""
        try:
            head = SignedRoot.decode_head(first_piece)
        except SnapshotError as e:
            raise Reject(f"root refused: {e}", P.Refusal.BAD_ROOT) from None
        if head is None:
            return  # a first piece shorter than the header: checked when complete
        gen, created = head
        if gen != generation:
            raise Reject("root refused: its generation does not match its id", P.Refusal.BAD_ROOT)
        why = P.plausible_root(gen, created, self._newest_root(owner), self._now_ns())
        if why:
            raise Reject(f"root generation {gen} refused: {why}", P.Refusal.ROLLBACK)

    # ----- releasing --------------------------------------------------------------------------------
    async def _release(self, conn, msg: P.Release):
        p = self._partner(conn)
        signed = P.release_message(peer_id_bytes(self.identity.public_key), msg.kind, msg.ids)
        if not verify_signature(bytes.fromhex(p.public_key), signed, msg.signature):
            raise Reject("release request not signed by you", P.Refusal.BAD_REQUEST)
        now, n = self._clock(), 0
        for obj_id in msg.ids:
            rec = self.ledger.hosted(p.raw_id, msg.kind, obj_id)
            if rec is not None and not rec.released_at:
                rec.released_at = now
                self.ledger.put_hosted(p.raw_id, msg.kind, obj_id, rec)
                n += 1
        return P.Done(n)

    async def _beacon(self, conn, msg: P.Beacon):
        """Announce this beacon key's verifiers for the partner (so it can find us after losing its
        drive: `rendezvous.beacon`)."""
        p = self._partner(conn, writing=True)
        beacon = bytes(msg.key).hex()
        if p.beacon != beacon:
            p.beacon = beacon
            self.ledger.put_partner(p)
            self._on_beacon()
        return P.Done(1)

    # ----- audits -------------------------------------------------------------------------------------
    def _budget(self, owner: bytes) -> TokenBucket:
        bucket = self._audit_budget.get(owner)
        if bucket is None:
            bucket = self._audit_budget[owner] = TokenBucket(AUDIT_LEAVES_PER_HOUR / 3600.0, AUDIT_BURST,
                                                             trio.current_time())
        return bucket

    async def _prove(self, conn, msg: P.Prove):
        owner = self._partner(conn).raw_id
        if msg.version != P.AUDIT_VERSION:
            raise Reject(f"audit version {msg.version} is not spoken here (we speak {P.AUDIT_VERSION})",
                         P.Refusal.BAD_REQUEST)
        cost = len(msg.packs) * msg.leaves
        if cost > P.MAX_AUDIT_LEAVES or len(set(msg.packs)) != len(msg.packs):
            raise Reject(f"an audit asks for at most {P.MAX_AUDIT_LEAVES} leaves, each pack once",
                         P.Refusal.BAD_REQUEST)
        bucket = self._budget(owner)
        if not bucket.take(trio.current_time(), cost):
            wait = (cost - bucket.tokens) / bucket.rate
            raise Reject(f"audit budget used up: at most {AUDIT_LEAVES_PER_HOUR} leaves an hour; retry in "
                         f"{wait:.0f} s", P.Refusal.AUDIT_LIMIT)
        records = {pid: self.ledger.hosted(owner, P.PACK, pid) for pid in msg.packs}
        paths = {pid: self.path(owner, P.PACK, pid) for pid in msg.packs}
        proofs, rebuilt = await trio.to_thread.run_sync(_prove_all, msg, records, paths)
        if rebuilt:
            bucket.tokens -= rebuilt  # rebuilding lost sidecars was work too
            log.info("rebuilt lost proof sidecars of %s's packs (%d blocks read)", conn.peer_id, rebuilt)
        return P.Proofs(proofs)

    def sweep(self) -> int:
        """Delete what the grace period allows: released objects, and everything of ended partners."""
        now, grace, dropped = self._clock(), self.config.grace_seconds, 0
        ended = {p.raw_id: p for p in self.ledger.partners() if not p.active}
        for owner, kind, obj, rec in self.ledger.all_hosted():
            gone = ended.get(owner)
            if (rec.released_at and now - rec.released_at >= grace) or (
                    gone is not None and now - (gone.ended_at or now) >= grace):
                self._drop(owner, kind, obj, rec)
                dropped += 1
        for owner, p in ended.items():
            if now - (p.ended_at or now) >= grace and not self.ledger.all_hosted(owner):
                self.ledger.forget_partner(p.peer_id)
        return dropped

    async def run_sweeper(self) -> None:
        while True:
            try:
                n = self.sweep()
                if n:
                    log.info("deleted %d objects whose grace period ended", n)
            except Exception:
                log.exception("sweeping hosted data failed")
            await trio.sleep(SWEEP_INTERVAL)


class _OutOfOrder(Exception):
    pass


class _Receiving:
    """An upload whose bytes are hashed as they are written (`hasher`: None once it cannot be,
    e.g. the file held bytes it did not see); `lock` keeps its pieces' writes one at a time."""

    __slots__ = ("lock", "hasher")

    def __init__(self):
        self.lock = threading.Lock()
        self.hasher: InOrderHasher | None = InOrderHasher()


def _write_piece(part: str, offset: int, data: bytes, receiving: _Receiving | None = None) -> int:
    """Append the new part of a piece; return the bytes now held. Pieces already held are no-ops."""
    if receiving is None:
        return _append(part, offset, data, None)
    with receiving.lock:
        return _append(part, offset, data, receiving)


def _append(part: str, offset: int, data: bytes, receiving: _Receiving | None) -> int:
    make_private_dir(os.path.dirname(part))
    fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if offset > size:
            raise _OutOfOrder()
        end = offset + len(data)
        if end > size:
            start = size
            new = view = memoryview(data)[size - offset:]
            while view:
                n = os.pwrite(fd, view, size)
                view, size = view[n:], size + n
            if receiving is not None and receiving.hasher is not None:
                if receiving.hasher.size == start:
                    receiving.hasher.add(new)
                else:
                    receiving.hasher = None
            os.posix_fadvise(fd, start, size - start, os.POSIX_FADV_DONTNEED)  # start writeback; not read again
        return size
    finally:
        os.close(fd)


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _tree_and_sync(part: str, receiving: _Receiving | None = None) -> Sidecar:
    """The proof sidecar of a received object (its root is the digest to check), once on disk:
    from the bytes hashed as they were written, else from the file."""
    tree = None
    if receiving is not None:
        with receiving.lock:
            if receiving.hasher is not None and receiving.hasher.size == os.stat(part).st_size:
                tree = receiving.hasher.sidecar()
    if tree is None:
        tree = Sidecar.of_file(part)
    _sync(part)
    return tree


def _tree_path(path: str) -> str:
    return path[:-len(".pack")] + ".tree" if path.endswith(".pack") else path + ".tree"


def _write_sidecar(path: str, tree: Sidecar) -> None:
    """Beside the pack; not synced: a lost or torn one is rebuilt from the pack when needed."""
    tmp = _tree_path(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(tree.encode())
    os.replace(tmp, _tree_path(path))


def _install(side: str, path: str, tree: Sidecar) -> None:
    os.replace(side, path)
    _write_sidecar(path, tree)
    fsync_dir(os.path.dirname(path))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _load_sidecar(path: str, size: int) -> tuple[Sidecar, int]:
    """The pack's sidecar, rebuilt from the pack when lost or not matching it; (sidecar, the
    blocks read to rebuild it: 0 if it was fine)."""
    try:
        with open(_tree_path(path), "rb") as f:
            tree = Sidecar.decode(f.read())
    except OSError:
        tree = None
    if tree is not None and tree.size == size:
        return tree, 0
    tree = Sidecar.of_file(path, size)
    try:
        _write_sidecar(path, tree)
    except OSError:
        pass
    return tree, -(-size // BLOCK_SIZE)


def _prove_all(msg: P.Prove, records: dict, paths: dict) -> tuple[list, int]:
    """The answer to one `Prove` (blocking: reads the blocks it needs). Returns (proofs, blocks
    read to rebuild lost sidecars)."""
    proofs, rebuilt = [], 0
    for pid in msg.packs:
        rec = records[pid]
        if rec is None:
            proofs.append(P.PackProof(P.ProofStatus.NOT_HELD, 0, [], []))
            continue
        if rec.released_at:
            proofs.append(P.PackProof(P.ProofStatus.RELEASED, rec.total, [], []))
            continue
        if not rec.complete:
            proofs.append(P.PackProof(P.ProofStatus.INCOMPLETE, 0, [], []))
            continue
        try:
            fd = os.open(paths[pid], os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            proofs.append(P.PackProof(P.ProofStatus.MISSING, 0, [], []))
            continue
        try:
            size = os.fstat(fd).st_size
            if size != rec.total:  # not the object we accepted: say what we have, prove nothing
                proofs.append(P.PackProof(P.ProofStatus.HELD, min(size, P.MAX_OBJECT), [], []))
                continue
            tree, cost = _load_sidecar(paths[pid], size)
            rebuilt += cost

            def read(offset: int, length: int, fd: int = fd) -> bytes:
                return os.pread(fd, length, offset)

            leaves, paths_out = [], []
            for leaf in challenge_leaves(msg.nonce, pid, size, msg.leaves):
                if leaf >= leaf_count(tree.size):
                    break
                data, siblings = read_proof(tree, leaf, read)
                leaves.append(data)
                paths_out.append(siblings)
            proofs.append(P.PackProof(P.ProofStatus.HELD, size, leaves, paths_out))
        except OSError:
            proofs.append(P.PackProof(P.ProofStatus.MISSING, 0, [], []))
        finally:
            os.close(fd)
    return proofs, rebuilt


def _read_all(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(P.MAX_OBJECT + 1)


