"""The broker over real QUIC on loopback: in-process (`broker.server.serve` in trio) and as the
`bpfs-broker` program (killed with SIGKILL and restarted on its state directory).

Clients are real endpoints (`bpfs.net.quic.open_endpoint`) with their own identity, holding a
broker connection on which they also serve what the broker pushes (Punch, RelayOffer,
RelayClosed) with an rpc Dispatcher, as stores do. Nothing is mocked. Waiting for something the
broker does asynchronously (a connection it has not noticed closing yet) polls the broker's
state under a deadline; no assertion depends on how long anything took.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from bpfs.identity import Identity
from bpfs.net.codec import ErrorCode, Ping, Pong
from bpfs.net.quic import RelayPath, open_endpoint
from bpfs.net.relay import relay_frame
from bpfs.net.rpc import Dispatcher, RemoteError, request
from bpfs.rendezvous import wire as P
from broker.config import BrokerConfig
from bpfs.rendezvous.wire import Refusal
from broker.server import serve
from tests.helpers.broker import BrokerProcess

pytestmark = pytest.mark.timeout(120)

# the installed script (pyproject [project.scripts]); `python -m broker` where it is not installed
_SCRIPT = Path(sys.executable).parent / "bpfs-broker"
BROKER_CMD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "broker"]


def run(fn, *args, timeout: float = 60):
    async def main():
        with trio.fail_after(timeout):
            return await fn(*args)

    return trio.run(main)


async def wait_until(predicate, timeout: float = 15.0) -> None:
    """Poll `predicate` (something the broker does on its own time) until it holds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


@asynccontextmanager
async def running_broker(tmp_path, listen="127.0.0.1:0", **cfg):
    config = BrokerConfig(listen=listen, **cfg)
    async with trio.open_nursery() as nursery:
        broker = await nursery.start(serve, config, Identity(os.urandom(32)), str(tmp_path / "broker-state"))
        try:
            yield broker
        finally:
            nursery.cancel_scope.cancel()


class Store:
    """A store's view of the broker: its endpoint, its broker connection, what was pushed to it."""

    def __init__(self, identity: Identity, endpoint, conn, broker_address):
        self.identity = identity
        self.endpoint = endpoint
        self.conn = conn
        self.broker_address = broker_address
        self.punches: list = []
        self.offers: list = []
        self.closed: list = []
        self.pushed = trio.Event()
        self.seq = 0

    @property
    def observed(self) -> str:
        host, port = self.endpoint.local_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _note(self, where: list, msg) -> None:
        where.append(msg)
        self.pushed.set()
        self.pushed = trio.Event()

    async def wait_for(self, where: list, n: int = 1) -> None:
        with trio.fail_after(20):
            while len(where) < n:
                await self.pushed.wait()

    async def call(self, msg, timeout: float = 20):
        return await request(self.conn, msg, registry=P.BROKER, timeout=timeout)

    async def announce(self, tokens=(), addresses=("192.0.2.10:7450",), seq=None, ttl=600):
        self.seq = seq if seq is not None else self.seq + 1
        return await self.call(P.signed_announcement(self.identity, self.conn.peer_public_key, self.seq,
                                                     time.time() + ttl, addresses, [P.verifier(t) for t in tokens]))


@asynccontextmanager
async def store(broker_address, broker_peer_id: str):
    identity = Identity(os.urandom(32))
    host = "::1" if ":" in broker_address[0] else "127.0.0.1"
    async with open_endpoint(identity, host, 0, listen=True) as endpoint:
        conn = await endpoint.connect(broker_address, expected_peer=broker_peer_id)
        s = Store(identity, endpoint, conn, broker_address)
        d = Dispatcher(P.BROKER)

        @d.handler(P.Punch)
        async def punch(conn, msg):
            s._note(s.punches, msg)
            return P.Ok()

        @d.handler(P.RelayOffer)
        async def offer(conn, msg):
            endpoint.add_relay_session(RelayPath(broker_address[0], broker_address[1], msg.session))
            s._note(s.offers, msg)
            return P.Ok()

        @d.handler(P.RelayClosed)
        async def closed(conn, msg):
            endpoint.remove_relay_session(msg.session)
            s._note(s.closed, msg)
            return P.Ok()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.serve_connection, conn)
            try:
                yield s
            finally:
                nursery.cancel_scope.cancel()


@asynccontextmanager
async def stores(broker, n: int):
    async with store(broker.address, broker.peer_id) as a:
        if n == 1:
            yield (a,)
            return
        async with store(broker.address, broker.peer_id) as b:
            if n == 2:
                yield a, b
                return
            async with store(broker.address, broker.peer_id) as c:
                yield a, b, c


async def refusal(coro) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        await coro
    assert info.value.message and "\n" not in info.value.message
    return info.value


def pair_token(target: Store) -> bytes:
    return P.lookup_token(os.urandom(32), target.conn.peer_public_key, P.epoch_of(time.time()),
                          target.identity.public_key)


# --------------------------------------------------------------------------- announce, lookup, punch

def test_announce_lookup_and_punch(tmp_path):
    async def main():
        async with running_broker(tmp_path) as broker, stores(broker, 2) as (target, asker):
            token = pair_token(target)
            reply = await target.announce([token], addresses=["192.0.2.10:7450", "[2001:db8::10]:7450"])
            assert reply.observed == target.observed
            assert reply.expires <= int(time.time()) + 600

            found = await asker.call(P.Lookup(token, ["198.51.100.20:7450"]))
            assert list(found.addresses) == ["192.0.2.10:7450", "[2001:db8::10]:7450"]
            assert found.observed == target.observed and found.online is True
            await target.wait_for(target.punches)
            punch = target.punches[0]
            assert punch.observed == asker.observed and list(punch.addresses) == ["198.51.100.20:7450"]

            err = await refusal(asker.call(P.Lookup(os.urandom(32), [])))
            assert err.code == Refusal.NOT_FOUND
            err = await refusal(asker.call(P.Lookup(P.verifier(token), [])))
            assert err.code == Refusal.NOT_FOUND

            # the same record again is a replay; a record of another key over this connection is refused
            err = await refusal(target.announce([token], seq=target.seq))
            assert err.code == Refusal.REPLAYED
            other = Identity(os.urandom(32))
            record = P.AnnounceRecord(other.public_key, target.conn.peer_public_key, 1, int(time.time()) + 60, [], [])
            err = await refusal(asker.call(P.Announce(record, other.sign(P.announce_message(record)))))
            assert err.code == ErrorCode.REJECTED and "authenticated with the announced key" in err.message
            record = P.AnnounceRecord(asker.identity.public_key, os.urandom(32), 1, int(time.time()) + 60, [], [])
            err = await refusal(asker.call(P.Announce(record, asker.identity.sign(P.announce_message(record)))))
            assert err.code == Refusal.WRONG_BROKER

            assert isinstance(await asker.call(Ping(7)), Pong)

            # the target goes away: still found (its record lives on), no longer online
            await target.conn.aclose()
            await wait_until(lambda: not broker.online(target.identity.public_key))
            found = await asker.call(P.Lookup(token, []))
            assert found.online is False and found.observed == target.observed
            assert list(found.addresses) == ["192.0.2.10:7450", "[2001:db8::10]:7450"]

    run(main)


def test_connections_per_source_are_capped(tmp_path):
    async def main():
        async with running_broker(tmp_path, max_connections_per_source=2) as broker, stores(broker, 2) as (a, b):
            assert isinstance(await a.call(Ping(1)), Pong)
            async with store(broker.address, broker.peer_id) as c:
                with trio.fail_after(20):
                    closed = await c.conn.wait_closed()
                assert "too many connections from this address" in closed.reason
            assert isinstance(await b.call(Ping(2)), Pong)
            assert broker.connections_refused == 1

    run(main)


# --------------------------------------------------------------------------- mailboxes

def test_mailbox_exchange_with_long_poll(tmp_path):
    async def main():
        async with running_broker(tmp_path) as broker, stores(broker, 3) as (alice, bob, carol):
            opened = await alice.call(P.MailboxOpen())
            n, a = opened.nameplate, opened.side
            assert 1 <= n <= 100 and opened.expires > time.time()
            joined = await bob.call(P.MailboxJoin(n))
            b = joined.side
            err = await refusal(carol.call(P.MailboxJoin(n)))
            assert err.code == Refusal.EXPIRED and "used already" in err.message

            assert (await alice.call(P.MailboxGet(n, a, 0, 0))).bodies == ()
            got = []

            async def long_poll():
                got.append(await alice.call(P.MailboxGet(n, a, 0, 20), timeout=30))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(long_poll)
                await wait_until(lambda: n in broker._mailbox_waiters)  # alice waits at the broker
                assert not got
                await bob.call(P.MailboxPut(n, b, 0, b"bob's first"))
                assert n not in broker._mailbox_waiters  # the put woke alice's poll (not its deadline)
            assert got[0].bodies == (b"bob's first",)

            await bob.call(P.MailboxPut(n, b, 0, b"bob's first"))  # a retry is fine
            err = await refusal(bob.call(P.MailboxPut(n, b, 0, b"changed")))
            assert err.code == ErrorCode.REJECTED
            err = await refusal(bob.call(P.MailboxPut(n, os.urandom(16), 1, b"guess")))
            assert err.code == Refusal.NOT_FOUND
            for seq in range(P.MAX_MAILBOX_MESSAGES):
                await alice.call(P.MailboxPut(n, a, seq, bytes([seq]) * P.MAX_BODY))
            # eight full bodies do not fit one reply: they come in turns, in order
            received = []
            while len(received) < P.MAX_MAILBOX_MESSAGES:
                received += (await bob.call(P.MailboxGet(n, b, len(received), 5))).bodies
            assert received == [bytes([seq]) * P.MAX_BODY for seq in range(P.MAX_MAILBOX_MESSAGES)]

            # alice closes; bob's long poll is answered: nothing more will come
            async with trio.open_nursery() as nursery:
                async def bob_waits():
                    err = await refusal(bob.call(P.MailboxGet(n, b, P.MAX_MAILBOX_MESSAGES, 20), timeout=30))
                    assert err.code == Refusal.EXPIRED and "other side closed" in err.message
                nursery.start_soon(bob_waits)
                await wait_until(lambda: n in broker._mailbox_waiters)
                await alice.call(P.MailboxClose(n, a))
                assert n not in broker._mailbox_waiters
            await bob.call(P.MailboxClose(n, b))
            assert broker.state.mailbox_state(n) is None
            err = await refusal(bob.call(P.MailboxJoin(n)))
            assert err.code == Refusal.NOT_FOUND

    run(main)


# --------------------------------------------------------------------------- relay

async def relayed_connection(broker, requester: Store, target: Store):
    """RelayOpen by `requester`, then a QUIC connection to `target` through the broker."""
    token = pair_token(target)
    await target.announce([token])
    opened = await requester.call(P.RelayOpen(token))
    assert len(target.offers) == 1  # the offer reached the target before RelayOpened came back
    assert target.offers[0].session != opened.session and target.offers[0].expires == opened.expires
    host, port = broker.address
    path = RelayPath(host, port, opened.session)
    requester.endpoint.add_relay_session(path)  # accept the answers that come back through the relay
    async with trio.open_nursery() as nursery:
        accepted = []

        async def accept():
            accepted.append(await target.endpoint.accept())

        nursery.start_soon(accept)
        conn = await requester.endpoint.connect(path, expected_peer=target.identity.peer_id)
    assert conn.peer_id == target.identity.peer_id and accepted[0].peer_id == requester.identity.peer_id
    assert isinstance(accepted[0].remote_address, RelayPath)
    return conn, accepted[0], opened


async def sink_digests(conn) -> None:
    """Serve: read each stream to its end, answer sha256 of it."""
    async with trio.open_nursery() as nursery:
        async for stream in conn:
            async def one(stream=stream):
                h = hashlib.sha256()
                while data := await stream.receive_some(1 << 16):
                    h.update(data)
                await stream.send(h.digest(), end=True)
            nursery.start_soon(one)


def test_relay_carries_an_authenticated_quic_connection(tmp_path):
    size = 6 << 20

    async def main():
        async with running_broker(tmp_path, relay_rate=1 << 30, relay_burst=64 << 20) as broker, \
                stores(broker, 2) as (alice, bob):
            conn, bobs_side, opened = await relayed_connection(broker, alice, bob)
            data = os.urandom(size)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sink_digests, bobs_side)
                stream = await conn.open_stream()
                await stream.send(data, end=True)
                digest = await stream.receive_exactly(32)
                nursery.cancel_scope.cancel()
            assert digest == hashlib.sha256(data).digest()
            assert broker.relay.bytes_relayed >= size
            assert broker.relay.account_used(alice.identity.peer_id) >= size
            assert broker.relay.dropped_address == 0
            assert len(broker.relay.sessions) == 1

            # garbage at the broker's port hurts nobody: random bytes, fake QUIC, relay frames
            # of unknown sessions, and alice's session sent from another socket (a spoofer)
            before = broker.relay.frames_dropped
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:
                for i in range(300):
                    raw.sendto(os.urandom(1 + i % 1400), broker.address)
                    raw.sendto(bytes([0xC0]) + os.urandom(1250), broker.address)
                    raw.sendto(relay_frame(os.urandom(16), b"\x40" + os.urandom(100)), broker.address)
                    raw.sendto(relay_frame(opened.session, b"\x40" + os.urandom(100)), broker.address)
            await wait_until(lambda: broker.relay.dropped_address >= 300)
            assert broker.relay.frames_dropped - before >= 600
            assert isinstance(await alice.call(Ping(3)), Pong)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sink_digests, bobs_side)
                stream = await conn.open_stream()
                await stream.send(b"still here", end=True)
                assert await stream.receive_exactly(32) == hashlib.sha256(b"still here").digest()
                nursery.cancel_scope.cancel()

            # bob's broker connection ends: the session ends, alice is told
            await bob.conn.aclose()
            await alice.wait_for(alice.closed)
            assert alice.closed[0].session == opened.session and "connection to the broker ended" in \
                alice.closed[0].reason
            assert len(broker.relay.sessions) == 0

    run(main)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_observed_addresses_and_relay(tmp_path):
    async def main():
        async with running_broker(tmp_path, listen="[::1]:0") as broker, stores(broker, 2) as (alice, bob):
            token = pair_token(bob)
            reply = await bob.announce([token], addresses=["[2001:db8::7]:7450"])
            assert reply.observed == bob.observed and reply.observed.startswith("[::1]:")
            found = await alice.call(P.Lookup(token, []))
            assert found.observed == bob.observed and list(found.addresses) == ["[2001:db8::7]:7450"]
            conn, bobs_side, _ = await relayed_connection(broker, alice, bob)
            data = os.urandom(256 << 10)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sink_digests, bobs_side)
                stream = await conn.open_stream()
                await stream.send(data, end=True)
                assert await stream.receive_exactly(32) == hashlib.sha256(data).digest()
                nursery.cancel_scope.cancel()
            assert broker.relay.bytes_relayed >= len(data) and broker.relay.dropped_address == 0

    run(main)


def test_relay_daily_cap_ends_the_session_and_refuses_new_ones(tmp_path):
    async def main():
        async with running_broker(tmp_path, relay_daily_bytes=300 << 10, relay_burst=16 << 20) as broker, \
                stores(broker, 2) as (alice, bob):
            conn, bobs_side, opened = await relayed_connection(broker, alice, bob)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sink_digests, bobs_side)

                async def push():
                    stream = await conn.open_stream()
                    await stream.send(os.urandom(2 << 20), end=True)

                nursery.start_soon(push)
                await alice.wait_for(alice.closed)
                await bob.wait_for(bob.closed)
                nursery.cancel_scope.cancel()
            assert alice.closed[0].session == opened.session
            assert bob.closed[0].session == bob.offers[0].session
            for msg in (alice.closed[0], bob.closed[0]):
                assert "daily relay allowance of 300.0 KiB used up" in msg.reason and "00:00 UTC" in msg.reason
            assert broker.relay.account_used(alice.identity.peer_id) == 300 << 10
            assert len(broker.relay.sessions) == 0

            err = await refusal(alice.call(P.RelayOpen(pair_token(bob))))
            assert err.code == Refusal.NOT_FOUND  # not a token bob announced
            token = pair_token(bob)
            await bob.announce([token])
            err = await refusal(alice.call(P.RelayOpen(token)))
            assert err.code == Refusal.RELAY_REFUSED
            assert "daily relay allowance" in err.message and "resets at 00:00 UTC" in err.message

    run(main)


# --------------------------------------------------------------------------- the bpfs-broker program

def test_broker_program_restart_keeps_mailbox_and_announcement(tmp_path):
    broker = BrokerProcess(tmp_path, command=BROKER_CMD).start()
    state_dir = broker.state
    first_id, first_address = broker.peer_id, broker.address
    secrets_seen: list[bytes] = []
    kept: dict = {}
    try:
        async def before():
            async with store(first_address, first_id) as target, store(first_address, first_id) as a, \
                    store(first_address, first_id) as b:
                token = pair_token(target)
                await target.announce([token], addresses=["192.0.2.44:7450"])
                opened = await a.call(P.MailboxOpen())
                joined = await b.call(P.MailboxJoin(opened.nameplate))
                await a.call(P.MailboxPut(opened.nameplate, opened.side, 0, b"spake message from a"))
                kept.update(token=token, n=opened.nameplate, a=opened.side, b=joined.side,
                            target_observed=target.observed, target_key=target.identity.public_key)
                secrets_seen.extend([token, opened.side, joined.side, P.verifier(token)])

        run(before)
        assert broker.stop(signal.SIGKILL) == -signal.SIGKILL
    except BaseException:
        broker.stop(signal.SIGKILL)
        raise

    assert stat.S_IMODE(os.stat(state_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state_dir / "identity.key").st_mode) == 0o600
    second = broker.start()  # on the same state directory and port
    try:
        assert second.peer_id == first_id and second.address == first_address

        async def after():
            async with store(second.address, second.peer_id) as a, store(second.address, second.peer_id) as b:
                n = kept["n"]
                # the clients retry what they were doing: the mailbox is there, with its message
                await a.call(P.MailboxPut(n, kept["a"], 0, b"spake message from a"))
                got = await b.call(P.MailboxGet(n, kept["b"], 0, 5))
                assert got.bodies == (b"spake message from a",)
                await b.call(P.MailboxPut(n, kept["b"], 0, b"spake message from b"))
                assert (await a.call(P.MailboxGet(n, kept["a"], 0, 5))).bodies == (b"spake message from b",)
                err = await refusal(b.call(P.MailboxJoin(n)))
                assert err.code == Refusal.EXPIRED
                found = await a.call(P.Lookup(kept["token"], []))
                assert list(found.addresses) == ["192.0.2.44:7450"] and found.online is False
                assert found.observed == kept["target_observed"]

        run(after)
    finally:
        assert second.stop(signal.SIGTERM) == 0

    lines = second.log.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON document
    names = [e["event"] for e in events]
    assert names.count("listening") == 2 and "shutdown" in names and "announce" in names
    assert all({"ts", "level", "event"} <= set(e) for e in events)
    text = second.log.read_text()
    for secret in secrets_seen:
        for form in (secret.hex(), secret.hex().upper(), repr(secret)[2:-1]):
            assert form not in text


def test_broker_program_refuses_bad_input(tmp_path):
    bad = tmp_path / "broker.toml"
    bad.write_text("max_ttl = 99999\n")
    for args, words in (
        (["--config", str(bad)], "max_ttl: must be <="),
        (["--listen", "nowhere"], "listen: not an address"),
    ):
        proc = subprocess.run([*BROKER_CMD, "--state-dir", str(tmp_path / "s"), *args], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_broker_program_refuses_a_state_dir_in_use(tmp_path):
    first = BrokerProcess(tmp_path, command=BROKER_CMD).start()
    try:
        proc = subprocess.run([*BROKER_CMD, "--listen", "127.0.0.1:0", "--state-dir", str(first.state)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and "another broker is running" in proc.stderr
    finally:
        assert first.stop() == 0
