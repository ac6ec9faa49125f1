"""Symmetric cryptography of a store: subkey derivation, AEAD sealing, keyed ids, padding.

Everything here is pure computation on bytes: no I/O, no knowledge of files or peers.
Data is sealed with XChaCha20-Poly1305 (192-bit nonces: a random per-process prefix and a
counter, so no nonce state to keep across runs),
always with associated data that names where the ciphertext belongs, so that a stored
record or chunk cannot be moved to another place without failing authentication.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_encrypt as _aead_encrypt,
)
from nacl._sodium import ffi as _ffi, lib as _lib  # PyNaCl's own libsodium binding: in-place calls

from .errors import IntegrityError

KEY_SIZE = 32
NONCE_SIZE = 24
TAG_SIZE = 16
SEAL_OVERHEAD = NONCE_SIZE + TAG_SIZE
CHUNK_ID_SIZE = 32


def derive_key(root: bytes, purpose: str, size: int = KEY_SIZE) -> bytes:
    """Derive an independent subkey of `root` for one named purpose (BLAKE2b keyed KDF)."""
    return hashlib.blake2b(purpose.encode(), key=root, digest_size=size, person=b"bpfs.kdf.v1").digest()


class _Nonces:
    """XChaCha20 nonces without a system call each: a random 128-bit prefix of this process and a
    64-bit counter. Unique like random 192-bit nonces are (a prefix repeats between two processes
    with probability 2^-128 per pair, and a forked child draws a new one before it seals)."""

    def __init__(self):
        self.reseed()

    def reseed(self) -> None:
        self._prefix = os.urandom(NONCE_SIZE - 8)
        self._counter = itertools.count(1)  # next() is atomic: threads sealing at once never share one

    def __call__(self) -> bytes:
        return self._prefix + next(self._counter).to_bytes(8, "little")


new_nonce = _Nonces()
os.register_at_fork(after_in_child=new_nonce.reseed)


class Sealer:
    """Seals and opens byte strings under one key: nonce || ciphertext || tag."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        if len(key) != KEY_SIZE:
            raise ValueError("key must be 32 bytes")
        self._key = key

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        # libsodium through PyNaCl's cffi module directly: PyNaCl's wrapper checks its arguments
        # with eagerly formatted messages, about 3x the cost of sealing a small index record
        n = len(plaintext)
        nonce = new_nonce()
        out = bytearray(NONCE_SIZE + n + TAG_SIZE)
        out[:NONCE_SIZE] = nonce
        rc = _lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
            _ffi.from_buffer("unsigned char[]", out, require_writable=True) + NONCE_SIZE, _ffi.NULL,
            _ffi.from_buffer(plaintext), n, aad, len(aad), _ffi.NULL, nonce, self._key)
        if rc != 0:
            raise RuntimeError("encryption failed")
        return bytes(out)

    def reseal(self, plaintext: bytes, aad: bytes, previous: bytes) -> bytes:
        """Seal a changed copy of the sealed value `previous` deterministically: the nonce is
        a keyed hash of (previous, aad, plaintext), so the same change of the same value gives
        the same bytes (snapshots that filter records stay deduplicated), and different
        plaintexts never share a nonce."""
        nonce_key = hashlib.blake2b(b"reseal nonce", key=self._key, digest_size=KEY_SIZE,
                                    person=b"bpfs.reseal").digest()
        h = hashlib.blake2b(key=nonce_key, digest_size=NONCE_SIZE)
        for part in (previous, aad, plaintext):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        nonce = h.digest()
        return nonce + _aead_encrypt(plaintext, aad, nonce, self._key)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        return bytes(self._open_into_new(sealed, aad))

    def _open_into_new(self, sealed, aad: bytes) -> bytearray:
        """The plaintext of `sealed` in a new buffer (IntegrityError unless it authenticates)."""
        n = len(sealed) - SEAL_OVERHEAD
        if n < 0:
            raise IntegrityError("sealed data too short")
        out = bytearray(n)
        src = _ffi.from_buffer("unsigned char[]", sealed)
        rc = _lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
            _ffi.from_buffer("unsigned char[]", out, require_writable=True), _ffi.NULL, _ffi.NULL,
            src + NONCE_SIZE, n + TAG_SIZE, aad, len(aad), src, self._key)
        if rc != 0:
            raise IntegrityError("authentication failed")
        return out


class BulkSealer(Sealer):
    """The data path: seals in place inside a caller's buffer and opens into a new one.

    Same format as `Sealer`, without PyNaCl's copies (twice the throughput for 1 MiB
    chunks here). libsodium is called through PyNaCl's own cffi module, which releases the
    GIL, so two threads seal two chunks at once.
    """

    __slots__ = ()

    def seal_in_place(self, buf: bytearray, offset: int, length: int, aad: bytes) -> None:
        """buf[offset+24 : offset+24+length] holds plaintext; afterwards buf[offset : offset+40+length]
        holds nonce || ciphertext || tag."""
        nonce = new_nonce()
        buf[offset:offset + NONCE_SIZE] = nonce
        p = _ffi.from_buffer("unsigned char[]", buf, require_writable=True) + offset + NONCE_SIZE
        rc = _lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
            p, _ffi.NULL, p, length, aad, len(aad), _ffi.NULL, nonce, self._key)
        if rc != 0:
            raise RuntimeError("encryption failed")

    # (a bytearray, not bytes: the data path takes any buffer, and a copy would cost what this class saves)
    def open(self, sealed, aad: bytes) -> bytearray:  # type: ignore[override]
        return self._open_into_new(sealed, aad)


class ChunkIdHash:
    """Chunk ids: HMAC-SHA256 under a store key (SHA-NI makes it 1.6x keyed BLAKE2b here)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        self._key = key

    def __call__(self, data) -> bytes:
        return hmac.digest(self._key, data, "sha256")


class KeyedHash:
    """A keyed BLAKE2b: name lookups in the index that only the key holder can compute."""

    __slots__ = ("_key", "_size")

    def __init__(self, key: bytes, size: int = CHUNK_ID_SIZE):
        self._key = key
        self._size = size

    def __call__(self, data) -> bytes:
        return hashlib.blake2b(data, key=self._key, digest_size=self._size).digest()


def padme(length: int) -> int:
    """Padmé padding (Nikitin et al., PETS 2019): at most 12% overhead, leaks O(log log n) bits."""
    if length < 256:
        return 256
    e = length.bit_length() - 1
    s = e.bit_length()
    mask = (1 << (e - s)) - 1
    return (length + mask) & ~mask


def sealed_chunk_size(plain_length: int) -> int:
    """Bytes a chunk of `plain_length` occupies in a pack once padded and sealed."""
    return padme(plain_length) + SEAL_OVERHEAD
