"""Exceptions and application error codes of the bpfs transport (no key material, ever)."""

from __future__ import annotations


class TransportError(Exception):
    """Base class for transport failures (never carries key material)."""


class ConnectionClosed(TransportError):
    """The connection is closed; `error_code` / `reason` say why, `by_peer` who did it."""

    def __init__(self, error_code: int = 0, reason: str = "", by_peer: bool = False):
        super().__init__(f"connection closed (code {error_code:#x}{', by peer' if by_peer else ''}): {reason}")
        self.error_code = error_code
        self.reason = reason
        self.by_peer = by_peer


class NoAnswer(ConnectionClosed):
    """Nothing answered a connection we dialled: not a packet from `address` within `waited`
    seconds (no listener, a host that is down or unreachable, a firewall). The words for the
    user belong to the caller, which knows what it dialled (a store, a broker)."""

    def __init__(self, address, waited: float):
        super().__init__(0, f"no answer from {address} within {waited:.0f} s")
        self.args = (self.reason,)
        self.address = address
        self.waited = waited


class AuthenticationError(TransportError):
    """The peer failed authentication, or is not the peer we wanted."""


class PeerRefused(AuthenticationError):
    """The peer proved its identity, but policy does not accept that identity."""


class WrongPeer(PeerRefused):
    """The peer we dialled proved an identity, but not the one we expected: `peer_id` is the one
    it proved."""

    def __init__(self, message: str, peer_id: str):
        super().__init__(message)
        self.peer_id = peer_id


class StreamReset(TransportError):
    """The peer reset (or asked us to stop) this stream."""

    def __init__(self, error_code: int):
        super().__init__(f"stream reset by peer (code {error_code:#x})")
        self.error_code = error_code


class LimitExceeded(TransportError):
    """More data than the caller allowed (e.g. `receive_all(limit)`)."""


class StreamClosed(TransportError):
    """The local side already finished or reset this stream."""


class Code:
    """Application error codes (CONNECTION_CLOSE / RESET_STREAM / STOP_SENDING), as
    class attributes: `NO_ERROR`, `PROTOCOL_VIOLATION`, `AUTH_FAILED`, `REFUSED`,
    `TIMEOUT`, `SHUTDOWN`, `INTERNAL` (connection), `STREAM_CANCELLED`, `STREAM_REFUSED`
    (stream)."""

    NO_ERROR = 0x0
    PROTOCOL_VIOLATION = 0x1
    AUTH_FAILED = 0x2
    REFUSED = 0x3
    TIMEOUT = 0x4
    SHUTDOWN = 0x5
    INTERNAL = 0x6
    STREAM_CANCELLED = 0x10
    STREAM_REFUSED = 0x11
