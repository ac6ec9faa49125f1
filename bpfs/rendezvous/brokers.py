"""Brokers, from a store's side: which ones, and the one connection the store keeps to a broker.

Owns resolving broker addresses (`config.parse_broker`), holding a connection to the first broker that answers (tried in
the configured order; after a failure the list is tried again from the top, with backoff), the
signed announcement of this store's addresses (renewed before it expires and whenever they or the
partner list change), what the broker pushes (punch requests, relay offers and closures), and the
requests a store makes of a broker (lookup, relay, mailbox).

Lookup tokens and the verifiers an announcement lists are made here for the broker actually
connected (its public key, as the connection proved it) and the epoch of this store's clock
(`now`; see `wire.LookupKey`): callers hand over `LookupKey`s, never tokens.

The connection runs on the store's own QUIC endpoint (its partner port): the NAT mapping the
broker observes is the one partners must use, and relay frames leave from the same socket. It
offers its own idle timeout (`BROKER_IDLE_TIMEOUT`, not the partner port's short one, which is
there to notice a dead partner fast: with it, the connection idled out between two pings every
8 s), pings the broker a few times per idle timeout (`keepalive_interval`: every 15 s; QUIC takes
the lower of both sides', and a broker allows at least 3 * KEEPALIVE), and lets the transport
judge whether the path is dead: a ping or
an announcement that goes unanswered (a busy machine, a stalled path) does not end a connection
the broker's packets still reach. Only the idle timeout ends it, or pings unanswered for
`SILENCE` seconds while the transport still hears the broker (its application is stuck).
Announcements are coalesced: a burst of changes makes one (`ANNOUNCE_SETTLE`, `ANNOUNCE_GAP`).
A connection that ends is logged once, at info, with its reason (`RECONNECT_LOG_EVERY`); one that
ends soon after it was made is redialled with backoff, not at once.

A store holds a broker connection only while it has a reason: partners it may need to be found
by, or a pairing by code in progress. A fresh store with no partners talks to no broker.
"""

from __future__ import annotations

import logging
import math
import random
import socket
import time

import trio

from . import wire as B
from ..config import BrokerAddress, ConfigError, format_address, parse_address
from ..net.codec import Ping, ProtocolError
from ..net.quic import Connection, NoAnswer, RelayPath, TransportError
from ..net.relay import punch_probe
from ..net.rpc import Dispatcher, RemoteError, request

log = logging.getLogger(__name__)

ANNOUNCE_TTL = 600  # seconds; renewed at half-life
ANNOUNCE_SETTLE = 0.25  # seconds after a change before announcing it: a burst of changes makes one announcement
ANNOUNCE_GAP = 2.0  # seconds between announcements at least (a broker allows 30 a minute by default)
ANNOUNCE_RETRY = 30.0  # seconds before announcing again after an announcement went unanswered
KEEPALIVE = 15.0  # seconds between pings at most (keeps the NAT mapping open); less on a short idle timeout
BROKER_IDLE_TIMEOUT = 45.0  # seconds: the broker connection offers this (brokers allow at least as much)
KEEPALIVE_PER_IDLE = 3  # pings per idle timeout: two in a row may go unanswered before the path idles out
SILENCE = 60.0  # seconds without an answer to anything (and pings unanswered) before giving up on a connection
KEEPALIVE_MISSES = 3  # ... and at least this many pings unanswered in a row
CONNECT_TIMEOUT = 10.0  # seconds a caller waits for a broker connection (`connection`)
DIAL_TIMEOUT = 8.0  # seconds one dial may take: less, so that a caller hears why the dial failed
REQUEST_TIMEOUT = 15.0
BACKOFF_FIRST, BACKOFF_MAX = 2.0, 300.0
STABLE_AFTER = 30.0  # seconds a connection must last for the next one to be dialled at once (else: backoff)
RECONNECT_LOG_EVERY = 600.0  # seconds: a connection's end is logged at info at most this often (else debug)
PUNCH_SCHEDULE = (0.0, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # seconds after a Punch
MAX_PUNCHING = 8  # punch requests served at once (more are ignored: a broker cannot make us flood)


class BrokerUnavailable(TransportError):
    """No broker connection now (none configured, none reachable)."""


def keepalive_interval(idle_timeout: float) -> float:
    """Seconds between pings on a connection whose (local) idle timeout is `idle_timeout`: a few per
    idle timeout, at most KEEPALIVE. The broker's idle timeout is at least 2 * KEEPALIVE
    (`broker.config`), and QUIC takes the lower of both sides', so this is well under both."""
    return max(0.5, min(KEEPALIVE, idle_timeout / KEEPALIVE_PER_IDLE))


async def resolve(broker: BrokerAddress, family: int) -> tuple[str, int]:
    infos = await trio.socket.getaddrinfo(broker.host, broker.port, family=family, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"no {'IPv6' if family == socket.AF_INET6 else 'IPv4'} address for {broker.host}")
    # (typeshed's sockaddr has an int first for a Python built without IPv6; never here)
    return infos[0][4][0], infos[0][4][1]  # type: ignore[return-value]


async def dial_broker(endpoint, broker: BrokerAddress, *, timeout: float = DIAL_TIMEOUT,
                      idle_timeout: float = BROKER_IDLE_TIMEOUT) -> tuple[Connection, tuple[str, int]]:
    """(connection, address) to `broker` from `endpoint`, authenticated as its peer id when the
    address names one; `BrokerUnavailable` in words a person reads (a name that does not resolve,
    no broker answering within `timeout`)."""
    family = socket.AF_INET6 if ":" in endpoint.local_address[0] else socket.AF_INET
    try:
        with trio.fail_after(timeout):
            address = await resolve(broker, family)
            conn = await endpoint.connect(address, expected_peer=broker.peer_id, idle_timeout=idle_timeout)
    except socket.gaierror as e:
        raise BrokerUnavailable(f"cannot find the broker {broker.host}: {e.strerror or e}") from None
    except NoAnswer as e:
        raise BrokerUnavailable(f"no bpfs broker answered at {broker} within {e.waited:.0f} s") from None
    except trio.TooSlowError:
        raise BrokerUnavailable(f"no bpfs broker answered at {broker} within {timeout:.0f} s") from None
    return conn, address


class BrokerClient:
    """The store's link to its brokers. `run()` in the service's nursery."""

    def __init__(self, identity, endpoint, brokers: list[BrokerAddress], *, addresses, lookup_keys, standing,
                 rng: random.Random | None = None, now=time.time, idle_timeout: float | None = None):
        self.identity = identity
        self.endpoint = endpoint
        # the broker connection's own idle timeout, whatever the endpoint's (the partner port's is short:
        # PARTNER_IDLE_TIMEOUT, so that a dead partner is noticed fast); a broker's is at least this
        self.idle_timeout = BROKER_IDLE_TIMEOUT if idle_timeout is None else idle_timeout
        self.keepalive = keepalive_interval(self.idle_timeout)
        self.brokers = list(brokers)
        self._addresses = addresses  # () -> list[str]: where this store listens
        self._lookup_keys = lookup_keys  # () -> list[LookupKey]: one per partner (or beacon) that may look us up
        self._standing = standing  # () -> bool: partners may look for us (hold a connection)
        self._holds = 0  # pairings in progress
        self._rng = rng or random.Random()
        self._now = now  # unix seconds: this store's clock (tokens' epochs, announcements' expiry)
        self.conn: Connection | None = None
        self.broker: BrokerAddress | None = None
        self.broker_address: tuple[str, int] | None = None
        self.observed: str | None = None  # our address as the broker sees it
        self.last_error: str | None = None
        self._tried = trio.Event()  # set (and renewed) when a round over every broker reached none
        self._round_errors: list[str] = []  # what each broker said in the last such round
        self._seq = 0
        self._kick = trio.Event()  # wakes `run`: a connection may be wanted now
        self._change = trio.Event()  # wakes the announcement loop: announce again
        self._connected = trio.Event()
        self._announced = trio.Event()
        self._heard_at = 0.0  # trio time of the broker's last answer (or push) on the connection held
        self._logged_broker: BrokerAddress | None = None  # the broker whose connection was logged at info
        self._end_logged_at = -math.inf  # trio time a connection's end was last logged at info
        self._ends_unlogged = 0  # ends logged at debug since
        self.dispatcher = Dispatcher(B.BROKER, rate=50.0, burst=100.0)
        self.dispatcher.handler(B.Punch)(self._on_punch)
        self.dispatcher.handler(B.RelayOffer)(self._on_relay_offer)
        self.dispatcher.handler(B.RelayClosed)(self._on_relay_closed)
        self._nursery: trio.Nursery | None = None
        self._punching = 0

    # ----- wanting a connection ---------------------------------------------------------------------
    @property
    def configured(self) -> bool:
        return bool(self.brokers)

    def _wanted(self) -> bool:
        return bool(self.brokers) and (self._holds > 0 or bool(self._standing()))

    def changed(self) -> None:
        """Our addresses or partners changed: announce again (and connect if now wanted). Cheap: a
        burst of calls makes one announcement (see ANNOUNCE_SETTLE, ANNOUNCE_GAP)."""
        self._announced = trio.Event()
        self._change.set()
        self._kick.set()

    def hold(self) -> None:
        """Hold a broker connection until `release()` (a pairing in progress needs one)."""
        self._holds += 1
        self._kick.set()

    def release(self) -> None:
        self._holds -= 1

    @property
    def holding(self) -> bool:
        """Whether a pairing in progress holds the broker connection (see `hold`)."""
        return self._holds > 0

    async def connection(self, timeout: float = CONNECT_TIMEOUT) -> Connection:
        """The broker connection, waiting up to `timeout` for one; BrokerUnavailable if none."""
        if not self.brokers:
            raise BrokerUnavailable("no broker configured (set brokers in bpfs.toml or pass --broker)")
        self._kick.set()
        tried = self._tried
        with trio.move_on_after(timeout):
            while self.conn is None or self.conn.closed:
                if tried.is_set():  # every broker failed since we asked: say why now
                    raise BrokerUnavailable("; ".join(self._round_errors) or "no broker reachable")
                await self._connected.wait()
            return self.conn
        raise BrokerUnavailable(f"no broker reachable ({self.last_error or 'still connecting'}; tried "
                                f"{', '.join(str(b) for b in self.brokers)})")

    async def announced(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Wait until the broker holds our current announcement."""
        await self.connection(timeout)
        with trio.fail_after(timeout):
            await self._announced.wait()

    # ----- running ---------------------------------------------------------------------------
    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            delay = BACKOFF_FIRST / 2
            while True:
                while not self._wanted():
                    self._kick = trio.Event()
                    await self._kick.wait()
                held = stable = False
                errors = []
                for broker in self.brokers:
                    try:
                        conn, address = await self._connect(broker)
                    except (OSError, TransportError, trio.TooSlowError) as e:
                        self.last_error = str(e) if isinstance(e, BrokerUnavailable) else \
                            f"{broker}: {e or type(e).__name__}"
                        errors.append(self.last_error)
                        log.info("broker %s not reachable: %s", broker, e or type(e).__name__)
                        self._logged_broker = None  # the next connection is news
                        continue
                    held = True
                    lasted = await self._hold_connection(broker, address, conn)
                    stable = lasted >= STABLE_AFTER
                    if stable:
                        delay = BACKOFF_FIRST / 2
                    break
                if not held:  # wake those waiting for a connection: none came
                    self._round_errors = errors
                    self._tried.set()
                    self._tried = trio.Event()
                    self._connected.set()
                    self._connected = trio.Event()
                # a connection that ended soon after it was made is not redialled at once either
                # (a broker that closes it at once, a path that breaks it: no reconnection storm)
                if not stable or not self._wanted():
                    delay = min(BACKOFF_MAX, delay * 2)
                    with trio.move_on_after(delay * (0.5 + self._rng.random())):
                        self._kick = trio.Event()
                        await self._kick.wait()

    async def _connect(self, broker: BrokerAddress):
        return await dial_broker(self.endpoint, broker, idle_timeout=self.idle_timeout)

    async def _hold_connection(self, broker: BrokerAddress, address, conn: Connection) -> float:
        """Serve `conn` until it closes; how many seconds it lasted."""
        self.conn, self.broker, self.broker_address = conn, broker, address
        started = self._heard_at = trio.current_time()
        self._connected.set()
        self._connected = trio.Event()
        if self._logged_broker == broker:  # a reconnection: its cause was logged with the end
            log.debug("reconnected to broker %s", broker)
        else:
            log.info("connected to broker %s (%s)", broker, conn.peer_id)
            self._logged_broker = broker
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.dispatcher.serve_connection, conn)
                nursery.start_soon(self._announce_loop, conn)
                nursery.start_soon(self._keepalive_loop, conn)
                await conn.wait_closed()
                nursery.cancel_scope.cancel()
        finally:
            info = conn.close_info
            reason = info.reason if info is not None and info.reason else "closed"
            self.last_error = f"{broker}: {reason}"
            self.conn = None
            conn.close()
            self._log_end(broker, reason, trio.current_time() - started)
        return trio.current_time() - started

    def _log_end(self, broker: BrokerAddress, reason: str, lasted: float) -> None:
        """One line per connection that ends, at info at most every RECONNECT_LOG_EVERY seconds (the
        next info line counts those logged at debug meanwhile)."""
        now = trio.current_time()
        if now - self._end_logged_at >= RECONNECT_LOG_EVERY:
            more = (f" ({self._ends_unlogged} more since the last such line, logged at debug)"
                    if self._ends_unlogged else "")
            log.info("broker connection to %s ended after %.0f s: %s%s", broker, lasted, reason, more)
            self._end_logged_at, self._ends_unlogged = now, 0
        else:
            self._ends_unlogged += 1
            log.debug("broker connection to %s ended after %.0f s: %s", broker, lasted, reason)

    def _heard(self) -> None:
        self._heard_at = trio.current_time()

    async def _request(self, conn: Connection, msg, timeout: float | None = None):
        """`rpc.request` on the broker connection (REQUEST_TIMEOUT unless `timeout`), noting that the
        broker answered (an `Error` too)."""
        try:
            reply = await request(conn, msg, registry=B.BROKER, timeout=REQUEST_TIMEOUT if timeout is None else timeout)
        except RemoteError:
            self._heard()
            raise
        self._heard()
        return reply

    async def _keepalive_loop(self, conn: Connection) -> None:
        """Ping every `keepalive` seconds (each ping may take that long), so that packets from the
        broker keep the connection (and the NAT mapping) alive. An unanswered ping ends nothing:
        QUIC's idle timeout ends a path that is dead. Only pings unanswered KEEPALIVE_MISSES times
        in a row with nothing answered for SILENCE seconds (the broker's packets arrive, its
        application is stuck) end the connection here; as does no longer needing one."""
        interval = self.keepalive
        silence = max(SILENCE, 2 * self.idle_timeout)
        missed = 0
        tick = trio.current_time()
        while True:
            tick = max(tick + interval, trio.current_time())
            await trio.sleep_until(tick)
            if not self._wanted():
                conn.close(reason="no longer needed")
                return
            try:
                await self._request(conn, Ping(self._rng.getrandbits(32)), timeout=min(REQUEST_TIMEOUT, interval))
            except RemoteError:
                missed = 0  # any answer proves the path (and keeps the NAT mapping) alive
            except trio.TooSlowError:
                missed += 1
                quiet = trio.current_time() - self._heard_at
                log.debug("ping %d in a row to %s unanswered (nothing answered for %.0f s)", missed, self.broker,
                          quiet)
                if missed >= KEEPALIVE_MISSES and quiet >= silence:
                    conn.close(reason=f"the broker answered no ping for {quiet:.0f} s")
                    return
            except (TransportError, ProtocolError):
                return  # the connection ended: the reason is logged once, with its end
            else:
                missed = 0

    async def _announce_loop(self, conn: Connection) -> None:
        """Announce now, renew at half-life, and announce again after changes: a burst of them
        makes one announcement (ANNOUNCE_SETTLE after the first), at least ANNOUNCE_GAP after the
        previous one. An unanswered announcement is retried after ANNOUNCE_RETRY seconds on the same
        connection (the keepalive and the transport decide whether the connection is dead)."""
        while True:
            # a change from now on (even one while this announcement is in flight) makes the next
            self._change = trio.Event()
            announced = self._announced  # what a change makes afterwards waits for the next round
            started = trio.current_time()
            try:
                reply = await self._announce(conn)
                self.observed = reply.observed
                wait = max(30, min(ANNOUNCE_TTL, reply.expires - int(self._now()))) / 2
                announced.set()
            except RemoteError as e:
                log.warning("broker %s refused our announcement: %s", self.broker, e.message)
                self.last_error = f"{self.broker}: {e.message}"
                wait = 60.0
            except trio.TooSlowError:
                log.debug("broker %s did not answer our announcement within %.0f s: announcing again in %.0f s",
                          self.broker, REQUEST_TIMEOUT, ANNOUNCE_RETRY)
                wait = ANNOUNCE_RETRY
            except (TransportError, ProtocolError):
                return  # the connection ended: the reason is logged once, with its end
            with trio.move_on_at(started + max(wait, ANNOUNCE_GAP)):
                await self._change.wait()
                await trio.sleep(ANNOUNCE_SETTLE)  # the rest of a burst of changes
                await trio.sleep_until(started + ANNOUNCE_GAP)

    def verifiers(self, broker_key: bytes, now: float | None = None) -> list[bytes]:
        """What our announcement to the broker with public key `broker_key` lists: each lookup
        key's verifiers for every epoch the record may be looked up in (`wire.announced_epochs`),
        those of the current epoch first so that a cut keeps them."""
        now = self._now() if now is None else now
        epochs = B.announced_epochs(now, ANNOUNCE_TTL)
        keys = list(self._lookup_keys())
        out = [v for e in epochs for k in keys for v in k.verifiers(broker_key, [e])]
        out = list(dict.fromkeys(out))
        if len(out) > B.MAX_VERIFIERS:
            log.warning("%d partner verifiers do not fit in one announcement: only %d are announced",
                        len(out), B.MAX_VERIFIERS)
        return out[:B.MAX_VERIFIERS]

    async def _announce(self, conn: Connection):
        now = self._now()
        self._seq = max(self._seq + 1, int(now * 1_000_000))  # grows across restarts too
        msg = B.signed_announcement(self.identity, conn.peer_public_key, self._seq, now + ANNOUNCE_TTL,
                                    list(self._addresses())[:B.MAX_ADDRESSES], self.verifiers(conn.peer_public_key, now))
        return await self._request(conn, msg)

    # ----- requests --------------------------------------------------------------------------
    async def call(self, msg, *, timeout: float = REQUEST_TIMEOUT):
        conn = await self.connection()
        return await self._request(conn, msg, timeout)

    def token(self, conn: Connection, key: B.LookupKey) -> bytes:
        """`key`'s token for the broker on `conn`, today (this store's clock)."""
        return key.token(conn.peer_public_key, B.epoch_of(self._now()))

    async def lookup(self, key: B.LookupKey) -> B.Found:
        conn = await self.connection()
        msg = B.Lookup(self.token(conn, key), list(self._addresses())[:B.MAX_ADDRESSES])
        return await self._request(conn, msg)

    async def open_relay(self, key: B.LookupKey) -> RelayPath:
        conn = await self.connection()
        reply = await self._request(conn, B.RelayOpen(self.token(conn, key)))
        assert self.broker_address is not None  # set with the connection
        path = RelayPath(self.broker_address[0], self.broker_address[1], bytes(reply.session))
        self._accept_relay(path, reply.expires)
        return path

    # ----- what the broker pushes ------------------------------------------------------------------
    async def _on_punch(self, conn, msg: B.Punch):
        self._heard()
        targets = []
        for text in [msg.observed, *msg.addresses]:
            try:
                addr = parse_address(text)
            except ConfigError:
                continue
            if addr not in targets and addr[1] != 0:
                targets.append(addr)
        if targets and self._nursery is not None and self._punching < MAX_PUNCHING:
            self._punching += 1
            self._nursery.start_soon(self._punch, targets[:1 + B.MAX_ADDRESSES])
        return B.Ok()

    async def _punch(self, targets) -> None:
        log.debug("punching towards %s", ", ".join(format_address(t) for t in targets))
        started = trio.current_time()
        try:
            for at in PUNCH_SCHEDULE:
                await trio.sleep_until(started + at)
                for addr in targets:
                    self.endpoint.send_datagram(punch_probe(), addr)
        finally:
            self._punching -= 1

    def _accept_relay(self, path: RelayPath, expires: int) -> None:
        self.endpoint.add_relay_session(path)
        if self._nursery is not None:
            self._nursery.start_soon(self._expire_relay, path.session, expires)

    async def _expire_relay(self, session: bytes, expires: int) -> None:
        await trio.sleep(max(0.0, expires - self._now()))
        self.endpoint.remove_relay_session(session)

    async def _on_relay_offer(self, conn, msg: B.RelayOffer):
        self._heard()
        if self.broker_address is None:
            raise TransportError("no broker")
        self._accept_relay(RelayPath(self.broker_address[0], self.broker_address[1], bytes(msg.session)),
                           msg.expires)
        return B.Ok()

    async def _on_relay_closed(self, conn, msg: B.RelayClosed):
        self._heard()
        session = bytes(msg.session)
        self.endpoint.remove_relay_session(session)
        for c in self.endpoint.connections:
            if isinstance(c.remote_address, RelayPath) and c.remote_address.session == session:
                log.warning("relay to %s closed by the broker: %s", c.peer_id, msg.reason)
                c.close(reason="relay closed")
        return B.Ok()
