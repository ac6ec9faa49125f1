"""Human-friendly encoding of 20-byte values: base32 with check characters, in groups.

Used for peer ids and recovery secrets, which people read aloud, type and compare.
Format: 32 base32 characters of the value, then 4 check characters (an unkeyed BLAKE2b
of the value, 20 bits), shown as six groups of six separated by dashes.
A typo in any one character, and almost any transposition, fails the check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

VALUE_SIZE = 20
_GROUP = 6


def _check(value: bytes, label: bytes) -> str:
    digest = hashlib.blake2b(value, digest_size=5, person=label).digest()
    return base64.b32encode(digest).decode()[:4]


def encode(value: bytes, label: bytes) -> str:
    if len(value) != VALUE_SIZE:
        raise ValueError("value must be 20 bytes")
    text = base64.b32encode(value).decode() + _check(value, label)
    return "-".join(text[i:i + _GROUP] for i in range(0, len(text), _GROUP))


def decode(text: str, label: bytes, what: str) -> bytes:
    """Parse `encode` output; ValueError with a one-line reason when it is not valid."""
    compact = "".join(text.split()).replace("-", "").upper()
    if len(compact) != 36:
        raise ValueError(f"{what} must have 36 characters (6 groups of 6), got {len(compact)}")
    try:
        value = base64.b32decode(compact[:32])
    except (ValueError, binascii.Error):
        raise ValueError(f"{what} contains characters outside A-Z and 2-7") from None
    if _check(value, label) != compact[32:]:
        raise ValueError(f"{what} has a typo: its check characters do not match")
    return value
