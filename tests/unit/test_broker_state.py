"""broker.state, broker.relay, broker.persist and broker.config without a network.

The state machine runs on a fake clock (`Clock`), so every expiry and rate limit is exact and
no test sleeps. Relay tests use plain value objects for the two stores' broker connections
(a remote address and a peer id is all the relay reads) and collect what it would send.
Persistence tests use a real LMDB in a temporary directory.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib

import pytest

from bpfs.identity import Identity
from bpfs.net.codec import ErrorCode
from bpfs.rendezvous import wire as P
from broker.config import DEFAULT_RATES, RATE_KINDS, BrokerConfig, ConfigError, Rate, from_dict, load
from broker.persist import Persist
from bpfs.rendezvous.wire import Refusal
from broker.relay import Relay
from broker.state import BrokerState, JournalFull, Refused, format_address, source_key
from tests.helpers.cli import REPO

pytestmark = pytest.mark.timeout(60)

T0 = 1_800_000_000.0
BROKER = Identity(b"\x07" * 32)


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


LOOSE = {kind: Rate(1e6, 1e6, 1e6, 1e6) for kind in RATE_KINDS}  # for tests about something else


def make_state(clock=None, journal=None, **cfg) -> BrokerState:
    cfg.setdefault("rates", LOOSE)
    return BrokerState(BrokerConfig(**cfg), BROKER.public_key, now=clock or Clock(), journal=journal)


def new_identity() -> Identity:
    return Identity(os.urandom(32))


def signed(identity: Identity, seq: int, *, expires: float, verifiers=(), addresses=("192.0.2.1:7450",),
           broker_id: bytes | None = None):
    msg = P.signed_announcement(identity, broker_id or BROKER.public_key, seq, expires, addresses, verifiers)
    return msg.record, msg.signature


def token_for(target: Identity) -> bytes:
    return P.lookup_token(os.urandom(32), BROKER.public_key, P.epoch_of(T0), target.public_key)


def announce(state, identity, seq, *, source="198.51.100.1", token=None, expires=None, **kw):
    tokens = [token] if token is not None else []
    record, sig = signed(identity, seq, expires=expires or state.now() + 600,
                         verifiers=[P.verifier(t) for t in tokens], **kw)
    return state.announce(record, sig, source=source, identity=identity.peer_id, observed=f"{source}:40000")


def refused(fn, *args, **kwargs) -> Refused:
    with pytest.raises(Refused) as info:
        fn(*args, **kwargs)
    exc = info.value
    assert exc.text and "\n" not in exc.text
    return exc


def look(state, token, source="203.0.113.9", identity="asker"):
    return state.lookup(token, source=source, identity=identity)


# --------------------------------------------------------------------------- announcements

def test_announce_then_lookup_by_token_and_not_by_another():
    clock = Clock()
    state = make_state(clock)
    store = new_identity()
    token = token_for(store)
    ann = announce(state, store, 1, token=token, addresses=("192.0.2.1:7450", "[2001:db8::1]:7450"))
    found = look(state, token)
    assert found is ann
    assert list(found.record.addresses) == ["192.0.2.1:7450", "[2001:db8::1]:7450"]
    assert found.observed == "198.51.100.1:40000"
    assert refused(look, state, os.urandom(32)).code == Refusal.NOT_FOUND
    # the verifier itself is not a token: showing it finds nothing
    assert refused(look, state, P.verifier(token)).code == Refusal.NOT_FOUND


def test_bad_signatures_are_refused():
    state = make_state()
    store, other = new_identity(), new_identity()
    token = token_for(store)
    record, sig = signed(store, 1, expires=T0 + 600, verifiers=[P.verifier(token)])
    forged = P.AnnounceRecord(record.public_key, record.broker_id, record.seq, record.expires,
                              ["203.0.113.66:7450"], record.verifiers)
    for rec, s in ((forged, sig), (record, other.sign(P.announce_message(record))), (record, bytes(64))):
        exc = refused(state.announce, rec, s, source="198.51.100.1", identity=store.peer_id, observed="x")
        assert exc.code == Refusal.BAD_SIGNATURE
    assert refused(look, state, token).code == Refusal.NOT_FOUND
    state.announce(record, sig, source="198.51.100.1", identity=store.peer_id, observed="x")  # the real one is fine
    assert look(state, token).record == record


def test_wrong_broker_and_expired_records_are_refused():
    clock = Clock()
    state = make_state(clock)
    store = new_identity()
    assert refused(announce, state, store, 1, broker_id=os.urandom(32)).code == Refusal.WRONG_BROKER
    exc = refused(announce, state, store, 2, expires=T0)
    assert exc.code == Refusal.EXPIRED and "clock" in exc.text
    assert refused(announce, state, store, 3, expires=T0 - 50).code == Refusal.EXPIRED


def test_lifetime_is_capped_and_announcements_expire():
    clock = Clock()
    state = make_state(clock, max_ttl=300)
    store = new_identity()
    token = token_for(store)
    ann = announce(state, store, 1, token=token, expires=T0 + 86400)
    assert ann.expires == T0 + 300
    clock.advance(299)
    assert look(state, token) is ann
    clock.advance(1)
    assert refused(look, state, token).code == Refusal.NOT_FOUND
    assert state.stats()["announcements"] == 0 and state.stats()["verifiers"] == 0

    # the sweep removes expired ones too, without a lookup
    announce(state, store, 2, token=token)
    clock.advance(301)
    report = state.expire()
    assert report.announcements == 1 and state.stats()["announcements"] == 0


def test_replayed_announcements_are_refused_also_after_expiry():
    clock = Clock()
    state = make_state(clock, max_ttl=600, seq_memory_ttl=3600)
    store = new_identity()
    token = token_for(store)
    old = signed(store, 5, expires=T0 + 86400, verifiers=[P.verifier(token)])
    state.announce(*old, source="198.51.100.1", identity=store.peer_id, observed="a")
    new = signed(store, 7, expires=T0 + 86400, verifiers=[P.verifier(token)], addresses=["192.0.2.2:7450"])
    state.announce(*new, source="198.51.100.1", identity=store.peer_id, observed="a")

    for rec in (new, old):  # the same seq, an older seq
        exc = refused(state.announce, *rec, source="198.51.100.1", identity=store.peer_id, observed="a")
        assert exc.code == Refusal.REPLAYED and "7" in exc.text
    assert list(look(state, token).record.addresses) == ["192.0.2.2:7450"]

    clock.advance(601)  # the record is gone, its seq is remembered
    state.expire()
    assert refused(look, state, token).code == Refusal.NOT_FOUND
    assert state.stats()["remembered_seqs"] == 1
    assert refused(state.announce, *old, source="198.51.100.1", identity=store.peer_id,
                   observed="a").code == Refusal.REPLAYED
    announce(state, store, 8, token=token)  # a fresh one is welcome
    assert look(state, token).record.seq == 8


def test_seq_memory_is_forgotten_after_its_horizon():
    clock = Clock()
    state = make_state(clock, max_ttl=600, seq_memory_ttl=1000)
    store = new_identity()
    old = signed(store, 5, expires=T0 + 86400)
    state.announce(*old, source="198.51.100.1", identity=store.peer_id, observed="a")
    clock.advance(600)
    state.expire()
    clock.advance(999)
    assert state.expire().seqs == 0
    assert refused(state.announce, *old, source="198.51.100.1", identity=store.peer_id,
                   observed="a").code == Refusal.REPLAYED
    clock.advance(1)
    assert state.expire().seqs == 1
    assert state.stats()["remembered_seqs"] == 0
    state.announce(*old, source="198.51.100.1", identity=store.peer_id, observed="a")  # the horizon has passed


def test_seq_memory_is_bounded_oldest_first():
    clock = Clock()
    state = make_state(clock, max_ttl=10, max_seq_memory=3)
    stores = [new_identity() for _ in range(5)]
    records = []
    for s in stores:
        records.append(signed(s, 1, expires=T0 + 86400))
        state.announce(*records[-1], source="198.51.100.1", identity=s.peer_id, observed="a")
        clock.advance(11)
        state.expire()
    assert state.stats()["remembered_seqs"] == 3
    # the two oldest were forgotten; the newest is still remembered
    state.announce(*records[0], source="198.51.100.1", identity=stores[0].peer_id, observed="a")
    assert refused(state.announce, *records[4], source="198.51.100.1", identity=stores[4].peer_id,
                   observed="a").code == Refusal.REPLAYED


def test_a_verifier_cannot_be_hijacked_by_another_key():
    clock = Clock()
    state = make_state(clock)
    victim, thief = new_identity(), new_identity()
    token = token_for(victim)
    announce(state, victim, 1, token=token)
    exc = refused(announce, state, thief, 1, token=token)
    assert exc.code == Refusal.LIMIT and "another store" in exc.text
    assert look(state, token).key == victim.public_key
    # once the victim stops listing it (a newer announcement without it), it is free again
    announce(state, victim, 2)
    announce(state, thief, 2, token=token)
    assert look(state, token).key == thief.public_key


def test_per_source_key_cap_and_global_record_cap():
    clock = Clock()
    state = make_state(clock, max_keys_per_source=2, max_records=4)
    a, b, c, d, e = (new_identity() for _ in range(5))
    announce(state, a, 1, source="198.51.100.1")
    announce(state, b, 1, source="198.51.100.1")
    announce(state, a, 2, source="198.51.100.1")  # the same key again is not a new one
    exc = refused(announce, state, c, 1, source="198.51.100.1")
    assert exc.code == Refusal.LIMIT and "this address already announces 2 store keys" in exc.text
    # a key that moves to another address frees its place at the old one
    announce(state, b, 2, source="198.51.100.2")
    announce(state, c, 1, source="198.51.100.1")
    announce(state, d, 1, source="198.51.100.3")
    exc = refused(announce, state, e, 1, source="198.51.100.4")
    assert exc.code == Refusal.LIMIT and "maximum of 4 announcements" in exc.text
    clock.advance(601)  # all expired: room again
    announce(state, e, 1, source="198.51.100.1")
    assert state.stats()["announcements"] == 1


def test_verifier_cap():
    state = make_state(max_verifiers=3)
    a, b = new_identity(), new_identity()
    record, sig = signed(a, 1, expires=T0 + 600, verifiers=[os.urandom(32) for _ in range(3)])
    state.announce(record, sig, source="198.51.100.1", identity=a.peer_id, observed="x")
    exc = refused(announce, state, b, 1, token=os.urandom(32))
    assert exc.code == Refusal.LIMIT and "verifiers" in exc.text
    # replacing a's own verifiers is counted net of the old ones
    record, sig = signed(a, 2, expires=T0 + 600, verifiers=[os.urandom(32) for _ in range(3)])
    state.announce(record, sig, source="198.51.100.1", identity=a.peer_id, observed="x")


# --------------------------------------------------------------------------- rate limits

def test_rate_limits_per_identity_and_per_source():
    clock = Clock()
    rates = dict(DEFAULT_RATES, lookup=Rate(per_minute=60, burst=2, source_per_minute=120, source_burst=4))
    state = make_state(clock, rates=rates)
    token = os.urandom(32)
    for _ in range(2):
        assert refused(look, state, token, identity="alice").code == Refusal.NOT_FOUND
    exc = refused(look, state, token, identity="alice")
    assert exc.code == Refusal.LIMIT and exc.text == "too many lookups from this identity; retry in 1 s"
    # another identity from the same address has its own bucket, the address's is nearly empty
    assert refused(look, state, token, identity="bob").code == Refusal.NOT_FOUND
    exc = refused(look, state, token, identity="carol")
    assert exc.code == Refusal.LIMIT and exc.text == "too many lookups from this address; retry in 1 s"
    # other addresses are not affected; time refills
    assert refused(look, state, token, source="203.0.113.10", identity="dave").code == Refusal.NOT_FOUND
    clock.advance(1)
    assert refused(look, state, token, identity="alice").code == Refusal.NOT_FOUND


def test_joins_are_rate_limited_against_guessing():
    clock = Clock()
    state = make_state(clock, rates=DEFAULT_RATES)
    for n in range(1, 5):
        assert refused(state.mailbox_join, n, source="198.51.100.7", identity=f"g{n}").code == Refusal.NOT_FOUND
    exc = refused(state.mailbox_join, 5, source="198.51.100.7", identity="g5")
    assert exc.code == Refusal.LIMIT
    assert exc.text == ("too many attempts to join a code from this address (each is a guess at a code: limited so "
                        "that guessing one is hopeless); retry in 600 s")
    # one identity hopping addresses is limited as well
    for n in range(4):
        refused(state.mailbox_join, 500, source=f"192.0.2.{n}", identity="hopper")
    exc = refused(state.mailbox_join, 500, source="192.0.2.200", identity="hopper")
    assert exc.text.startswith("too many attempts to join a code from this identity") and exc.text.endswith(
        "retry in 600 s")
    clock.advance(600)
    assert refused(state.mailbox_join, 12, source="198.51.100.7", identity="g12").code == Refusal.NOT_FOUND


def test_rate_buckets_are_bounded_and_idle_ones_expire():
    clock = Clock()
    state = make_state(clock, max_buckets=5, rates=DEFAULT_RATES)
    for n in range(20):
        refused(look, state, os.urandom(32), source=f"192.0.2.{n}", identity=f"id{n}")
    assert len(state.buckets) == 5
    clock.advance(1)  # one token used of each; refilled within a second at 120/min
    assert state.expire().buckets == 5
    assert len(state.buckets) == 0


def test_source_key_groups_ipv6_by_64_and_unmaps_ipv4():
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.1") == source_key("192.0.2.1") == "192.0.2.1"
    assert format_address(("::ffff:192.0.2.1", 7450, 0, 0)) == "192.0.2.1:7450"
    assert format_address(("2001:db8::1", 7450, 0, 0)) == "[2001:db8::1]:7450"


# --------------------------------------------------------------------------- mailboxes

def mb_open(state, source="198.51.100.1", identity="opener"):
    return state.mailbox_open(source=source, identity=identity)


def io(state, **kw):
    return dict(source="198.51.100.1", identity="someone", **kw)


def test_mailbox_exchange_with_idempotent_in_order_puts():
    state = make_state()
    mb, a = mb_open(state)
    assert 1 <= mb.nameplate <= 100 and len(a) == 16
    _, b = state.mailbox_join(mb.nameplate, source="203.0.113.5", identity="joiner")
    assert a != b
    n = mb.nameplate
    assert state.mailbox_put(n, a, 0, b"spake-a", **io(state)) is True
    assert state.mailbox_put(n, a, 0, b"spake-a", **io(state)) is False  # a retry
    exc = refused(state.mailbox_put, n, a, 0, b"different", **io(state))
    assert exc.code == ErrorCode.REJECTED and "other content" in exc.text
    exc = refused(state.mailbox_put, n, a, 2, b"skipped one", **io(state))
    assert exc.code == ErrorCode.REJECTED and "put message 1 first" in exc.text
    assert state.mailbox_get(n, b, 0, **io(state)) == [b"spake-a"]
    assert state.mailbox_get(n, b, 1, **io(state)) == []
    assert state.mailbox_get(n, a, 0, **io(state)) == []  # a's own messages are not echoed
    state.mailbox_put(n, b, 0, b"spake-b", **io(state))
    state.mailbox_put(n, a, 1, b"intro-a", **io(state))
    assert state.mailbox_get(n, a, 0, **io(state)) == [b"spake-b"]
    assert state.mailbox_get(n, b, 0, **io(state)) == [b"spake-a", b"intro-a"]
    exc = refused(state.mailbox_get, n, b, 3, **io(state))
    assert exc.code == ErrorCode.REJECTED
    assert refused(state.mailbox_put, n, os.urandom(16), 0, b"x", **io(state)).code == Refusal.NOT_FOUND
    assert refused(state.mailbox_get, n, os.urandom(16), 0, **io(state)).code == Refusal.NOT_FOUND


def test_mailbox_message_count_and_byte_bounds():
    state = make_state(max_mailbox_bytes=P.MAX_BODY * 9 + 100)
    mb, a = mb_open(state)
    for seq in range(P.MAX_MAILBOX_MESSAGES):
        state.mailbox_put(mb.nameplate, a, seq, bytes([seq]) * P.MAX_BODY, **io(state))
    exc = refused(state.mailbox_put, mb.nameplate, a, P.MAX_MAILBOX_MESSAGES, b"x", **io(state))
    assert exc.code == Refusal.LIMIT and f"at most {P.MAX_MAILBOX_MESSAGES} messages" in exc.text
    exc = refused(state.mailbox_put, mb.nameplate, a, 0, b"x" * (P.MAX_BODY + 1), **io(state))
    assert exc.code == ErrorCode.REJECTED
    mb2, c = mb_open(state)
    state.mailbox_put(mb2.nameplate, c, 0, b"y" * P.MAX_BODY, **io(state))
    exc = refused(state.mailbox_put, mb2.nameplate, c, 1, b"y" * P.MAX_BODY, **io(state))
    assert exc.code == Refusal.LIMIT and "mailboxes are full" in exc.text
    assert state.stats()["mailbox_bytes"] == P.MAX_BODY * 9


def test_a_mailbox_is_joined_once_and_a_join_uses_it_up():
    state = make_state()
    mb, _ = mb_open(state)
    state.mailbox_join(mb.nameplate, source="203.0.113.5", identity="first")
    for who in ("first", "second"):  # nobody joins again, not even the first joiner
        exc = refused(state.mailbox_join, mb.nameplate, source="203.0.113.6", identity=who)
        assert exc.code == Refusal.EXPIRED and "used already" in exc.text
    exc = refused(state.mailbox_join, 999_999, source="203.0.113.5", identity="x")
    assert exc.code == Refusal.NOT_FOUND and "ask for a new code" in exc.text


def test_mailboxes_expire():
    clock = Clock()
    state = make_state(clock, code_ttl=600, max_mailboxes_per_source=1)
    mb, a = mb_open(state)
    assert mb.expires == T0 + 600
    exc = refused(mb_open, state)
    assert exc.code == Refusal.LIMIT and "retry in 600 s" in exc.text
    clock.advance(600)
    assert refused(state.mailbox_join, mb.nameplate, source="203.0.113.5", identity="late").code == Refusal.NOT_FOUND
    assert refused(state.mailbox_put, mb.nameplate, a, 0, b"x", **io(state)).code == Refusal.NOT_FOUND
    mb2, _ = mb_open(state)  # the expired one no longer counts against the address
    clock.advance(600)
    assert state.expire().mailboxes == [mb2.nameplate]
    assert state.stats()["mailboxes"] == 0


def test_mailbox_caps_per_source_and_global():
    state = make_state(max_mailboxes=10)
    for _ in range(8):
        mb_open(state)
    exc = refused(mb_open, state, identity="another")
    assert exc.code == Refusal.LIMIT and "this address has 8 codes open" in exc.text
    mb_open(state, source="198.51.100.2")
    mb_open(state, source="198.51.100.2")
    exc = refused(mb_open, state, source="198.51.100.3")
    assert exc.code == Refusal.LIMIT and "maximum of 10 open codes" in exc.text
    assert len({n for n in state._mailboxes}) == 10


def test_mailbox_close():
    state = make_state()
    mb, a = mb_open(state)
    n = mb.nameplate
    _, b = state.mailbox_join(n, source="203.0.113.5", identity="joiner")
    state.mailbox_put(n, a, 0, b"last words", **io(state))
    assert state.mailbox_close(n, a, **io(state)) is False
    assert refused(state.mailbox_put, n, a, 1, b"x", **io(state)).code == Refusal.EXPIRED
    assert state.mailbox_get(n, b, 0, **io(state)) == [b"last words"]  # still readable
    exc = refused(state.mailbox_get, n, b, 1, **io(state))
    assert exc.code == Refusal.EXPIRED and "other side closed" in exc.text
    assert state.mailbox_close(n, os.urandom(16), **io(state)) is False  # not a side: nothing happens
    assert state.mailbox_close(n, b, **io(state)) is True
    assert state.mailbox_state(n) is None
    assert state.mailbox_close(n, b, **io(state)) is False  # twice: nothing happens
    # an unjoined mailbox goes when its opener closes it
    mb, a = mb_open(state)
    assert state.mailbox_close(mb.nameplate, a, **io(state)) is True
    assert state.stats()["mailboxes"] == 0


def test_nameplates_are_short_and_distinct():
    state = make_state(max_mailboxes_per_source=100)
    plates = {mb_open(state)[0].nameplate for _ in range(25)}
    assert len(plates) == 25 and max(plates) <= 100
    plates |= {mb_open(state)[0].nameplate for _ in range(50)}
    assert len(plates) == 75 and max(plates) <= 4 * 75


# --------------------------------------------------------------------------- journal and restart

def test_a_change_the_journal_cannot_hold_is_refused_and_not_applied():
    full = [False]

    def journal(ops):
        if full[0]:
            raise JournalFull()

    state = make_state(journal=journal)
    store = new_identity()
    token = token_for(store)
    full[0] = True
    exc = refused(announce, state, store, 1, token=token)
    assert exc.code == Refusal.LIMIT and "storage is full" in exc.text
    assert refused(look, state, token).code == Refusal.NOT_FOUND
    assert refused(mb_open, state).code == Refusal.LIMIT
    assert state.stats()["mailboxes"] == 0
    full[0] = False
    announce(state, store, 1, token=token)
    assert look(state, token).key == store.public_key


def test_state_survives_a_restart_through_lmdb(tmp_path):
    clock = Clock()
    persist = Persist(str(tmp_path))
    state = make_state(clock, journal=persist.write)
    store, gone, tampered = new_identity(), new_identity(), new_identity()
    token = token_for(store)
    announce(state, store, 3, token=token, source="198.51.100.4")
    announce(state, gone, 1, expires=T0 + 100)
    announce(state, tampered, 1)
    mb, a = mb_open(state)
    _, b = state.mailbox_join(mb.nameplate, source="203.0.113.5", identity="joiner")
    state.mailbox_put(mb.nameplate, a, 0, b"hello", **io(state))
    old_mb, _ = mb_open(state)
    state.mailbox_close(old_mb.nameplate, _, **io(state))
    persist.close()

    # an attacker with write access to the state flips a signature: it is dropped at load
    persist = Persist(str(tmp_path))
    stored = {a.key: a for a in persist.load()[0]}
    assert set(stored) == {store.public_key, gone.public_key, tampered.public_key}
    bad = stored[tampered.public_key]
    persist.write([("announcement", bad.key, dataclasses.replace(bad, signature=bytes(64)))])
    clock.advance(200)
    state = make_state(clock, journal=persist.write)
    kept = state.restore(*persist.load())
    assert kept["announcements"] == 1 and kept["mailboxes"] == 1
    assert look(state, token).observed == "198.51.100.4:40000"
    assert state.mailbox_get(mb.nameplate, b, 0, **io(state)) == [b"hello"]
    assert state.mailbox_put(mb.nameplate, a, 0, b"hello", **io(state)) is False  # a retry after the restart
    assert refused(announce, state, store, 3, token=token).code == Refusal.REPLAYED
    assert refused(announce, state, gone, 1).code == Refusal.REPLAYED  # its seq was remembered on disk
    assert refused(state.mailbox_join, mb.nameplate, source="203.0.113.5", identity="j").code == Refusal.EXPIRED
    persist.close()


def test_a_full_map_refuses_instead_of_crashing(tmp_path):
    persist = Persist(str(tmp_path), map_size=1 << 20)
    state = make_state(journal=persist.write, max_mailboxes_per_source=1000, max_mailbox_bytes=1 << 30)
    with pytest.raises(Refused) as info:
        for _ in range(1000):
            mb, side = mb_open(state)
            for seq in range(P.MAX_MAILBOX_MESSAGES):
                state.mailbox_put(mb.nameplate, side, seq, os.urandom(P.MAX_BODY), **io(state))
    assert info.value.code == Refusal.LIMIT and "storage is full" in info.value.text
    n = state.stats()["mailboxes"]
    assert n >= 10
    state.expire()  # still working, and what it holds is intact
    assert state.stats()["mailboxes"] == n
    persist.close()


# --------------------------------------------------------------------------- relay

class FakeConn:
    """What the relay reads of a broker connection."""

    def __init__(self, peer_id: str, addr):
        self.peer_id = peer_id
        self.remote_address = addr


def make_relay(clock, **cfg):
    sent, closed = [], []
    relay = Relay(BrokerConfig(**cfg), lambda data, addr: sent.append((data, addr)), now=clock,
                  on_closed=lambda legs, reason: closed.append(([leg.session_id for leg in legs], reason)))
    return relay, sent, closed


def frame(session: bytes, payload: bytes) -> bytes:
    return b"\x01" + session + payload


def test_relay_forwards_between_the_two_broker_connections_only():
    clock = Clock()
    relay, sent, closed = make_relay(clock)
    a = FakeConn("A", ("192.0.2.1", 1000))
    b = FakeConn("B", ("192.0.2.2", 2000))
    la, lb, expires = relay.open(a, b)
    assert la.session_id != lb.session_id and expires == T0 + 86400
    relay.datagram(frame(la.session_id, b"\x40quic-from-a"), ("192.0.2.1", 1000))
    relay.datagram(frame(lb.session_id, b"\x40quic-from-b"), ("192.0.2.2", 2000))
    assert sent == [(frame(lb.session_id, b"\x40quic-from-a"), ("192.0.2.2", 2000)),
                    (frame(la.session_id, b"\x40quic-from-b"), ("192.0.2.1", 1000))]
    # a frame of a's session from anywhere else, unknown sessions, garbage: dropped and counted
    relay.datagram(frame(la.session_id, b"\x40spoofed"), ("192.0.2.99", 1000))
    relay.datagram(frame(os.urandom(16), b"\x40who"), ("192.0.2.1", 1000))
    relay.datagram(b"\x02punchprobe", ("192.0.2.1", 1000))
    relay.datagram(b"\x01short", ("192.0.2.1", 1000))
    relay.datagram(b"", ("192.0.2.1", 1000))
    assert len(sent) == 2
    assert relay.dropped_address == 1 and relay.dropped_unknown == 4
    assert relay.bytes_relayed == len(b"\x40quic-from-a") + len(b"\x40quic-from-b")
    # a's broker connection migrates: the leg follows it
    a.remote_address = ("192.0.2.1", 1001)
    relay.datagram(frame(la.session_id, b"\x40moved"), ("192.0.2.1", 1001))
    assert sent[-1] == (frame(lb.session_id, b"\x40moved"), ("192.0.2.2", 2000))
    relay.datagram(frame(lb.session_id, b"\x40back"), ("192.0.2.2", 2000))
    assert sent[-1] == (frame(la.session_id, b"\x40back"), ("192.0.2.1", 1001))
    relay.datagram(frame(la.session_id, b"\x40old address"), ("192.0.2.1", 1000))
    assert relay.dropped_address == 2
    # a connection that closes ends its sessions (the other side is told)
    relay.connection_closed(b)
    assert closed and closed[0][0] == [la.session_id, lb.session_id]
    relay.datagram(frame(la.session_id, b"\x40after"), ("192.0.2.1", 1001))
    assert sent[-1][0] != frame(lb.session_id, b"\x40after") and len(relay.sessions) == 0


def test_relay_legs_match_ipv6_addresses_in_either_tuple_form():
    clock = Clock()
    relay, sent, _ = make_relay(clock)
    a = FakeConn("A", ("2001:db8::1", 1000, 0, 0))
    b = FakeConn("B", ("2001:db8::2", 2000, 0, 0))
    la, lb, _ = relay.open(a, b)
    relay.datagram(frame(la.session_id, b"\x40four"), ("2001:db8::1", 1000, 0, 0))
    relay.datagram(frame(la.session_id, b"\x40two"), ("2001:db8::1", 1000))
    relay.datagram(frame(la.session_id, b"\x40other port"), ("2001:db8::1", 1001, 0, 0))
    assert [d for d, _ in sent] == [frame(lb.session_id, b"\x40four"), frame(lb.session_id, b"\x40two")]
    assert relay.dropped_address == 1


def test_relay_bandwidth_bucket_drops_frames_over_the_rate():
    clock = Clock()
    relay, sent, _ = make_relay(clock, relay_rate=10_000, relay_burst=3_000)
    a, b = FakeConn("A", ("192.0.2.1", 1)), FakeConn("B", ("192.0.2.2", 2))
    la, _, _ = relay.open(a, b)
    payload = b"\x40" + bytes(999)
    for _ in range(4):
        relay.datagram(frame(la.session_id, payload), a.remote_address)
    assert len(sent) == 3 and relay.dropped_rate == 1
    clock.advance(0.15)  # 1500 bytes more
    relay.datagram(frame(la.session_id, payload), a.remote_address)
    relay.datagram(frame(la.session_id, payload), a.remote_address)
    assert len(sent) == 4 and relay.dropped_rate == 2


def test_relay_daily_cap_closes_the_session_and_refuses_until_the_next_day():
    clock = Clock(T0 - T0 % 86400 + 3600)  # 01:00 UTC
    relay, sent, closed = make_relay(clock, relay_daily_bytes=2500, relay_burst=1 << 20)
    a, b = FakeConn("A", ("192.0.2.1", 1)), FakeConn("B", ("192.0.2.2", 2))
    la, lb, _ = relay.open(a, b)
    payload = b"\x40" + bytes(999)
    for _ in range(3):
        relay.datagram(frame(la.session_id, payload), a.remote_address)
    assert len(sent) == 2 and relay.dropped_cap == 1
    assert closed[0][0] == [la.session_id, lb.session_id]
    assert "daily relay allowance" in closed[0][1] and "resets at 00:00 UTC (in 23 h 0 min)" in closed[0][1]
    exc = refused(relay.open, a, b)
    assert exc.code == Refusal.RELAY_REFUSED and "this identity used its daily relay allowance" in exc.text
    exc = refused(relay.open, FakeConn("C", ("192.0.2.3", 3)), a)
    assert exc.code == Refusal.RELAY_REFUSED and "the store you asked for used its daily" in exc.text
    relay.open(b, FakeConn("C", ("192.0.2.3", 3)))  # B only received: its allowance is intact
    clock.advance(23 * 3600)
    relay.open(a, b)


def test_relay_session_bounds_and_idle_expiry():
    clock = Clock()
    relay, sent, closed = make_relay(clock, max_relay_sessions=3, max_relay_sessions_per_identity=2,
                                     relay_idle=120, relay_lifetime=1000)
    conns = [FakeConn(f"S{i}", ("192.0.2.1", i + 1)) for i in range(6)]
    la, _, _ = relay.open(conns[0], conns[1])
    relay.open(conns[0], conns[2])
    exc = refused(relay.open, conns[0], conns[3])
    assert exc.code == Refusal.RELAY_REFUSED and "this identity has 2 relay sessions" in exc.text
    exc = refused(relay.open, conns[3], conns[0])
    assert "the store you asked for has 2 relay sessions" in exc.text
    relay.open(conns[3], conns[4])
    exc = refused(relay.open, conns[4], conns[5])
    assert "maximum of 3 sessions" in exc.text
    clock.advance(100)
    relay.datagram(frame(la.session_id, b"\x40keepalive"), conns[0].remote_address)
    clock.advance(20)
    assert relay.expire() == 2  # the two idle ones
    assert len(relay.sessions) == 1 and all("idle for 120 s" in r for _, r in closed)
    clock.advance(100)
    relay.datagram(frame(la.session_id, b"\x40keepalive"), conns[0].remote_address)
    clock.advance(780)
    relay.datagram(frame(la.session_id, b"\x40keepalive"), conns[0].remote_address)
    assert relay.expire() == 1 and "maximum lifetime" in closed[-1][1]
    assert not relay._accounts or all(acct.sessions == 0 for acct in relay._accounts.values())


# --------------------------------------------------------------------------- config

def test_the_packaged_example_config_is_the_defaults():
    example = (REPO / "packaging" / "broker.toml.example").read_text()
    uncommented = "\n".join(line[1:] if line[1:2].isalpha() or line[1:2] == "[" else line
                            for line in example.splitlines())
    doc = tomllib.loads(uncommented)
    assert len(doc) == len(dataclasses.fields(BrokerConfig)) and set(doc["rates"]) == set(RATE_KINDS)
    assert from_dict(doc) == BrokerConfig()


def test_config_defaults_and_toml(tmp_path):
    cfg = BrokerConfig()
    assert cfg.listen_address == ("0.0.0.0", P.DEFAULT_BROKER_PORT)
    assert cfg.max_ttl <= P.MAX_TTL and cfg.relay_rate == 4 << 20 and cfg.relay_daily_bytes == 8 << 30
    path = tmp_path / "broker.toml"
    path.write_text('listen = "[::1]:9000"\nrelay_rate = "2M"\nrelay_idle = 30\n'
                    '[rates.lookup]\nper_minute = 5\n')
    cfg = load(str(path))
    assert cfg.listen_address == ("::1", 9000) and cfg.relay_rate == 2 << 20 and cfg.relay_idle == 30
    assert cfg.rates["lookup"].per_minute == 5 and cfg.rates["lookup"].burst == DEFAULT_RATES["lookup"].burst
    assert load(str(path), listen="127.0.0.1:1").listen == "127.0.0.1:1"


@pytest.mark.parametrize("doc, words", [
    ({"nope": 1}, "unknown key 'nope'"),
    ({"max_ttl": 100000}, "max_ttl"),
    ({"max_ttl": "3600"}, "max_ttl: expected an integer"),
    ({"relay_rate": "fast"}, "relay_rate: not a size"),
    ({"listen": "localhost:7451"}, "listen: not an address"),
    ({"max_records": 0}, "max_records: must be >= 1"),
    ({"rates": {"lookup": {"per_minute": -1}}}, "rates.lookup.per_minute"),
    ({"rates": {"flood": {}}}, "unknown kind 'flood'"),
    ({"seq_memory_ttl": 10}, "seq_memory_ttl"),
])
def test_config_errors_are_one_line(doc, words):
    with pytest.raises(ConfigError) as info:
        from_dict(doc)
    assert words in str(info.value) and "\n" not in str(info.value)
