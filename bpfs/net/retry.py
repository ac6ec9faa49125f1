"""Address validation with QUIC Retry (RFC 9000 section 8.1): the tokens and the Retry packet.

When handshakes pile up at a listening endpoint (`quic.TransportConfig.retry_threshold`), it
answers a client Initial that carries no token with a Retry packet instead of a connection; the
client must send its Initial again with the token the Retry carried. A token is bound to the
address the Initial came from, so only a client that receives packets at that address can come
back with it: a flood of Initials from spoofed or throwaway source addresses costs the endpoint
one small Retry packet each (smaller than the Initial: no amplification) and no state at all.

Owns the token format and building the Retry packet (aioquic's public `encode_quic_retry`). No
state but one random key per endpoint; nothing here does I/O.

Token (authenticated, not secret: it carries nothing the client did not send):

    issued (u64, milliseconds of the endpoint's clock) || len(odcid) (u8) || odcid || tag (16)
    tag = BLAKE2b-128(key = the endpoint's random key, person = "bpfs-net-retry",
                      issued || len(addr) || addr || len(rscid) || rscid || len(odcid) || odcid)

`addr` is the client's address as the endpoint sees it (IP and port, or the relay and session of a
relayed path), `rscid` the connection id the Retry told the client to use (the Initial that comes
back is sent to it) and `odcid` the destination id of the client's first Initial (the handshake's
transport parameters must repeat it, and the channel binding covers it). A token is good for
`TOKEN_LIFETIME` seconds. What it proves: the client received a packet at that address a moment
ago. Not who the client is: that is authentication's job (`auth`), after the handshake.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from aioquic.quic.packet import encode_quic_retry

TOKEN_LIFETIME = 20.0  # seconds: a client answers a Retry at once (aioquic uses 30)
_TAG = 16
_ISSUED = struct.Struct(">Q")
_MIN_CID, _MAX_CID = 8, 20  # client Initials we accept have a destination id of 8..20 bytes
MAX_TOKEN = _ISSUED.size + 1 + _MAX_CID + _TAG
_PERSON = b"bpfs-net-retry"


def _address_bytes(addr) -> bytes:
    """A canonical encoding of a peer address: (ip, port) or a `relay.RelayPath`."""
    parts = [str(addr[0]).encode(), str(int(addr[1])).encode()]
    if len(addr) > 2:  # RelayPath: the session is part of the path
        parts.append(bytes(addr[2]))
    return b"".join(bytes([len(p)]) + p for p in parts)


class RetryTokens:
    """Mints and checks the Retry tokens of one endpoint (a random key of its own)."""

    def __init__(self, key: bytes | None = None):
        self._key = key or os.urandom(32)

    def _tag(self, issued: bytes, addr, rscid: bytes, odcid: bytes) -> bytes:
        a = _address_bytes(addr)
        h = hashlib.blake2b(digest_size=_TAG, key=self._key, person=_PERSON)
        h.update(issued + bytes([len(a)]) + a + bytes([len(rscid)]) + rscid + bytes([len(odcid)]) + odcid)
        return h.digest()

    def mint(self, addr, rscid: bytes, odcid: bytes, now: float) -> bytes:
        if not _MIN_CID <= len(odcid) <= _MAX_CID:
            raise ValueError("original destination connection id of 8..20 bytes expected")
        issued = _ISSUED.pack(max(0, int(now * 1000)))
        return issued + bytes([len(odcid)]) + odcid + self._tag(issued, addr, rscid, odcid)

    def check(self, token: bytes, addr, rscid: bytes, now: float) -> bytes | None:
        """The original destination id the token vouches for, or None: not ours, for another
        address or connection id, malformed, or older than TOKEN_LIFETIME."""
        token = bytes(token)
        if not _ISSUED.size + 1 + _MIN_CID + _TAG <= len(token) <= MAX_TOKEN:
            return None
        issued, n = token[:_ISSUED.size], token[_ISSUED.size]
        if len(token) != _ISSUED.size + 1 + n + _TAG:
            return None
        odcid = token[_ISSUED.size + 1:_ISSUED.size + 1 + n]
        if not hmac.compare_digest(token[-_TAG:], self._tag(issued, addr, rscid, odcid)):
            return None
        age = now - _ISSUED.unpack(issued)[0] / 1000
        if not -1.0 <= age <= TOKEN_LIFETIME:
            return None
        return odcid


def retry_packet(tokens: RetryTokens, header, addr, now: float) -> bytes:
    """The Retry packet answering the client Initial `header` (aioquic's `QuicHeader`) from `addr`:
    a fresh connection id for the client to use next, and a token bound to both."""
    rscid = os.urandom(8)
    token = tokens.mint(addr, rscid, header.destination_cid, now)
    return encode_quic_retry(version=header.version, source_cid=rscid, destination_cid=header.source_cid,
                             original_destination_cid=header.destination_cid, retry_token=token)
