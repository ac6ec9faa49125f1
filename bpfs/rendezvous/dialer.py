"""Reaching a partner: direct addresses, then the broker (hole punching), then the broker's relay.

Owns the order and the racing of connection attempts. Every attempt is an ordinary
authenticated QUIC connection that must prove the partner's Ed25519 identity (`expected_peer`),
whatever path it takes: a wrong address, a NAT or a relay can delay us, never fool us.

1. Known addresses (what the partner told us, where it last came from) and, when a broker is
   configured and we share a pair key with the partner, what the broker says (its announced
   addresses and the address the broker sees it at), asked with the pair's lookup key (the
   broker client makes today's token for that broker from it: `wire.LookupKey`). Asking the
   broker also makes it tell the partner to punch towards us. All of these are dialled at once;
   the first to authenticate wins and the others are abandoned.
2. If none answers within the punch window and a broker is there, a relay session through it
   (`bpfs.rendezvous.wire`, `bpfs.net.relay`), dialled like any address.
"""

from __future__ import annotations

import logging

import trio

from . import wire as B
from ..config import ConfigError, format_address, parse_address
from ..net.quic import Connection, NoAnswer, RelayPath, TransportError
from ..net.rpc import RemoteError
from .brokers import BrokerClient, BrokerUnavailable

log = logging.getLogger(__name__)

DIRECT_TIMEOUT = 15.0  # without a broker to fall back on
PUNCH_WINDOW = 7.0  # direct attempts (with punching) before we try the relay
RELAY_TIMEOUT = 15.0


class NoRoute(TransportError):
    """No path to the partner worked: what each attempt said (direct, broker, relay)."""


async def dial_first(endpoint, addresses: list, expected_peer: str, timeout: float) -> Connection:
    """Dial every address at once; the first authenticated connection (others are closed)."""
    if not addresses:
        raise NoRoute("it has no address we know: waiting for it to connect")
    winner: list[Connection] = []
    errors: list[str] = []

    async def attempt(addr, scope):
        try:
            conn = await endpoint.connect(addr, expected_peer=expected_peer)
        except NoAnswer as e:
            errors.append(f"no bpfs store answered at {_show(addr)} within {e.waited:.0f} s")
            return
        except (TransportError, OSError) as e:
            errors.append(f"{_show(addr)}: {e or type(e).__name__}")
            return
        if winner:
            conn.close(reason="another path won")
            return
        winner.append(conn)
        scope.cancel()

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for addr in addresses:
                nursery.start_soon(attempt, addr, nursery.cancel_scope)
    if winner:
        return winner[0]
    raise NoRoute("; ".join(errors) or f"no answer within {timeout:.0f} s")


def _show(addr) -> str:
    return str(addr) if isinstance(addr, RelayPath) else format_address(addr)


def parse_addresses(texts) -> list:
    """The dialable (host, port) addresses among `texts`, in order, once each; the rest skipped."""
    out = []
    for text in texts:
        try:
            addr = parse_address(text)
        except ConfigError:
            continue
        if addr[1] and addr not in out:
            out.append(addr)
    return out


class Dialer:
    """How the partner service dials a partner (`reach`): its addresses and the broker's lookup at
    once, then the broker's relay (see the module docstring)."""

    def __init__(self, endpoint, broker: BrokerClient | None):
        self.endpoint = endpoint
        self.broker = broker

    async def reach(self, peer: str, addresses: list[str], key: B.LookupKey | None) -> Connection:
        """A connection to `peer`. `key` is our lookup key for it (None: no broker help)."""
        direct = parse_addresses(addresses)
        # the broker that helps (None: none does; it needs our lookup `key` for the peer)
        broker = self.broker if key is not None and self.broker is not None and self.broker.configured else None
        found_note = ""
        if broker is not None and key is not None:
            try:
                found = await broker.lookup(key)
                direct += [a for a in parse_addresses([found.observed, *found.addresses]) if a not in direct]
                found_note = "" if found.online else " (not connected to the broker)"
            except RemoteError as e:
                found_note = f" (broker: {e.message})"
            except (BrokerUnavailable, TransportError, trio.TooSlowError) as e:
                log.debug("broker lookup for %s failed: %s", peer, e)
                broker = None
        try:
            return await dial_first(self.endpoint, direct, peer, PUNCH_WINDOW if broker is not None else DIRECT_TIMEOUT)
        except NoRoute as e:
            direct_error = str(e)
        if broker is None or key is None:
            raise NoRoute(f"{direct_error}{found_note}")
        try:
            path = await broker.open_relay(key)
        except RemoteError as e:
            raise NoRoute(f"{direct_error}{found_note}; relay refused: {e.message}") from None
        except (BrokerUnavailable, TransportError, trio.TooSlowError) as e:
            raise NoRoute(f"{direct_error}{found_note}; relay failed: {e or type(e).__name__}") from None
        log.info("no direct path to %s: trying the relay at %s", peer, broker.broker)
        try:
            conn = await dial_first(self.endpoint, [path], peer, RELAY_TIMEOUT)
        except NoRoute as e:
            self.endpoint.remove_relay_session(path.session)
            raise NoRoute(f"{direct_error}; through the relay: {e}") from None
        return conn


def lookup_key_for(pair_key_hex: str | None, public_key_hex: str) -> B.LookupKey | None:
    """The lookup key of a partner recorded with this pair key and public key (hex); None without
    a pair key. ValueError if either is not what it should be."""
    if not pair_key_hex:
        return None
    return B.pair_lookup_key(bytes.fromhex(pair_key_hex), bytes.fromhex(public_key_hex))
