"""bpfs.net on qh3 (`TransportConfig.quic_library`, `bpfs/net/machine_qh3.py`) next to aioquic.

What does not carry over from aioquic by itself, shown over both libraries: receive credit
granted only as the reader consumes (a stalled reader holds the sender at the window), the
peer's stream limits, the channel binding (equal at both ends, different across a relay,
no session resumption), and interoperation: an aioquic store and a qh3 store connect and
authenticate each other, both ways, through a Retry and over a relay path. The tests of
`test_transport` that show these run here once per library (`BPFS_QUIC` sets the default
of every `TransportConfig` they make). Real QUIC over loopback UDP, as there.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import qh3  # a dependency of bpfs (the default QUIC library): never skipped
import trio

import test_transport as tt  # tests/net is on sys.path (rootdir-relative test modules)
from bpfs.net import machine, machine_qh3, quic
from bpfs.net.errors import AuthenticationError
from bpfs.net.quic import TransportConfig, open_endpoint

pytestmark = pytest.mark.timeout(120)

LIBRARIES = ("aioquic", "qh3")
PAIRS = [(c, s) for c in LIBRARIES for s in LIBRARIES]  # (client library, server library)


@pytest.fixture(params=LIBRARIES)
def library(request, monkeypatch):
    """Run the test with every `TransportConfig` defaulting to this library."""
    monkeypatch.setenv("BPFS_QUIC", request.param)
    assert TransportConfig().quic_library == request.param
    return request.param


def machine_class(library: str) -> type:
    return machine_qh3.Qh3Machine if library == "qh3" else machine.AioquicMachine


# =========================================================================== the setting

def test_library_setting_and_version_check(monkeypatch):
    monkeypatch.delenv("BPFS_QUIC", raising=False)
    assert TransportConfig().quic_library == "qh3"  # the default
    monkeypatch.setenv("BPFS_QUIC", "aioquic")
    assert TransportConfig().quic_library == "aioquic"
    assert TransportConfig(quic_library="qh3").quic_library == "qh3"
    with pytest.raises(ValueError):
        TransportConfig(quic_library="quiche")
    # exactly the version whose internals were checked
    assert qh3.__version__ == machine_qh3.QH3_VERSION
    machine_qh3.check_qh3()
    monkeypatch.setattr(machine_qh3, "_qh3_version", "2.1.1")
    with pytest.raises(ImportError, match="2.1.0"):
        machine_qh3.check_qh3()


def test_pyproject_pins_the_checked_version():
    text = (tt.REPO / "pyproject.toml").read_text()
    assert f'"qh3=={machine_qh3.QH3_VERSION}"' in text


# =========================================================================== 1. receive credit

def test_slow_reader_bounds_buffered_bytes_and_throttles_sender(library):
    """`test_transport`'s slow-reader test, measured without aioquic internals: the reader
    sleeps, so the sender must stall with at most one stream window sent and not consumed
    (in flight, in the receiving machine, in the stream's buffer; qh3: plus the one event
    its gate holds back), and the stream never buffers more than the window."""
    window = 1 << 20
    cfg = TransportConfig(max_stream_data=window, max_data=2 * window, send_buffer=256 << 10)
    total = 24 << 20
    data = os.urandom(total)
    slack = 64 << 10 if library == "qh3" else 0

    async def main():
        async with tt.pair(server_config=cfg, client_config=cfg) as (srv, cli):
            conn = await cli.connect(srv.local_address)
            sconn = await srv.accept()
            assert type(conn._quic) is machine_class(library) and type(sconn._quic) is machine_class(library)
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
                sent = conn._quic.sent_offset(s.stream_id)
                assert sent is not None and window // 2 <= sent - sconn._consumed <= window + slack
                await trio.sleep(0.5)
                assert conn._quic.sent_offset(s.stream_id) == sent  # stalled, not trickling
                h, got, peak = hashlib.sha256(), 0, 0
                while chunk := await r.receive_some(64 << 10):
                    peak = max(peak, r.buffered)
                    h.update(chunk)
                    got += len(chunk)
                    assert conn._quic.sent_offset(s.stream_id) - sconn._consumed <= window + slack
                assert got == total and h.digest() == hashlib.sha256(data).digest()
                assert peak <= window
            assert done.is_set()

    tt.run(main)


def test_qh3_gate_holds_the_connection_window_across_streams():
    """qh3: the gate counts the connection too: two stalled streams together stay within
    `max_data` sent and not consumed; reading one of them lets the other's sender go on."""
    window = 1 << 20
    cfg = TransportConfig(max_stream_data=window, max_data=window, send_buffer=256 << 10, quic_library="qh3")

    async def main():
        async with tt.pair(server_config=cfg, client_config=cfg) as (srv, cli):
            conn = await cli.connect(srv.local_address)
            sconn = await srv.accept()
            payload = os.urandom(8 << 20)
            streams = [await conn.open_stream() for _ in range(2)]
            async with trio.open_nursery() as n:
                for s in streams:
                    n.start_soon(s.send, payload, True)
                readers = [await sconn.accept_stream() for _ in range(2)]
                await trio.sleep(1.0)
                sent = sum(conn._quic.sent_offset(s.stream_id) or 0 for s in streams)
                assert sent - sconn._consumed <= window + (64 << 10)
                assert sum(r.buffered for r in readers) <= window
                assert sconn._quic._held is not None  # one event held back, the rest in the core
                digests = [hashlib.sha256(), hashlib.sha256()]

                async def read(i):
                    while chunk := await readers[i].receive_some(1 << 20):
                        digests[i].update(chunk)

                for i in range(2):
                    n.start_soon(read, i)
            assert all(d.digest() == hashlib.sha256(payload).digest() for d in digests)

    tt.run(main)


def test_qh3_events_behind_a_held_event_are_bounded(monkeypatch):
    """Past `MAX_EVENTS_BEHIND` core events queued behind a held-back one, the connection's
    datagrams are dropped (as lost) until the reader catches up; transfers still complete.
    A flow-controlled peer soon stops by itself (a few DATA_BLOCKED or probes then); what
    keeps arriving here is the client's ACKs for the server's own transfer, with the bound
    set to 1."""
    monkeypatch.setattr(machine_qh3, "MAX_EVENTS_BEHIND", 1)
    window = 256 << 10
    cfg = TransportConfig(max_stream_data=window, max_data=window, preauth_window=64 << 10, quic_library="qh3")
    up, down = os.urandom(4 << 20), os.urandom(2 << 20)

    async def main():
        async with tt.pair(server_config=cfg, client_config=cfg) as (srv, cli):
            conn = await cli.connect(srv.local_address)
            sconn = await srv.accept()
            s = await conn.open_stream()
            got = {}
            async with trio.open_nursery() as n:
                n.start_soon(s.send, up, True)
                r = await sconn.accept_stream()
                await trio.sleep(0.5)
                assert sconn._quic._held is not None
                before = sconn._quic.gated_drops
                back = await sconn.open_stream()
                n.start_soon(back.send, down, True)

                async def client_reads():
                    got["down"] = await (await conn.accept_stream()).receive_all(len(down))

                n.start_soon(client_reads)
                await trio.sleep(1.0)
                assert sconn._quic.gated_drops > before  # the client's ACKs, dropped while the reader sleeps
                got["up"] = await r.receive_all(len(up))
            assert got == {"up": up, "down": down}

    tt.run(main)


def test_a_stranger_reaches_the_quic_machine_with_at_most_the_preauth_budget(library, monkeypatch):
    """A client that completes the QUIC handshake and then floods stream 0, while the
    server has not authenticated it, gets at most `preauth_window + PREAUTH_HANDSHAKE_BYTES`
    of datagrams into the server's QUIC machine; the rest is dropped and counted. With
    qh3 this is the bound: its core announces half the post-authentication windows (8 MiB
    here) from construction, and would take, in order or out of it, whatever arrived before
    bpfs.net reads stream 0. (The server's stalled authenticator stands in for data the
    reader cannot take: a stream 0 sent out of order.)"""
    cfg = TransportConfig()
    budget = cfg.preauth_window + quic.PREAUTH_HANDSHAKE_BYTES
    into_server = {"bytes": 0}
    cls = machine_class(library)
    original = cls.receive_datagram

    def counting(self, data, addr, now):
        if not self._is_client:
            into_server["bytes"] += len(data)
        return original(self, data, addr, now)

    monkeypatch.setattr(cls, "receive_datagram", counting)

    class Stalled:  # the server never reads the hello
        async def authenticate(self, conn, stream, accept):
            await trio.sleep_forever()

    class Flooder:  # the client sends far more than a hello, and never stops
        async def authenticate(self, conn, stream, accept):
            await stream.send(os.urandom(4 << 20))
            await trio.sleep_forever()

    async def main():
        async with open_endpoint(Stalled(), config=cfg) as srv, \
                open_endpoint(Flooder(), listen=False, config=cfg) as cli, trio.open_nursery() as n:
            n.start_soon(cli.connect, srv.local_address)  # never returns: the server never authenticates

            def flooded() -> bool:  # the window is full, and with qh3 the budget is past
                conns = srv.connections
                return bool(conns) and into_server["bytes"] >= cfg.preauth_window and (
                    library != "qh3" or conns[0].preauth_dropped > 0)

            with trio.fail_after(30):
                while not flooded():
                    await trio.sleep(0.02)
            await trio.sleep(0.3)  # more of the flood arrives meanwhile
            n.cancel_scope.cancel()
            (sconn,) = srv.connections
            assert not sconn._authenticated
            assert sconn.preauth_received >= into_server["bytes"] > 0
            assert into_server["bytes"] <= budget
            if library == "qh3":  # aioquic's window stops the flooder at 256 KiB by itself
                assert sconn.preauth_dropped > 0 and sconn.preauth_received > budget

    tt.run(main)


# =========================================================================== 2. stream limits

def test_peer_opened_streams_are_bounded(library):
    tt.test_peer_opened_streams_are_bounded()


@pytest.mark.parametrize("client_lib,server_lib", PAIRS)
def test_stream_limits_announced(client_lib, server_lib):
    """Each side announces `max_streams` bidirectional and no unidirectional streams (qh3
    hard-codes 100 and 103): read from the other side's machine. (The concurrency itself:
    `test_peer_opened_streams_are_bounded`.)"""

    def peer_limits(quic_machine) -> tuple[int, int]:
        if isinstance(quic_machine, machine_qh3.Qh3Machine):
            return tuple(quic_machine._core.stream_limits[:2])
        return quic_machine._remote_max_streams_bidi, quic_machine._remote_max_streams_uni

    async def main():
        async with open_endpoint(tt.new_identity(), config=TransportConfig(max_streams=5, quic_library=server_lib)) \
                as srv, open_endpoint(tt.new_identity(), listen=False,
                                      config=TransportConfig(max_streams=7, quic_library=client_lib)) as cli:
            conn = await cli.connect(srv.local_address)
            sconn = await srv.accept()
            # stream 0 (authentication) is over: a peer may already have raised the limit by one
            assert peer_limits(conn._quic) in ((5, 0), (6, 0))
            assert peer_limits(sconn._quic) == (7, 0)

    tt.run(main)


# =========================================================================== 3. channel binding

def test_connect_authenticates_both_sides(library):
    tt.test_connect_authenticates_both_sides()


def test_mitm_relaying_hellos_fails(library):
    tt.test_mitm_relaying_hellos_fails()


def test_mitm_showing_a_hello_from_another_connection_fails(library):
    tt.test_mitm_showing_a_hello_from_another_connection_fails()


def test_mitm_control_without_channel_binding_succeeds(library, monkeypatch):
    tt.test_mitm_control_without_channel_binding_succeeds(monkeypatch)


def test_forged_authentication_is_rejected(library):
    for forgery in ("signature over another binding", "key of someone else"):
        tt.test_forged_authentication_is_rejected(forgery)


@pytest.mark.parametrize("lib", LIBRARIES)
def test_binding_refuses_a_resumed_session(lib, monkeypatch):
    """`export_binding` refuses a resumed session (no certificate, another key schedule);
    qh3's TLS context is the same Python code, checked here on a live connection."""

    async def main():
        cfg = TransportConfig(quic_library=lib)
        async with tt.pair(server_config=cfg, client_config=cfg) as (srv, cli):
            conn = await cli.connect(srv.local_address)
            context = conn._quic.tls
            assert machine.export_binding(conn._quic) == conn.channel_binding
            assert not context.session_resumed and context.key_schedule.generation == 3
            assert context.session_ticket is None and context.get_session_ticket_cb is None
            monkeypatch.setattr(context, "_session_resumed", True)
            with pytest.raises(AuthenticationError):
                machine.export_binding(conn._quic)

    tt.run(main)


# =========================================================================== interoperation

@pytest.mark.parametrize("client_lib,server_lib", PAIRS)
def test_interop_connect_authenticate_and_carry_data(client_lib, server_lib):
    """An aioquic store and a qh3 store: same ALPN, same binding, authentication both ways,
    data both ways, streams the server opens, a stream reset, a close."""

    async def main():
        async with tt.pair(server_config=TransportConfig(quic_library=server_lib),
                           client_config=TransportConfig(quic_library=client_lib)) as (srv, cli), \
                trio.open_nursery() as nursery:
            conn = await cli.connect(srv.local_address, expected_peer=srv.identity.peer_id)
            server_conn = await srv.accept()
            assert type(conn._quic) is machine_class(client_lib)
            assert type(server_conn._quic) is machine_class(server_lib)
            assert conn.channel_binding == server_conn.channel_binding and len(conn.channel_binding) == 32
            assert server_conn.peer_id == cli.identity.peer_id

            resets = []

            async def echo():
                async for stream in server_conn:
                    h = hashlib.sha256()
                    try:
                        while data := await stream.receive_some(1 << 20):
                            h.update(data)
                    except quic.StreamReset as exc:
                        resets.append(exc.error_code)
                        continue
                    await stream.send(h.digest(), end=True)

            nursery.start_soon(echo)
            for size in (0, 1, 70_000, 3 << 20):
                payload = os.urandom(size)
                assert await tt.echo_digest(conn, payload) == hashlib.sha256(payload).digest()
            s = await conn.open_stream()
            await s.send(b"x" * 5000)
            await trio.sleep(0.2)
            s.reset(0x42)
            with trio.fail_after(5):
                while not resets:
                    await trio.sleep(0.01)
            assert resets == [0x42]
            s = await server_conn.open_stream()
            await s.send(b"from the server", end=True)
            assert await (await conn.accept_stream()).receive_all(100) == b"from the server"
            await conn.aclose()
            info = await server_conn.wait_closed()
            assert info.by_peer and info.error_code == quic.Code.NO_ERROR
            nursery.cancel_scope.cancel()

    tt.run(main)


@pytest.mark.parametrize("client_lib,server_lib", PAIRS)
def test_interop_through_a_retry(client_lib, server_lib):
    """`retry_threshold=0`: every client Initial is answered with a Retry (aioquic's packet,
    our token) first; the client comes back and both sides still bind the same connection."""

    async def main():
        async with tt.pair(server_config=TransportConfig(quic_library=server_lib, retry_threshold=0),
                           client_config=TransportConfig(quic_library=client_lib)) as (srv, cli):
            conn = await cli.connect(srv.local_address)
            sconn = await srv.accept()
            assert srv.retries_sent >= 1
            assert conn.channel_binding == sconn.channel_binding
            assert conn._quic.original_destination_connection_id == sconn._quic.original_destination_connection_id
            assert sconn.peer_id == cli.identity.peer_id

    tt.run(main)


def test_relay_path(library):
    tt.test_connection_through_a_relay_path_is_authenticated_end_to_end()


@pytest.mark.parametrize("client_lib,server_lib", [("aioquic", "qh3"), ("qh3", "aioquic")])
def test_interop_idle_timeout_and_close(client_lib, server_lib):
    cfg = dict(idle_timeout=1.0)

    async def main():
        async with tt.pair(server_config=TransportConfig(quic_library=server_lib, **cfg),
                           client_config=TransportConfig(quic_library=client_lib, **cfg)) as (srv, cli):
            conn = await cli.connect(srv.local_address)
            sconn = await srv.accept()
            with trio.fail_after(10):
                await conn.wait_closed()
                await sconn.wait_closed()
            with pytest.raises(quic.ConnectionClosed):
                await conn.open_stream()

    tt.run(main)
