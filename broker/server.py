"""The running broker: its QUIC endpoint, the request handlers, pushes to stores, periodic work.

Owns `serve()` (the whole broker as one trio task) and `Broker` (what `serve` hands to
`task_status.started`: address, peer id, counters). It wires `broker.state` (the rules),
`broker.relay` (sessions and the per-datagram path) and `broker.persist` (LMDB) to the network:

- one QUIC endpoint (`bpfs.net.quic`) on `config.listen`; its non-QUIC datagrams go straight to
  `Relay.datagram`. Authenticated connections beyond `max_connections_per_source` from one source
  are closed with a reason.
- an rpc `Dispatcher` for `bpfs.rendezvous.wire.BROKER`: Announce, Lookup, RelayOpen, Mailbox*, Ping.
  A `state.Refused` becomes `Reject(text, code)`, i.e. `Error(code, text)` at the client.
- per connection: the keys it announced (it is their "online" connection until it closes or
  another connection announces them), its source, and the long polls waiting on it.
- pushes over a store's own connection (`rpc.request`): `Punch` after a Lookup finds it (in the
  background, `push_timeout`), `RelayOffer` before RelayOpened is returned (so the target accepts
  the first relayed frame), `RelayClosed` when the relay ends a session. At most `max_pushes`
  run at once; a failed push is logged at debug.
- MailboxGet long-polls up to `wait` seconds, woken by the other side's put or close.
- every `sweep_interval`: expiry (`state.expire`, `relay.expire`) and an fsync of the LMDB;
  every `stats_interval`: a `relay_stats` log line.

Logs (`broker.logs`): one event per line; never tokens, sides, verifiers, keys or bodies, and
never who paired, looked up or relayed to whom, nor where a store is: announcements, lookups,
mailboxes and relay sessions are debug events without peer ids or addresses, summed up in the
periodic `relay_stats` line. Peer ids appear only where an operator must act on one: a refused
request (rate limits, caps) and an internal error.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field

import trio

from bpfs.identity import Identity
from bpfs.net.codec import HEADER_SIZE, ErrorCode, Ping, Pong, ProtocolError
from bpfs.net.quic import Code, Connection, TransportConfig, TransportError, open_endpoint
from bpfs.net.rpc import Dispatcher, Reject, request

from bpfs.rendezvous import wire as P
from .config import BrokerConfig
from .logs import event
from .persist import Persist
from .relay import Relay
from .state import BrokerState, Refused, format_address, source_key

log = logging.getLogger(__name__)

LOCK_NAME = "broker.lock"


class BrokerError(Exception):
    """The broker cannot start (one line, for the operator)."""


@dataclass(eq=False)
class _ConnInfo:
    conn: Connection
    source: str
    keys: set = field(default_factory=set)  # public keys this connection announced
    waiters: set = field(default_factory=set)  # long polls to wake when it closes
    gone: bool = False

    @property
    def observed(self) -> str:
        return format_address(self.conn.remote_address)


def _fit(bodies: list[bytes]) -> list[bytes]:
    """As many bodies (from the first) as fit in one reply frame; the client asks again for the
    rest (8 bodies of MAX_BODY would not fit in BROKER.max_frame)."""
    room = P.BROKER.max_frame - HEADER_SIZE - 5
    out = []
    for body in bodies:
        room -= 5 + len(body)
        if room < 0:
            break
        out.append(body)
    return out


class Broker:
    """A running broker. `address` is the (host, port) it listens on."""

    def __init__(self, config: BrokerConfig, identity: Identity, endpoint, state: BrokerState, relay: Relay,
                 persist: Persist, nursery: trio.Nursery):
        self.config = config
        self.identity = identity
        self.peer_id = identity.peer_id
        self.public_key = identity.public_key
        self.endpoint = endpoint
        self.state = state
        self.relay = relay
        self.persist = persist
        self._nursery = nursery
        self.address: tuple[str, int] = tuple(endpoint.local_address[:2])
        self._conns: dict[Connection, _ConnInfo] = {}
        self._per_source: collections.Counter = collections.Counter()
        self._presence: dict[bytes, Connection] = {}  # public key -> the connection that announced it last
        self._mailbox_waiters: dict[int, set[trio.Event]] = {}
        self._pushes = 0
        self.pushes_dropped = 0
        self.connections_refused = 0
        self.dispatcher = self._make_dispatcher()

    # ---- public

    def stats(self) -> dict:
        return {"connections": len(self._conns), "online": len(self._presence),
                "dropped_datagrams": self.endpoint.dropped_datagrams, **self.state.stats(),
                **{f"relay_{k}" if not k.startswith(("bytes", "frames", "dropped")) else k: v
                   for k, v in self.relay.stats().items()}}

    def online(self, public_key: bytes) -> bool:
        conn = self._presence.get(public_key)
        return conn is not None and not conn.closed

    # ---- connections

    async def _accept_loop(self) -> None:
        async for conn in self.endpoint:
            source = source_key(conn.remote_address[0])
            n = self._per_source[source]
            if n >= self.config.max_connections_per_source:
                self.connections_refused += 1
                conn.close(Code.REFUSED, f"too many connections from this address ({n}, the most allowed); "
                           "close some and retry")
                event("connection_refused", peer=conn.peer_id, addr=format_address(conn.remote_address),
                      reason="per-source connection limit")
                continue
            info = self._conns[conn] = _ConnInfo(conn, source)
            self._per_source[source] += 1
            event("connect", logging.DEBUG)
            self._nursery.start_soon(self._serve_connection, info)

    async def _serve_connection(self, info: _ConnInfo) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, info)
                await self.dispatcher.serve_connection(info.conn)
        finally:
            self._forget(info)

    async def _watch(self, info: _ConnInfo) -> None:
        closed = await info.conn.wait_closed()
        self._forget(info)
        event("disconnect", logging.DEBUG, reason=closed.reason if closed is not None else "")

    def _forget(self, info: _ConnInfo) -> None:
        if info.gone:
            return
        info.gone = True
        conn = info.conn
        self._conns.pop(conn, None)
        self._per_source[info.source] -= 1
        if self._per_source[info.source] <= 0:
            del self._per_source[info.source]
        for key in info.keys:
            if self._presence.get(key) is conn:
                del self._presence[key]
        self.relay.connection_closed(conn)
        for wake in list(info.waiters):
            wake.set()

    def _info(self, conn: Connection) -> _ConnInfo:
        info = self._conns.get(conn)
        if info is None:  # closed meanwhile: answer nothing more
            raise Refused(ErrorCode.REJECTED, "this connection is closing")
        return info

    # ---- pushes

    def _push(self, conn: Connection, msg, what: str) -> None:
        if conn.closed:
            return
        if self._pushes >= self.config.max_pushes:
            self.pushes_dropped += 1
            event("push_dropped", logging.DEBUG, what=what)
            return
        try:
            self._nursery.start_soon(self._push_task, conn, msg, what)
        except RuntimeError:  # shutting down: the nursery takes no new tasks
            return
        self._pushes += 1

    async def _push_task(self, conn: Connection, msg, what: str) -> None:
        try:
            await request(conn, msg, registry=P.BROKER, timeout=self.config.push_timeout)
            event(what, logging.DEBUG)
        except (TransportError, ProtocolError, trio.TooSlowError) as exc:
            event("push_failed", logging.DEBUG, what=what, error=type(exc).__name__)
        finally:
            self._pushes -= 1

    def _relay_closed(self, legs, reason: str) -> None:
        session = legs[0].session
        event("relay_close", logging.DEBUG, bytes=session.bytes, frames=session.frames, reason=reason)
        for leg in legs:
            self._push(leg.conn, P.RelayClosed(leg.session_id, reason[:200]), "relay_closed_push")

    # ---- handlers

    def _make_dispatcher(self) -> Dispatcher:
        cfg = self.config
        d = Dispatcher(P.BROKER, rate=cfg.request_rate, burst=cfg.request_burst,
                       max_tracked_peers=cfg.max_connections)
        for cls, fn in ((P.Announce, self._announce), (P.Lookup, self._lookup), (P.RelayOpen, self._relay_open),
                        (P.MailboxOpen, self._mailbox_open), (P.MailboxJoin, self._mailbox_join),
                        (P.MailboxPut, self._mailbox_put), (P.MailboxGet, self._mailbox_get),
                        (P.MailboxClose, self._mailbox_close)):
            d.handler(cls)(self._wrap(cls.__name__, fn))
        d.handler(Ping)(self._ping)
        return d

    def _wrap(self, name: str, fn):
        async def handle(conn: Connection, msg):
            try:
                return await fn(conn, self._info(conn), msg)
            except Refused as exc:
                event("refused", request=name, peer=conn.peer_id, code=exc.code, reason=exc.text)
                raise Reject(exc.text, exc.code) from None
            except (trio.Cancelled, Reject):
                raise
            except Exception as exc:
                event("internal_error", logging.ERROR, request=name, peer=conn.peer_id, error=type(exc).__name__)
                log.debug("%s handler failed", name, exc_info=True)
                raise

        return handle

    async def _ping(self, conn: Connection, msg: Ping):
        return Pong(msg.nonce)

    async def _announce(self, conn: Connection, info: _ConnInfo, msg: P.Announce):
        record = msg.record
        if record.public_key != conn.peer_public_key:
            raise Refused(ErrorCode.REJECTED, "announce over a connection authenticated with the announced key "
                          "(this connection proved another identity)")
        observed = info.observed
        ann = self.state.announce(record, msg.signature, source=info.source, identity=conn.peer_id,
                                  observed=observed)
        self._presence[record.public_key] = conn
        info.keys.add(record.public_key)
        event("announce", logging.DEBUG, addresses=len(record.addresses), partners=len(record.verifiers))
        return P.Announced(observed, int(ann.expires))

    async def _lookup(self, conn: Connection, info: _ConnInfo, msg: P.Lookup):
        ann = self.state.lookup(msg.token, source=info.source, identity=conn.peer_id)
        target = self._presence.get(ann.key)
        online = target is not None and not target.closed
        observed = format_address(target.remote_address) if target is not None and online else ann.observed
        if target is not None and online and target is not conn:
            self._push(target, P.Punch(info.observed, list(msg.addresses)), "punch")
        event("lookup", logging.DEBUG, online=online)
        return P.Found(list(ann.record.addresses), observed, online)

    async def _relay_open(self, conn: Connection, info: _ConnInfo, msg: P.RelayOpen):
        self.state.check_rate("relay_open", info.source, conn.peer_id)
        ann = self.state.find(msg.token)
        target = self._presence.get(ann.key)
        if target is None or target.closed:
            raise Refused(P.Refusal.RELAY_REFUSED, "the store you asked for is not connected to this broker; "
                          "retry later")
        if target is conn:
            raise Refused(P.Refusal.RELAY_REFUSED, "this connection announced that store itself: nothing to relay")
        mine, theirs, expires = self.relay.open(conn, target)
        try:
            await request(target, P.RelayOffer(theirs.session_id, int(expires)), registry=P.BROKER,
                          timeout=self.config.push_timeout)
        except (TransportError, ProtocolError, trio.TooSlowError) as exc:
            self.relay.close(mine.session, "offer failed", notify=False)
            event("relay_offer_failed", error=type(exc).__name__)
            raise Refused(P.Refusal.RELAY_REFUSED, "the store you asked for did not take the relay offer; "
                          "retry later") from None
        if self.relay.leg(mine.session_id) is None:  # a connection closed meanwhile
            raise Refused(P.Refusal.RELAY_REFUSED, "the relay session ended before it started; retry")
        event("relay_open", logging.DEBUG, sessions=len(self.relay.sessions))
        return P.RelayOpened(mine.session_id, int(expires))

    async def _mailbox_open(self, conn: Connection, info: _ConnInfo, msg: P.MailboxOpen):
        mb, side = self.state.mailbox_open(source=info.source, identity=conn.peer_id)
        event("mailbox_open", logging.DEBUG, open=self.state.stats()["mailboxes"])
        return P.MailboxOpened(mb.nameplate, side, int(mb.expires))

    async def _mailbox_join(self, conn: Connection, info: _ConnInfo, msg: P.MailboxJoin):
        mb, side = self.state.mailbox_join(msg.nameplate, source=info.source, identity=conn.peer_id)
        event("mailbox_join", logging.DEBUG)
        self._wake(msg.nameplate)
        return P.MailboxJoined(side, int(mb.expires))

    async def _mailbox_put(self, conn: Connection, info: _ConnInfo, msg: P.MailboxPut):
        if self.state.mailbox_put(msg.nameplate, msg.side, msg.seq, msg.body, source=info.source,
                                  identity=conn.peer_id):
            self._wake(msg.nameplate)
        return P.Ok()

    async def _mailbox_get(self, conn: Connection, info: _ConnInfo, msg: P.MailboxGet):
        state = self.state
        bodies = state.mailbox_get(msg.nameplate, msg.side, msg.after, source=info.source, identity=conn.peer_id)
        deadline = trio.current_time() + min(msg.wait, P.MAX_WAIT)
        while not bodies and not info.gone and trio.current_time() < deadline:
            wake = trio.Event()
            waiters = self._mailbox_waiters.setdefault(msg.nameplate, set())
            waiters.add(wake)
            info.waiters.add(wake)
            try:
                with trio.move_on_at(deadline):
                    await wake.wait()
            finally:
                info.waiters.discard(wake)
                waiters.discard(wake)
                if not waiters and self._mailbox_waiters.get(msg.nameplate) is waiters:
                    del self._mailbox_waiters[msg.nameplate]
            bodies = state.mailbox_peek(msg.nameplate, msg.side, msg.after)
        return P.MailboxMessages(_fit(bodies))

    async def _mailbox_close(self, conn: Connection, info: _ConnInfo, msg: P.MailboxClose):
        gone = self.state.mailbox_close(msg.nameplate, msg.side, source=info.source, identity=conn.peer_id)
        event("mailbox_close", logging.DEBUG, gone=gone)
        self._wake(msg.nameplate)
        return P.Ok()

    def _wake(self, nameplate: int) -> None:
        for wake in self._mailbox_waiters.pop(nameplate, ()):
            wake.set()

    # ---- periodic work

    async def _sweep_loop(self) -> None:
        while True:
            await trio.sleep(self.config.sweep_interval)
            report = self.state.expire()
            ended = self.relay.expire()
            for nameplate in report.mailboxes:
                self._wake(nameplate)
            if report.announcements or report.mailboxes or ended:
                event("expired", logging.DEBUG, announcements=report.announcements, mailboxes=len(report.mailboxes),
                      relay_sessions=ended, seqs=report.seqs, buckets=report.buckets)
            await trio.to_thread.run_sync(self.persist.sync)

    async def _stats_loop(self) -> None:
        if not self.config.stats_interval:
            return
        last_bytes, last_time = self.relay.bytes_relayed, trio.current_time()
        while True:
            await trio.sleep(self.config.stats_interval)
            now = trio.current_time()
            rate = (self.relay.bytes_relayed - last_bytes) / max(1e-9, now - last_time)
            last_bytes, last_time = self.relay.bytes_relayed, now
            event("relay_stats", bytes_per_s=int(rate), **self.stats())


def _lock_state_dir(state_dir: str) -> int:
    fd = os.open(os.path.join(state_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BrokerError(f"another broker is running with the state directory {state_dir}") from None
    return fd


def transport_config(config: BrokerConfig) -> TransportConfig:
    """The broker's QUIC bounds: many connections, each with small windows (requests are <= 16 KiB)."""
    return TransportConfig(max_connections=config.max_connections, max_pending=config.max_pending,
                           max_pending_per_host=config.max_pending_per_source, idle_timeout=config.idle_timeout,
                           max_data=256 << 10, max_stream_data=64 << 10, preauth_window=64 << 10,
                           send_buffer=64 << 10, max_streams=64)


async def serve(config: BrokerConfig, identity: Identity, state_dir: str, *,
                task_status=trio.TASK_STATUS_IGNORED, now=time.time) -> None:
    """Run a broker until cancelled. `state_dir` (created 0700 if missing) holds its LMDB and a lock;
    `task_status.started(broker)` once it listens: `broker.address`, `broker.peer_id`.
    `BrokerError` if it cannot start (state directory in use, address in use)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    lock = _lock_state_dir(state_dir)
    persist = None
    try:
        persist = Persist(state_dir, config.map_size)
        state = BrokerState(config, identity.public_key, now=now, journal=persist.write)
        kept = state.restore(*persist.load())
        relay = Relay(config, now=now)
        host, port = config.listen_address
        listening = False
        try:
            async with open_endpoint(identity, host, port, config=transport_config(config), listen=True,
                                     on_datagram=relay.datagram) as endpoint:
                listening = True
                relay.send = endpoint.send_datagram
                async with trio.open_nursery() as nursery:
                    broker = Broker(config, identity, endpoint, state, relay, persist, nursery)
                    relay.on_closed = broker._relay_closed
                    nursery.start_soon(broker._accept_loop)
                    nursery.start_soon(broker._sweep_loop)
                    nursery.start_soon(broker._stats_loop)
                    event("listening", peer=broker.peer_id, addr=format_address(broker.address),
                          announcements=kept["announcements"], mailboxes=kept["mailboxes"])
                    task_status.started(broker)
        except OSError as exc:
            if listening:
                raise
            raise BrokerError(f"cannot listen on {config.listen}: {exc.strerror or exc}") from None
    finally:
        if persist is not None:
            persist.close()
        os.close(lock)
