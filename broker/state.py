"""The broker's state machine: announcements, lookups, mailboxes and request rate limits.

Pure: no sockets, no tasks, time from an injected `now()` (unix seconds, so unit tests control
it and expiry times survive a restart). `broker.server` calls it with what it knows of the
connection (the source, i.e. the IP address or IPv6 /64; the peer id; the observed address) and
turns `Refused` into an `Error` reply. Every change is first written to the optional journal
(`broker.persist`, one transaction per change) and only then applied in memory, so a change the
disk cannot hold is refused, not half-made. Relay sessions live in `broker.relay`.

What it holds, and its bounds (all in `BrokerConfig`):

- announcements by public key (`max_records`; `max_keys_per_source` distinct keys per source;
  `max_verifiers` verifiers together), each lives until `min(record.expires, accepted +
  max_ttl)`; the verifier -> key index (one key per verifier).
- the highest seq of every key whose record is gone, for `seq_memory_ttl` (>= max_ttl) after it
  went, so that an old signed record cannot be replayed; at most `max_seq_memory` of them (the
  oldest dropped first).
- mailboxes by nameplate (`max_mailboxes`, `max_mailboxes_per_source`, `max_mailbox_bytes`),
  each for `code_ttl` from its opening; side secrets only as hashes.
- token buckets per (request kind, source) and (request kind, identity) (`rates`), at most
  `max_buckets` (least recently used dropped first, idle full ones by `expire()`). Joining a code
  is limited hardest (4 at once, then one per 10 minutes per source, by default): each join is
  one online guess at a live code's words, and uses that code up.

Verifiers and tokens are opaque here: a store makes them for this broker's public key and the
current UTC day (`bpfs.rendezvous.wire.LookupKey`), so a token seen at another broker, or on
another day, matches nothing this broker holds.

Refusal texts are one line a person can act on, and never carry a token, side, verifier or body.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import ipaddress
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from bpfs.identity import peer_id_bytes, verify_signature
from bpfs.net.codec import ErrorCode

from .config import BrokerConfig
from bpfs.rendezvous.wire import (KEY_SIZE, MAX_BODY, MAX_MAILBOX_MESSAGES, SIDE_SIZE, AnnounceRecord, Refusal, announce_message,
                       verifier)

_NAMEPLATE_MAX = 999_999  # the protocol's bound
_SIDE_PERSON = b"bpfs-broker-side"
_KIND_TEXT = {
    "announce": "announcements", "lookup": "lookups", "relay_open": "relay requests",
    "mailbox_open": "new codes", "mailbox_join": "attempts to join a code", "mailbox_io": "mailbox requests",
}
_KIND_WHY = {"mailbox_join": " (each is a guess at a code: limited so that guessing one is hopeless)"}


class Refused(Exception):
    """A request the broker refuses: `code` (a `Refusal` or `ErrorCode`) and a one-line `text`."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code
        self.text = text


class JournalFull(Exception):
    """The journal cannot hold a change (the LMDB map is full); the change is refused."""


STORAGE_FULL = "the broker's storage is full; retry in a few minutes"


# --------------------------------------------------------------------------- addresses

def _unmap(ip: ipaddress._BaseAddress) -> ipaddress._BaseAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def format_address(addr) -> str:
    """"IP:PORT" or "[v6]:PORT" of a socket address tuple (IPv4-mapped IPv6 shown as IPv4)."""
    try:
        ip = _unmap(ipaddress.ip_address(addr[0].split("%", 1)[0]))
    except (ValueError, TypeError, IndexError, AttributeError):
        return ""
    return f"[{ip}]:{addr[1]}" if ip.version == 6 else f"{ip}:{addr[1]}"


def source_key(host: str) -> str:
    """What per-source bounds count by: the IPv4 address, or the IPv6 /64 (one subscriber's
    prefix: an IPv6 host has as many addresses as it likes within it)."""
    try:
        ip = _unmap(ipaddress.ip_address(str(host).split("%", 1)[0]))
    except ValueError:
        return str(host)
    if ip.version == 6:
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def _retry_in(seconds: float) -> str:
    return f"retry in {max(1, math.ceil(seconds))} s"


# --------------------------------------------------------------------------- rate limits

class _Bucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def refill(self, now: float) -> None:
        if now > self.stamp:  # a clock stepping back refills nothing
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now


class Buckets:
    """Token buckets by key, least recently used dropped beyond `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self._buckets: collections.OrderedDict[tuple, _Bucket] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: tuple, rate: float, burst: float, now: float, n: float = 1.0) -> float:
        """0.0 if `n` tokens were taken, else the seconds until they would be there."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(rate, burst, now)
            while len(self._buckets) > self.limit:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket.rate, bucket.burst = rate, burst
            bucket.refill(now)
        if bucket.tokens >= n:
            bucket.tokens -= n
            return 0.0
        return (n - bucket.tokens) / rate

    def expire(self, now: float) -> int:
        """Drop the buckets that are full again (they hold nothing a new one would not)."""
        idle = []
        for key, b in self._buckets.items():
            b.refill(now)
            if b.tokens >= b.burst:
                idle.append(key)
        for key in idle:
            del self._buckets[key]
        return len(idle)


# --------------------------------------------------------------------------- records

@dataclass(frozen=True)
class Announcement:
    """An announcement the broker holds: the signed record as received, where it came from, and when
    the broker forgets it."""

    record: AnnounceRecord
    signature: bytes
    observed: str  # the announcing connection's address, "IP:PORT"
    source: str  # source_key of that address
    expires: float  # when the broker forgets it (capped by max_ttl)

    @property
    def key(self) -> bytes:
        return self.record.public_key


@dataclass(frozen=True)
class Mailbox:
    """A pairing-by-code mailbox: its number, the hashed side secrets, each side's messages and
    whether it closed; replaced whole on every change."""

    nameplate: int
    sides: tuple  # hashes of the side secrets: (opener,) or (opener, joiner)
    messages: tuple  # (opener's bodies, joiner's bodies), tuples of bytes
    closed: tuple  # (opener closed, joiner closed)
    source: str  # source_key of the opener (per-source bound)
    expires: float

    @property
    def joined(self) -> bool:
        return len(self.sides) == 2

    @property
    def size(self) -> int:
        return sum(len(b) for bodies in self.messages for b in bodies)

    @property
    def finished(self) -> bool:
        """Every side there is has closed: nothing more can happen."""
        return all(self.closed[:len(self.sides)])


@dataclass(frozen=True)
class SeqMemory:
    """The highest seq of a key whose record is gone, kept until `forget_at` against replays."""

    seq: int
    forget_at: float


@dataclass
class ExpiryReport:
    """What `BrokerState.expire` removed: how many of each, and the mailboxes that went."""

    announcements: int = 0
    seqs: int = 0
    buckets: int = 0
    mailboxes: list = field(default_factory=list)  # nameplates that went (their waiters should wake)


def hash_side(side: bytes) -> bytes:
    return hashlib.blake2b(side, digest_size=32, person=_SIDE_PERSON).digest()


Journal = Callable[[list], None]
"""`journal(ops)` writes ops in one transaction or raises `JournalFull`; an op is
(table, key, value or None to delete) with table "announcement" (key: public key, value:
Announcement), "seq" (public key, SeqMemory) or "mailbox" (nameplate, Mailbox)."""


# --------------------------------------------------------------------------- the state

class BrokerState:
    """The broker's rules and everything they hold (see the module docstring): `server` calls one method
    per request, `expire` periodically and `restore` at start."""

    def __init__(self, config: BrokerConfig, broker_public_key: bytes, *, now: Callable[[], float] = time.time,
                 journal: Journal | None = None):
        self.config = config
        # What an announcement's broker_id may be: the broker's public key (what the 32-byte field
        # holds), or its raw 20-byte peer id, should the field be narrowed to that.
        self._broker_ids = (bytes(broker_public_key), peer_id_bytes(broker_public_key))
        self.now = now
        self._journal = journal
        self._records: dict[bytes, Announcement] = {}
        self._full_scan_at = float("-inf")  # when announce() last swept expired records itself
        self._by_verifier: dict[bytes, bytes] = {}
        self._source_keys: dict[str, set[bytes]] = {}
        self._verifier_count = 0
        self._seqs: collections.OrderedDict[bytes, SeqMemory] = collections.OrderedDict()
        self._mailboxes: dict[int, Mailbox] = {}
        self._mailbox_sources: collections.Counter = collections.Counter()
        self._mailbox_bytes = 0
        self.buckets = Buckets(config.max_buckets)

    # ---- rate limits

    def check_rate(self, kind: str, source: str, identity: str) -> None:
        """Take one request of `kind` from the source's and the identity's buckets, or refuse."""
        rate = self.config.rates[kind]
        now = self.now()
        why = _KIND_WHY.get(kind, "")
        wait = self.buckets.take((kind, "s", source), rate.source_per_minute / 60, rate.source_burst, now)
        if wait:
            raise Refused(Refusal.LIMIT, f"too many {_KIND_TEXT[kind]} from this address{why}; {_retry_in(wait)}")
        wait = self.buckets.take((kind, "i", identity), rate.per_minute / 60, rate.burst, now)
        if wait:
            raise Refused(Refusal.LIMIT, f"too many {_KIND_TEXT[kind]} from this identity{why}; {_retry_in(wait)}")

    # ---- journal

    def _write(self, ops: list) -> None:
        if self._journal is None:
            return
        try:
            self._journal(ops)
        except JournalFull:
            raise Refused(Refusal.LIMIT, STORAGE_FULL) from None

    def _write_quietly(self, ops: list) -> None:
        """Deletions: memory is freed whether or not the disk follows (it is reloaded and
        re-expired at start)."""
        try:
            self._write(ops)
        except Refused:
            pass

    # ---- announcements

    def announce(self, record: AnnounceRecord, signature: bytes, *, source: str, identity: str,
                 observed: str) -> Announcement:
        """Accept a signed announcement (see the module docstring for every check)."""
        self.check_rate("announce", source, identity)
        now = self.now()
        key = record.public_key
        if record.broker_id not in self._broker_ids:
            raise Refused(Refusal.WRONG_BROKER, "this announcement is for another broker: sign it with this "
                          "broker's public key as broker_id")
        if record.expires <= now:
            raise Refused(Refusal.EXPIRED, "this announcement has expired already; check this machine's clock")
        if len(key) != KEY_SIZE or not verify_signature(key, announce_message(record), signature):
            raise Refused(Refusal.BAD_SIGNATURE, "the announcement's signature does not verify with its public key")
        old = self._live(key, now)
        held = old.record.seq if old is not None else self._held_seq(key, now)
        if held is not None and record.seq <= held:
            raise Refused(Refusal.REPLAYED, f"announcement seq {record.seq} is not above {held}, the one this "
                          "broker holds; announce with a higher seq")
        verifiers = set(record.verifiers)
        for v in verifiers:
            owner = self._by_verifier.get(v)
            # One key per verifier: the first live claim wins. A verifier is H(token) and the token
            # depends on the target's key, so two stores never share one honestly; letting a newer
            # claim replace the old one would let whoever learnt a partner's verifier (the partner
            # itself, a leak of this broker's state) make lookups for that store find another.
            if owner is not None and owner != key and self._live(owner, now) is not None:
                raise Refused(Refusal.LIMIT, "a partner verifier in this announcement is already listed by "
                              "another store; a verifier can find only one store")
        if old is None and len(self._records) >= self.config.max_records and now - self._full_scan_at >= 1.0:
            # expired ones that no sweep removed yet do not count; at most one scan a second, so a
            # flood of new keys at the cap costs a refusal each, not a scan of every record each
            self._full_scan_at = now
            self._expire_announcements(now)
        if old is None and len(self._records) >= self.config.max_records:
            raise Refused(Refusal.LIMIT, f"this broker holds its maximum of {self.config.max_records} "
                          "announcements; retry in a few minutes or use another broker")
        keys = self._source_keys.get(source, ())
        if key not in keys and len(keys) >= self.config.max_keys_per_source:
            raise Refused(Refusal.LIMIT, f"this address already announces {len(keys)} store keys, the most "
                          "allowed; retry after one of them expires")
        count = self._verifier_count - (len(set(old.record.verifiers)) if old else 0) + len(verifiers)
        if count > self.config.max_verifiers:
            raise Refused(Refusal.LIMIT, "this broker holds its maximum of partner verifiers; retry in a few "
                          "minutes or use another broker")
        ann = Announcement(record, bytes(signature), observed, source,
                           float(min(record.expires, now + self.config.max_ttl)))
        self._write([("announcement", key, ann), ("seq", key, None)])
        if old is not None:
            self._unindex(old)
        self._seqs.pop(key, None)
        self._index(ann)
        return ann

    def _index(self, ann: Announcement) -> None:
        key = ann.key
        self._records[key] = ann
        for v in set(ann.record.verifiers):
            self._by_verifier[v] = key
            self._verifier_count += 1
        self._source_keys.setdefault(ann.source, set()).add(key)

    def _unindex(self, ann: Announcement) -> None:
        key = ann.key
        del self._records[key]
        for v in set(ann.record.verifiers):
            if self._by_verifier.get(v) == key:
                del self._by_verifier[v]
            self._verifier_count -= 1
        keys = self._source_keys.get(ann.source)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._source_keys[ann.source]

    def _held_seq(self, key: bytes, now: float) -> int | None:
        mem = self._seqs.get(key)
        return mem.seq if mem is not None and mem.forget_at > now else None

    def _live(self, key: bytes, now: float) -> Announcement | None:
        """The key's announcement, expiring it first if its time has come."""
        ann = self._records.get(key)
        if ann is not None and ann.expires <= now:
            self._drop_announcement(ann, now)
            return None
        return ann

    def _drop_announcement(self, ann: Announcement, now: float) -> None:
        mem = SeqMemory(ann.record.seq, now + self.config.seq_memory_ttl)
        self._write_quietly([("announcement", ann.key, None), ("seq", ann.key, mem)])
        self._unindex(ann)
        self._remember_seq(ann.key, mem)

    def _expire_announcements(self, now: float) -> int:
        gone = [a for a in self._records.values() if a.expires <= now]
        for ann in gone:
            self._drop_announcement(ann, now)
        return len(gone)

    def _remember_seq(self, key: bytes, mem: SeqMemory) -> None:
        self._seqs.pop(key, None)
        self._seqs[key] = mem
        while len(self._seqs) > self.config.max_seq_memory:
            old, _ = self._seqs.popitem(last=False)
            self._write_quietly([("seq", old, None)])

    def announcement(self, key: bytes) -> Announcement | None:
        return self._live(key, self.now())

    def lookup(self, token: bytes, *, source: str, identity: str) -> Announcement:
        """The live announcement that lists `verifier(token)`, or `Refused(NOT_FOUND)`."""
        self.check_rate("lookup", source, identity)
        return self.find(token)

    def find(self, token: bytes) -> Announcement:
        """`lookup` without the rate limit (RelayOpen counts as its own kind)."""
        key = self._by_verifier.get(verifier(token))
        ann = self._live(key, self.now()) if key is not None else None
        if ann is None:
            raise Refused(Refusal.NOT_FOUND, "no store is announced here for this token (it is offline, has not "
                          "announced to this broker, or its announcement expired)")
        return ann

    # ---- mailboxes

    def mailbox_open(self, *, source: str, identity: str) -> tuple[Mailbox, bytes]:
        """A new mailbox and the opener's side secret."""
        self.check_rate("mailbox_open", source, identity)
        self._expire_mailboxes(self.now())
        cfg = self.config
        if len(self._mailboxes) >= cfg.max_mailboxes:
            raise Refused(Refusal.LIMIT, f"this broker holds its maximum of {cfg.max_mailboxes} open codes; retry "
                          "in a few minutes")
        if self._mailbox_sources[source] >= cfg.max_mailboxes_per_source:
            raise Refused(Refusal.LIMIT, f"this address has {self._mailbox_sources[source]} codes open, the most "
                          f"allowed; finish or cancel one, or {_retry_in(self._next_expiry(source))}")
        side = secrets.token_bytes(SIDE_SIZE)
        mb = Mailbox(self._free_nameplate(), (hash_side(side),), ((), ()), (False, False), source,
                     float(self.now() + cfg.code_ttl))
        self._write([("mailbox", mb.nameplate, mb)])
        self._mailboxes[mb.nameplate] = mb
        self._mailbox_sources[source] += 1
        return mb, side

    def _next_expiry(self, source: str) -> float:
        now = self.now()
        return min((mb.expires - now for mb in self._mailboxes.values() if mb.source == source), default=1.0)

    def _free_nameplate(self) -> int:
        top = min(_NAMEPLATE_MAX, max(100, 4 * len(self._mailboxes)))
        for _ in range(64):
            n = 1 + secrets.randbelow(top)
            if n not in self._mailboxes:
                return n
        free = [n for n in range(1, _NAMEPLATE_MAX + 1) if n not in self._mailboxes]  # never in practice
        return free[secrets.randbelow(len(free))]

    def mailbox_join(self, nameplate: int, *, source: str, identity: str) -> tuple[Mailbox, bytes]:
        """Join (and so use up) the mailbox; the joiner's side secret."""
        self.check_rate("mailbox_join", source, identity)
        mb = self._mailbox(nameplate)
        if mb.joined:
            raise Refused(Refusal.EXPIRED, "this code was used already (a code works once); ask for a new one")
        side = secrets.token_bytes(SIDE_SIZE)
        new = dataclasses.replace(mb, sides=(mb.sides[0], hash_side(side)))
        self._write([("mailbox", nameplate, new)])
        self._mailboxes[nameplate] = new
        return new, side

    def mailbox_put(self, nameplate: int, side: bytes, seq: int, body: bytes, *, source: str,
                    identity: str) -> bool:
        """Store message `seq` of this side; False if it was there already (a retry)."""
        self.check_rate("mailbox_io", source, identity)
        mb, i = self._mailbox_side(nameplate, side)
        mine = mb.messages[i]
        if len(body) > MAX_BODY:
            raise Refused(ErrorCode.REJECTED, f"a mailbox message may hold at most {MAX_BODY} bytes")
        if seq < len(mine):
            if mine[seq] == body:
                return False
            raise Refused(ErrorCode.REJECTED, f"message {seq} was put already with other content")
        if seq > len(mine):
            raise Refused(ErrorCode.REJECTED, f"message {seq} is out of order: put message {len(mine)} first")
        if seq >= MAX_MAILBOX_MESSAGES:
            raise Refused(Refusal.LIMIT, f"a side may put at most {MAX_MAILBOX_MESSAGES} messages")
        if self._mailbox_bytes + len(body) > self.config.max_mailbox_bytes:
            raise Refused(Refusal.LIMIT, "this broker's mailboxes are full; retry in a few minutes")
        messages = list(mb.messages)
        messages[i] = mine + (bytes(body),)
        new = dataclasses.replace(mb, messages=tuple(messages))
        self._write([("mailbox", nameplate, new)])
        self._mailboxes[nameplate] = new
        self._mailbox_bytes += len(body)
        return True

    def mailbox_get(self, nameplate: int, side: bytes, after: int, *, source: str, identity: str) -> list[bytes]:
        """The other side's messages from number `after` on (maybe none)."""
        self.check_rate("mailbox_io", source, identity)
        return self.mailbox_peek(nameplate, side, after)

    def mailbox_peek(self, nameplate: int, side: bytes, after: int) -> list[bytes]:
        """`mailbox_get` without the rate limit (a long poll looking again)."""
        mb, i = self._mailbox_side(nameplate, side)
        theirs = mb.messages[1 - i]
        if after > len(theirs):
            raise Refused(ErrorCode.REJECTED, f"after={after}, but the other side has put only {len(theirs)} messages")
        if after == len(theirs) and mb.closed[1 - i]:
            raise Refused(Refusal.EXPIRED, "the other side closed this mailbox")
        return list(theirs[after:])

    def mailbox_close(self, nameplate: int, side: bytes, *, source: str, identity: str) -> bool:
        """Close this side; the mailbox goes once every side closed. Closing an unknown
        mailbox, or twice, does nothing. True if the mailbox went."""
        self.check_rate("mailbox_io", source, identity)
        mb = self._mailboxes.get(nameplate)
        i = self._side_index(mb, side) if mb is not None else None
        if mb is None or i is None or mb.closed[i]:
            return False
        closed = list(mb.closed)
        closed[i] = True
        new = dataclasses.replace(mb, closed=tuple(closed))
        if new.finished:
            self._drop_mailbox(mb)
            return True
        self._write([("mailbox", nameplate, new)])
        self._mailboxes[nameplate] = new
        return False

    def mailbox_state(self, nameplate: int) -> Mailbox | None:
        return self._mailboxes.get(nameplate)

    def _mailbox(self, nameplate: int) -> Mailbox:
        mb = self._mailboxes.get(nameplate)
        if mb is not None and mb.expires <= self.now():
            self._drop_mailbox(mb)
            mb = None
        if mb is None:
            raise Refused(Refusal.NOT_FOUND, "no open mailbox has this number (mistyped, expired or cancelled); "
                          "ask for a new code")
        return mb

    @staticmethod
    def _side_index(mb: Mailbox, side: bytes) -> int | None:
        h = hash_side(bytes(side))
        found = None
        for i, s in enumerate(mb.sides):
            if hmac.compare_digest(s, h):
                found = i
        return found

    def _mailbox_side(self, nameplate: int, side: bytes) -> tuple[Mailbox, int]:
        mb = self._mailbox(nameplate)
        i = self._side_index(mb, side)
        if i is None:
            raise Refused(Refusal.NOT_FOUND, "no open mailbox has this number and side; ask for a new code")
        if mb.closed[i]:
            raise Refused(Refusal.EXPIRED, "this side closed the mailbox already")
        return mb, i

    def _drop_mailbox(self, mb: Mailbox) -> None:
        self._write_quietly([("mailbox", mb.nameplate, None)])
        del self._mailboxes[mb.nameplate]
        self._mailbox_bytes -= mb.size
        self._mailbox_sources[mb.source] -= 1
        if self._mailbox_sources[mb.source] <= 0:
            del self._mailbox_sources[mb.source]

    def _expire_mailboxes(self, now: float) -> list[int]:
        gone = [mb for mb in self._mailboxes.values() if mb.expires <= now]
        for mb in gone:
            self._drop_mailbox(mb)
        return [mb.nameplate for mb in gone]

    # ---- expiry and restart

    def expire(self) -> ExpiryReport:
        """Remove every expired piece of state: announcements, remembered seqs past their
        horizon, mailboxes, idle (full) rate buckets."""
        now = self.now()
        report = ExpiryReport()
        report.announcements = self._expire_announcements(now)
        gone = [k for k, mem in self._seqs.items() if mem.forget_at <= now]
        for key in gone:
            del self._seqs[key]
        if gone:
            self._write_quietly([("seq", key, None) for key in gone])
        report.seqs = len(gone)
        report.mailboxes = self._expire_mailboxes(now)
        report.buckets = self.buckets.expire(now)
        return report

    def restore(self, announcements: Iterable[Announcement], seqs: Iterable[tuple[bytes, SeqMemory]],
                mailboxes: Iterable[Mailbox]) -> dict:
        """Load what the journal held (at start): expired, unverifiable or conflicting entries are
        dropped (and deleted from the journal). Counts of what was kept."""
        now = self.now()
        ops: list = []
        for key, mem in seqs:
            if mem.forget_at > now and len(key) == KEY_SIZE:
                self._seqs[key] = mem
            else:
                ops.append(("seq", key, None))
        for key in [k for k, _ in sorted(self._seqs.items(), key=lambda kv: kv[1].forget_at)]:
            self._seqs.move_to_end(key)
        while len(self._seqs) > self.config.max_seq_memory:
            ops.append(("seq", self._seqs.popitem(last=False)[0], None))
        for ann in announcements:
            r = ann.record
            ok = (ann.expires > now and r.broker_id in self._broker_ids and ann.key not in self._records
                  and verify_signature(r.public_key, announce_message(r), ann.signature)
                  and not any(self._by_verifier.get(v, ann.key) != ann.key for v in r.verifiers))
            if ok:
                self._index(dataclasses.replace(ann, expires=min(ann.expires, now + self.config.max_ttl)))
                self._seqs.pop(ann.key, None)
                continue
            ops.append(("announcement", ann.key, None))
            held = self._seqs.get(ann.key)
            if ann.expires <= now and len(ann.key) == KEY_SIZE and (held is None or held.seq < r.seq):
                # expired while the broker was down: its seq is remembered as if a sweep had seen it go
                mem = SeqMemory(r.seq, ann.expires + self.config.seq_memory_ttl)
                if mem.forget_at > now:
                    self._remember_seq(ann.key, mem)
                    ops.append(("seq", ann.key, mem))
        for mb in mailboxes:
            if mb.expires > now and mb.nameplate not in self._mailboxes and not mb.finished:
                self._mailboxes[mb.nameplate] = mb
                self._mailbox_sources[mb.source] += 1
                self._mailbox_bytes += mb.size
            else:
                ops.append(("mailbox", mb.nameplate, None))
        if ops:
            self._write_quietly(ops)
        return {"announcements": len(self._records), "mailboxes": len(self._mailboxes), "seqs": len(self._seqs),
                "dropped": sum(1 for op in ops if op[2] is None)}

    def stats(self) -> dict:
        return {"announcements": len(self._records), "verifiers": self._verifier_count,
                "remembered_seqs": len(self._seqs), "mailboxes": len(self._mailboxes),
                "mailbox_bytes": self._mailbox_bytes, "buckets": len(self.buckets)}
