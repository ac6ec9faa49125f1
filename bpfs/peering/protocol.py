"""The partner protocol: the typed messages two paired stores exchange over QUIC.

Owns the message schemas (registry `PARTNER`), their bounds, the refusal codes and the bytes a
release request signs. One request per QUIC stream, one reply (see `bpfs.net.rpc`). Nothing here
touches disk or keys; `holder` serves these messages, `replicator` and `recovery` send them.

What is exchanged is opaque to the holder: *objects* of two kinds, identified by the owner:
  PACK  a pack file of sealed chunks (id = the owner's pack id), at most MAX_OBJECT bytes;
  ROOT  a signed snapshot root (id = its generation); the holder checks its signature against
        the owner's public key, and keeps every root it is given (the owner's history) until
        the owner releases it; it refuses a root made in the future (beyond CLOCK_SKEW) or one
        whose generation jumps further past the newest root held than the time between them
        allows (GENERATIONS_PER_SECOND, plus GENERATION_SLACK): a key in the wrong hands cannot
        make a root that outranks every future one.
Objects are uploaded in pieces of at most PIECE bytes, in order (offset = bytes the holder has);
the last piece carries the object's digest: its tree root (`bpfs.packtree`, a Merkle tree over
2 KiB leaves), checked before the holder calls it complete and kept by the holder. So a pack is
acknowledged by the very root that storage audits later check it against. A piece the holder
already has is acknowledged again (a retry after a lost reply); a piece beyond what it has is out
of order and closes the connection. A `repair` upload replaces a copy the holder calls complete
but that failed an audit: the new bytes must hash to the digest the holder recorded the first
time, so a repair can mend a copy, never replace it with something else.

Storage audits (`Prove`): the owner names up to MAX_AUDIT_PACKS packs, a fresh 32-byte nonce and
how many leaves per pack; both sides derive the same leaf indices from the nonce
(`packtree.challenge_leaves`), and the holder answers each pack with a status and, when it holds
it, those leaves and their Merkle paths. The holder's work is bounded: at most
MAX_AUDIT_LEAVES leaves per request, each read as one 16 KiB block, and a per-partner budget of
leaves per hour (refused with AUDIT_LIMIT and when to retry). The owner checks every leaf
against the root it recorded (`auditor`).

Messages (request -> reply); every request but PairRequest needs an active partnership:
  PairRequest(offer, ask, listen_port, pair_key) -> PairReply(keep_for_you, keep_for_me, listen_port)
  Unpair(reason)                          -> Done
  Usage()                                 -> UsageReply: what the holder keeps for the asker
  Have(kind, ids)                         -> HaveReply(sizes, complete): bytes held of each
  PutPiece(kind, id, total, offset, data, digest?) -> PutAck(held, complete)
  ListHeld(kind, after, limit)            -> HeldList(ids, sizes, complete, digests)
  GetPiece(kind, id, offset, length)      -> PieceData(data)
  Release(kind, ids, signature)           -> Done: delete these packs or roots after the grace period
  GetRoot()                               -> RootInfo(generation, size, digest, created): the newest
  ListRoots(after, limit)                 -> RootList(generations, sizes, digests, created, released)
  Prove(version, nonce, packs, leaves)    -> Proofs(one PackProof per pack: status, size, leaves, paths)
  Beacon(key)                             -> Done: announce this beacon key's verifiers for me (`rendezvous.beacon`)
"""

from __future__ import annotations

import struct

from ..net.codec import Bool, Bytes, List, Optional, Record, Registry, Text, UInt, field, message, record
from ..packtree import LEAF_SIZE, MAX_DEPTH, root_of_bytes

PARTNER_IDLE_TIMEOUT = 8.0  # seconds of silence before a connection is dead (a killed peer sends no close)
PIECE = 1 << 20  # bytes of object data per PutPiece / PieceData
MAX_OBJECT = 64 << 20  # a pack is ~16 MiB plus at most one 4 MiB chunk; a root at most 18 MiB
MAX_IDS = 1024  # ids per Have / ListHeld / Release
MAX_QUOTA = 1 << 60
DIGEST_SIZE = 32
SIGNATURE_SIZE = 64

PACK, ROOT = 0, 1
KINDS = (PACK, ROOT)

PARTNER = Registry("bpfs.partner", max_frame=PIECE + (64 << 10))


class Refusal:
    """Error codes (beyond the core ones) a holder replies with; the message says it for humans."""

    NOT_PAIRED = 16  # no active partnership with the asker
    NOT_INVITED = 17  # PairRequest without an invitation (`bpfs pair --accept`)
    QUOTA = 18  # the object would exceed the quota granted to the asker
    NO_SPACE = 19  # the holder's disk is full
    BAD_DIGEST = 20  # the finished object does not match its digest: it is discarded
    ROLLBACK = 21  # a root whose generation or time is not plausible (see ROOT above)
    BAD_ROOT = 22  # a root whose signature or format is wrong
    NOT_FOUND = 23  # GetPiece of something not held
    BAD_REQUEST = 24  # a well-formed request that makes no sense (e.g. total changed)
    AUDIT_LIMIT = 25  # the asker used up its audit budget here: retry later (the message says when)


_KIND = UInt(1)
_ID = UInt((1 << 63) - 1)
_SIZE = UInt(MAX_OBJECT)


@message(PARTNER, 0x10)
class PairRequest:
    """Sent by the store running `bpfs pair` (or finishing a code pairing) to the peer that invited it:
    the one request a stranger may make. Reply: `PairReply`, or `Error(NOT_INVITED)`."""

    offer: int = field(UInt(MAX_QUOTA))  # the requester keeps up to this much of the responder's data
    ask: int = field(UInt(MAX_QUOTA))  # and asks the responder to keep up to this much of its own
    listen_port: int = field(UInt(0xFFFF))  # where the requester accepts connections (0: it does not)
    # the partners' shared secret for finding each other through a broker (`bpfs.rendezvous.wire`)
    pair_key: bytes = field(Bytes(32, min_len=32))


@message(PARTNER, 0x11)
class PairReply:
    """The reply to `PairRequest`: the quotas agreed (each the smaller of what one side offers and
    the other asks; the standing ones if already paired) and the port the responder listens on."""

    keep_for_you: int = field(UInt(MAX_QUOTA))  # the responder keeps this much of the requester's data
    keep_for_me: int = field(UInt(MAX_QUOTA))  # the requester is asked to keep this much of the responder's
    listen_port: int = field(UInt(0xFFFF))


@message(PARTNER, 0x12)
class Unpair:
    """Sent by a store running `bpfs unpair` to end the partnership: the receiver keeps what it holds
    of the sender for the grace period, then deletes it. Reply: `Done`."""

    reason: str = field(Text(200))


@message(PARTNER, 0x13)
class Done:
    """The reply to `Unpair`, `Release` and `Beacon`: what changed (for `Release`, how many objects
    were newly released; 1 otherwise)."""

    count: int = field(UInt())


@message(PARTNER, 0x14)
class Usage:
    """An owner asks what its partner keeps for it (a recovery's first question to each source; an
    audit with no packs to prove). Reply: `UsageReply`."""


@message(PARTNER, 0x15)
class UsageReply:
    """The reply to `Usage`: the quota the holder grants the asker (0 once the partnership ended),
    the bytes it uses, and what it holds."""

    quota: int = field(UInt(MAX_QUOTA))  # what the holder agreed to keep for the asker
    used: int = field(UInt(MAX_QUOTA))  # bytes it holds (or has reserved) for the asker, incl. grace
    packs: int = field(UInt())  # complete packs held
    highest_pack: int = field(UInt())  # the highest pack id held (0: none); recovery starts above it
    root_generation: int = field(UInt())  # of the root held (0: none)


@message(PARTNER, 0x16)
class Have:
    """Sent by the replicator before uploading packs: how much of each the holder has, so an upload
    resumes where it stopped. Reply: `HaveReply`."""

    kind: int = field(_KIND)
    ids: list = field(List(_ID, MAX_IDS))


@message(PARTNER, 0x17)
class HaveReply:
    """The reply to `Have`, one entry per id asked, in order: bytes held (of a partial upload too)
    and whether the object is complete."""

    sizes: list = field(List(UInt(MAX_OBJECT), MAX_IDS))
    complete: list = field(List(Bool(), MAX_IDS))


@message(PARTNER, 0x18)
class PutPiece:
    """One piece of an object the owner's replicator uploads, in order; the last one carries the
    digest. Reply: `PutAck`, or a refusal (quota, disk full, digest, root checks)."""

    kind: int = field(_KIND)
    id: int = field(_ID)
    total: int = field(_SIZE)  # the object's full size, the same on every piece
    offset: int = field(_SIZE)
    data: bytes = field(Bytes(PIECE))
    digest: bytes | None = field(Optional(Bytes(DIGEST_SIZE, min_len=DIGEST_SIZE)))  # on the last piece
    repair: bool = field(Bool(), default=False)  # replace a complete copy that failed an audit


@message(PARTNER, 0x19)
class PutAck:
    """The reply to `PutPiece`: the bytes of the object the holder now has, and whether it is
    complete (digest checked, on disk)."""

    held: int = field(_SIZE)
    complete: bool = field(Bool())


@message(PARTNER, 0x1A)
class ListHeld:
    """An owner lists its objects of one kind at a holder, ids above `after` (the replicator
    reconciling on each new connection, a recovery finding packs). Reply: `HeldList`."""

    kind: int = field(_KIND)
    after: int = field(UInt())  # ids greater than this
    limit: int = field(UInt(MAX_IDS))


@message(PARTNER, 0x1B)
class HeldList:
    """The reply to `ListHeld`: at most `limit` objects in id order, each with its size, whether it
    is complete and, if so, the digest it was accepted by (b"" otherwise)."""

    ids: list = field(List(_ID, MAX_IDS))
    sizes: list = field(List(UInt(MAX_OBJECT), MAX_IDS))
    complete: list = field(List(Bool(), MAX_IDS))
    digests: list = field(List(Bytes(DIGEST_SIZE), MAX_IDS))  # the digest each complete object was accepted by


@message(PARTNER, 0x1C)
class GetPiece:
    """An owner reads back part of one of its complete objects (a recovery fetching roots and packs).
    Reply: `PieceData`, or `Error(NOT_FOUND)`."""

    kind: int = field(_KIND)
    id: int = field(_ID)
    offset: int = field(_SIZE)
    length: int = field(UInt(PIECE))


@message(PARTNER, 0x1D)
class PieceData:
    """The reply to `GetPiece`: the object's bytes from `offset`, at most `length` (fewer at its end)."""

    data: bytes = field(Bytes(PIECE))


@message(PARTNER, 0x1E)
class Release:
    """An owner signs away objects a holder keeps for it (roots it no longer retains, packs it
    deleted, what a spare held): the holder deletes them after its grace period. Reply: `Done`."""

    kind: int = field(_KIND)
    ids: list = field(List(_ID, MAX_IDS))
    signature: bytes = field(Bytes(SIGNATURE_SIZE, min_len=SIGNATURE_SIZE))


@message(PARTNER, 0x1F)
class GetRoot:
    """An owner asks for its newest root a holder keeps and has not released. Reply: `RootInfo`.
    (The daemon itself uses `ListRoots`.)"""


@message(PARTNER, 0x20)
class RootInfo:
    """The reply to `GetRoot`: the newest root held and not released (generation 0: none)."""

    generation: int = field(UInt())  # 0: no root held
    size: int = field(_SIZE)
    digest: bytes = field(Bytes(DIGEST_SIZE))  # b"": no root
    created: int = field(UInt())  # ns since the epoch, as the root says


@message(PARTNER, 0x23)
class ListRoots:
    """An owner lists the roots a holder keeps for it, generations above `after`, released ones
    too (the replicator reconciling, a recovery choosing a root). Reply: `RootList`."""

    after: int = field(UInt())  # generations greater than this
    limit: int = field(UInt(MAX_IDS))


@message(PARTNER, 0x24)
class RootList:
    """The reply to `ListRoots`: at most `limit` complete roots, oldest first, each with its size,
    digest, creation time (ns) and whether the owner released it."""

    generations: list = field(List(_ID, MAX_IDS))
    sizes: list = field(List(UInt(MAX_OBJECT), MAX_IDS))
    digests: list = field(List(Bytes(DIGEST_SIZE), MAX_IDS))
    created: list = field(List(UInt(), MAX_IDS))
    released: list = field(List(Bool(), MAX_IDS))  # released by the owner: kept for the grace period


AUDIT_VERSION = 1
MAX_AUDIT_PACKS = 128  # packs per Prove
MAX_PROOF_LEAVES = 32  # leaves per pack per Prove
MAX_AUDIT_LEAVES = 256  # leaves per Prove in all: about 0.9 MiB of answer at most
NONCE_SIZE = 32


class ProofStatus:
    """What a holder says of one audited pack."""

    HELD = 0  # here are the leaves
    MISSING = 1  # recorded as held, but the bytes are gone or unreadable
    NOT_HELD = 2  # not held here (never received, or already deleted)
    RELEASED = 3  # the owner released it: kept only for the grace period (not a failure)
    INCOMPLETE = 4  # an upload of it is in progress


@message(PARTNER, 0x21)
class Prove:
    """A storage audit, sent by the owner's auditor: prove these packs with `leaves` leaves each,
    chosen by `nonce` (see above). Reply: `Proofs`, or `Error(AUDIT_LIMIT)` past the budget."""

    version: int = field(UInt(0xFF))
    nonce: bytes = field(Bytes(NONCE_SIZE, min_len=NONCE_SIZE))
    packs: list = field(List(_ID, MAX_AUDIT_PACKS))
    leaves: int = field(UInt(MAX_PROOF_LEAVES, min=1))


@record
class PackProof:
    """One pack's answer in `Proofs`: a `ProofStatus`, the size of the holder's copy and, when
    HELD, the challenged leaves with their Merkle paths."""

    status: int = field(UInt(4))
    size: int = field(UInt(MAX_OBJECT))  # the size of the holder's copy
    leaves: list = field(List(Bytes(LEAF_SIZE), MAX_PROOF_LEAVES))  # in the order of the derived indices
    paths: list = field(List(List(Bytes(DIGEST_SIZE, min_len=DIGEST_SIZE), MAX_DEPTH), MAX_PROOF_LEAVES))


@message(PARTNER, 0x22)
class Proofs:
    """The reply to `Prove`: one `PackProof` per pack asked, in the order asked."""

    proofs: list = field(List(Record(PackProof), MAX_AUDIT_PACKS))


@message(PARTNER, 0x25)
class Beacon:
    """Sent by the replicator when it gives a partner a recovery beacon slot: the partner announces
    this key's verifiers at its brokers, so our recovery can find it (`rendezvous.beacon`). Reply: `Done`."""

    key: bytes = field(Bytes(DIGEST_SIZE, min_len=DIGEST_SIZE))  # the slot's beacon key (32 bytes)


def object_digest(data) -> bytes:
    """The digest of an object held in memory (a root): its tree root."""
    return root_of_bytes(data)


_RELEASE_DOMAIN = b"bpfs release v2\0"
CLOCK_SKEW = 600 * 10**9  # ns a root's creation time may lie ahead of the holder's clock
GENERATIONS_PER_SECOND = 10_000  # how fast a store's generation may grow (commits; ~4,000/s at most here)
GENERATION_SLACK = 1_000_000


def release_message(holder_peer_id: bytes, kind: int, ids: list[int]) -> bytes:
    """What the owner signs to release objects at one holder (so it cannot be replayed elsewhere)."""
    return _RELEASE_DOMAIN + holder_peer_id + struct.pack(f"<BI{len(ids)}Q", kind, len(ids), *ids)


def plausible_root(generation: int, created: int, newest: tuple[int, int] | None, now_ns: int) -> str | None:
    """Why a new root of `generation` made at `created` (ns) is not plausible next to the newest
    root held, (generation, created); None when it is."""
    if created > now_ns + CLOCK_SKEW:
        return f"it was made {(created - now_ns) / 1e9:.0f} s in the future"
    if newest is None:
        return None
    top, top_created = newest
    if generation > top:
        seconds = max(0, created - top_created) / 1e9 if top_created else float("inf")
        if generation - top > GENERATIONS_PER_SECOND * seconds + GENERATION_SLACK:
            return (f"its generation {generation} jumps {generation - top} past the newest held ({top}), "
                    f"more than {seconds:.0f} s allow")
    elif top_created and created > top_created + CLOCK_SKEW:
        return f"it is older than generation {top} but made after it"
    return None
