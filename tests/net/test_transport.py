"""bpfs.net: QUIC transport, peer authentication, codec and request/response.

Real QUIC over loopback UDP (127.0.0.1 only) between trio tasks, and between two
processes in one test. Nothing is mocked; the only monkeypatch (the channel binding in
the MITM control tests) shows that the MITM tests detect what they claim to.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import sys
import textwrap
from contextlib import asynccontextmanager

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpfs.identity import Identity, peer_id
from bpfs.net import auth, codec, machine, quic, rpc
from bpfs.net.codec import Bool, Bytes, List, Optional, ProtocolError, Record, Registry, Text, UInt, field, record
from bpfs.net.quic import (AuthenticationError, Code, ConnectionClosed, TransportConfig, TransportError,
                           open_endpoint)
from tests.helpers.cli import REPO

pytestmark = pytest.mark.timeout(90)


def new_identity() -> Identity:
    return Identity(os.urandom(32))


def run(fn, *args, timeout: float = 60):
    """Run `fn(*args)` in a fresh trio loop, failing (not hanging) after `timeout`."""

    async def main():
        with trio.fail_after(timeout):
            return await fn(*args)

    return trio.run(main)


@asynccontextmanager
async def pair(server_config=None, client_config=None, **server_kwargs):
    """A listening endpoint and a dialling endpoint, each with a fresh identity."""
    a, b = new_identity(), new_identity()
    async with open_endpoint(a, config=server_config, **server_kwargs) as srv, \
            open_endpoint(b, config=client_config, listen=False) as cli:
        srv.identity, cli.identity = a, b
        yield srv, cli


async def echo_server(endpoint, nursery):
    """Accept connections; on each stream send back sha256(everything received)."""

    async def serve_stream(stream):
        h = hashlib.sha256()
        while data := await stream.receive_some(1 << 20):
            h.update(data)
        await stream.send(h.digest(), end=True)

    async def serve_conn(conn):
        async with trio.open_nursery() as n:
            async for stream in conn:
                n.start_soon(serve_stream, stream)

    async def loop():
        async for conn in endpoint:
            nursery.start_soon(serve_conn, conn)

    nursery.start_soon(loop)


async def echo_digest(conn, data: bytes) -> bytes:
    stream = await conn.open_stream()
    await stream.send(data, end=True)
    return await stream.receive_all(64)


# =========================================================================== transport

def test_connect_authenticates_both_sides():
    async def main():
        async with pair() as (srv, cli):
            conn = await cli.connect(srv.local_address, expected_peer=srv.identity.peer_id)
            server_conn = await srv.accept()
            assert conn.peer_id == srv.identity.peer_id
            assert conn.peer_public_key == srv.identity.public_key
            assert server_conn.peer_id == cli.identity.peer_id
            assert server_conn.peer_id == peer_id(cli.identity.public_key)
            # both ends derived the same binding; another connection gets another one
            assert conn.channel_binding == server_conn.channel_binding
            assert len(conn.channel_binding) == 32
            conn2 = await cli.connect(srv.local_address)
            assert conn2.channel_binding != conn.channel_binding
            assert conn2.peer_id == srv.identity.peer_id
            await conn.aclose()
            info = await server_conn.wait_closed()
            assert info.by_peer and info.error_code == Code.NO_ERROR

    run(main)


@pytest.mark.aioquic_too
def test_streams_carry_data_intact_both_ways():
    async def main():
        async with pair() as (srv, cli), trio.open_nursery() as nursery:
            await echo_server(srv, nursery)
            conn = await cli.connect(srv.local_address)
            sizes = [0, 1, 1000, 1452, 65536, 3 << 20]
            payloads = [os.urandom(n) for n in sizes]

            async def one(data):
                assert await echo_digest(conn, data) == hashlib.sha256(data).digest()

            async with trio.open_nursery() as n:  # concurrently, on separate streams
                for data in payloads:
                    n.start_soon(one, data)
            # the server can open streams towards the client, too
            server_conn = srv.connections[0]
            s = await server_conn.open_stream()
            await s.send(b"hello from the server", end=True)
            incoming = await conn.accept_stream()
            assert await incoming.receive_all(100) == b"hello from the server"
            nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.aioquic_too
def test_server_may_open_streams_right_after_accepting():
    """The server's first stream can overtake its hello: the client must hold it until
    it has verified the server, not treat it as a protocol violation."""

    async def main():
        async with pair() as (srv, cli), trio.open_nursery() as nursery:
            async def pusher():
                async for conn in srv:
                    s = await conn.open_stream()
                    await s.send(b"pushed", end=True)

            nursery.start_soon(pusher)
            for _ in range(20):
                conn = await cli.connect(srv.local_address)
                s = await conn.accept_stream()
                assert await s.receive_all(10) == b"pushed"
                assert not conn.closed
                await conn.aclose()
            nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.aioquic_too
def test_receive_exactly_and_limits():
    async def main():
        async with pair() as (srv, cli):
            conn = await cli.connect(srv.local_address)
            sconn = await srv.accept()
            s = await conn.open_stream()
            await s.send(b"abcdefgh" * 10, end=True)
            r = await sconn.accept_stream()
            assert await r.receive_exactly(5) == b"abcde"
            with pytest.raises(quic.LimitExceeded):
                await r.receive_all(10)
            s2 = await conn.open_stream()
            await s2.send(b"xy", end=True)
            r2 = await sconn.accept_stream()
            with pytest.raises(TransportError):
                await r2.receive_exactly(3)

    run(main)


def test_slow_reader_bounds_buffered_bytes_and_throttles_sender():
    """Receive credit follows what the reader consumed: a sender facing a reader that
    does not read is stopped at about one window, not buffered without end."""
    window = 1 << 20
    cfg = TransportConfig(max_stream_data=window, max_data=2 * window, send_buffer=256 << 10)
    total = 24 << 20
    data = os.urandom(total)

    async def main():
        async with pair(server_config=cfg, client_config=cfg) as (srv, cli):
            conn = await cli.connect(srv.local_address)
            sconn = await srv.accept()
            s = await conn.open_stream()
            done = trio.Event()

            async def writer():
                await s.send(data, end=True)
                done.set()

            async with trio.open_nursery() as n:
                n.start_soon(writer)
                r = await sconn.accept_stream()
                await trio.sleep(1.5)  # the reader sleeps: the sender must stall
                assert not done.is_set()
                assert r.buffered <= window
                if isinstance(sconn._quic, machine.AioquicMachine):
                    received = sconn._quic._local_max_data.used  # aioquic internal: bytes received
                else:  # qh3 (BPFS_QUIC=qh3): its core's count is not reachable; what was sent bounds it
                    received = conn._quic.sent_offset(s.stream_id)
                    assert received is not None
                in_flight = received - sconn._consumed
                assert in_flight <= 2 * window
                h, got = hashlib.sha256(), 0
                peak = 0
                while chunk := await r.receive_some(64 << 10):
                    peak = max(peak, r.buffered)
                    h.update(chunk)
                    got += len(chunk)
                assert got == total and h.digest() == hashlib.sha256(data).digest()
                assert peak <= window
            assert done.is_set()

    run(main)


def test_peer_opened_streams_are_bounded():
    cfg = TransportConfig(max_streams=3)

    async def main():
        async with pair(server_config=cfg) as (srv, cli):
            conn = await cli.connect(srv.local_address)
            sconn = await srv.accept()
            streams = []
            for i in range(7):
                s = await conn.open_stream()
                await s.send(bytes([i]), end=True)
                streams.append(s)
            await trio.sleep(0.5)
            held = []
            with trio.move_on_after(0.5):
                while True:
                    held.append(await sconn.accept_stream())
            assert len(held) == 3  # the others wait in the client for MAX_STREAMS
            seen = set()
            for _ in range(7):
                if not held:
                    held.append(await sconn.accept_stream())
                r = held.pop(0)
                seen.add(await r.receive_all(1))
                await r.send(b"ok", end=True)
            assert seen == {bytes([i]) for i in range(7)}
            for s in streams:
                assert await s.receive_all(2) == b"ok"

    run(main)


@pytest.mark.aioquic_too
def test_connection_limits_per_endpoint():
    cfg = TransportConfig(max_connections=2, handshake_timeout=1.5)

    async def main():
        async with pair(server_config=cfg) as (srv, cli):
            c1 = await cli.connect(srv.local_address)
            c2 = await cli.connect(srv.local_address)
            async with open_endpoint(new_identity(), listen=False,
                                     config=TransportConfig(handshake_timeout=1.5)) as other:
                with pytest.raises(ConnectionClosed):
                    await other.connect(srv.local_address)
            await c1.aclose()
            with trio.fail_after(5):
                while len(srv.connections) >= 2:
                    await trio.sleep(0.05)
            c3 = await cli.connect(srv.local_address)
            assert c3.peer_id == srv.identity.peer_id and not c2.closed

    run(main)


@pytest.mark.aioquic_too
def test_unauthenticated_connections_are_bounded_and_timed_out():
    """Peers that finish the QUIC handshake but never authenticate hold a pending slot
    for at most `handshake_timeout`, and one host holds at most `max_pending_per_host`."""
    cfg = TransportConfig(max_pending=8, max_pending_per_host=2, handshake_timeout=1.0)

    class Silent:
        async def authenticate(self, conn, stream, accept):
            await trio.sleep_forever()

    async def main():
        async with open_endpoint(new_identity(), config=cfg) as srv, \
                open_endpoint(Silent(), listen=False, config=TransportConfig(handshake_timeout=30)) as silent:
            outcomes = []

            async def loris():
                try:
                    await silent.connect(srv.local_address)
                except ConnectionClosed as exc:
                    outcomes.append(exc)

            async with trio.open_nursery() as n:
                n.start_soon(loris)
                n.start_soon(loris)
                await trio.sleep(0.3)
                quick = TransportConfig(handshake_timeout=0.5)
                async with open_endpoint(new_identity(), listen=False, config=quick) as honest:
                    with pytest.raises(ConnectionClosed):  # no room for this host
                        await honest.connect(srv.local_address)
            assert len(outcomes) == 2
            assert all(e.by_peer and e.error_code == Code.TIMEOUT for e in outcomes)
            latecomer = new_identity()
            async with open_endpoint(latecomer, listen=False) as honest:
                await honest.connect(srv.local_address)
                assert (await srv.accept()).peer_id == latecomer.peer_id

    run(main)


@pytest.mark.aioquic_too
def test_garbage_datagrams_are_dropped_without_harm():
    async def main():
        async with pair() as (srv, cli), trio.open_nursery() as nursery:
            await echo_server(srv, nursery)
            conn = await cli.connect(srv.local_address)
            server_cids = list(srv.connections[0]._cids)
            rng = random.Random(7)
            junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            stop = trio.Event()

            async def spray():
                try:
                    while not stop.is_set():
                        for _ in range(50):
                            kind = rng.randrange(4)
                            n = rng.randrange(1, 1500)
                            body = rng.randbytes(n)
                            if kind == 1:  # short header aimed at a live connection
                                body = bytes([0x40 | rng.randrange(64)]) + rng.choice(server_cids) + body
                            elif kind == 2:  # long-header "Initial" of random content
                                body = bytes([0xC0]) + b"\x00\x00\x00\x01" + rng.randbytes(1300)
                            elif kind == 3:
                                body = b""
                            junk.sendto(body, srv.local_address)
                        await trio.sleep(0.002)
                finally:
                    junk.close()

            nursery.start_soon(spray)
            data = os.urandom(4 << 20)
            for _ in range(3):
                assert await echo_digest(conn, data) == hashlib.sha256(data).digest()
            conn2 = await cli.connect(srv.local_address)  # new connections still work
            assert await echo_digest(conn2, b"x") == hashlib.sha256(b"x").digest()
            stop.set()
            assert srv.dropped_datagrams > 0
            assert not conn.closed
            nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.aioquic_too
def test_idle_timeout_closes_both_sides():
    cfg = TransportConfig(idle_timeout=1.0)

    async def main():
        async with pair(server_config=cfg, client_config=cfg) as (srv, cli):
            conn = await cli.connect(srv.local_address)
            sconn = await srv.accept()
            t0 = trio.current_time()
            with trio.fail_after(10):
                await conn.wait_closed()
                await sconn.wait_closed()
            assert trio.current_time() - t0 >= 0.9
            with pytest.raises(ConnectionClosed):
                await conn.open_stream()
            with pytest.raises(ConnectionClosed):
                await sconn.accept_stream()

    run(main)


@pytest.mark.aioquic_too
def test_close_wakes_blocked_operations():
    async def main():
        async with pair() as (srv, cli):
            conn = await cli.connect(srv.local_address)
            sconn = await srv.accept()
            s = await conn.open_stream()
            await s.send(b"partial")
            r = await sconn.accept_stream()
            assert await r.receive_some() == b"partial"

            async def close_soon():
                await trio.sleep(0.2)
                conn.close(Code.SHUTDOWN, "bye")

            async with trio.open_nursery() as n:
                n.start_soon(close_soon)
                with pytest.raises(ConnectionClosed) as info:
                    await r.receive_some()  # blocked until the peer closes
            assert info.value.by_peer and info.value.error_code == Code.SHUTDOWN
            with pytest.raises(ConnectionClosed):
                await s.send(b"more")

    run(main)


@pytest.mark.aioquic_too
def test_stream_reset_reaches_the_reader():
    async def main():
        async with pair() as (srv, cli):
            conn = await cli.connect(srv.local_address)
            sconn = await srv.accept()
            s = await conn.open_stream()
            await s.send(b"x" * 5000)
            r = await sconn.accept_stream()
            s.reset(0x77)
            with pytest.raises(quic.StreamReset) as info:
                while await r.receive_some():
                    pass
            assert info.value.error_code == 0x77
            # the connection is fine afterwards
            s2 = await conn.open_stream()
            await s2.send(b"after", end=True)
            assert await (await sconn.accept_stream()).receive_all(10) == b"after"

    run(main)


# =========================================================================== authentication

class ForgingAuthenticator:
    """A client that claims `claimed` identity but cannot sign for it properly."""

    def __init__(self, signer: Identity, claimed_key: bytes | None = None, bad_binding: bool = False):
        self.signer, self.claimed_key, self.bad_binding = signer, claimed_key, bad_binding

    async def authenticate(self, conn, stream, accept):
        binding = os.urandom(32) if self.bad_binding else conn.channel_binding
        key = self.claimed_key or self.signer.public_key
        sig = self.signer.sign(auth.transcript(auth.CLIENT, binding, key))
        await stream.send(bytes([auth.VERSION]) + key + sig, end=True)
        await stream.receive_all(auth.HELLO_SIZE)
        return key


@pytest.mark.parametrize("forgery", ["signature over another binding", "key of someone else",
                                     "garbage hello", "oversized hello"])
def test_forged_authentication_is_rejected(forgery):
    victim = new_identity()

    async def main():
        server_id = new_identity()
        async with open_endpoint(server_id) as srv:
            if forgery == "signature over another binding":
                authenticator = ForgingAuthenticator(new_identity(), bad_binding=True)
            elif forgery == "key of someone else":
                authenticator = ForgingAuthenticator(new_identity(), claimed_key=victim.public_key)
            else:
                class Garbage:
                    async def authenticate(self, conn, stream, accept):
                        size = auth.HELLO_SIZE if forgery == "garbage hello" else 10_000
                        await stream.send(os.urandom(size), end=True)
                        await stream.receive_all(auth.HELLO_SIZE)
                        return b"\0" * 32

                authenticator = Garbage()
            async with open_endpoint(authenticator, listen=False) as evil:
                with pytest.raises((AuthenticationError, ConnectionClosed)):
                    await evil.connect(srv.local_address)
                assert not evil.connections or all(c.closed for c in evil.connections)
            with trio.move_on_after(0.5):
                conn = await srv.accept()
                pytest.fail(f"server accepted a forged peer {conn.peer_id}")
            # an honest client still gets in
            async with open_endpoint(victim, listen=False) as honest:
                conn = await honest.connect(srv.local_address)
                assert conn.peer_id == server_id.peer_id
                assert (await srv.accept()).peer_id == victim.peer_id

    run(main)


@pytest.mark.aioquic_too
def test_expected_peer_and_accept_policy():
    async def main():
        allowed = new_identity()
        async with pair(accept_peer=lambda pid: pid == allowed.peer_id) as (srv, cli):
            # the client wants someone else: it hangs up after the server's hello
            with pytest.raises(AuthenticationError):
                await cli.connect(srv.local_address, expected_peer=new_identity().peer_id)
            # the server does not accept this client's peer id
            with pytest.raises(AuthenticationError):
                await cli.connect(srv.local_address, expected_peer=srv.identity.peer_id)
            async with open_endpoint(allowed, listen=False) as ok:
                conn = await ok.connect(srv.local_address, expected_peer=srv.identity.peer_id)
                assert (await srv.accept()).peer_id == allowed.peer_id
                assert conn.peer_id == srv.identity.peer_id

    run(main)


class _RelayDialer:
    """MITM, dialling leg: sends whatever hello it is given, returns the answer's key."""

    def __init__(self):
        self.outgoing = self.incoming = None

    async def authenticate(self, conn, stream, accept):
        await stream.send(self.outgoing, end=True)
        self.incoming = await stream.receive_all(auth.HELLO_SIZE)
        return self.incoming[1:33]


class _RelayListener:
    """MITM, listening leg: terminates QUIC itself (its own certificate and handshake)
    and relays the client's hello to the real server and the server's hello back."""

    def __init__(self, dialer_endpoint, dialer: _RelayDialer, target):
        self.ep, self.dialer, self.target = dialer_endpoint, dialer, target
        self.legs = []

    async def authenticate(self, conn, stream, accept):
        self.dialer.outgoing = await stream.receive_all(auth.HELLO_SIZE)
        self.legs.append(await self.ep.connect(self.target))
        await stream.send(self.dialer.incoming, end=True)
        return self.dialer.incoming[1:33]


async def _mitm_relay_attempt():
    """Alice dials the MITM believing it is Bob; the MITM relays hellos to Bob.
    Returns (alice's result, bob's accepted connection or None)."""
    alice, bob = new_identity(), new_identity()
    async with open_endpoint(bob) as bob_ep:
        dialer = _RelayDialer()
        async with open_endpoint(dialer, listen=False) as mitm_out:
            relay = _RelayListener(mitm_out, dialer, bob_ep.local_address)
            async with open_endpoint(relay) as mitm_in, open_endpoint(alice, listen=False) as alice_ep:
                try:
                    conn = await alice_ep.connect(mitm_in.local_address, expected_peer=bob.peer_id)
                    result = conn.peer_id
                except (AuthenticationError, ConnectionClosed) as exc:
                    result = exc
                bob_conn = None
                with trio.move_on_after(0.5):
                    bob_conn = await bob_ep.accept()
                return result, bob_conn and bob_conn.peer_id, alice.peer_id, bob.peer_id


async def _mitm_reflect_attempt():
    """The MITM is a genuine partner of Bob (own identity), and shows Alice the hello
    Bob sent on the MITM's own connection. Alice must not believe she reached Bob."""
    alice, bob, mallory = new_identity(), new_identity(), new_identity()
    async with open_endpoint(bob) as bob_ep:
        captured = {}

        class Capture(auth.Ed25519Authenticator):  # honest as Mallory, keeps Bob's hello
            async def authenticate(self, conn, stream, accept):
                await stream.send(auth.make_hello(mallory, auth.CLIENT, conn.channel_binding), end=True)
                captured["hello"] = await stream.receive_all(auth.HELLO_SIZE)
                return auth.check_hello(captured["hello"], auth.SERVER, conn.channel_binding)

        class Present:
            async def authenticate(self, conn, stream, accept):
                await stream.receive_all(auth.HELLO_SIZE)  # Alice's hello, ignored
                async with open_endpoint(Capture(mallory), listen=False) as out:
                    await out.connect(bob_ep.local_address)
                await stream.send(captured["hello"], end=True)
                return captured["hello"][1:33]

        async with open_endpoint(Present()) as mitm, open_endpoint(alice, listen=False) as alice_ep:
            try:
                conn = await alice_ep.connect(mitm.local_address, expected_peer=bob.peer_id)
                return conn.peer_id, bob.peer_id
            except (AuthenticationError, ConnectionClosed) as exc:
                return exc, bob.peer_id


def test_mitm_relaying_hellos_fails():
    result, bob_saw, alice_id, bob_id = run(_mitm_relay_attempt)
    assert isinstance(result, (AuthenticationError, ConnectionClosed)), f"Alice was fooled: {result}"
    assert bob_saw is None, "Bob accepted a relayed connection as Alice"


def test_mitm_showing_a_hello_from_another_connection_fails():
    result, bob_id = run(_mitm_reflect_attempt)
    assert isinstance(result, AuthenticationError), f"Alice believed she reached Bob: {result}"


def test_mitm_control_without_channel_binding_succeeds(monkeypatch):
    """Control: with the binding replaced by a constant, the same relays succeed. This
    is what the two tests above would see if the binding did not bind."""
    monkeypatch.setattr(machine, "export_binding", lambda q: b"\x42" * 32)
    result, bob_saw, alice_id, bob_id = run(_mitm_relay_attempt)
    assert result == bob_id and bob_saw == alice_id
    result, bob_id = run(_mitm_reflect_attempt)
    assert result == bob_id


# =========================================================================== codec

TEST = Registry("test", max_frame=1 << 16)


@record
class Item:
    key: bytes = field(Bytes(32, min_len=32))
    size: int = field(UInt(1 << 40))


@TEST.message(0x10)
class Everything:
    small: int = field(UInt(255))
    big: int = field(UInt())
    ranged: int = field(UInt(1000, min=10))
    flag: bool = field(Bool())
    blob: bytes = field(Bytes(1000))
    name: str = field(Text(64))
    items: tuple = field(List(Record(Item), 20))
    maybe: bytes | None = field(Optional(Bytes(16)))
    numbers: tuple = field(List(UInt(0xFFFF), 50))


@TEST.message(0x11)
class Echo:
    data: bytes = field(Bytes(60_000))


items = st.builds(Item, key=st.binary(min_size=32, max_size=32), size=st.integers(0, 1 << 40))
everything = st.builds(
    Everything,
    small=st.integers(0, 255), big=st.integers(0, 2**64 - 1), ranged=st.integers(10, 1000),
    flag=st.booleans(), blob=st.binary(max_size=1000),
    name=st.text(max_size=16),
    items=st.lists(items, max_size=20).map(tuple),
    maybe=st.none() | st.binary(max_size=16),
    numbers=st.lists(st.integers(0, 0xFFFF), max_size=50).map(tuple),
)


@settings(max_examples=300, deadline=None)
@given(everything)
def test_codec_round_trip(msg):
    frame = TEST.encode(msg)
    assert TEST.decode(frame) == msg
    assert TEST.encode(TEST.decode(frame)) == frame  # canonical: one encoding


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=2000))
def test_codec_random_bytes_only_raise_protocol_error(data):
    for registry in (TEST, codec.CORE):
        try:
            registry.decode(data)
        except ProtocolError:
            pass


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(everything, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from("sid")),
                            min_size=1, max_size=6))
def test_codec_mutated_frames(msg, mutations):
    """Valid frames with bytes set, inserted or deleted: decode gives ProtocolError or a
    message whose encoding is exactly the mutated input (never anything else)."""
    frame = bytearray(TEST.encode(msg))
    for pos, value, op in mutations:
        pos %= len(frame) + 1
        if op == "s" and pos < len(frame):
            frame[pos] = value
        elif op == "i":
            frame.insert(pos, value)
        elif op == "d" and pos < len(frame):
            del frame[pos]
    for fix_length in (False, True):
        data = bytearray(frame)
        if fix_length and len(data) >= 6:  # keep the header consistent to reach the body parser
            data[2:6] = (len(data) - 6).to_bytes(4, "big")
        try:
            decoded = TEST.decode(bytes(data))
        except ProtocolError:
            continue
        assert TEST.encode(decoded) == bytes(data)


def test_codec_rejects_specific_malformations():
    good = TEST.encode(Echo(b"hi"))
    assert TEST.decode(good) == Echo(b"hi")
    cases = {
        "bad version": bytes([2]) + good[1:],
        "unknown type": good[:1] + bytes([0x99]) + good[2:],
        "length too long": good[:2] + (len(good)).to_bytes(4, "big") + good[6:],
        "length too short": good[:2] + (len(good) - 7).to_bytes(4, "big") + good[6:],
        "trailing bytes": good[:2] + (len(good) - 5).to_bytes(4, "big") + good[6:] + b"!",
        "wrong tag": good[:6] + bytes([0x08]) + good[7:],
        "header only": good[:6],
        "empty": b"",
        "over the frame limit": good[:2] + (1 << 20).to_bytes(4, "big"),
    }
    for data in cases.values():
        with pytest.raises(ProtocolError):
            TEST.decode(data)
    assert isinstance(_raises(TEST.decode, cases["unknown type"]), codec.UnknownMessage)
    # integers: non-minimal width and out of range
    ping = codec.encode(codec.Ping(5))
    assert ping[6] == 0x01
    nonminimal = ping[:2] + (1 + 2).to_bytes(4, "big") + bytes([0x02, 0, 5])
    with pytest.raises(ProtocolError):
        codec.decode(nonminimal)
    e = Everything(small=1, big=1, ranged=10, flag=True, blob=b"", name="", items=(), maybe=None, numbers=())
    frame = bytearray(TEST.encode(e))
    idx = frame.index(bytes([0x01, 10]))  # `ranged` = 10, encoded as u8
    frame[idx + 1] = 9
    with pytest.raises(ProtocolError):
        TEST.decode(bytes(frame))
    # invalid UTF-8 and lone surrogates
    bad_text = TEST.encode(Everything(**{**e.__dict__, "name": "ab"})).replace(b"ab", b"\xff\xfe")
    with pytest.raises(ProtocolError):
        TEST.decode(bad_text)
    with pytest.raises(ProtocolError):
        TEST.encode(Everything(**{**e.__dict__, "name": "\ud800"}))
    # encode validates too
    for bad in (dict(small=256), dict(small=True), dict(blob="text"), dict(items=[1]), dict(name="x" * 65),
                dict(maybe=b"x" * 17), dict(numbers=tuple(range(51)))):
        with pytest.raises(ProtocolError):
            TEST.encode(Everything(**{**e.__dict__, **bad}))
    with pytest.raises(ProtocolError):
        TEST.encode(Echo(b"x" * 60_001))
    with pytest.raises(ProtocolError):  # a message of another registry
        codec.CORE.encode(Echo(b""))


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


def test_codec_oversized_message_is_refused_by_encode():
    small = Registry("small", max_frame=100)

    @small.message(0x10)
    class Blob:
        data: bytes = field(Bytes(1000))

    assert small.decode(small.encode(Blob(b"x" * 50))) == Blob(b"x" * 50)
    with pytest.raises(ProtocolError):
        small.encode(Blob(b"x" * 200))


# =========================================================================== request / response

def make_dispatcher(**kwargs) -> rpc.Dispatcher:
    d = rpc.Dispatcher(TEST, **kwargs)

    @d.handler(codec.Ping)
    async def ping(conn, msg):
        return codec.Pong(msg.nonce + 1)

    @d.handler(Echo)
    async def echo(conn, msg):
        if msg.data == b"reject":
            raise rpc.Reject("not today")
        if msg.data == b"crash":
            raise RuntimeError("secret detail 1234")
        return Echo(msg.data[::-1])

    return d


@asynccontextmanager
async def rpc_server(**kwargs):
    async with pair() as (srv, cli), trio.open_nursery() as nursery:
        nursery.start_soon(make_dispatcher(**kwargs).serve, srv)
        yield srv, cli
        nursery.cancel_scope.cancel()


@pytest.mark.aioquic_too
def test_request_response():
    async def main():
        async with rpc_server() as (srv, cli):
            conn = await cli.connect(srv.local_address)
            assert await rpc.request(conn, codec.Ping(41), registry=TEST) == codec.Pong(42)
            big = os.urandom(60_000)
            assert await rpc.request(conn, Echo(big), registry=TEST) == Echo(big[::-1])
            with pytest.raises(rpc.RemoteError) as info:
                await rpc.request(conn, Echo(b"reject"), registry=TEST)
            assert info.value.code == codec.ErrorCode.REJECTED and info.value.message == "not today"
            with pytest.raises(rpc.RemoteError) as info:
                await rpc.request(conn, Echo(b"crash"), registry=TEST)
            assert info.value.code == codec.ErrorCode.INTERNAL and "secret" not in info.value.message
            e = Everything(small=1, big=1, ranged=10, flag=True, blob=b"", name="", items=(), maybe=None,
                           numbers=())
            with pytest.raises(rpc.RemoteError) as info:  # known type, no handler
                await rpc.request(conn, e, registry=TEST)
            assert info.value.code == codec.ErrorCode.UNSUPPORTED

            async def many(i):
                assert await rpc.request(conn, codec.Ping(i), registry=TEST) == codec.Pong(i + 1)

            async with trio.open_nursery() as n:
                for i in range(100):
                    n.start_soon(many, i)
            assert not conn.closed

    run(main)


async def _raw_request(conn, payload: bytes) -> bytes:
    s = await conn.open_stream()
    await s.send(payload, end=True)
    return await s.receive_all(1 << 20)


@pytest.mark.parametrize("bad", ["garbage", "truncated", "bad version", "oversized", "oversized header"])
def test_malformed_request_closes_only_that_connection(bad):
    async def main():
        async with rpc_server() as (srv, cli):
            victim = await cli.connect(srv.local_address)
            bystander = await cli.connect(srv.local_address)
            assert await rpc.request(bystander, codec.Ping(1), registry=TEST) == codec.Pong(2)
            good = TEST.encode(Echo(b"hello"))
            payload = {
                "garbage": os.urandom(300),
                "truncated": good[:-2],
                "bad version": b"\x07" + good[1:],
                "oversized": TEST.encode(Echo(b"x" * 60_000))[:6] + b"x" * 70_000,
                "oversized header": good[:2] + (10 << 20).to_bytes(4, "big") + good[6:],
            }[bad]
            with pytest.raises((ConnectionClosed, TransportError)):
                await _raw_request(victim, payload)
            info = await victim.wait_closed()
            assert info.by_peer and info.error_code == Code.PROTOCOL_VIOLATION
            # the other connection never noticed
            assert await rpc.request(bystander, codec.Ping(2), registry=TEST) == codec.Pong(3)
            assert not bystander.closed
            # and the offender may come back with well-formed requests
            again = await cli.connect(srv.local_address)
            assert await rpc.request(again, codec.Ping(3), registry=TEST) == codec.Pong(4)

    run(main)


def test_unknown_message_type_gets_error_reply():
    async def main():
        async with rpc_server() as (srv, cli):
            conn = await cli.connect(srv.local_address)
            frame = codec.HEADER.pack(codec.VERSION, 0x77, 0)
            reply = TEST.decode(await _raw_request(conn, frame))
            assert isinstance(reply, codec.Error) and reply.code == codec.ErrorCode.UNSUPPORTED
            assert not conn.closed

    run(main)


def test_oversized_request_refused_before_sending():
    async def main():
        async with rpc_server() as (srv, cli):
            conn = await cli.connect(srv.local_address)
            with pytest.raises(ProtocolError):
                await rpc.request(conn, Echo(b"x" * 60_001), registry=TEST)
            assert await rpc.request(conn, codec.Ping(0), registry=TEST) == codec.Pong(1)

    run(main)


@pytest.mark.aioquic_too
def test_rate_limit_per_peer():
    async def main():
        async with rpc_server(rate=2.0, burst=5) as (srv, cli):
            conn = await cli.connect(srv.local_address)
            outcomes = []
            for i in range(8):
                try:
                    await rpc.request(conn, codec.Ping(i), registry=TEST)
                    outcomes.append("ok")
                except rpc.RemoteError as exc:
                    assert exc.code == codec.ErrorCode.RATE_LIMITED
                    outcomes.append("limited")
            assert outcomes[:5] == ["ok"] * 5 and "limited" in outcomes[5:]
            # reconnecting does not refill the bucket (it is per peer id) ...
            conn2 = await cli.connect(srv.local_address)
            with pytest.raises(rpc.RemoteError):
                await rpc.request(conn2, codec.Ping(0), registry=TEST)
            # ... while another peer is unaffected
            async with open_endpoint(new_identity(), listen=False) as other:
                c = await other.connect(srv.local_address)
                assert await rpc.request(c, codec.Ping(0), registry=TEST) == codec.Pong(1)
            # tokens come back with time
            await trio.sleep(1.2)
            assert await rpc.request(conn2, codec.Ping(9), registry=TEST) == codec.Pong(10)
            # a peer that keeps hammering after refusals is disconnected
            with pytest.raises((rpc.RemoteError, ConnectionClosed, TransportError)):
                for i in range(100):
                    try:
                        await rpc.request(conn2, codec.Ping(i), registry=TEST)
                    except rpc.RemoteError:
                        pass
            assert conn2.closed

    run(main)


# =========================================================================== two processes

SERVER_SCRIPT = textwrap.dedent("""
    import os, sys, trio
    sys.path.insert(0, sys.argv[2])
    from bpfs.identity import Identity
    from bpfs.net import codec, rpc
    from bpfs.net.quic import open_endpoint

    async def main():
        ident = Identity(bytes.fromhex(sys.argv[1]))
        d = rpc.Dispatcher()

        @d.handler(codec.Ping)
        async def ping(conn, msg):
            return codec.Pong(msg.nonce ^ 0xFFFF)

        async with open_endpoint(ident) as ep:
            print(ep.local_address[1], flush=True)
            async with trio.open_nursery() as n:
                n.start_soon(d.serve, ep)
                await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes stdin
                n.cancel_scope.cancel()

    trio.run(main)
""")


@pytest.mark.aioquic_too
def test_two_processes():
    seed = os.urandom(32)
    server_id = Identity(seed)
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, seed.hex(), str(REPO)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())

        async def main():
            async with open_endpoint(new_identity(), listen=False) as ep:
                conn = await ep.connect(("127.0.0.1", port), expected_peer=server_id.peer_id)
                for i in range(20):
                    assert await rpc.request(conn, codec.Ping(i)) == codec.Pong(i ^ 0xFFFF)
                await conn.aclose()
            async with open_endpoint(new_identity(), listen=False) as ep:
                with pytest.raises(AuthenticationError):
                    await ep.connect(("127.0.0.1", port), expected_peer=new_identity().peer_id)

        run(main)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# =========================================================================== datagrams beside QUIC

def test_connection_through_a_relay_path_is_authenticated_end_to_end():
    """`RelayPath`: a QUIC connection whose datagrams travel inside relay frames through a third
    socket. The relay here is a plain UDP forwarder that swaps session ids, as a broker's does; it
    sees only relay frames of QUIC packets, and both ends still authenticate each other."""
    from bpfs.net.relay import RelayPath, parse_relay_frame, relay_frame, punch_probe

    async def main():
        relay_sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await relay_sock.bind(("127.0.0.1", 0))
        relay_addr = relay_sock.getsockname()
        sa, sb = os.urandom(16), os.urandom(16)
        where: dict[bytes, tuple] = {}
        seen = bytearray()
        forwarded = [0]

        async def relay():
            while True:
                data, addr = await relay_sock.recvfrom(65536)
                frame = parse_relay_frame(data)
                if frame is None:
                    continue
                session, payload = frame
                seen.extend(payload)
                where[session] = addr
                other = sb if session == sa else sa
                if other in where:
                    forwarded[0] += 1
                    await relay_sock.sendto(relay_frame(other, payload), where[other])

        async with pair() as (srv, cli), trio.open_nursery() as nursery:
            nursery.start_soon(relay)
            await echo_server(srv, nursery)
            srv.add_relay_session(RelayPath(relay_addr[0], relay_addr[1], sb))
            cli.add_relay_session(RelayPath(relay_addr[0], relay_addr[1], sa))
            # the server side must be known to the relay before the first packet can reach it
            srv.send_datagram(relay_frame(sb, punch_probe()), relay_addr)
            await trio.sleep(0.1)
            conn = await cli.connect(RelayPath(relay_addr[0], relay_addr[1], sa), expected_peer=srv.identity.peer_id)
            assert isinstance(conn.remote_address, RelayPath)
            data = os.urandom(2 << 20)
            assert await echo_digest(conn, data) == hashlib.sha256(data).digest()
            server_conn = srv.connections[0]
            assert server_conn.peer_id == cli.identity.peer_id
            assert isinstance(server_conn.remote_address, RelayPath) and server_conn.remote_address.session == sb
            assert forwarded[0] > 100
            assert data[1000:1064] not in bytes(seen)  # the relay saw ciphertext only
            # frames for a session the endpoint does not accept, and punch probes, are dropped
            before = srv.dropped_datagrams
            srv_addr = srv.local_address
            cli.send_datagram(relay_frame(os.urandom(16), b"\xc0" + os.urandom(1300)), srv_addr)
            cli.send_datagram(punch_probe(), srv_addr)
            with trio.fail_after(5):
                while srv.dropped_datagrams < before + 2:
                    await trio.sleep(0.01)
            assert not conn.closed
            nursery.cancel_scope.cancel()

    run(main)
