"""Mutual peer authentication by Ed25519 identity, bound to the QUIC connection.

Owns the "hello" exchange that runs on stream 0 right after the QUIC handshake and
before the connection is handed to the application (`quic.Connection._establish`).

Wire format: each side sends exactly one hello, then FIN:

    hello = version (1 byte, = 1) || public_key (32) || signature (64)        97 bytes

The client speaks first; the server answers only after the client's hello verified
(and its peer id passed the server's policy), so unauthenticated clients never learn
the server's identity. Each signature is Ed25519 over

    DOMAIN || role || binding || public_key
    DOMAIN  = b"bpfs/net/auth/v1\\0"
    role    = b"C" in the client's hello, b"S" in the server's (no reflection)
    binding = Connection.channel_binding: 32 bytes derived from this connection's TLS
              1.3 master secret and full handshake transcript (see `quic`).

Why this stops a relay in the middle: a relay that terminates QUIC with each side runs
two handshakes with two different ECDHE secrets, so the two legs have different
bindings; the honest side's signature covers *its* leg's binding and fails on the other
leg. The relay cannot produce a fresh signature without the private key. The TLS
certificate plays no part in identity (it is a throwaway per process).

The peer id of a verified key is `identity.peer_id(public_key)`.
"""

from __future__ import annotations

from typing import Callable

from ..identity import Identity, peer_id, verify_signature
from .errors import AuthenticationError, LimitExceeded, PeerRefused, WrongPeer

VERSION = 1
DOMAIN = b"bpfs/net/auth/v1\x00"
CLIENT, SERVER = b"C", b"S"
KEY_SIZE, SIG_SIZE, BINDING_SIZE = 32, 64, 32
HELLO_SIZE = 1 + KEY_SIZE + SIG_SIZE


def transcript(role: bytes, binding: bytes, public_key: bytes) -> bytes:
    """The bytes each side signs (fixed-size fields, so the encoding is unambiguous)."""
    if role not in (CLIENT, SERVER) or len(binding) != BINDING_SIZE or len(public_key) != KEY_SIZE:
        raise ValueError("malformed transcript fields")
    return DOMAIN + role + binding + public_key


def make_hello(identity: Identity, role: bytes, binding: bytes) -> bytes:
    key = identity.public_key
    return bytes([VERSION]) + key + identity.sign(transcript(role, binding, key))


def check_hello(hello: bytes, role: bytes, binding: bytes) -> bytes:
    """The public key from a valid hello; `AuthenticationError` otherwise."""
    if len(hello) != HELLO_SIZE or hello[0] != VERSION:
        raise AuthenticationError("malformed hello")
    key, sig = hello[1:1 + KEY_SIZE], hello[1 + KEY_SIZE:]
    if not verify_signature(key, transcript(role, binding, key), sig):
        raise AuthenticationError("bad signature in hello")
    return key


class Ed25519Authenticator:
    """The default authenticator of an `Endpoint`: proves `identity`, learns the peer's."""

    def __init__(self, identity: Identity):
        self._identity = identity

    async def authenticate(self, conn, stream, accept: Callable[[bytes], bool]) -> bytes:
        binding = conn.channel_binding
        if binding is None or len(binding) != BINDING_SIZE:
            raise AuthenticationError("no channel binding")
        try:
            if conn.is_client:
                await stream.send(make_hello(self._identity, CLIENT, binding), end=True)
                key = check_hello(await stream.receive_all(HELLO_SIZE), SERVER, binding)
                if not accept(key):
                    raise WrongPeer(f"the server is {peer_id(key)}, not the peer we dialled", peer_id(key))
            else:
                key = check_hello(await stream.receive_all(HELLO_SIZE), CLIENT, binding)
                if not accept(key):
                    raise PeerRefused("peer not accepted")
                await stream.send(make_hello(self._identity, SERVER, binding), end=True)
        except LimitExceeded:
            raise AuthenticationError("oversized hello") from None
        return key
