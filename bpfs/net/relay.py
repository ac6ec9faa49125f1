"""Datagrams beside QUIC on the same UDP socket: relay frames and hole-punching probes.

Owns their wire format and `RelayPath`, the address of a peer reached through a relay. Every
QUIC version 1 packet has the "fixed bit" (0x40) of its first byte set (RFC 9000 section 17), so
a datagram whose first byte has it clear is one of these and never confused with QUIC:

    relay frame  0x01 | session (16 bytes) | payload (one QUIC datagram of the two peers)
    punch probe  0x02 | 8 random bytes      (opens a NAT mapping; the receiver ignores it)

A store sends a relay frame to the broker with *its* session id; the broker forwards the payload
to the other side of the session with *that side's* id. The payload is the peers' own QUIC packet
(end-to-end encrypted and authenticated between them); the relay only counts and forwards it.
"""

from __future__ import annotations

import os
from typing import NamedTuple

RELAY_FRAME = 0x01
PUNCH_PROBE = 0x02
SESSION_SIZE = 16
RELAY_OVERHEAD = 1 + SESSION_SIZE
QUIC_FIXED_BIT = 0x40


class RelayPath(NamedTuple):
    """Where a relayed connection's datagrams go: the relay's (host, port) and our session id.

    `path[0]` is the relay's host, so per-host accounting treats a relayed peer as the relay."""

    host: str
    port: int
    session: bytes

    @property
    def relay(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"relay {host}:{self.port}"


def is_quic(data: bytes) -> bool:
    return bool(data) and bool(data[0] & QUIC_FIXED_BIT)


def relay_frame(session: bytes, payload: bytes) -> bytes:
    return bytes((RELAY_FRAME,)) + session + payload


def parse_relay_frame(data: bytes) -> tuple[bytes, bytes] | None:
    """(session, payload) of a relay frame, or None if `data` is not one."""
    if len(data) <= RELAY_OVERHEAD or data[0] != RELAY_FRAME:
        return None
    return bytes(data[1:RELAY_OVERHEAD]), data[RELAY_OVERHEAD:]


def punch_probe() -> bytes:
    return bytes((PUNCH_PROBE,)) + os.urandom(8)
