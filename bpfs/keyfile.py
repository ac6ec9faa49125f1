"""The store's key material: created once, unlocked by passphrase, rebuilt from the recovery secret.

Everything secret derives from one 160-bit root secret, which the user holds as the
recovery secret (printed once at `bpfs init`). The key file on the drive keeps that root
wrapped under a key stretched from the passphrase with Argon2id, so the passphrase can be
changed without touching data, and the recovery secret alone rebuilds every key:
identity, data keys, the chunkers' secret gear tables.
"""

from __future__ import annotations

import base64
import json
import os

import nacl.pwhash

from . import checked
from .crypto import KEY_SIZE, BulkSealer, ChunkIdHash, KeyedHash, Sealer, derive_key
from .errors import BpfsError, IntegrityError, WrongPassphrase
from .fsutil import write_private_file
from .identity import Identity

FORMAT = "bpfs-key-v1"
_RECOVERY_LABEL = b"bpfs.recovery"

KDF_PROFILES = {
    "interactive": (nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE, nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE),
    "moderate": (nacl.pwhash.argon2id.OPSLIMIT_MODERATE, nacl.pwhash.argon2id.MEMLIMIT_MODERATE),
    "sensitive": (nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE, nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE),
}


# What `unlock` accepts from a key file: the costs of the profiles above, nothing else (an edited
# file could otherwise make unlocking use all memory, or make the passphrase cheap to guess).
_OPS_RANGE = (min(p[0] for p in KDF_PROFILES.values()), max(p[0] for p in KDF_PROFILES.values()))
_MEM_RANGE = (min(p[1] for p in KDF_PROFILES.values()), max(p[1] for p in KDF_PROFILES.values()))


class KeyRing:
    """All keys of one store, derived from its root secret. Never logged, never sent."""

    def __init__(self, root: bytes):
        if len(root) != checked.VALUE_SIZE:
            raise ValueError("root secret must be 20 bytes")
        self._root = root
        master = derive_key(root, "master")
        self.identity = Identity(derive_key(root, "identity-ed25519"))
        self.data = BulkSealer(derive_key(master, "pack-data"))
        self.records = Sealer(derive_key(master, "index-records"))
        self.chunk_id = ChunkIdHash(derive_key(master, "chunk-id"))
        self.name_hash = KeyedHash(derive_key(master, "name-lookup"), size=16)  # index format 1 only
        # index format 2 on: a name's tag is keyed with its directory (or inode), so equal names
        # in different places do not share a tag (see index)
        self.dirent_tag = KeyedHash(derive_key(master, "index-dirent-tag"), size=16)
        self.xattr_tag = KeyedHash(derive_key(master, "index-xattr-tag"), size=16)
        self.chunker_key = derive_key(master, "chunker-gear-table")  # keys the chunker's secret table
        # index format 4 on: keys the hash of every index record whose sum authenticates the
        # whole index (see index)
        self.index_state = derive_key(master, "index-state")

    def derive(self, purpose: str, size: int = KEY_SIZE) -> bytes:
        """A subkey of the master key for one named purpose, for modules with keys of their own."""
        return derive_key(derive_key(self._root, "master"), purpose, size)

    @property
    def recovery_secret(self) -> str:
        return checked.encode(self._root, _RECOVERY_LABEL)

    @classmethod
    def from_recovery_secret(cls, text: str) -> "KeyRing":
        try:
            return cls(checked.decode(text, _RECOVERY_LABEL, "recovery secret"))
        except ValueError as e:
            raise BpfsError(str(e), exit_code=2) from None

    def __repr__(self) -> str:
        return f"KeyRing({self.identity.peer_id})"


def _kek(passphrase: bytes, salt: bytes, opslimit: int, memlimit: int) -> Sealer:
    return Sealer(nacl.pwhash.argon2id.kdf(32, passphrase, salt, opslimit=opslimit, memlimit=memlimit))


def create(path: str, passphrase: bytes, profile: str = "moderate", root: bytes | None = None) -> KeyRing:
    """Write a new key file at `path` (0600) and return the keys. Fails if `path` exists."""
    if not passphrase:
        raise BpfsError("the passphrase must not be empty", exit_code=2)
    opslimit, memlimit = KDF_PROFILES[profile]
    keys = KeyRing(root if root is not None else os.urandom(checked.VALUE_SIZE))
    salt = os.urandom(nacl.pwhash.argon2id.SALTBYTES)
    aad = FORMAT.encode() + keys.identity.public_key
    wrapped = _kek(passphrase, salt, opslimit, memlimit).seal(keys._root, aad)
    doc = {
        "format": FORMAT,
        "peer_id": keys.identity.peer_id,
        "public_key": keys.identity.public_key.hex(),
        "kdf": {"algorithm": "argon2id", "opslimit": opslimit, "memlimit": memlimit,
                "salt": base64.b64encode(salt).decode()},
        "wrapped_root": base64.b64encode(wrapped).decode(),
    }
    write_private_file(path, (json.dumps(doc, indent=1) + "\n").encode(), exclusive=True)
    return keys


def read_public(path: str) -> dict:
    """The key file's public part (peer id, public key) without unlocking it."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1 << 16))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise BpfsError(f"cannot read key file {path}: {e}", exit_code=2) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise BpfsError(f"{path} is not a bpfs key file of a known format", exit_code=2)
    return doc


def unlock(path: str, passphrase: bytes) -> KeyRing:
    doc = read_public(path)
    try:
        kdf = doc["kdf"]
        salt = base64.b64decode(kdf["salt"])
        wrapped = base64.b64decode(doc["wrapped_root"])
        public_key = bytes.fromhex(doc["public_key"])
        opslimit, memlimit = int(kdf["opslimit"]), int(kdf["memlimit"])
    except (KeyError, ValueError, TypeError):
        raise BpfsError(f"key file {path} is damaged", exit_code=2) from None
    if not (_OPS_RANGE[0] <= opslimit <= _OPS_RANGE[1] and _MEM_RANGE[0] <= memlimit <= _MEM_RANGE[1]
            and len(salt) == nacl.pwhash.argon2id.SALTBYTES):
        raise BpfsError(f"key file {path} asks for an Argon2id cost bpfs never uses (opslimit {opslimit}, memlimit "
                        f"{memlimit}): refusing it (was the file edited?)", exit_code=2)
    try:
        root = _kek(passphrase, salt, opslimit, memlimit).open(wrapped, FORMAT.encode() + public_key)
    except IntegrityError:
        raise WrongPassphrase("wrong passphrase for this store") from None
    keys = KeyRing(root)
    if keys.identity.public_key != public_key:
        raise BpfsError(f"key file {path} is damaged: identity does not match", exit_code=2)
    return keys
