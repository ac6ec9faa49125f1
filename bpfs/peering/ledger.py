"""The partner ledger: what we agreed with whom, and what is where. LMDB in STORE/partners/.

Tables (keys use the 20-byte peer id, `identity.peer_id_bytes`):
  peers    peer id              -> JSON Partner: public key, quotas both ways, state, times, the root
                                   generation the partner confirmed holding for us, and `sealed`:
                                   what finds the partner (see below)
  invites  peer id              -> JSON: quotas offered/asked to a peer allowed to pair, expiry, and
                                   `sealed` (the pair key of a pairing by code)
  meta     b"format"            -> u64: 2 once every record's secrets are sealed (absent: 1, before)
  sent     peer id + kind + id  -> b"": an object of ours the partner confirmed complete by its digest,
                                   and that has not failed an audit since
  hosted   peer id + kind + id  -> HostedRecord: an object we keep for that partner, with the digest
                                   (tree root) it was accepted by
  audits   peer id + pack id    -> AuditRecord: when we last audited that pack at that partner, how
                                   it went, and since when it has failed (until a repair or a pass)
  health   peer id              -> JSON `reputation.Health`: audit evidence, reachability, response
                                   times: what the partner's score and trust level are made of

Each change is one committed (fsynced) transaction: a handful per pack, never per piece (how far
a transfer got is the partial file's size; see `holder`).

Sealed (format 2): what would let someone holding the drive find a partner, or pose as us to the
broker to find it: its pair key (lookup tokens are made from it), its addresses (`address`,
`observed`), and the recovery beacon material (`beacon`, `beacon_slot`, `beacon_sent`); an
invitation's pair key. They are one JSON object per record, sealed (XChaCha20-Poly1305) under a
key derived from the master key (`KeyRing.derive("partner-ledger")`), bound to the table and the
peer id. In the clear stays what `bpfs peers`, `status` and `reputation` show without a
passphrase (see `offline`): partner ids and public keys, quotas, states, times, what each holds,
audit outcomes and health. A `Ledger` opened without keys reads those, reads the sealed fields
as None, and may write only records whose sealed fields it leaves as they are. A ledger of
format 1 (everything plain) is sealed in one transaction the first time it is opened with keys;
after that, a record without a sealed part is taken to have no pair key, address or beacon
(a plain one put there is ignored). No plaintext of files is kept here.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
import time
from collections.abc import Set as AbstractSet
from dataclasses import asdict, replace, dataclass, field

import lmdb

from ..crypto import Sealer
from ..errors import BpfsError, IntegrityError
from ..fsutil import compact_lmdb, make_private_dir
from ..identity import parse_peer_id

log = logging.getLogger(__name__)

_TABLES = ("peers", "invites", "sent", "hosted", "audits", "health", "meta")
FORMAT = 2  # the ledger's format (meta b"format"): 2 seals what finds partners
# the fields sealed in each record, with their value when unknown or absent
SEALED_PARTNER_FIELDS = {"address": None, "observed": None, "pair_key": None, "beacon_slot": None,
                         "beacon_sent": False, "beacon": None}
SEALED_INVITE_FIELDS = {"pair_key": None}
_SEALED: dict[str, dict] = {"peers": SEALED_PARTNER_FIELDS, "invites": SEALED_INVITE_FIELDS}
_OBJ = struct.Struct(">BQ")
_HOSTED = struct.Struct("<QBQ32sQ")  # total size, complete, released at (unix s; 0 = not), digest, created
_HOSTED_V1 = struct.Struct("<QBQ32s")  # before roots' creation times were kept
_HOSTED_V0 = struct.Struct("<QBQ")  # before digests were kept
_AUDIT = struct.Struct("<dBd")  # last audited (unix seconds), outcome, failed since (0: not failing)
_PACK_KIND = 0  # protocol.PACK: the kind of object audits are about

ACTIVE, ENDED = "active", "ended"


@dataclass
class Partner:
    """A partnership as the `peers` table holds it: who the partner is, the quotas both ways, its state
    and times, and what finds it (sealed, see the module docstring)."""

    peer_id: str
    public_key: str  # hex
    address: str | None  # "ip:port" we dial, None if it does not accept connections
    we_keep: int  # bytes of theirs we agreed to keep
    they_keep: int  # bytes of ours they agreed to keep
    state: str = ACTIVE
    paired_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    last_seen: float | None = None
    root_generation: int = 0  # our root generation this partner confirmed holding
    root_created: int = 0  # when that root was made (ns since the epoch; 0: unknown)
    observed: str | None = None  # where its last connection to us came from (its port, or a NAT's)
    pair_key: str | None = None  # hex: the secret we share for finding each other through a broker
    beacon_slot: int | None = None  # ours: the recovery beacon slot this partner announces for us
    beacon_sent: bool = False  # ours: it acknowledged that beacon
    beacon: str | None = None  # theirs: hex verifier we announce so that they can find us after a disaster

    @property
    def addresses(self) -> list[str]:
        return [a for a in dict.fromkeys((self.address, self.observed)) if a]

    @property
    def raw_id(self) -> bytes:
        return parse_peer_id(self.peer_id)

    @property
    def active(self) -> bool:
        return self.state == ACTIVE


@dataclass
class Invite:
    """An invitation (`bpfs pair --accept`, or a pairing by code): the quotas offered to and asked of a
    peer that may pair until `expires`; its `PairRequest` takes it."""

    peer_id: str
    offer: int
    ask: int
    expires: float
    pair_key: str | None = None  # hex, set by a pairing by code (both sides derived it)


@dataclass
class HostedRecord:
    """An object we keep for a partner (the `hosted` table): its size, whether it is complete, when the
    owner released it, the digest it was accepted by and, for a root, when it was made."""

    total: int
    complete: bool
    released_at: float  # 0: not released
    digest: bytes = b""  # the tree root the complete object was accepted by (b"": not known)
    created: int = 0  # a root's creation time as it says (ns since the epoch; 0 for packs)

    def pack(self) -> bytes:
        return _HOSTED.pack(self.total, self.complete, int(self.released_at), self.digest.ljust(32, b"\0"),
                            self.created)

    @classmethod
    def unpack(cls, raw: bytes) -> "HostedRecord":
        if len(raw) == _HOSTED_V0.size:
            total, complete, released = _HOSTED_V0.unpack(raw)
            return cls(total, bool(complete), released)
        if len(raw) == _HOSTED_V1.size:
            total, complete, released, digest = _HOSTED_V1.unpack(raw)
            created = 0
        else:
            total, complete, released, digest, created = _HOSTED.unpack(raw)
        return cls(total, bool(complete), released, digest if any(digest) else b"", created)


class Outcome:
    """How one pack's audit at a partner went (`AuditRecord.outcome`)."""

    OK, MISSING, DAMAGED, WRONG = range(4)
    NAMES = ("ok", "missing", "damaged", "wrong pack")


@dataclass
class AuditRecord:
    """How one of our packs last fared in an audit at one partner (the `audits` table)."""

    last_at: float = 0.0  # when this pack was last audited at this partner (or acknowledged, if never)
    outcome: int = Outcome.OK
    failed_since: float = 0.0  # when it first failed, until repaired or proven again (0: not failing)

    @property
    def failing(self) -> bool:
        return self.failed_since > 0


def _obj_key(raw_peer: bytes, kind: int, obj_id: int) -> bytes:
    return raw_peer + _OBJ.pack(kind, obj_id)


class Ledger:
    """The partner ledger of one store. `keys` (the store's `KeyRing`) opens the sealed fields;
    without them they read as unknown (None) and are never written (see the module docstring)."""

    def __init__(self, store_dir: str, keys=None):
        self.path = os.path.join(store_dir, "partners")
        make_private_dir(self.path)
        self._sealer = Sealer(keys.derive("partner-ledger")) if keys is not None else None
        sealed_now = self._open()
        if sealed_now:  # the plain records' bytes are still in freed pages: keep none of them
            compact_lmdb(self.env, self.path)
            self.env.close()
            self._open()

    def _open(self) -> bool:
        """Open the environment (sealing a format 1 ledger when we have keys: True if it did)."""
        self.env = lmdb.open(self.path, map_size=1 << 36, max_dbs=len(_TABLES) + 1, subdir=True, sync=True,
                             metasync=True, readahead=False, mode=0o600, max_readers=16, lock=True)
        try:
            with self.env.begin(write=True) as txn:
                self._db = {name: self.env.open_db(name.encode(), txn=txn) for name in _TABLES}
                raw = txn.get(b"format", db=self._db["meta"])
                self.format = int.from_bytes(raw, "big") if raw is not None else 1
                if self.format > FORMAT:
                    raise BpfsError(f"the partner ledger is in format {self.format}, newer than this bpfs knows "
                                    f"({FORMAT}): use a newer bpfs", exit_code=2)
                if self.format < FORMAT and self._sealer is not None:
                    self._seal_all(txn)
                    return True
        except BaseException:
            self.env.close()
            raise
        return False

    @property
    def sealed(self) -> bool:
        """Whether the sealed fields read as unknown here (opened without keys)."""
        return self._sealer is None

    def close(self) -> None:
        self.env.close()

    # ----- sealed fields --------------------------------------------------------------------
    @staticmethod
    def _aad(table: str, key: bytes) -> bytes:
        return b"bpfs partner ledger v2\0" + table.encode() + b"\0" + bytes(key)

    def _decode(self, table: str, key: bytes, raw: bytes) -> dict:
        """A record's fields: the plain ones, and the sealed ones opened (or unknown)."""
        doc = json.loads(raw)
        secret = _SEALED[table]
        sealed = doc.pop("sealed", None)
        if sealed is None and self.format >= 2:
            for name, default in secret.items():  # a plain secret in a sealed ledger: not ours
                if doc.get(name, default) != default:
                    log.warning("ignoring an unsealed %s in a partner ledger record (put there by hand?)", name)
                    doc[name] = default
        if sealed is not None:
            if self._sealer is None:
                doc.update(secret)
            else:
                try:
                    doc.update(json.loads(self._sealer.open(base64.b64decode(sealed), self._aad(table, key))))
                except (IntegrityError, ValueError):
                    raise BpfsError("the partner ledger is damaged: a sealed record does not open with this "
                                    "store's keys", exit_code=2) from None
        return doc

    def _encode(self, table: str, key: bytes, doc: dict, old: bytes | None) -> bytes:
        """The stored form of `doc`: its secrets sealed. Without keys the stored ones stay as
        they are, and `doc` may not set any."""
        if self._sealer is None and self.format < 2:
            return json.dumps(doc).encode()  # an unsealed ledger, opened without keys: as it was
        secret = {name: doc.pop(name, default) for name, default in _SEALED[table].items()}
        if self._sealer is not None:
            doc["sealed"] = base64.b64encode(self._sealer.seal(json.dumps(secret).encode(),
                                                               self._aad(table, key))).decode()
        else:
            if secret != _SEALED[table]:
                raise BpfsError("recording a partner's pair key, address or beacon needs the store's keys "
                                "(the passphrase)", exit_code=2)
            kept = json.loads(old).get("sealed") if old is not None else None
            if kept is not None:
                doc["sealed"] = kept
        return json.dumps(doc).encode()

    def _seal_all(self, txn) -> None:
        """Format 1 -> 2: seal the secrets of every record, in the opening transaction."""
        for table in _SEALED:
            for key, raw in list(txn.cursor(db=self._db[table])):
                doc = self._decode(table, bytes(key), bytes(raw))
                txn.put(key, self._encode(table, bytes(key), doc, None), db=self._db[table])
        txn.put(b"format", FORMAT.to_bytes(8, "big"), db=self._db["meta"])
        self.format = FORMAT

    def _partner(self, key: bytes, raw: bytes) -> Partner:
        return Partner(**self._decode("peers", key, raw))

    # ----- partners -------------------------------------------------------------------------
    def partners(self) -> list[Partner]:
        with self.env.begin() as txn:
            return [self._partner(bytes(k), bytes(v)) for k, v in txn.cursor(db=self._db["peers"])]

    def partner(self, peer_id: str) -> Partner | None:
        key = parse_peer_id(peer_id)
        with self.env.begin() as txn:
            raw = txn.get(key, db=self._db["peers"])
        return self._partner(key, bytes(raw)) if raw is not None else None

    def put_partner(self, p: Partner) -> None:
        key = p.raw_id
        with self.env.begin(write=True) as txn:
            txn.put(key, self._encode("peers", key, asdict(p), txn.get(key, db=self._db["peers"])),
                    db=self._db["peers"])

    def update_partner(self, peer_id: str, **fields) -> Partner | None:
        """Set some fields of a partner's record in one transaction, leaving the rest as they are
        now. For a task that read the record, awaited, and would otherwise write back a stale
        copy over what another task stored meanwhile (a beacon, an unpair)."""
        raw = parse_peer_id(peer_id)
        with self.env.begin(write=True) as txn:
            old = txn.get(raw, db=self._db["peers"])
            if old is None:
                return None
            old = bytes(old)
            p = replace(self._partner(raw, old), **fields)
            txn.put(raw, self._encode("peers", raw, asdict(p), old), db=self._db["peers"])
        return p

    def forget_partner(self, peer_id: str) -> None:
        """Remove an ended partnership whose data is gone both ways."""
        raw = parse_peer_id(peer_id)
        with self.env.begin(write=True) as txn:
            txn.delete(raw, db=self._db["peers"])
            txn.delete(raw, db=self._db["health"])
            for table in ("sent", "hosted", "audits"):
                cur = txn.cursor(db=self._db[table])
                if cur.set_range(raw):
                    while cur.key()[:20] == raw:
                        if not cur.delete():
                            break

    # ----- invitations ------------------------------------------------------------------------
    def put_invite(self, inv: Invite) -> None:
        key = parse_peer_id(inv.peer_id)
        with self.env.begin(write=True) as txn:
            # a new invitation replaces the old one, sealed part and all
            txn.put(key, self._encode("invites", key, asdict(inv), None), db=self._db["invites"])

    def take_invite(self, peer_id: str, now: float) -> Invite | None:
        """The unexpired invitation of `peer_id`, removed (one pairing per invitation)."""
        with self.env.begin(write=True) as txn:
            key = parse_peer_id(peer_id)
            raw = txn.get(key, db=self._db["invites"])
            if raw is None:
                return None
            txn.delete(key, db=self._db["invites"])
            inv = Invite(**self._decode("invites", key, bytes(raw)))
        return inv if inv.expires > now else None

    def invites(self) -> list[Invite]:
        with self.env.begin() as txn:
            return [Invite(**self._decode("invites", bytes(k), bytes(v))) for k, v in txn.cursor(db=self._db["invites"])]

    # ----- what partners confirmed holding of ours ----------------------------------------------
    def sent(self, peer_id: str, kind: int) -> set[int]:
        raw = parse_peer_id(peer_id)
        prefix = raw + bytes([kind])
        out = set()
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._db["sent"])
            if cur.set_range(prefix):
                for key in cur.iternext(values=False):
                    if key[:21] != prefix:
                        break
                    out.add(_OBJ.unpack(key[20:])[1])
        return out

    def mark_sent(self, peer_id: str, kind: int, ids, held: bool = True) -> None:
        raw = parse_peer_id(peer_id)
        with self.env.begin(write=True) as txn:
            for obj_id in ids:
                if held:
                    txn.put(_obj_key(raw, kind, obj_id), b"", db=self._db["sent"])
                else:
                    txn.delete(_obj_key(raw, kind, obj_id), db=self._db["sent"])

    def replace_sent(self, peer_id: str, kind: int, ids: set[int]) -> None:
        """What the partner reports holding complete becomes our record of it."""
        old = self.sent(peer_id, kind)
        raw = parse_peer_id(peer_id)
        with self.env.begin(write=True) as txn:
            for obj_id in old - ids:
                txn.delete(_obj_key(raw, kind, obj_id), db=self._db["sent"])
            for obj_id in ids - old:
                txn.put(_obj_key(raw, kind, obj_id), b"", db=self._db["sent"])

    # ----- what we keep for partners -------------------------------------------------------------
    def hosted(self, owner_raw: bytes, kind: int, obj_id: int) -> HostedRecord | None:
        with self.env.begin() as txn:
            raw = txn.get(_obj_key(owner_raw, kind, obj_id), db=self._db["hosted"])
        if raw is None:
            return None
        return HostedRecord.unpack(raw)

    def put_hosted(self, owner_raw: bytes, kind: int, obj_id: int, rec: HostedRecord) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(_obj_key(owner_raw, kind, obj_id), rec.pack(), db=self._db["hosted"])

    def delete_hosted(self, owner_raw: bytes, kind: int, obj_id: int) -> None:
        with self.env.begin(write=True) as txn:
            txn.delete(_obj_key(owner_raw, kind, obj_id), db=self._db["hosted"])

    def all_hosted(self, owner_raw: bytes | None = None):
        """(owner raw id, kind, id, record) in key order, for one owner or all."""
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._db["hosted"])
            ok = cur.set_range(owner_raw) if owner_raw else cur.first()
            rows = []
            while ok:
                key, raw = bytes(cur.key()), bytes(cur.value())
                if owner_raw and key[:20] != owner_raw:
                    break
                kind, obj_id = _OBJ.unpack(key[20:])
                rows.append((key[:20], kind, obj_id, HostedRecord.unpack(raw)))
                ok = cur.next()
        return rows

    # ----- audits of what partners hold for us (see auditor) --------------------------------------
    def audits(self, peer_id: str) -> dict[int, AuditRecord]:
        """pack id -> how its audits at this partner went."""
        raw = parse_peer_id(peer_id)
        out = {}
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._db["audits"])
            if cur.set_range(raw):
                for key, value in cur:
                    if key[:20] != raw:
                        break
                    out[int.from_bytes(key[20:], "big")] = AuditRecord(*_AUDIT.unpack(value))
        return out

    def put_audits(self, peer_id: str, records: dict[int, AuditRecord], *, held: AbstractSet[int] = frozenset(),
                   not_held: AbstractSet[int] = frozenset()) -> None:
        """Record audit outcomes, and in the same transaction which packs count as held by this
        partner from now on (a failed one stops counting at once; a repaired one counts again)."""
        raw = parse_peer_id(peer_id)
        with self.env.begin(write=True) as txn:
            for pack_id, rec in records.items():
                txn.put(raw + pack_id.to_bytes(8, "big"), _AUDIT.pack(rec.last_at, rec.outcome, rec.failed_since),
                        db=self._db["audits"])
            for pack_id in held:
                txn.put(_obj_key(raw, _PACK_KIND, pack_id), b"", db=self._db["sent"])
            for pack_id in not_held:
                txn.delete(_obj_key(raw, _PACK_KIND, pack_id), db=self._db["sent"])

    def forget_audits(self, peer_id: str, pack_ids) -> None:
        raw = parse_peer_id(peer_id)
        with self.env.begin(write=True) as txn:
            for pack_id in pack_ids:
                txn.delete(raw + pack_id.to_bytes(8, "big"), db=self._db["audits"])

    def health(self, peer_id: str) -> dict | None:
        with self.env.begin() as txn:
            raw = txn.get(parse_peer_id(peer_id), db=self._db["health"])
        return json.loads(raw) if raw is not None else None

    def put_health(self, peer_id: str, doc: dict) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(parse_peer_id(peer_id), json.dumps(doc).encode(), db=self._db["health"])
