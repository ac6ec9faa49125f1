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
list of *verifiers*: `verifier = H(token)` for the lookup token of each partner that may look the
store up, for each epoch the record may be looked up in (`announced_epochs`). A token is bound to
the broker and to the time (`LookupKey`):

    token = BLAKE2b-256(key = secret, domain || broker public key || epoch (u64) || subject)

`secret` is 32 bytes only the partners share (the pair key made at pairing, with domain
"bpfs lookup v2" and subject the target's public key; or a recovery beacon's key, domain
"bpfs beacon v2" and no subject, see `beacon`), the broker's public key is the one its QUIC connection proves, and `epoch` is the UTC
day (`epoch_of`: unix time // EPOCH_SECONDS). So tokens and verifiers differ at every broker and
every day: one broker's records cannot be matched with another's, a token a broker (or a host
posing as an unpinned broker) saw is worthless at any other broker, and at this one once its day
is over (honest stores announce the verifiers of the days within CLOCK_SLACK of the record's
life only). The broker stores verifiers, not tokens, so an announcement does not let it (or
anyone it leaks to) look the store up, and it does not say who the partners are.

Lookups. `Lookup(token)`: the broker hashes the token and finds the one announcement listing that
verifier. Knowing the token proves the asker was given the secret, i.e. is the partner. The
broker then learns that the asker wants to reach the target, which the connection it helps set up
would reveal anyway; and within one day it can tell that lookups with the same token are the same
pair's.

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
mailbox up: no second joiner, ever; the broker limits joins per source hard, since each is a
guess at a code's words); the two exchange a handful of opaque messages through it
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

from ..net.codec import Bool, Bytes, List, Record, Registry, Text, UInt, field, message

DEFAULT_BROKER_PORT = 7451
BROKER = Registry("bpfs.broker", max_frame=16 << 10)

KEY_SIZE = 32
SIGNATURE_SIZE = 64
TOKEN_SIZE = 32
SESSION_SIZE = 16
SIDE_SIZE = 16
MAX_ADDRESSES = 8  # addresses in one announcement
MAX_VERIFIERS = 128  # verifiers in one announcement: 64 partners, each for two epochs near midnight
MAX_ADDRESS_TEXT = 64
MAX_BODY = 4096  # one mailbox message
MAX_MAILBOX_MESSAGES = 8  # per side
MAX_WAIT = 30  # seconds a MailboxGet may wait for a message
MAX_TTL = 3600  # seconds an announcement may live (the broker may cap lower)
ANNOUNCE_DOMAIN = b"bpfs/broker/announce/v1\x00"
LOOKUP_DOMAIN = b"bpfs lookup v2\x00"  # a pair's tokens (subject: the target's public key)
BEACON_DOMAIN = b"bpfs beacon v2\x00"  # a recovery beacon's tokens (subject: empty; see `beacon`)
EPOCH_SECONDS = 86400  # tokens rotate every UTC day
CLOCK_SLACK = 900  # seconds of clock difference between two stores that lookups tolerate
MAX_EPOCH = (1 << 64) - 1
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

def epoch_of(t: float) -> int:
    """The token epoch (UTC day) of unix time `t`."""
    return max(0, int(t // EPOCH_SECONDS))


def announced_epochs(now: float, ttl: float) -> list[int]:
    """The epochs an announcement made at `now` and living `ttl` seconds lists verifiers for:
    every day a partner's clock may be in while the record lives (CLOCK_SLACK either way), the
    current one first. One epoch most of the day, two near midnight."""
    first, last = epoch_of(now - CLOCK_SLACK), epoch_of(now + ttl + CLOCK_SLACK)
    current = epoch_of(now)
    return [current] + [e for e in range(first, last + 1) if e != current]


def lookup_token(secret: bytes, broker_key: bytes, epoch: int, subject: bytes = b"", *,
                 domain: bytes = LOOKUP_DOMAIN) -> bytes:
    """The token that finds, at the broker whose public key is `broker_key` and during `epoch`,
    the store that announces its verifier: only holders of `secret` can make it. A pair's token
    names the target by its public key (`subject`); a beacon's has its own domain and none."""
    if len(secret) != 32 or len(broker_key) != KEY_SIZE or not 0 <= epoch <= MAX_EPOCH or len(subject) > 64:
        raise ValueError("a lookup token needs a 32-byte secret, a 32-byte broker key and an epoch")
    if domain not in (LOOKUP_DOMAIN, BEACON_DOMAIN):
        raise ValueError("unknown lookup token domain")
    # fixed-size fields, and two domains neither of which is a prefix of the other: unambiguous
    data = domain + bytes(broker_key) + epoch.to_bytes(8, "big") + bytes(subject)
    return hashlib.blake2b(data, key=bytes(secret), digest_size=TOKEN_SIZE).digest()


def verifier(token: bytes) -> bytes:
    """What the target announces for a token; the broker matches lookups against it."""
    return hashlib.blake2b(token, person=_VERIFIER_PERSON, digest_size=32).digest()


class LookupKey:
    """What lets a store find a target through any broker on any day: the shared secret, and
    what the target's tokens name. `token(broker_key, epoch)` is what the seeker shows that broker;
    `verifiers(broker_key, epochs)` what the target announces there."""

    __slots__ = ("secret", "subject", "domain")

    def __init__(self, secret: bytes, subject: bytes = b"", *, domain: bytes = LOOKUP_DOMAIN):
        lookup_token(secret, b"\0" * KEY_SIZE, 0, subject, domain=domain)  # checks the arguments
        self.secret, self.subject, self.domain = bytes(secret), bytes(subject), domain

    def __repr__(self) -> str:
        return "<LookupKey>"  # never the secret

    def token(self, broker_key: bytes, epoch: int) -> bytes:
        return lookup_token(self.secret, broker_key, epoch, self.subject, domain=self.domain)

    def verifiers(self, broker_key: bytes, epochs) -> list[bytes]:
        return [verifier(self.token(broker_key, e)) for e in epochs]


def pair_lookup_key(pair_key: bytes, target_public_key: bytes) -> LookupKey:
    """How a partner finds `target` (and `target` is found): the pair key and the target's key."""
    if len(target_public_key) != KEY_SIZE:
        raise ValueError("target_public_key must be 32 bytes")
    return LookupKey(pair_key, target_public_key)


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


@message(BROKER, 0x10)
class Ok:
    """The empty reply: to `MailboxPut` and `MailboxClose` from the broker, and from a store to the
    broker's pushes (`Punch`, `RelayOffer`, `RelayClosed`)."""


@message(BROKER, 0x11)
class AnnounceRecord:
    """What a store announces and signs (see Announcements above): never sent alone, but inside
    `Announce`; its frame, after ANNOUNCE_DOMAIN, is what the signature covers (`announce_message`)."""

    public_key: bytes = field(Bytes(KEY_SIZE, min_len=KEY_SIZE))
    # the broker's Ed25519 public key, as its connection shows it (binds the record to that broker)
    broker_id: bytes = field(Bytes(32, min_len=32))
    seq: int = field(UInt())  # must grow with every announcement of this key
    expires: int = field(UInt())  # unix seconds
    addresses: list = field(List(_ADDRESS, MAX_ADDRESSES))  # "IP:PORT" the store listens on
    verifiers: list = field(List(Bytes(32, min_len=32), MAX_VERIFIERS))


@message(BROKER, 0x12)
class Announce:
    """Sent by a store's broker client on its broker connection, and again before the record expires
    or when its addresses or partners change. Reply: `Announced`, or a refusal (signature, seq, limits)."""

    record: AnnounceRecord = field(Record(AnnounceRecord))
    signature: bytes = field(Bytes(SIGNATURE_SIZE, min_len=SIGNATURE_SIZE))


@message(BROKER, 0x13)
class Announced:
    """The broker's reply to `Announce`: where it sees the store, and when it forgets the record."""

    observed: str = field(_ADDRESS)  # the address the broker sees this connection come from
    expires: int = field(UInt())  # when the broker forgets the record (may be before the asked time)


@message(BROKER, 0x14)
class Lookup:
    """Sent by a store that wants to reach a partner (the dialer) or a recovery looking for beacons:
    who announced this token's verifier? The broker has a connected target `Punch`. Reply: `Found`."""

    token: bytes = field(Bytes(TOKEN_SIZE, min_len=TOKEN_SIZE))
    addresses: list = field(List(_ADDRESS, MAX_ADDRESSES))  # the asker's own, for the target to punch


@message(BROKER, 0x15)
class Found:
    """The broker's reply to `Lookup`: the target's announced addresses, where the broker sees it,
    and whether it is connected (and so was told to punch); `Error(NOT_FOUND)` instead if none."""

    addresses: list = field(List(_ADDRESS, MAX_ADDRESSES))  # announced by the target
    observed: str = field(_ADDRESS)  # where the broker last saw the target's connection ("" if none)
    online: bool = field(Bool())  # the target holds a connection to the broker (it was told to punch)


@message(BROKER, 0x16)
class RelayOpen:
    """Sent by a store (or a recovery) when no direct path to the partner answered: a relay session
    to the store that announced this token's verifier. Reply: `RelayOpened`, or `Error(RELAY_REFUSED)`."""

    token: bytes = field(Bytes(TOKEN_SIZE, min_len=TOKEN_SIZE))


@message(BROKER, 0x17)
class RelayOpened:
    """The broker's reply to `RelayOpen`: the asker's session id for its relay frames, sent once
    the target has taken the `RelayOffer`."""

    session: bytes = field(Bytes(SESSION_SIZE, min_len=SESSION_SIZE))
    expires: int = field(UInt())  # unix seconds; the session also ends after idling


@message(BROKER, 0x18)
class MailboxOpen:
    """Sent by the store that makes a pairing code: open a mailbox. Reply: `MailboxOpened`."""


@message(BROKER, 0x19)
class MailboxOpened:
    """The reply to `MailboxOpen`: the mailbox's number (the code's first part), the opener's side
    secret and when the mailbox expires."""

    nameplate: int = field(_NAMEPLATE)
    side: bytes = field(Bytes(SIDE_SIZE, min_len=SIDE_SIZE))
    expires: int = field(UInt())


@message(BROKER, 0x1A)
class MailboxJoin:
    """Sent by the store given a pairing code: join the mailbox with this number, using it up.
    Reply: `MailboxJoined`, or a refusal (no such mailbox, already joined, join rate)."""

    nameplate: int = field(_NAMEPLATE)


@message(BROKER, 0x1B)
class MailboxJoined:
    """The reply to `MailboxJoin`: the joiner's side secret and when the mailbox expires."""

    side: bytes = field(Bytes(SIDE_SIZE, min_len=SIDE_SIZE))
    expires: int = field(UInt())


@message(BROKER, 0x1C)
class MailboxPut:
    """Either side of a code pairing leaves its next message (number `seq`) for the other side.
    Reply: `Ok`."""

    nameplate: int = field(_NAMEPLATE)
    side: bytes = field(Bytes(SIDE_SIZE, min_len=SIDE_SIZE))
    seq: int = field(UInt(MAX_MAILBOX_MESSAGES - 1))  # 0, 1, ... in order; a repeat is a no-op
    body: bytes = field(Bytes(MAX_BODY))


@message(BROKER, 0x1D)
class MailboxGet:
    """Either side of a code pairing asks for the other side's messages from number `after` on,
    waiting up to `wait` seconds for one. Reply: `MailboxMessages`."""

    nameplate: int = field(_NAMEPLATE)
    side: bytes = field(Bytes(SIDE_SIZE, min_len=SIDE_SIZE))
    after: int = field(UInt(MAX_MAILBOX_MESSAGES))  # how many of the other side's messages we have
    wait: int = field(UInt(MAX_WAIT))  # seconds to wait when there is nothing new


@message(BROKER, 0x1E)
class MailboxMessages:
    """The reply to `MailboxGet`: the other side's messages from `after` on, as many as fit in a
    frame (none if the wait ran out); `Error(EXPIRED)` instead once that side closed with nothing more."""

    bodies: list = field(List(Bytes(MAX_BODY), MAX_MAILBOX_MESSAGES))  # the other side's, from `after` on


@message(BROKER, 0x1F)
class MailboxClose:
    """Either side of a code pairing is done with the mailbox (paired, failed or cancelled); it goes
    once both sides closed. Reply: `Ok`."""

    nameplate: int = field(_NAMEPLATE)
    side: bytes = field(Bytes(SIDE_SIZE, min_len=SIDE_SIZE))


@message(BROKER, 0x20)
class Punch:
    """Pushed by the broker to a connected store when a partner looks it up: send a few datagrams to
    these addresses of the asker, to open the NATs' mappings. Reply: `Ok`."""

    observed: str = field(_ADDRESS)  # where the broker sees the asker
    addresses: list = field(List(_ADDRESS, MAX_ADDRESSES))  # what the asker announced


@message(BROKER, 0x21)
class RelayOffer:
    """Pushed by the broker to the target of a `RelayOpen`, before the asker gets its reply: accept
    relay frames of this session until `expires`. Reply: `Ok`."""

    session: bytes = field(Bytes(SESSION_SIZE, min_len=SESSION_SIZE))
    expires: int = field(UInt())


@message(BROKER, 0x22)
class RelayClosed:
    """Pushed by the broker to each side of a relay session when it ends (idle, expired, cap
    reached, a side gone): stop using it. Reply: `Ok`."""

    session: bytes = field(Bytes(SESSION_SIZE, min_len=SESSION_SIZE))
    reason: str = field(Text(200))
