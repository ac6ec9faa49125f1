"""Pairing by code: the short code, the password-authenticated key exchange and what it seals.

Owns the code's format, the SPAKE2 exchange (the `spake2` library, the one magic-wormhole uses)
and the messages the two stores send each other through the broker's mailbox. No I/O here:
`codepair` moves these bytes through the broker.

The code is `NUMBER-WORD-WORD-WORD` (`words`; 3 words by default, 4 on request): the number names
the mailbox on the broker; the whole code is the SPAKE2 password. Both sides run SPAKE2
(symmetric mode) on it; if they typed the same code they share a 32-byte key K, otherwise their
keys differ and every sealed message fails to open. The broker relays the exchange but learns
nothing that lets it check a guess offline. Anyone (the broker, or whoever joins a live mailbox
first: numbers are short and dense) can try one online guess per code, which burns the code (one
join per mailbox) and shows the real users a failure. With 3 words a guess succeeds once in 2^24
(16.7 million), and the broker lets one address join 4 codes at once and then one every 10
minutes (`broker.config`), about 150 guesses a day. Two words (2^16) are no longer offered: a
few thousand addresses guessing at that rate would pair with someone's live code every day. A
code of two words is refused locally, so a word left out is not a failed guess either. The users
still compare the peer ids both sides show, over another channel, before they accept: that is
what a guess that succeeded cannot fake.

From K (and the transcript of both SPAKE2 messages, so a relay cannot splice two exchanges):
  seal key of the code's creator ("A") and of the joiner ("B"): who sent a message is bound;
  pair key: the partners' shared secret for finding each other through a broker (see
            `bpfs.rendezvous.wire`); it is stored with the partnership.
Messages, in mailbox order on each side:
  0  the SPAKE2 message (33 bytes, clear)
  1  sealed Intro(public key, offer, ask): who I am and the quotas I propose
  2  sealed Decision(accept, reason): my user's answer
  3  (joiner only, when it could not reach the creator) sealed Decision(False, why)
Sealing is XChaCha20-Poly1305 with a random 24-byte nonce, the side's seal key and the
transcript as associated data. The identities carried in Intro are then proven on the direct (or
relayed) QUIC connection, which authenticates both Ed25519 keys (`bpfs.net.auth`): a public key
somebody merely copied into an Intro cannot authenticate.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from nacl import bindings
from nacl.exceptions import CryptoError

from ..errors import BpfsError
from ..net.codec import Bool, Bytes, ProtocolError, Registry, Text, UInt, field, message
from .words import WORDS

CREATOR, JOINER = b"A", b"B"
DEFAULT_WORDS = 3
MIN_WORDS, MAX_WORDS = 3, 4
MAX_QUOTA = 1 << 60
_ID = b"bpfs pair v1"
_NONCE = bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
_CODE = re.compile(r"^\s*(\d{1,6})((?:-[a-z]+){3,4})\s*$")
_SHAPE = re.compile(r"^\s*(\d{1,6})((?:-[a-z]+)+)\s*$")  # a number and words, of any count

PAIRING = Registry("bpfs.pairing", max_frame=2048)


class PairingError(BpfsError):
    """A pairing by code that failed or cannot go on: one line (and an exit code) for the user."""


class WrongCode(PairingError):
    """The other side's sealed message did not open: the two codes differ (or a guess failed); the
    code is used up."""

    def __init__(self):
        super().__init__("the code did not match: the other side typed a different code (or somebody guessed "
                         "and failed). The code is used up; start again with a new one.")


@message(PAIRING, 0x10)
class Intro:
    """Mailbox message 1, sealed, from each side once the SPAKE2 exchange is done: its identity and the
    quotas it proposes, for the other side to show its user. No reply: the other side sends its own."""

    public_key: bytes = field(Bytes(32, min_len=32))
    offer: int = field(UInt(MAX_QUOTA))  # bytes of the other's data this side keeps
    ask: int = field(UInt(MAX_QUOTA))  # bytes of this side's data it asks the other to keep


@message(PAIRING, 0x11)
class Decision:
    """Mailbox message 2 (and the joiner's 3), sealed: whether this side's user accepted (if not,
    `reason` says why); the joiner also sends one when it could not reach the creator. No reply."""

    accept: bool = field(Bool())
    reason: str = field(Text(200))


# --------------------------------------------------------------------------- codes

def make_code(nameplate: int, words: int = DEFAULT_WORDS) -> str:
    if not MIN_WORDS <= words <= MAX_WORDS:
        raise ValueError(f"a code has {MIN_WORDS} to {MAX_WORDS} words")
    return "-".join([str(nameplate)] + [secrets.choice(WORDS) for _ in range(words)])


def parse_code(text: str) -> tuple[int, str]:
    """(mailbox number, normalised code). PairingError (exit 2) if it is not a code."""
    m = _CODE.match(text.lower())
    shape = _SHAPE.match(text.lower())
    unknown = [w for w in shape.group(2)[1:].split("-") if w not in WORDS] if shape else []
    if unknown:  # it has the form: say which words are wrong (a typo, a word misheard)
        which = " and ".join(repr(w) for w in unknown)
        raise PairingError(f"not a pairing code: {text.strip()!r}: {which} {'is' if len(unknown) == 1 else 'are'} "
                           "not in the list of code words (check the spelling with your partner)", exit_code=2)
    if shape and not m:
        n = len(shape.group(2)[1:].split("-"))
        raise PairingError(f"not a pairing code: {text.strip()!r} has {n} word{'s' if n != 1 else ''}, a code has "
                           f"{MIN_WORDS} or {MAX_WORDS} (NUMBER-WORD-WORD-WORD, as `bpfs pair` printed it)",
                           exit_code=2)
    if not m or int(m.group(1)) == 0:
        raise PairingError(f"not a pairing code: {text.strip()!r} (expected NUMBER-WORD-WORD-WORD, as "
                           "`bpfs pair` printed it)", exit_code=2)
    return int(m.group(1)), f"{int(m.group(1))}{m.group(2)}"


# --------------------------------------------------------------------------- the exchange

class Exchange:
    """One side's SPAKE2 run and, once finished, its sealing keys."""

    def __init__(self, code: str, role: bytes):
        from spake2 import SPAKE2_Symmetric

        if role not in (CREATOR, JOINER):
            raise ValueError("role must be CREATOR or JOINER")
        self.role = role
        self._spake = SPAKE2_Symmetric(code.encode(), idSymmetric=_ID)
        self.message = self._spake.start()
        self._keys: dict[bytes, bytes] | None = None
        self.pair_key: bytes | None = None
        self._transcript = b""

    def finish(self, other_message: bytes) -> None:
        from spake2 import SPAKEError

        try:
            k = self._spake.finish(bytes(other_message))
        except (SPAKEError, ValueError, AssertionError, TypeError) as e:
            raise PairingError(f"the other side sent a malformed key exchange message ({type(e).__name__})") from None
        first, second = (self.message, other_message) if self.role == CREATOR else (other_message, self.message)
        self._transcript = hashlib.blake2b(bytes(first) + b"|" + bytes(second), digest_size=32).digest()

        def derive(label: bytes) -> bytes:
            return hashlib.blake2b(label + b"|" + self._transcript, key=k, person=b"bpfs-pair-v1",
                                   digest_size=32).digest()

        self._keys = {CREATOR: derive(b"seal-A"), JOINER: derive(b"seal-B")}
        self.pair_key = derive(b"rendezvous")

    def seal(self, msg) -> bytes:
        assert self._keys is not None, "finish() first"
        nonce = secrets.token_bytes(_NONCE)
        body = PAIRING.encode(msg)
        return nonce + bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(body, self._transcript, nonce,
                                                                            self._keys[self.role])

    def open(self, sealed: bytes, cls: type):
        """The other side's message of type `cls`; WrongCode if it does not open (different codes)."""
        assert self._keys is not None, "finish() first"
        other = JOINER if self.role == CREATOR else CREATOR
        sealed = bytes(sealed)
        if len(sealed) < _NONCE + 16:
            raise WrongCode()
        try:
            body = bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(sealed[_NONCE:], self._transcript,
                                                                        sealed[:_NONCE], self._keys[other])
        except CryptoError:
            raise WrongCode() from None
        try:
            msg = PAIRING.decode(body)
        except ProtocolError as e:
            raise PairingError(f"the other side sent a malformed pairing message: {e}") from None
        if not isinstance(msg, cls):
            raise PairingError(f"the other side sent {type(msg).__name__} where {cls.__name__} was expected")
        return msg
