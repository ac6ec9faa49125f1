"""Recovery beacons: how a store that lost its drive finds its partners through a broker.

A running store gives each partner a *beacon verifier*, one per partner slot (0 to SLOTS-1):
`verifier(token)` for `token = keys.derive("recovery beacon N")`, a key only the recovery secret
derives. The partner lists that verifier in its own announcements to its broker (as it lists the
verifiers of its pairings), so a lookup with the token finds the partner's addresses. After a
disaster, `bpfs recover` derives the tokens of every slot from the recovery secret and looks
them up: no address, no partner id and no pair key are needed to find the partners again.

What this gives away: the partner learns a verifier (a hash), nothing it can look anything up
with; the broker sees the token only when a recovery looks it up, and then learns that someone
holding the recovery secret looks for that partner, which the connection it helps with shows
anyway. The broker holds each verifier for one key only (`broker.state`), so slots are distinct.
"""

from __future__ import annotations

from .wire import verifier

SLOTS = 16  # partners one store can be recovered from through a broker


def beacon_token(keys, slot: int) -> bytes:
    """The lookup token of slot `slot` (only the recovery secret derives it)."""
    if not 0 <= slot < SLOTS:
        raise ValueError("beacon slot out of range")
    return keys.derive(f"recovery beacon {slot}")


def beacon_verifier(keys, slot: int) -> bytes:
    """What the partner in slot `slot` announces for us."""
    return verifier(beacon_token(keys, slot))


def free_slot(taken: set[int]) -> int | None:
    """The lowest slot not taken (None: all are)."""
    return next((s for s in range(SLOTS) if s not in taken), None)
