"""Pairing by code, run: the mailbox conversation through the broker and its outcome.

Owns a pairing session from `bpfs pair` (the creator: it gets a code and waits) and from
`bpfs pair CODE` (the joiner), step by step so a CLI can ask its user in between:

  creator: open() -> code         wait() -> the partner's identity and offer     decide(yes/no)
  joiner:                          join(code) -> the creator's identity and offer decide(yes/no)

The crypto is `pairing`; the broker only carries opaque messages. When both users said yes, the
pairing itself is the same as `bpfs pair --accept` + `bpfs pair --direct`: the creator records an
invitation for the joiner's identity (with the pair key, so it is announced and can be looked
up), then the joiner reaches the creator (directly, by hole punching or through the relay: see
`dialer`) on an authenticated QUIC connection that must prove the identity the code exchange
carried, and sends the usual pairing request. The creator waits until that request arrived.

Mailbox messages are retried across a broker restart (puts are idempotent, gets resume), so a
broker that comes back within the code's lifetime does not break a pairing in progress.
"""

from __future__ import annotations

import logging
import secrets
import time

import trio

from . import wire as B
from ..errors import BpfsError
from ..identity import peer_id
from ..net.quic import TransportError
from ..net.rpc import RemoteError
from .brokers import BrokerClient, BrokerUnavailable
from .pairing import CREATOR, DEFAULT_WORDS, JOINER, Decision, Exchange, Intro, PairingError, make_code, parse_code

log = logging.getLogger(__name__)

GET_WAIT = 25  # seconds a mailbox get waits at the broker
PAIRED_TIMEOUT = 90.0  # after both said yes: the joiner must reach us within this
MAX_SESSIONS = 8


class Session:
    """One pairing by code in progress, the creator's or the joiner's: its mailbox (number, side
    secret), the SPAKE2 exchange, what the other side introduced, and messages sent and received."""

    def __init__(self, role: bytes, offer: int, ask: int):
        self.handle = secrets.token_hex(8)
        self.role = role
        self.offer, self.ask = offer, ask
        self.code = ""
        self.nameplate = 0
        self.side = b""
        self.deadline = 0.0  # unix seconds
        self._exchange: Exchange | None = None  # see `exchange`
        self.other: Intro | None = None
        self.got = 0  # messages of the other side received
        self.sent = 0
        self.lock = trio.Lock()
        self.done = False

    @property
    def exchange(self) -> Exchange:
        """The SPAKE2 exchange: set by `open` / `join` as soon as the code is known, before anything
        is exchanged (a session whose setup failed is finished at once)."""
        if self._exchange is None:
            raise RuntimeError("this pairing session has no code exchange yet")
        return self._exchange

    @exchange.setter
    def exchange(self, exchange: Exchange) -> None:
        self._exchange = exchange

    def summary(self) -> dict:
        o = self.other
        assert o is not None  # called once `_exchange` got it
        return {"session": self.handle, "peer_id": peer_id(bytes(o.public_key)), "their_offer": o.offer,
                "their_ask": o.ask, "we_keep": min(o.ask, self.offer), "they_keep": min(o.offer, self.ask)}


class CodePairing:
    """The pairing sessions of one store. `invite(peer, offer, ask, pair_key)`, `uninvite(peer)`,
    `pair_with(peer, offer, ask, pair_key, public_key)` and `wait_paired(peer, timeout)` are the
    partner service's; this module knows nothing of ledgers or holders."""

    def __init__(self, broker: BrokerClient, identity, *, invite, uninvite, pair_with, wait_paired):
        self.broker = broker
        self.identity = identity
        self._invite, self._uninvite = invite, uninvite
        self._pair_with, self._wait_paired = pair_with, wait_paired
        self.sessions: dict[str, Session] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        """Expire sessions a CLI abandoned."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while True:
                await trio.sleep(5)
                for s in list(self.sessions.values()):
                    if time.time() > s.deadline:
                        await self._finish(s)

    # ----- steps --------------------------------------------------------------------------------
    async def open(self, offer: int, ask: int, words: int = DEFAULT_WORDS) -> dict:
        s = self._new(CREATOR, offer, ask)
        try:
            reply = await self._call(s, B.MailboxOpen(), retry=False)
            s.nameplate, s.side, s.deadline = reply.nameplate, bytes(reply.side), float(reply.expires)
            s.code = make_code(reply.nameplate, words)
            s.exchange = Exchange(s.code, CREATOR)
            await self._put(s, s.exchange.message)
        except BaseException:
            await self._finish(s)
            raise
        return {"session": s.handle, "code": s.code, "expires": s.deadline}

    async def wait(self, handle: str) -> dict:
        """Creator: wait for the joiner; its identity and offer."""
        s = self._session(handle, CREATOR)
        async with s.lock:
            try:
                await self._exchange(s)
            except BaseException:
                await self._finish(s)
                raise
        return s.summary()

    async def join(self, code: str, offer: int, ask: int) -> dict:
        """Joiner: the creator's identity and offer."""
        nameplate, code = parse_code(code)
        s = self._new(JOINER, offer, ask)
        try:
            s.deadline = time.time() + 60  # until the broker tells us the mailbox's own expiry
            reply = await self._call(s, B.MailboxJoin(nameplate), retry=False)
            s.nameplate, s.side, s.deadline, s.code = nameplate, bytes(reply.side), float(reply.expires), code
            s.exchange = Exchange(code, JOINER)
            await self._put(s, s.exchange.message)
            await self._exchange(s)
        except BaseException:
            await self._finish(s)
            raise
        return s.summary()

    async def decide(self, handle: str, accept: bool) -> dict:
        """Say our user's answer, hear theirs; if both said yes, pair. The partnership as stored."""
        s = self._session(handle, None)
        async with s.lock:
            try:
                return await self._decide(s, accept)
            finally:
                await self._finish(s)

    async def cancel(self, handle: str) -> dict:
        s = self.sessions.get(handle)
        if s is not None:
            await self._finish(s)
        return {"session": handle}

    # ----- the conversation -----------------------------------------------------------------------
    async def _exchange(self, s: Session) -> None:
        if s.other is not None:
            return
        their_spake = await self._get(s)
        s.exchange.finish(their_spake)
        await self._put(s, s.exchange.seal(Intro(self.identity.public_key, s.offer, s.ask)))
        s.other = s.exchange.open(await self._get(s), Intro)  # WrongCode if the codes differ
        if bytes(s.other.public_key) == self.identity.public_key:
            raise PairingError("that code is this store's own: run `bpfs pair CODE` on the partner's machine",
                               exit_code=2)

    async def _decide(self, s: Session, accept: bool) -> dict:
        if s.other is None:
            raise PairingError("the pairing has not reached the point of deciding", exit_code=2)
        ex, other = s.exchange, s.other
        peer = peer_id(bytes(other.public_key))
        if not accept:
            await self._put(s, ex.seal(Decision(False, "declined by its user")))
            raise PairingError(f"pairing with {peer} declined", exit_code=1)
        if s.role == CREATOR:
            # Invite first (and be findable by it), then say yes: the joiner dials when it hears it.
            self._invite(peer, s.offer, s.ask, ex.pair_key)
            try:
                await self.broker.announced()
            except (BrokerUnavailable, TransportError, trio.TooSlowError) as e:
                log.info("announcing before pairing failed: %s", e)
        await self._put(s, ex.seal(Decision(True, "")))
        theirs = ex.open(await self._get(s), Decision)
        if not theirs.accept:
            if s.role == CREATOR:
                self._uninvite(peer)
            raise PairingError(f"{peer} declined the pairing ({theirs.reason})")
        if s.role == CREATOR:
            return await self._until_paired(s, peer)
        try:
            return await self._pair_with(peer, s.offer, s.ask, ex.pair_key, bytes(other.public_key))
        except BpfsError as e:  # tell the creator, who is waiting for us, why not
            with trio.move_on_after(5):
                await self._put(s, ex.seal(Decision(False, str(e)[:200])))
            raise

    async def _until_paired(self, s: Session, peer: str) -> dict:
        """Creator: the partnership once the joiner's request arrived, or the joiner's reason why not."""
        outcome: list = []

        async def paired(scope):
            try:
                outcome.append(await self._wait_paired(peer, PAIRED_TIMEOUT))
            except BpfsError as e:
                outcome.append(e)
            scope.cancel()

        async def failed(scope):
            try:
                note = s.exchange.open(await self._get(s), Decision)
                outcome.append(PairingError(f"{peer} could not pair: {note.reason}"))
            except BpfsError as e:
                outcome.append(e)
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(paired, nursery.cancel_scope)
            nursery.start_soon(failed, nursery.cancel_scope)
        if isinstance(outcome[0], BpfsError):
            self._uninvite(peer)
            raise outcome[0]
        return outcome[0]

    # ----- mailbox plumbing ---------------------------------------------------------------------
    def _new(self, role: bytes, offer: int, ask: int) -> Session:
        if len(self.sessions) >= MAX_SESSIONS:
            raise PairingError("too many pairings in progress on this store", exit_code=3)
        self.broker.hold()
        s = Session(role, offer, ask)
        self.sessions[s.handle] = s
        return s

    def _session(self, handle: str, role: bytes | None) -> Session:
        s = self.sessions.get(handle)
        if s is None or (role is not None and s.role != role):
            raise PairingError("no such pairing in progress (it expired or ended)", exit_code=2)
        return s

    async def _finish(self, s: Session) -> None:
        if s.done:
            return
        s.done = True
        self.sessions.pop(s.handle, None)
        try:
            if s.side:
                with trio.move_on_after(5):
                    await self.broker.call(B.MailboxClose(s.nameplate, s.side))
        except (RemoteError, BrokerUnavailable, TransportError, trio.TooSlowError):
            pass
        finally:
            self.broker.release()

    async def _call(self, s: Session, msg, *, retry: bool = True, timeout: float = 15.0):
        """A mailbox request; retried (after the broker comes back) until the code expires."""
        while True:
            try:
                return await self.broker.call(msg, timeout=timeout)
            except RemoteError as e:
                raise PairingError(f"the broker refused: {e.message}") from None
            except (BrokerUnavailable, TransportError, trio.TooSlowError) as e:
                if not retry or time.time() > s.deadline:
                    if isinstance(e, BrokerUnavailable):  # it says which broker and what happened
                        raise PairingError(str(e)) from None
                    raise PairingError(f"lost the broker: {e or type(e).__name__}") from None
                log.info("mailbox request failed (%s); retrying", e or type(e).__name__)
                await trio.sleep(1.0)

    async def _put(self, s: Session, body: bytes) -> None:
        await self._call(s, B.MailboxPut(s.nameplate, s.side, s.sent, body))
        s.sent += 1

    async def _get(self, s: Session) -> bytes:
        while True:
            if time.time() > s.deadline:
                raise PairingError("the code expired before the other side answered", exit_code=1)
            reply = await self._call(s, B.MailboxGet(s.nameplate, s.side, s.got, GET_WAIT), timeout=GET_WAIT + 15)
            if reply.bodies:
                s.got += 1
                return bytes(reply.bodies[0])
