"""Where a recovery finds our data: the partners that hold it, reached without the lost drive.

Owns, for `recovery` (and `bpfs recover --list`), reaching partners from what a recovery knows:
  - addresses given with `--from` (each may be a partner: `--expect` pins the peer id of one);
  - the recovery beacons a broker answers for (`rendezvous.beacon`: lookup keys only the
    recovery secret derives, one per slot, whose tokens are made for the broker connected and
    today, as every lookup token is: `rendezvous.wire.LookupKey`), with hole punching and the
    broker's relay as the partners' own connections use them (`rendezvous.dialer.dial_first`);
  - once a root is open, the partner list its manifest carries (peer ids, addresses, pair keys).
A reached partner is a `Source`: who it is, how it was found, what it serves (usage figures, the
roots it holds, its complete packs with their digests) and one connection to it, redialled with
backoff and jitter when it drops (`Source.call` raises `SourceDown` for the caller to retry,
`Source.ensure` gives up with `SourceGone` after GIVE_UP_AFTER seconds of failed dials).

Trust: a connection proves the peer's identity, nothing more. Whoever answers at an address or a
beacon must still prove it holds our roots (they are signed by our key, which only the recovery
secret derives: `recovery` checks that), and a partner from a manifest's list must be the peer id
the list names. The broker is asked for lookups and relays only: a recovery never announces
itself there (the old store, or the very store being drilled with `--list`, may still be
announcing under the same identity). A partner takes a recovery's connection for its link to us
(it proves our identity): whatever it asks over it (its own uploads, audits) is refused at once,
so that none of it fills the flow-control window the recovery's downloads need. Nothing here
writes to disk.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import time
from dataclasses import dataclass

import trio

from ..config import DEFAULT_PORT, BrokerAddress, format_address
from ..net.codec import ProtocolError
from ..net.quic import RelayPath, TransportError
from ..net.rpc import Dispatcher, RemoteError, request
from ..rendezvous import wire as B
from ..rendezvous.beacon import SLOTS, beacon_key, beacon_lookup_key
from ..rendezvous.brokers import BrokerUnavailable, dial_broker
from ..rendezvous.dialer import (DIRECT_TIMEOUT, PUNCH_WINDOW, RELAY_TIMEOUT, NoRoute, dial_first, lookup_key_for,
                                 parse_addresses)
from . import protocol as P

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 60.0  # one request (a 1 MiB piece at most); a dead peer is noticed sooner (idle timeout)
BROKER_TIMEOUT = 10.0
BROKER_RETRY = 30.0  # after every broker failed to answer, wait this long before trying them again
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 20.0  # redialling a partner whose connection dropped (jittered)
GIVE_UP_AFTER = 75.0  # seconds of failed redials before a partner counts as gone for this run
BEACON_WAIT = 5.0  # seconds the broker's beacons get once a partner given by address answered


_REFUSING = Dispatcher(P.PARTNER, rate=100.0, burst=200.0,
                       admit=lambda conn, type_id, length: "a recovery of this store is in progress (bpfs recover): "
                                                           "it serves nothing")


class SourceDown(TransportError):
    """The connection to a partner failed under a request (it is redialled by the next call)."""


class SourceGone(TransportError):
    """A partner could not be reached again within GIVE_UP_AFTER seconds."""


@dataclass(frozen=True)
class RootRow:
    """One root a partner lists for us (unverified until fetched and opened)."""

    generation: int
    size: int
    digest: bytes
    created: int  # ns since the epoch, as the root's header says
    released: bool  # released by the owner: the partner keeps it for its grace period only


class Lookups:
    """Broker lookups and relays for a recovery, on the recovery's own endpoint (so hole punching
    and relay frames use the socket the partner connections use). Never announces. Tokens are
    made from lookup keys for the broker connected and the epoch of `now` (unix seconds)."""

    def __init__(self, endpoint, brokers: list[BrokerAddress], nursery, now=time.time):
        self._now = now
        self.endpoint = endpoint
        self.brokers = list(brokers)
        self.nursery = nursery
        self.conn = None
        self.broker: BrokerAddress | None = None
        self.address: tuple[str, int] | None = None
        self.error: str | None = None
        self._failed_at: float | None = None
        self._lock = trio.Lock()
        self._dispatcher = Dispatcher(B.BROKER, rate=50.0, burst=100.0)
        self._dispatcher.handler(B.RelayClosed)(self._on_relay_closed)

    @property
    def configured(self) -> bool:
        return bool(self.brokers)

    async def connection(self):
        async with self._lock:
            if self.conn is not None and not self.conn.closed:
                return self.conn
            if not self.brokers:
                raise BrokerUnavailable("no broker configured")
            if self._failed_at is not None and trio.current_time() - self._failed_at < BROKER_RETRY:
                raise BrokerUnavailable(self.error or "no broker reachable")
            errors = []
            for broker in self.brokers:
                try:
                    conn, address = await dial_broker(self.endpoint, broker, timeout=BROKER_TIMEOUT)
                except BrokerUnavailable as e:
                    errors.append(str(e))
                    continue
                except (OSError, TransportError) as e:
                    errors.append(f"{broker}: {e or type(e).__name__}")
                    continue
                self.conn, self.broker, self.address = conn, broker, address
                self._failed_at = self.error = None
                self.nursery.start_soon(self._serve, conn)
                return conn
            self._failed_at = trio.current_time()
            self.error = "; ".join(errors)  # each names its broker and what happened
            raise BrokerUnavailable(self.error)

    async def _serve(self, conn) -> None:
        try:
            await self._dispatcher.serve_connection(conn)
        except (TransportError, ProtocolError):
            pass

    async def _on_relay_closed(self, conn, msg: B.RelayClosed):
        self.endpoint.remove_relay_session(bytes(msg.session))
        return B.Ok()

    def _token(self, conn, key: B.LookupKey) -> bytes:
        return key.token(conn.peer_public_key, B.epoch_of(self._now()))

    async def lookup(self, key: B.LookupKey) -> B.Found:
        conn = await self.connection()
        return await request(conn, B.Lookup(self._token(conn, key), []), registry=B.BROKER, timeout=BROKER_TIMEOUT)

    async def open_relay(self, key: B.LookupKey) -> RelayPath:
        conn = await self.connection()
        reply = await request(conn, B.RelayOpen(self._token(conn, key)), registry=B.BROKER, timeout=BROKER_TIMEOUT)
        assert self.address is not None  # set with the connection
        path = RelayPath(self.address[0], self.address[1], bytes(reply.session))
        self.endpoint.add_relay_session(path)
        return path


def split_host_port(text: str) -> tuple[str, int]:
    """"HOST:PORT", "[v6]:PORT" or "HOST" (a name or an IP literal) -> (host, port); ValueError."""
    text = text.strip()
    host, port = text, str(DEFAULT_PORT)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(text)
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif text.count(":") > 1:
        ipaddress.ip_address(text)  # a bare IPv6 literal
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(text)
    return host, int(port)


async def _resolve(endpoint, texts) -> tuple[list, list[str]]:
    """(ip, port) of each "HOST:PORT" (names resolved in the endpoint's address family), and why
    the others could not be used."""
    family = socket.AF_INET6 if ":" in endpoint.local_address[0] else socket.AF_INET
    out, errors, parsed = [], [], []
    for text in texts:
        try:
            parsed.append(split_host_port(text))
        except ValueError:
            errors.append(f"not an address: {text!r}")
    for host, port in parsed:
        try:
            ipaddress.ip_address(host)
            found = [(host, port)]
        except ValueError:
            try:
                infos = await trio.socket.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
            except OSError as e:
                errors.append(f"{host}: {e.strerror or e}")
                continue
            # (typeshed's sockaddr has an int first for a Python built without IPv6; never here)
            found = [(i[4][0], i[4][1]) for i in infos]  # type: ignore[misc]
        out += [a for a in found if a not in out]
    return out, errors


class Source:
    """One partner a recovery reads from.

    Attributes:
      found: how it was found ("--from ADDR", "beacon N", "partner list").
      addresses: where to dial it; key: our broker lookup key for it (None: no broker help).
      expect: the peer id it must prove (None: anyone, who must then prove to hold our roots).
      peer_id, public_key (hex): who answered (set once connected; every redial must prove it).
      address: where the last connection went ("relay ..." through the broker).
      slot: the beacon slot it answered (None: not found by a beacon).
      listed: its row in a manifest's partner list (None: not listed in the one opened).
      usage: its `UsageReply`; roots: generation -> RootRow; packs: pack id -> (size, digest) of
        the complete packs it lists (None until listed).
      dead: it stayed unreachable for GIVE_UP_AFTER seconds: not used again this run.
      error: the last failure, for messages.
    """

    def __init__(self, endpoint, lookups: Lookups | None, *, found: str, addresses=(), key: B.LookupKey | None = None,
                 expect: str | None = None, slot: int | None = None, listed: dict | None = None,
                 rng: random.Random | None = None, on_connect=lambda conn: None):
        self.endpoint = endpoint
        self.on_connect = on_connect
        self.lookups = lookups
        self.found = found
        self.addresses = list(addresses)
        self.key = key
        self.expect = expect
        self.slot = slot
        self.listed = listed
        self._peer_id: str | None = None  # see `peer_id`
        self.public_key: str | None = None
        self.address: str | None = None
        self.conn = None
        self.usage = None
        self.roots: dict[int, RootRow] = {}
        self.packs: dict[int, tuple[int, bytes]] | None = None
        self.dead = False
        self.error: str | None = None
        self.redials = 0
        self.announced = False  # a broker knows where it is (its lookup key's token is announced)
        self._down_since: float | None = None
        self._lock = trio.Lock()
        self._rng = rng or random.Random()

    def __repr__(self) -> str:
        return f"<Source {self.name}>"

    @property
    def peer_id(self) -> str:
        """The peer id it proved on connecting: every source a `Finder` keeps (and what reads from
        those) has one."""
        if self._peer_id is None:
            raise RuntimeError(f"{self.found}: never connected, so no peer id yet")
        return self._peer_id

    @property
    def name(self) -> str:
        """The peer id once known, else how it was found."""
        return self._peer_id or self.found

    @property
    def connected(self) -> bool:
        return self.conn is not None and not self.conn.closed

    # ----- connecting ---------------------------------------------------------------------------
    async def _dial(self):
        expected = self._peer_id or self.expect
        direct, bad = await _resolve(self.endpoint, self.addresses)
        relay, note = False, "".join(f" ({e})" for e in bad)
        if self.key is not None and self.lookups is not None and self.lookups.configured:
            try:
                found = await self.lookups.lookup(self.key)
                self.announced = True
                direct += [a for a in parse_addresses([found.observed, *found.addresses]) if a not in direct]
                relay = found.online
                if not found.online:
                    note = " (not connected to the broker)"
            except RemoteError as e:
                note = f" (broker: {e.message})"
            except (BrokerUnavailable, TransportError, ProtocolError, trio.TooSlowError) as e:
                note = f" (broker: {e or type(e).__name__})"
        error = "no address known" + note
        if direct:
            try:
                conn = await dial_first(self.endpoint, direct, expected, PUNCH_WINDOW if relay else DIRECT_TIMEOUT)
                self.address = format_address(conn.remote_address)
                return conn
            except NoRoute as e:
                error = f"{e}{note}"
        if relay:
            try:
                path = await self.lookups.open_relay(self.key)
            except RemoteError as e:
                raise NoRoute(f"{error}; relay refused: {e.message}") from None
            except (BrokerUnavailable, TransportError, ProtocolError, trio.TooSlowError) as e:
                raise NoRoute(f"{error}; relay failed: {e or type(e).__name__}") from None
            try:
                conn = await dial_first(self.endpoint, [path], expected, RELAY_TIMEOUT)
            except NoRoute as e:
                self.endpoint.remove_relay_session(path.session)
                raise NoRoute(f"{error}; through the relay: {e}") from None
            self.address = str(path)
            return conn
        raise NoRoute(error)

    async def connect_once(self) -> None:
        """The first connection (discovery): one attempt, no backoff. Raises NoRoute."""
        async with self._lock:
            conn = await self._dial()
            self._adopt(conn)

    def _adopt(self, conn) -> None:
        if self._peer_id is None:
            self._peer_id = conn.peer_id
            self.public_key = conn.peer_public_key.hex()
        self.conn = conn
        self._down_since = None
        self.on_connect(conn)

    async def ensure(self):
        """The live connection, redialled with backoff while it is down; SourceGone when this
        partner stayed unreachable for GIVE_UP_AFTER seconds (it is then dead for this run)."""
        if self.connected:
            return self.conn
        if self.dead:
            raise SourceGone(f"{self.name} is unreachable: {self.error}")
        async with self._lock:
            if self.connected:
                return self.conn
            if self._down_since is None:
                self._down_since = trio.current_time()
            delay = BACKOFF_FIRST
            while True:
                try:
                    conn = await self._dial()
                except (NoRoute, TransportError, OSError, trio.TooSlowError) as e:
                    self.error = str(e) or type(e).__name__
                else:
                    self.redials += 1
                    self._adopt(conn)
                    log.info("reconnected to %s (%s)", self.name, self.address)
                    return conn
                wait = delay * (0.5 + self._rng.random())
                if trio.current_time() + wait - self._down_since > GIVE_UP_AFTER:
                    self.dead = True
                    raise SourceGone(f"{self.name} is unreachable: {self.error}")
                await trio.sleep(wait)
                delay = min(BACKOFF_MAX, delay * 2)

    def down(self, conn, why: str) -> None:
        """The connection `conn` failed: forget it (the next call redials)."""
        if self.conn is conn and conn is not None:
            self.conn = None
            if self._down_since is None:
                self._down_since = trio.current_time()
            self.error = why
            conn.close(reason="request failed")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close(reason="recovery done")
            self.conn = None

    # ----- requests ----------------------------------------------------------------------------
    async def call(self, msg, timeout: float = REQUEST_TIMEOUT):
        """One request on the connection (redialled first if down). RemoteError: the partner
        refused; SourceDown: the connection failed (the caller may retry); SourceGone."""
        conn = await self.ensure()
        try:
            return await request(conn, msg, registry=P.PARTNER, timeout=timeout)
        except RemoteError:
            raise  # a refusal: the connection is fine
        except (TransportError, ProtocolError, trio.TooSlowError) as e:
            why = str(e) or type(e).__name__
            self.down(conn, why)
            raise SourceDown(f"{self.name}: {why}") from None

    async def list_roots(self) -> dict[int, RootRow]:
        rows: dict[int, RootRow] = {}
        after = 0
        while True:
            reply = await self.call(P.ListRoots(after, P.MAX_IDS))
            if not (len(reply.generations) == len(reply.sizes) == len(reply.digests) == len(reply.created)
                    == len(reply.released)):
                raise SourceDown(f"{self.name}: its root listing does not match itself")
            for g, size, digest, created, released in zip(reply.generations, reply.sizes, reply.digests,
                                                         reply.created, reply.released):
                rows[g] = RootRow(g, size, bytes(digest), created, bool(released))
            if len(reply.generations) < P.MAX_IDS:
                break
            after = reply.generations[-1]
        self.roots = rows
        return rows

    async def list_packs(self) -> dict[int, tuple[int, bytes]]:
        """pack id -> (size, digest) of the complete packs it holds for us."""
        held: dict[int, tuple[int, bytes]] = {}
        after = 0
        while True:
            reply = await self.call(P.ListHeld(P.PACK, after, P.MAX_IDS))
            if not len(reply.ids) == len(reply.sizes) == len(reply.complete) == len(reply.digests):
                raise SourceDown(f"{self.name}: its pack listing does not match itself")
            for pid, size, done, digest in zip(reply.ids, reply.sizes, reply.complete, reply.digests):
                if done:
                    held[pid] = (size, bytes(digest))
            if len(reply.ids) < P.MAX_IDS:
                break
            after = reply.ids[-1]
        self.packs = held
        return held

    async def fetch_object(self, kind: int, obj_id: int, size: int) -> bytes:
        """A whole (small) object: a root. Short or refused copies raise RemoteError/ValueError."""
        out = bytearray()
        while len(out) < size:
            reply = await self.call(P.GetPiece(kind, obj_id, len(out), min(P.PIECE, size - len(out))))
            if not reply.data:
                raise ValueError(f"its copy of {'root' if kind == P.ROOT else 'pack'} {obj_id} is short")
            out += reply.data
        return bytes(out)

    def newest_root(self) -> RootRow | None:
        live = [r for r in self.roots.values() if not r.released]
        return max(live, key=lambda r: r.generation) if live else None


class Finder:
    """Reaches partners and keeps them as `sources` (peer id -> Source).

    Attributes:
      sources: the partners that answered as ours (they know our identity), by peer id.
      failures: one line per attempt that found nobody usable (for the final error).
    """

    def __init__(self, keys, endpoint, lookups: Lookups | None, nursery, *, warn=lambda line: None):
        self.keys = keys
        self.endpoint = endpoint
        self.lookups = lookups
        self.nursery = nursery
        self.warn = warn
        self.sources: dict[str, Source] = {}
        self.failures: list[str] = []
        self._own = keys.identity.peer_id
        self._tried: set[str] = set()  # peer ids from partner lists already dialled
        self.why: dict[str, str] = {}  # peer id -> why it could not be reached

    def live(self) -> list[Source]:
        return [s for s in self.sources.values() if not s.dead]

    def _source(self, **kw) -> Source:
        return Source(self.endpoint, self.lookups, on_connect=self._refuse_requests, **kw)

    def _refuse_requests(self, conn) -> None:
        """The partner takes our connection for its link to us (we have our identity): what it asks
        of us (its uploads, audits) is refused at once, so that nothing it sends takes up the
        connection's flow-control window our downloads need."""
        async def serve():
            try:
                await _REFUSING.serve_connection(conn)
            except (TransportError, ProtocolError):
                pass

        self.nursery.start_soon(serve)

    async def find(self, froms: list[str], expect: str | None) -> None:
        """Dial every `--from` address and, with a broker, look up every beacon slot, at once. Once
        the `--from` partners answered, the beacons get BEACON_WAIT seconds more, not the broker's
        and the dials' full timeouts."""
        direct = [self._source(found=f"--from {a}", addresses=[a], expect=expect if len(froms) == 1 else None)
                  for a in froms]
        beacons = []
        if self.lookups is not None and self.lookups.configured:
            beacons = [self._source(found=f"beacon {slot}", key=beacon_lookup_key(beacon_key(self.keys, slot)),
                                    slot=slot)
                       for slot in range(SLOTS)]
        scope = trio.CancelScope()

        async def look_up():
            with scope:
                await self._open_all(beacons)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(look_up)
            await self._open_all(direct)
            if self.sources:
                scope.deadline = min(scope.deadline, trio.current_time() + BEACON_WAIT)
        if self.lookups is not None and self.lookups.error and not any(s.slot is not None for s in self.live()):
            self.failures.append(f"broker: {self.lookups.error}")

    async def add_partner_list(self, rows: list[dict], wait: float | None = None) -> list[Source]:
        """Reach the partners a manifest lists that were not reached or tried yet, for at most
        `wait` seconds (None: as long as dialling takes); the new sources."""
        candidates = []
        for row in rows:
            peer = row.get("peer_id")
            if not isinstance(peer, str) or peer == self._own:
                continue
            known = self.sources.get(peer)
            if known is not None:
                known.listed = row
                continue
            if peer in self._tried:
                continue
            self._tried.add(peer)
            addresses = [a for a in (row.get("address"), row.get("observed")) if isinstance(a, str) and a]
            key = None
            try:
                if row.get("pair_key") and row.get("public_key"):
                    key = lookup_key_for(row["pair_key"], row["public_key"])
            except (ValueError, TypeError):
                key = None
            candidates.append(self._source(found="partner list", addresses=addresses, key=key, expect=peer,
                                           listed=row))
        before = set(self.sources)
        with trio.move_on_after(wait if wait is not None else float("inf")) as scope:
            await self._open_all(candidates)
        if scope.cancelled_caught:
            for c in candidates:
                if c._peer_id not in self.sources and c.expect is not None:  # (each expects its row's peer)
                    self.why.setdefault(c.expect, f"no answer within {wait:.0f} s")
                    self.failures.append(f"partner list: {c.expect}: no answer within {wait:.0f} s")
        return [s for p, s in self.sources.items() if p not in before]

    async def _open_all(self, candidates: list[Source]) -> None:
        async with trio.open_nursery() as nursery:
            for c in candidates:
                nursery.start_soon(self._open, c)

    async def _open(self, c: Source) -> None:
        try:
            await c.connect_once()
        except (NoRoute, TransportError, OSError, trio.TooSlowError) as e:
            if c.slot is None or c.announced:  # an empty beacon slot is no failure
                self.failures.append(f"{c.found}: {_short(e)}")
            if c.expect:
                self.why[c.expect] = _short(e)
            return
        peer = c.peer_id
        if peer == self._own:
            self.failures.append(f"{c.found}: that is this store's own identity (the original store, still running?)")
            c.close()
            return
        if peer in self.sources:  # the same partner by two routes: keep the first
            known = self.sources[peer]
            if known.slot is None:
                known.slot = c.slot
            c.close()
            return
        self.sources[peer] = c
        ok = False
        try:
            c.usage = await c.call(P.Usage())
            await c.list_roots()
            ok = True
        except RemoteError as e:
            self.failures.append(f"{c.found}: {peer} refused: {e.message}")
            self.why[peer] = f"refused: {e.message}"
        except (SourceDown, SourceGone) as e:
            self.failures.append(f"{c.found}: {_short(e)}")
            self.why[peer] = _short(e)
        finally:
            if not ok:  # (cancelled too: not waited for)
                self.sources.pop(peer, None)
                c.close()

    def drop(self, peer: str, why: str) -> None:
        s = self.sources.pop(peer, None)
        if s is not None:
            s.close()
            self.failures.append(f"{s.found}: {peer} {why}")

    def close(self) -> None:
        for s in self.sources.values():
            s.close()


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
