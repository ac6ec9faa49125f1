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
broker observes is the one partners must use, and relay frames leave from the same socket.

A store holds a broker connection only while it has a reason: partners it may need to be found
by, or a pairing by code in progress. A fresh store with no partners talks to no broker.
"""

from __future__ import annotations

import logging
import random
import socket
import time

import trio

from . import wire as B
from ..config import BrokerAddress, ConfigError, format_address, parse_address
from ..net.codec import Ping
from ..net.quic import Connection, NoAnswer, RelayPath, TransportError
from ..net.relay import punch_probe
from ..net.rpc import Dispatcher, RemoteError, request

log = logging.getLogger(__name__)

ANNOUNCE_TTL = 600  # seconds; renewed at half-life
KEEPALIVE = 15.0  # seconds between pings: keeps the NAT mapping to the broker open
CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 15.0
BACKOFF_FIRST, BACKOFF_MAX = 2.0, 300.0
PUNCH_SCHEDULE = (0.0, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # seconds after a Punch
MAX_PUNCHING = 8  # punch requests served at once (more are ignored: a broker cannot make us flood)


class BrokerUnavailable(TransportError):
    """No broker connection now (none configured, none reachable)."""


async def resolve(broker: BrokerAddress, family: int) -> tuple[str, int]:
    infos = await trio.socket.getaddrinfo(broker.host, broker.port, family=family, type=socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"no {'IPv6' if family == socket.AF_INET6 else 'IPv4'} address for {broker.host}")
    # (typeshed's sockaddr has an int first for a Python built without IPv6; never here)
    return infos[0][4][0], infos[0][4][1]  # type: ignore[return-value]


class BrokerClient:
    """The store's link to its brokers. `run()` in the service's nursery."""

    def __init__(self, identity, endpoint, brokers: list[BrokerAddress], *, addresses, lookup_keys, standing,
                 rng: random.Random | None = None, now=time.time):
        self.identity = identity
        self.endpoint = endpoint
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
        self._kick = trio.Event()
        self._connected = trio.Event()
        self._announced = trio.Event()
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
        """Our addresses or partners changed: announce again (and connect if now wanted)."""
        self._announced = trio.Event()
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
                held = False
                errors = []
                for broker in self.brokers:
                    try:
                        conn, address = await self._connect(broker)
                    except (OSError, TransportError, trio.TooSlowError) as e:
                        self.last_error = str(e) if isinstance(e, BrokerUnavailable) else \
                            f"{broker}: {e or type(e).__name__}"
                        errors.append(self.last_error)
                        log.info("broker %s not reachable: %s", broker, e or type(e).__name__)
                        continue
                    held = True
                    delay = BACKOFF_FIRST / 2
                    await self._hold_connection(broker, address, conn)
                    break
                if not held:  # wake those waiting for a connection: none came
                    self._round_errors = errors
                    self._tried.set()
                    self._tried = trio.Event()
                    self._connected.set()
                    self._connected = trio.Event()
                if not held or not self._wanted():
                    delay = min(BACKOFF_MAX, delay * 2)
                    with trio.move_on_after(delay * (0.5 + self._rng.random())):
                        self._kick = trio.Event()
                        await self._kick.wait()

    async def _connect(self, broker: BrokerAddress):
        family = socket.AF_INET6 if ":" in self.endpoint.local_address[0] else socket.AF_INET
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                address = await resolve(broker, family)
                conn = await self.endpoint.connect(address, expected_peer=broker.peer_id)
        except socket.gaierror as e:
            raise BrokerUnavailable(f"cannot find the broker {broker.host}: {e.strerror or e}") from None
        except NoAnswer as e:
            raise BrokerUnavailable(f"no bpfs broker answered at {broker} within {e.waited:.0f} s") from None
        except trio.TooSlowError:
            raise BrokerUnavailable(f"no bpfs broker answered at {broker} within {CONNECT_TIMEOUT:.0f} s") from None
        return conn, address

    async def _hold_connection(self, broker: BrokerAddress, address, conn: Connection) -> None:
        self.conn, self.broker, self.broker_address = conn, broker, address
        self._connected.set()
        self._connected = trio.Event()
        log.info("connected to broker %s (%s)", broker, conn.peer_id)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.dispatcher.serve_connection, conn)
                nursery.start_soon(self._announce_loop, conn, nursery.cancel_scope)
                await conn.wait_closed()
                nursery.cancel_scope.cancel()
        finally:
            info = conn.close_info
            self.last_error = f"{broker}: {info.reason if info else 'closed'}"
            log.info("broker connection to %s ended: %s", broker, info.reason if info else "closed")
            self.conn = None
            conn.close()

    async def _announce_loop(self, conn: Connection, scope) -> None:
        while True:
            if not self._wanted():
                conn.close(reason="no longer needed")
                return
            expires_in = ANNOUNCE_TTL
            # a change from now on (even one while this announcement is in flight) kicks the next
            self._kick = trio.Event()
            announced = self._announced  # what a change makes afterwards waits for the next round
            try:
                reply = await self._announce(conn)
                self.observed = reply.observed
                expires_in = max(30, min(ANNOUNCE_TTL, reply.expires - int(self._now())))
                announced.set()
            except RemoteError as e:
                log.warning("broker %s refused our announcement: %s", self.broker, e.message)
                self.last_error = f"{self.broker}: {e.message}"
                expires_in = 120
            except (TransportError, trio.TooSlowError) as e:
                log.info("announcing to %s failed: %s", self.broker, e or type(e).__name__)
                conn.close(reason="announcement failed")
                return
            renew_at = trio.current_time() + expires_in / 2
            while trio.current_time() < renew_at:
                with trio.move_on_after(min(KEEPALIVE, renew_at - trio.current_time())):
                    await self._kick.wait()
                if self._kick.is_set():
                    break  # something changed: announce again now
                try:
                    await request(conn, Ping(self._rng.getrandbits(32)), registry=B.BROKER, timeout=REQUEST_TIMEOUT)
                except RemoteError:
                    pass  # any answer proves the path (and keeps the NAT mapping) alive
                except (TransportError, trio.TooSlowError):
                    conn.close(reason="keepalive failed")
                    return

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
        return await request(conn, msg, registry=B.BROKER, timeout=REQUEST_TIMEOUT)

    # ----- requests --------------------------------------------------------------------------
    async def call(self, msg, *, timeout: float = REQUEST_TIMEOUT):
        conn = await self.connection()
        return await request(conn, msg, registry=B.BROKER, timeout=timeout)

    def token(self, conn: Connection, key: B.LookupKey) -> bytes:
        """`key`'s token for the broker on `conn`, today (this store's clock)."""
        return key.token(conn.peer_public_key, B.epoch_of(self._now()))

    async def lookup(self, key: B.LookupKey) -> B.Found:
        conn = await self.connection()
        msg = B.Lookup(self.token(conn, key), list(self._addresses())[:B.MAX_ADDRESSES])
        return await request(conn, msg, registry=B.BROKER, timeout=REQUEST_TIMEOUT)

    async def open_relay(self, key: B.LookupKey) -> RelayPath:
        conn = await self.connection()
        reply = await request(conn, B.RelayOpen(self.token(conn, key)), registry=B.BROKER, timeout=REQUEST_TIMEOUT)
        assert self.broker_address is not None  # set with the connection
        path = RelayPath(self.broker_address[0], self.broker_address[1], bytes(reply.session))
        self._accept_relay(path, reply.expires)
        return path

    # ----- what the broker pushes ------------------------------------------------------------------
    async def _on_punch(self, conn, msg: B.Punch):
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
        if self.broker_address is None:
            raise TransportError("no broker")
        self._accept_relay(RelayPath(self.broker_address[0], self.broker_address[1], bytes(msg.session)),
                           msg.expires)
        return B.Ok()

    async def _on_relay_closed(self, conn, msg: B.RelayClosed):
        session = bytes(msg.session)
        self.endpoint.remove_relay_session(session)
        for c in self.endpoint.connections:
            if isinstance(c.remote_address, RelayPath) and c.remote_address.session == session:
                log.warning("relay to %s closed by the broker: %s", c.peer_id, msg.reason)
                c.close(reason="relay closed")
        return B.Ok()
