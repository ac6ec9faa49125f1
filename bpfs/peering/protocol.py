"""The partner protocol: the typed messages two paired stores exchange over QUIC.

Owns the message schemas (registry `PARTNER`), their bounds, the refusal codes and the bytes a
release request signs. One request per QUIC stream, one reply (see `bpfs.net.rpc`). Nothing here
touches disk or keys; `holder` serves these messages, `replicator` and `recovery` send them.

What is exchanged is opaque to the holder: *objects* of two kinds, identified by the owner:
  PACK  a pack file of sealed chunks (id = the owner's pack id), at most MAX_OBJECT bytes;
  ROOT  a signed snapshot root (id = its generation); the holder checks its signature against
        the owner's public key and refuses one that is not newer than the root it holds.
Objects are uploaded in pieces of at most PIECE bytes, in order (offset = bytes the holder has);
the last piece carries the BLAKE2b-256 of the whole object, checked before the holder calls it
complete. A piece the holder already has is acknowledged again (a retry after a lost reply); a
piece beyond what it has is out of order and closes the connection.

Messages (request -> reply); every request but PairRequest needs an active partnership:
  PairRequest(offer, ask, listen_port, pair_key) -> PairReply(keep_for_you, keep_for_me, listen_port)
  Unpair(reason)                          -> Done
  Usage()                                 -> UsageReply: what the holder keeps for the asker
  Have(kind, ids)                         -> HaveReply(sizes, complete): bytes held of each
  PutPiece(kind, id, total, offset, data, digest?) -> PutAck(held, complete)
  ListHeld(kind, after, limit)            -> HeldList(ids, sizes, complete)
  GetPiece(kind, id, offset, length)      -> PieceData(data)
  Release(ids, signature)                 -> Done: delete these packs after the grace period
  GetRoot()                               -> RootInfo(generation, size)
"""

from __future__ import annotations

import hashlib
import struct

from ..net.codec import Bool, Bytes, List, Optional, Registry, Text, UInt, field

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
    ROLLBACK = 21  # a root that is not newer than the one held
    BAD_ROOT = 22  # a root whose signature or format is wrong
    NOT_FOUND = 23  # GetPiece of something not held
    BAD_REQUEST = 24  # a well-formed request that makes no sense (e.g. total changed)


_KIND = UInt(1)
_ID = UInt((1 << 63) - 1)
_SIZE = UInt(MAX_OBJECT)


@PARTNER.message(0x10)
class PairRequest:
    offer: int = field(UInt(MAX_QUOTA))  # the requester keeps up to this much of the responder's data
    ask: int = field(UInt(MAX_QUOTA))  # and asks the responder to keep up to this much of its own
    listen_port: int = field(UInt(0xFFFF))  # where the requester accepts connections (0: it does not)
    # the partners' shared secret for finding each other through a broker (`broker.protocol`)
    pair_key: bytes = field(Bytes(32, min_len=32))


@PARTNER.message(0x11)
class PairReply:
    keep_for_you: int = field(UInt(MAX_QUOTA))  # the responder keeps this much of the requester's data
    keep_for_me: int = field(UInt(MAX_QUOTA))  # the requester is asked to keep this much of the responder's
    listen_port: int = field(UInt(0xFFFF))


@PARTNER.message(0x12)
class Unpair:
    reason: str = field(Text(200))


@PARTNER.message(0x13)
class Done:
    count: int = field(UInt())


@PARTNER.message(0x14)
class Usage:
    pass


@PARTNER.message(0x15)
class UsageReply:
    quota: int = field(UInt(MAX_QUOTA))  # what the holder agreed to keep for the asker
    used: int = field(UInt(MAX_QUOTA))  # bytes it holds (or has reserved) for the asker, incl. grace
    packs: int = field(UInt())  # complete packs held
    highest_pack: int = field(UInt())  # the highest pack id held (0: none); recovery starts above it
    root_generation: int = field(UInt())  # of the root held (0: none)


@PARTNER.message(0x16)
class Have:
    kind: int = field(_KIND)
    ids: list = field(List(_ID, MAX_IDS))


@PARTNER.message(0x17)
class HaveReply:
    sizes: list = field(List(UInt(MAX_OBJECT), MAX_IDS))
    complete: list = field(List(Bool(), MAX_IDS))


@PARTNER.message(0x18)
class PutPiece:
    kind: int = field(_KIND)
    id: int = field(_ID)
    total: int = field(_SIZE)  # the object's full size, the same on every piece
    offset: int = field(_SIZE)
    data: bytes = field(Bytes(PIECE))
    digest: bytes | None = field(Optional(Bytes(DIGEST_SIZE, min_len=DIGEST_SIZE)))  # on the last piece


@PARTNER.message(0x19)
class PutAck:
    held: int = field(_SIZE)
    complete: bool = field(Bool())


@PARTNER.message(0x1A)
class ListHeld:
    kind: int = field(_KIND)
    after: int = field(UInt())  # ids greater than this
    limit: int = field(UInt(MAX_IDS))


@PARTNER.message(0x1B)
class HeldList:
    ids: list = field(List(_ID, MAX_IDS))
    sizes: list = field(List(UInt(MAX_OBJECT), MAX_IDS))
    complete: list = field(List(Bool(), MAX_IDS))


@PARTNER.message(0x1C)
class GetPiece:
    kind: int = field(_KIND)
    id: int = field(_ID)
    offset: int = field(_SIZE)
    length: int = field(UInt(PIECE))


@PARTNER.message(0x1D)
class PieceData:
    data: bytes = field(Bytes(PIECE))


@PARTNER.message(0x1E)
class Release:
    ids: list = field(List(_ID, MAX_IDS))
    signature: bytes = field(Bytes(SIGNATURE_SIZE, min_len=SIGNATURE_SIZE))


@PARTNER.message(0x1F)
class GetRoot:
    pass


@PARTNER.message(0x20)
class RootInfo:
    generation: int = field(UInt())  # 0: no root held
    size: int = field(_SIZE)


def digest_hasher():
    """The hash of a whole object, sent with its last piece: BLAKE2b-256."""
    return hashlib.blake2b(digest_size=DIGEST_SIZE)


def object_digest(data) -> bytes:
    h = digest_hasher()
    h.update(data)
    return h.digest()


_RELEASE_DOMAIN = b"bpfs release v1\0"


def release_message(holder_peer_id: bytes, ids: list[int]) -> bytes:
    """What the owner signs to release packs at one holder (so it cannot be replayed elsewhere)."""
    return _RELEASE_DOMAIN + holder_peer_id + struct.pack(f"<I{len(ids)}Q", len(ids), *ids)
