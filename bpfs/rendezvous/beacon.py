"""Recovery beacons: how a store that lost its drive finds its partners through a broker.

A running store gives each partner a *beacon key*, one per partner slot (0 to SLOTS-1):
`beacon_key(keys, N) = keys.derive("recovery beacon v2 N")`, a key only the recovery secret
derives. The partner lists, in its own announcements to its broker, the verifiers of that key's
tokens for this broker and the current days (as it lists the verifiers of its pairings; see
`wire.LookupKey`, domain "bpfs beacon v2"), so a lookup with the token finds the partner's
addresses. After a disaster, `bpfs recover` derives the keys of every slot from the recovery
secret and looks up their tokens for its broker and today: no address, no partner id and no pair
key are needed to find the partners again.

Tokens rotate as pair tokens do: bound to the broker's public key and the UTC day, so a broker
that served a recovery's lookups cannot replay them at another broker or on another day, and two
brokers cannot match the verifiers they hold.

What this gives away: the partner in slot N learns slot N's key, with which it can make the
tokens that find itself and nothing else (other slots have other keys; announcing them would
only make lookups find it); the broker sees a token only when a recovery looks it up, and then
learns that someone holding the recovery secret looks for that partner, which the connection it
helps with shows anyway. The broker holds each verifier for one key only (`broker.state`), so
slots are distinct. A partner that held a slot before (unpaired since) still knows that slot's
key and may announce it too: whoever announces a verifier first keeps it, and a recovery proves
every store it reaches holds its roots, so such a partner can delay a beacon, never fool it.
"""

from __future__ import annotations

from .wire import BEACON_DOMAIN, LookupKey

SLOTS = 16  # partners one store can be recovered from through a broker


def beacon_key(keys, slot: int) -> bytes:
    """Slot `slot`'s key (only the recovery secret derives it): what its partner is given."""
    if not 0 <= slot < SLOTS:
        raise ValueError("beacon slot out of range")
    return keys.derive(f"recovery beacon v2 {slot}")


def beacon_lookup_key(key: bytes) -> LookupKey:
    """A beacon key's tokens and verifiers (the recovering store's and the partner's side)."""
    return LookupKey(key, domain=BEACON_DOMAIN)


def free_slot(taken: set[int]) -> int | None:
    """The lowest slot not taken (None: all are)."""
    return next((s for s in range(SLOTS) if s not in taken), None)
