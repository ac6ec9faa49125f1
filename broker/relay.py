"""Relay sessions: forwarding two stores' QUIC datagrams when they cannot reach each other.

Owns the sessions, the per-identity relay accounts (bandwidth bucket, daily byte cap) and the
per-datagram forwarding path (`datagram`, called for every non-QUIC datagram the broker's
endpoint receives). No sockets of its own: it sends with the injected `send(data, addr)`
(`Endpoint.send_datagram`) and reports ended sessions to `on_closed(legs, reason)`, which pushes
`RelayClosed` to each leg's store.

A session has two legs, one per store, each with its own random 16-byte session id and bound to
the remote address of that store's *broker connection* (a store sends its relay frames from the
socket its broker connection uses, so the source address matches; a frame for a session from any
other address is dropped). When that connection migrates, the leg follows it (the address is
looked up again on a mismatch). A frame `0x01 | leg session | payload` from the leg's address is
forwarded as `0x01 | other leg's session | payload` to the other leg's address. The payload is
the stores' own end-to-end encrypted QUIC packet: it is counted, never parsed.

Accounting is per identity, on what it *sends*: a token bucket of `relay_rate` bytes/s (burst
`relay_burst`; over it, frames are dropped and the stores' congestion control slows down) and a
byte allowance per UTC day (`relay_daily_bytes`; reaching it ends the session with a reason and
refuses new sessions until the day ends). Sessions end after `relay_idle` seconds without a
frame, after `relay_lifetime`, when either store's broker connection closes, or on `close`.
Bounds: `max_relay_sessions`, `max_relay_sessions_per_identity`, `max_relay_accounts` (LRU;
an evicted account has no session, and only its daily count is forgotten).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import time
from typing import Callable

from bpfs.net.relay import RELAY_FRAME, RELAY_OVERHEAD, SESSION_SIZE

from .config import BrokerConfig
from bpfs.rendezvous.wire import Refusal
from .state import Refused

log = logging.getLogger(__name__)

_DAY = 86400


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _until_midnight(now: float) -> str:
    left = max(60, int((math.floor(now / _DAY) + 1) * _DAY - now))
    return f"resets at 00:00 UTC (in {left // 3600} h {left % 3600 // 60} min)"


class Account:
    """One identity's relay usage."""

    __slots__ = ("identity", "tokens", "stamp", "day", "used", "sessions")

    def __init__(self, identity: str, burst: float, now: float):
        self.identity = identity
        self.tokens, self.stamp = float(burst), now
        self.day = int(now // _DAY)
        self.used = 0  # bytes sent through the relay this UTC day
        self.sessions = 0

    def used_today(self, now: float) -> int:
        if int(now // _DAY) != self.day:
            self.day, self.used = int(now // _DAY), 0
        return self.used


class Leg:
    """One store's side of a session."""

    __slots__ = ("session_id", "conn", "addr", "account", "peer", "session")
    peer: Leg  # the other store's leg, and
    session: Session  # their session: both set by `Relay.open` as soon as both legs exist

    def __init__(self, session_id: bytes, conn, account: Account):
        self.session_id = session_id
        self.conn = conn  # the store's broker connection (has .remote_address, .peer_id)
        self.addr = conn.remote_address
        self.account = account


class Session:
    """One relay session: its two legs, when it opened and expires, when it last carried a frame, and
    the bytes and frames it carried."""

    __slots__ = ("legs", "opened", "expires", "last", "bytes", "frames")

    def __init__(self, legs: tuple[Leg, Leg], now: float, lifetime: float):
        self.legs = legs
        self.opened = now
        self.expires = now + lifetime
        self.last = now
        self.bytes = 0
        self.frames = 0


class Relay:
    """The broker's relay (see the module docstring): sessions, accounts and counters; `open`, `close`
    and `expire` sessions, `datagram` forwards a frame."""

    def __init__(self, config: BrokerConfig, send: Callable[[bytes, tuple], None] | None = None, *,
                 now: Callable[[], float] = time.time,
                 on_closed: Callable[[tuple, str], None] | None = None):
        self.config = config
        self.send = send  # (data, addr) -> None: set once the endpoint exists
        self.now = now
        self.on_closed = on_closed
        self._legs: dict[bytes, Leg] = {}
        self._by_conn: dict[object, set[Session]] = {}
        self._accounts: collections.OrderedDict[str, Account] = collections.OrderedDict()
        self.sessions: set[Session] = set()
        # counters, for logs and benchmarks
        self.bytes_relayed = 0
        self.frames_relayed = 0
        self.dropped_unknown = 0  # not a relay frame, or no such session
        self.dropped_address = 0  # a session's frame from another address
        self.dropped_rate = 0  # over the sender's bandwidth
        self.dropped_cap = 0  # over the sender's daily allowance
        self.sessions_opened = 0
        self.sessions_closed = 0

    @property
    def frames_dropped(self) -> int:
        return self.dropped_unknown + self.dropped_address + self.dropped_rate + self.dropped_cap

    # ---- accounts

    def _account(self, identity: str, now: float) -> Account:
        acct = self._accounts.get(identity)
        if acct is None:
            acct = self._accounts[identity] = Account(identity, self.config.relay_burst, now)
            if len(self._accounts) > self.config.max_relay_accounts:
                for old in list(self._accounts.values()):  # the least recently used idle one
                    if old.sessions == 0 and old is not acct:
                        del self._accounts[old.identity]
                        break
        else:
            self._accounts.move_to_end(identity)
        return acct

    def account_used(self, identity: str) -> int:
        acct = self._accounts.get(identity)
        return acct.used_today(self.now()) if acct is not None else 0

    # ---- sessions

    def open(self, requester, target) -> tuple[Leg, Leg, float]:
        """A session between two broker connections: (requester's leg, target's leg, expires).
        `Refused(RELAY_REFUSED)` over a bound or an allowance."""
        cfg = self.config
        now = self.now()
        if len(self.sessions) >= cfg.max_relay_sessions:
            raise Refused(Refusal.RELAY_REFUSED, f"this broker relays its maximum of {cfg.max_relay_sessions} "
                          "sessions; retry in a few minutes")
        for conn, whose in ((requester, "this identity"), (target, "the store you asked for")):
            acct = self._accounts.get(conn.peer_id)
            if acct is not None:
                if acct.sessions >= cfg.max_relay_sessions_per_identity:
                    raise Refused(Refusal.RELAY_REFUSED, f"{whose} has {acct.sessions} relay sessions, the most "
                                  "allowed; close one first")
                if acct.used_today(now) >= cfg.relay_daily_bytes:
                    raise Refused(Refusal.RELAY_REFUSED, f"{whose} used its daily relay allowance of "
                                  f"{_size(cfg.relay_daily_bytes)}; it {_until_midnight(now)}")
        a = Leg(self._new_id(), requester, self._account(requester.peer_id, now))
        b = Leg(self._new_id(), target, self._account(target.peer_id, now))
        a.peer, b.peer = b, a
        session = Session((a, b), now, cfg.relay_lifetime)
        for leg in (a, b):
            leg.session = session
            leg.account.sessions += 1
            self._legs[leg.session_id] = leg
            self._by_conn.setdefault(leg.conn, set()).add(session)
        self.sessions.add(session)
        self.sessions_opened += 1
        return a, b, session.expires

    def _new_id(self) -> bytes:
        while True:
            sid = os.urandom(SESSION_SIZE)
            if sid not in self._legs:
                return sid

    def close(self, session: Session, reason: str, *, notify: bool = True) -> None:
        """End `session`; its stores are told (`on_closed`) unless `notify` is False."""
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self.sessions_closed += 1
        for leg in session.legs:
            self._legs.pop(leg.session_id, None)
            leg.account.sessions -= 1
            mine = self._by_conn.get(leg.conn)
            if mine is not None:
                mine.discard(session)
                if not mine:
                    del self._by_conn[leg.conn]
        if notify and self.on_closed is not None:
            try:
                self.on_closed(session.legs, reason)
            except Exception:  # never let a notification failure reach the datagram path
                log.exception("relay on_closed failed")

    def leg(self, session_id: bytes) -> Leg | None:
        return self._legs.get(session_id)

    def connection_closed(self, conn) -> None:
        """A store's broker connection ended: its sessions end (the other store is told)."""
        for session in list(self._by_conn.get(conn, ())):
            self.close(session, "the other store's connection to the broker ended")

    def expire(self) -> int:
        """End idle and overlong sessions; how many ended."""
        now = self.now()
        idle_before = now - self.config.relay_idle
        ended = 0
        for session in list(self.sessions):
            if session.last <= idle_before:
                self.close(session, f"idle for {self.config.relay_idle:g} s")
            elif session.expires <= now:
                self.close(session, "the relay session reached its maximum lifetime; open a new one")
            else:
                continue
            ended += 1
        for identity in [i for i, a in self._accounts.items() if a.sessions == 0 and a.used_today(now) == 0]:
            del self._accounts[identity]
        return ended

    # ---- the per-datagram path

    def datagram(self, data: bytes, addr) -> None:
        """One non-QUIC datagram from the broker's socket: forward it if it is a relay frame of a
        session from that session's store, else drop (and count) it."""
        if len(data) <= RELAY_OVERHEAD or data[0] != RELAY_FRAME:
            self.dropped_unknown += 1
            return
        leg = self._legs.get(data[1:RELAY_OVERHEAD])
        if leg is None:
            self.dropped_unknown += 1
            return
        if addr != leg.addr and not self._moved(leg, addr):
            self.dropped_address += 1
            return
        n = len(data) - RELAY_OVERHEAD
        acct = leg.account
        now = self.now()
        tokens = acct.tokens + (now - acct.stamp) * self.config.relay_rate
        if tokens > self.config.relay_burst:
            tokens = self.config.relay_burst
        acct.stamp = now
        if tokens < n:
            acct.tokens = tokens
            self.dropped_rate += 1
            return
        acct.tokens = tokens - n
        if acct.used_today(now) + n > self.config.relay_daily_bytes:
            acct.used = self.config.relay_daily_bytes  # used up: what is left is less than a frame
            self.dropped_cap += 1
            self.close(leg.session, f"daily relay allowance of {_size(self.config.relay_daily_bytes)} used up; "
                       f"it {_until_midnight(now)}")
            return
        acct.used += n
        session = leg.session
        session.last = now
        session.bytes += n
        session.frames += 1
        self.bytes_relayed += n
        self.frames_relayed += 1
        peer = leg.peer
        assert self.send is not None  # set once the endpoint exists, and frames come from it
        self.send(b"\x01" + peer.session_id + data[RELAY_OVERHEAD:], peer.addr)

    def _moved(self, leg: Leg, addr) -> bool:
        """True if `addr` is where the leg's broker connection is now (it migrated, or the address
        comes in another tuple form, e.g. IPv6 with flow info and scope): the leg follows it."""
        current = leg.conn.remote_address
        if tuple(addr[:2]) == tuple(current[:2]):
            leg.addr = addr
            return True
        return False

    def stats(self) -> dict:
        return {"sessions": len(self.sessions), "bytes_relayed": self.bytes_relayed,
                "frames_relayed": self.frames_relayed, "frames_dropped": self.frames_dropped,
                "dropped_unknown": self.dropped_unknown, "dropped_address": self.dropped_address,
                "dropped_rate": self.dropped_rate, "dropped_cap": self.dropped_cap,
                "sessions_opened": self.sessions_opened, "sessions_closed": self.sessions_closed}
