"""The broker wire contract: the typed messages between a store and a broker, over QUIC.

Owns the message schemas (registry `BROKER`), their bounds, the bytes an announcement signs and
the lookup token / verifier derivation. It lives in `bpfs` because both sides use it: the client
(`bpfs.rendezvous`) and the broker (`broker.server`, which depends on `bpfs`, never the other
way round). Nothing here does I/O. One request per QUIC stream, one reply (see
`bpfs.net.rpc`). A refusal is `Error(REJECTED, text)` with text a human can act on.

What the broker is told, and why it cannot use it against the peers:

Announcements. A store announces the addresses it listens on with a record signed by its
Ed25519 identity, bound to this broker (`broker_id`), numbered (`seq` must grow: a replayed or
older record is refused) and expiring (`expires`, capped by the broker). The record carries a
list of *verifiers*, one per partner: `verifier = H(token)` where the partner's lookup token is
`token = BLAKE2b-256(key=pair_key, "bpfs lookup v1" || target public key)` and `pair_key` is a
32-byte secret only the two partners share (made at pairing). The broker stores verifiers, not
tokens, so an announcement does not let it (or anyone it leaks to) look the store up, and it does
not say who the partners are.

Lookups. `Lookup(token)`: the broker hashes the token and finds the one announcement listing that
verifier. Knowing the token proves the asker was given the pair key, i.e. is the partner. The
broker then learns that the asker wants to reach the target, which the connection it helps set up
would reveal anyway.

Hole punching. With a lookup the broker also tells the target (if it holds a connection to the
broker) the asker's observed address and announced addresses (`Punch`); the target sends a few
small datagrams there while the asker dials, which opens both NATs' mappings.

Relay. `RelayOpen(token)` (same proof as a lookup) makes a relay session: each side gets its own
16-byte session id and sends raw relay frames (`bpfs.net.relay`) from the socket its broker
connection uses; the broker forwards the payload, QUIC packets of the peers' own end-to-end
encrypted and authenticated connection, to the other side. The broker counts bytes per identity
(rate and daily cap); it never sees inside.

Mailboxes (pairing by code). `MailboxOpen` allocates a short number (the code's first part); the
words of the code never reach the broker. The second store joins with the number (which uses the
mailbox up: no second joiner, ever); the two exchange a handful of opaque messages through it
(a SPAKE2 exchange and what it encrypts, see `bpfs.rendezvous.pairing`). Each side holds a 16-byte
`side` secret that authorises its puts and gets, so a reconnecting client (after a broker restart)
picks up where it was. Mailboxes live in the broker's LMDB and expire.

Messages (request -> reply); the broker sends Punch, RelayOffer and RelayClosed to a store:
  Announce(record, signature)              -> Announced(observed, expires)
  Lookup(token, addresses)                 -> Found(addresses, observed, online)
  RelayOpen(token)                         -> RelayOpened(session, expires)
  MailboxOpen()                            -> MailboxOpened(nameplate, side, expires)
  MailboxJoin(nameplate)                   -> MailboxJoined(side, expires)
  MailboxPut(nameplate, side, seq, body)   -> Ok
  MailboxGet(nameplate, side, after, wait) -> MailboxMessages(bodies)
  MailboxClose(nameplate, side)            -> Ok
  (broker -> store) Punch(observed, addresses)   -> Ok
  (broker -> store) RelayOffer(session, expires)  -> Ok
  (broker -> store) RelayClosed(session, reason)  -> Ok
"""

from __future__ import annotations

import hashlib

from ..net.codec import Bool, Bytes, List, Record, Registry, Text, UInt, field

DEFAULT_BROKER_PORT = 7451
BROKER = Registry("bpfs.broker", max_frame=16 << 10)

KEY_SIZE = 32
SIGNATURE_SIZE = 64
TOKEN_SIZE = 32
SESSION_SIZE = 16
SIDE_SIZE = 16
MAX_ADDRESSES = 8  # addresses in one announcement
MAX_VERIFIERS = 64  # partners one announcement can be found by
MAX_ADDRESS_TEXT = 64
MAX_BODY = 4096  # one mailbox message
MAX_MAILBOX_MESSAGES = 8  # per side
MAX_WAIT = 30  # seconds a MailboxGet may wait for a message
MAX_TTL = 3600  # seconds an announcement may live (the broker may cap lower)
ANNOUNCE_DOMAIN = b"bpfs/broker/announce/v1\x00"
_LOOKUP_DOMAIN = b"bpfs lookup v1"
_VERIFIER_PERSON = b"bpfs-verifier"


class Refusal:
    """Error codes (beyond the core ones) the broker replies with."""

    BAD_SIGNATURE = 32
    REPLAYED = 33  # seq not above the one the broker holds
    EXPIRED = 34  # expires in the past, or a mailbox/code that is gone
    NOT_FOUND = 35  # no announcement lists that token's verifier; no such mailbox
    LIMIT = 36  # a per-source, per-identity or global bound: the text says which and when to retry
    WRONG_BROKER = 37  # the record names another broker
    RELAY_REFUSED = 38  # relay cap reached, or the target is not connected


# --------------------------------------------------------------------------- derivations

def lookup_token(pair_key: bytes, target_public_key: bytes) -> bytes:
    """What a partner shows the broker to find `target`: only holders of `pair_key` can make it."""
    if len(pair_key) != 32 or len(target_public_key) != KEY_SIZE:
        raise ValueError("pair_key and target_public_key must be 32 bytes")
    return hashlib.blake2b(_LOOKUP_DOMAIN + target_public_key, key=pair_key, digest_size=TOKEN_SIZE).digest()


def verifier(token: bytes) -> bytes:
    """What the target announces for a token; the broker matches lookups against it."""
    return hashlib.blake2b(token, person=_VERIFIER_PERSON, digest_size=32).digest()


def announce_message(record: "AnnounceRecord") -> bytes:
    """The bytes an announcement's signature covers (the record's canonical encoding)."""
    return ANNOUNCE_DOMAIN + BROKER.encode(record)


def signed_announcement(identity, broker_public_key: bytes, seq: int, expires: float, addresses,
                        verifiers) -> "Announce":
    """`identity`'s announcement (signed by it: anything with `public_key` and `sign`) for the broker
    whose public key is `broker_public_key`."""
    record = AnnounceRecord(public_key=identity.public_key, broker_id=bytes(broker_public_key), seq=seq,
                            expires=int(expires), addresses=list(addresses), verifiers=list(verifiers))
    return Announce(record, identity.sign(announce_message(record)))


# --------------------------------------------------------------------------- messages

_ADDRESS = Text(MAX_ADDRESS_TEXT)
_NAMEPLATE = UInt(999_999, min=1)


@BROKER.message(0x10)
class Ok:
    pass


@BROKER.message(0x11)
class AnnounceRecord:
    public_key: bytes = field(Bytes(KEY_SIZE, min_len=KEY_SIZE))
    # the broker's Ed25519 public key, as its connection shows it (binds the record to that broker)
    broker_id: bytes = field(Bytes(32, min_len=32))
    seq: int = field(UInt())  # must grow with every announcement of this key
    expires: int = field(UInt())  # unix seconds
    addresses: list = field(List(_ADDRESS, MAX_ADDRESSES))  # "IP:PORT" the store listens on
    verifiers: list = field(List(Bytes(32, min_len=32), MAX_VERIFIERS))


@BROKER.message(0x12)
class Announce:
    record: AnnounceRecord = field(Record(AnnounceRecord))
    signature: bytes = field(Bytes(SIGNATURE_SIZE, min_len=SIGNATURE_SIZE))


@BROKER.message(0x13)
class Announced:
    observed: str = field(_ADDRESS)  # the address the broker sees this connection come from
    expires: int = field(UInt())  # when the broker forgets the record (may be before the asked time)


@BROKER.message(0x14)
class Lookup:
    token: bytes = field(Bytes(TOKEN_SIZE, min_len=TOKEN_SIZE))
    addresses: list = field(List(_ADDRESS, MAX_ADDRESSES))  # the asker's own, for the target to punch


@BROKER.message(0x15)
class Found:
    addresses: list = field(List(_ADDRESS, MAX_ADDRESSES))  # announced by the target
    observed: str = field(_ADDRESS)  # where the broker last saw the target's connection ("" if none)
    online: bool = field(Bool())  # the target holds a connection to the broker (it was told to punch)


@BROKER.message(0x16)
class RelayOpen:
    token: bytes = field(Bytes(TOKEN_SIZE, min_len=TOKEN_SIZE))


@BROKER.message(0x17)
class RelayOpened:
    session: bytes = field(Bytes(SESSION_SIZE, min_len=SESSION_SIZE))
    expires: int = field(UInt())  # unix seconds; the session also ends after idling


@BROKER.message(0x18)
class MailboxOpen:
    pass


@BROKER.message(0x19)
class MailboxOpened:
    nameplate: int = field(_NAMEPLATE)
    side: bytes = field(Bytes(SIDE_SIZE, min_len=SIDE_SIZE))
    expires: int = field(UInt())


@BROKER.message(0x1A)
class MailboxJoin:
    nameplate: int = field(_NAMEPLATE)


@BROKER.message(0x1B)
class MailboxJoined:
    side: bytes = field(Bytes(SIDE_SIZE, min_len=SIDE_SIZE))
    expires: int = field(UInt())


@BROKER.message(0x1C)
class MailboxPut:
    nameplate: int = field(_NAMEPLATE)
    side: bytes = field(Bytes(SIDE_SIZE, min_len=SIDE_SIZE))
    seq: int = field(UInt(MAX_MAILBOX_MESSAGES - 1))  # 0, 1, ... in order; a repeat is a no-op
    body: bytes = field(Bytes(MAX_BODY))


@BROKER.message(0x1D)
class MailboxGet:
    nameplate: int = field(_NAMEPLATE)
    side: bytes = field(Bytes(SIDE_SIZE, min_len=SIDE_SIZE))
    after: int = field(UInt(MAX_MAILBOX_MESSAGES))  # how many of the other side's messages we have
    wait: int = field(UInt(MAX_WAIT))  # seconds to wait when there is nothing new


@BROKER.message(0x1E)
class MailboxMessages:
    bodies: list = field(List(Bytes(MAX_BODY), MAX_MAILBOX_MESSAGES))  # the other side's, from `after` on


@BROKER.message(0x1F)
class MailboxClose:
    nameplate: int = field(_NAMEPLATE)
    side: bytes = field(Bytes(SIDE_SIZE, min_len=SIDE_SIZE))


@BROKER.message(0x20)
class Punch:
    observed: str = field(_ADDRESS)  # where the broker sees the asker
    addresses: list = field(List(_ADDRESS, MAX_ADDRESSES))  # what the asker announced


@BROKER.message(0x21)
class RelayOffer:
    session: bytes = field(Bytes(SESSION_SIZE, min_len=SESSION_SIZE))
    expires: int = field(UInt())


@BROKER.message(0x22)
class RelayClosed:
    session: bytes = field(Bytes(SESSION_SIZE, min_len=SESSION_SIZE))
    reason: str = field(Text(200))
