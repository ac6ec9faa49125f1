"""Links: at most one live authenticated connection per partner, whichever side dialled.

Owns the connection cache and redialling. A connection the partner opened to us is used for our
requests too (so a partner behind NAT that dials us still receives our data); one we dialled is
served for the partner's requests too. A failed dial waits before the next attempt: 1 s doubling
up to 5 minutes, each wait scaled by a random factor in [0.5, 1.5) so partners that lost a link
together do not come back in lockstep. A partner that was offline for a week is retried every
few minutes and catches up by itself. How a dial goes (addresses, broker, relay) is the
`dial` function's (`rendezvous.dialer`). Every dial that works or fails, and every connection a
partner opens to us, is reported to `on_contact` (the partner's reachability evidence).
"""

from __future__ import annotations

import logging
import random

import trio

from ..net.quic import Connection, TransportError

log = logging.getLogger(__name__)

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 300.0


class Unreachable(TransportError):
    """No connection to the partner now (and when the next attempt may be made)."""

    def __init__(self, message: str, retry_at: float):
        super().__init__(message)
        self.retry_at = retry_at


class Links:
    """The partners' connections, at most one each (see the module docstring): `get` the live one or
    dial with backoff, `adopt` one already open (incoming, or dialled for pairing), `drop` one."""

    def __init__(self, endpoint, nursery: trio.Nursery, serve_connection, dial, *,
                 rng: random.Random | None = None, on_contact=lambda peer, ok, dialled: None):
        self.endpoint = endpoint
        # dial(peer, addresses) -> Connection, or a TransportError saying why not (rendezvous.dialer)
        self._dial = dial
        self._nursery = nursery
        self._serve = serve_connection
        self._conns: dict[str, Connection] = {}
        self._delay: dict[str, float] = {}
        self._retry_at: dict[str, float] = {}
        self._why: dict[str, str] = {}  # why the last dial failed (shown while its backoff lasts)
        self._locks: dict[str, trio.Lock] = {}
        self._changed = trio.Event()
        self._rng = rng or random.Random()
        self._on_contact = on_contact  # (peer, worked, we dialled) -> None

    def connection(self, peer: str) -> Connection | None:
        conn = self._conns.get(peer)
        if conn is not None and conn.closed:
            del self._conns[peer]
            return None
        return conn

    def connected(self, peer: str) -> bool:
        return self.connection(peer) is not None

    def unreachable(self, peer: str) -> bool:
        """The last dial to the partner failed and it has not connected since."""
        return peer in self._why and not self.connected(peer)

    def adopt(self, conn: Connection) -> None:
        """An authenticated connection (incoming, or dialled for pairing) now serves this partner."""
        old = self.connection(conn.peer_id)
        if old is None or old is conn:
            self._conns[conn.peer_id] = conn
        if old is None:
            self._on_contact(conn.peer_id, True, False)
        self._delay.pop(conn.peer_id, None)
        self._retry_at.pop(conn.peer_id, None)
        self._why.pop(conn.peer_id, None)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def retry_now(self, peer: str) -> None:
        self._retry_at.pop(peer, None)

    async def get(self, peer: str, addresses: list[str]) -> Connection:
        """The partner's connection, dialling its `addresses` in turn if there is none. `Unreachable`
        while a failed dial's backoff lasts, or when it has no address and is not connected."""
        conn = self.connection(peer)
        if conn is not None:
            return conn
        lock = self._locks.setdefault(peer, trio.Lock())
        async with lock:
            conn = self.connection(peer)
            if conn is not None:
                return conn
            now = trio.current_time()
            retry_at = self._retry_at.get(peer, 0.0)
            if now < retry_at:
                why = self._why.get(peer)
                raise Unreachable(f"{peer} is unreachable{f' ({why})' if why else ''}; next attempt in "
                                  f"{retry_at - now:.0f} s", retry_at)
            conn = error = None
            try:
                conn = await self._dial(peer, addresses)
            except (TransportError, trio.TooSlowError, OSError) as e:
                error = e
            if conn is None:
                self._on_contact(peer, False, True)
                err, address = error, " or ".join(addresses) or "any address"
                delay = min(BACKOFF_MAX, self._delay.get(peer, BACKOFF_FIRST / 2) * 2)
                self._delay[peer] = delay
                wait = delay * (0.5 + self._rng.random())
                self._retry_at[peer] = now + wait
                log.info("could not reach %s at %s (%s); retrying in %.0f s", peer, address,
                         type(err).__name__ if not str(err) else err, wait)
                self._why[peer] = f"{err or type(err).__name__}"
                raise Unreachable(f"{peer} is unreachable: {err or type(err).__name__} (tried {address})",
                                  now + wait) from None
            self._on_contact(peer, True, True)
            self._nursery.start_soon(self._serve, conn)
            self.adopt(conn)
            return conn

    def drop(self, peer: str) -> None:
        conn = self._conns.pop(peer, None)
        if conn is not None:
            conn.close()
