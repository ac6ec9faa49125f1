"""A store's Ed25519 identity and the peer id derived from it.

The peer id is the BLAKE2b-160 hash of the public key, shown with check characters
(see `checked`): short enough to read aloud, and enough to pin a partner's key.
"""

from __future__ import annotations

import hashlib

from nacl.signing import SigningKey, VerifyKey

from . import checked

_LABEL = b"bpfs.peer-id"


def peer_id_bytes(public_key: bytes) -> bytes:
    return hashlib.blake2b(public_key, digest_size=checked.VALUE_SIZE, person=_LABEL).digest()


def peer_id(public_key: bytes) -> str:
    return format_peer_id(peer_id_bytes(public_key))


def format_peer_id(raw: bytes) -> str:
    """The text form (with check characters) of a 20-byte peer id."""
    return checked.encode(raw, _LABEL)


def parse_peer_id(text: str) -> bytes:
    return checked.decode(text, _LABEL, "peer id")


class Identity:
    """The signing key of a store; the private half never leaves this object."""

    def __init__(self, seed: bytes):
        self._signing = SigningKey(seed)
        self.public_key = bytes(self._signing.verify_key)
        self.peer_id = peer_id(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._signing.sign(message).signature

    def __repr__(self) -> str:  # never show key material
        return f"Identity({self.peer_id})"


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    from nacl.exceptions import BadSignatureError

    try:
        VerifyKey(public_key).verify(message, signature)
        return True
    except (BadSignatureError, ValueError):
        return False
