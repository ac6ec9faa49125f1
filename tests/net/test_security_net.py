"""Security hardening, the network: a handshake flood against a daemon (issue 12).

A flood of client Initials that never complete their handshakes, from several loopback source
addresses and ports, sent from a thread of this process (real UDP, aioquic's own client state
machine to make each Initial), against real `bpfs serve` daemons: a partner coming online and an
invited `bpfs pair --direct` must still get in while it lasts. And the same against an endpoint
in this process, for what admission guarantees and where its limit is (`bpfs.net.quic`).

Loopback: the whole of 127.0.0.0/8 is this machine, so each source host is a real address the
flood can bind (a "spoofed" flood is one that never reads what comes back to it).
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import trio
from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from bpfs.identity import Identity
from bpfs.net.machine import ALPN, CID_LENGTH
from bpfs.net.quic import ConnectionClosed, TransportConfig, open_endpoint
from tests.helpers.netlab import parse_hostport
from tests.helpers.partners import Server, pair, wait_for

pytestmark = pytest.mark.timeout(240)


class HandshakeFlood:
    """Client Initials (made by aioquic's client) sent round-robin from `ports_per_host` sockets
    on each of `hosts`, `rate` a second, none of them ever finished. With `answer_retry` the flood
    reads what comes back and answers a Retry (so it proves its addresses, and each of its
    handshakes then stalls at the server's first flight); without, it never reads: what a flood
    from spoofed source addresses looks like to the server."""

    def __init__(self, target: tuple[str, int], hosts, *, ports_per_host: int = 4, rate: float = 40.0,
                 answer_retry: bool = False):
        self.target = target
        self.socks = []
        for host in hosts:
            for _ in range(ports_per_host):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind((host, 0))
                self.socks.append(s)
        self.rate = rate
        self.answer_retry = answer_retry
        self.initials = self.retries_answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="handshake-flood", daemon=True)

    def __enter__(self) -> "HandshakeFlood":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.socks:
            s.close()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            sock = self.socks[i % len(self.socks)]
            i += 1
            quic = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=[ALPN],
                                                                  connection_id_length=CID_LENGTH))
            quic.connect(self.target, now=time.monotonic())
            for data, _ in quic.datagrams_to_send(now=time.monotonic()):
                sock.sendto(data, self.target)
                self.initials += 1
            if self.answer_retry:
                self._answer_retry(sock, quic)
            self._stop.wait(1 / self.rate)

    def _answer_retry(self, sock, quic) -> None:
        sock.settimeout(0.2)
        until = time.monotonic() + 0.2
        while time.monotonic() < until:
            try:
                data, _ = sock.recvfrom(65536)
            except OSError:  # timeout
                return
            try:
                header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
            except ValueError:
                continue
            if header.packet_type == QuicPacketType.RETRY and header.destination_cid == quic.host_cid:
                quic.receive_datagram(data, self.target, now=time.monotonic())
                for out, _ in quic.datagrams_to_send(now=time.monotonic()):
                    sock.sendto(out, self.target)
                self.retries_answered += 1
                return


def spoofed_hosts(first: int, n: int) -> list[str]:
    return [f"127.0.0.{first + i}" for i in range(n)]


# =========================================================================== real daemons

def test_a_handshake_flood_keeps_neither_a_partner_nor_an_invited_pairing_out(tmp_path):
    """The flood of the issue (half-finished handshakes from several addresses and ports), made
    heavier (8 addresses, 2 ports each, as many Initials a second as this thread makes, about 50),
    plus 4 more addresses that do answer Retry and stall after it: during it, an invited `bpfs
    pair --direct` pairs and a partner that comes online connects, each within seconds (before
    Retry, both waited until the flood stopped, or got in by luck when a slot fell free)."""
    a = Server(tmp_path / "a")
    b = Server(tmp_path / "b")
    c = Server(tmp_path / "c")
    try:
        a.serve("127.0.0.1:0")
        b.serve("127.0.0.10:0")  # the partner: a host of its own, known to A once paired
        c.serve("127.0.0.11:0")  # the invited store: a host A has never seen
        pair(b, a)
        b.stop()
        a_addr = a.address()
        target = parse_hostport(a_addr)
        with HandshakeFlood(target, spoofed_hosts(2, 8), ports_per_host=2, rate=100.0) as spoofed, \
                HandshakeFlood(target, spoofed_hosts(12, 4), rate=10.0, answer_retry=True) as stalling:
            time.sleep(12)  # longer than a handshake may take: every slot the flood can take is taken
            a.bpfs("pair", "--accept", c.peer_id)
            started = time.monotonic()
            cp = c.bpfs("pair", "--direct", a_addr, "--expect", a.peer_id, "--json", check=False, timeout=90)
            pair_took = time.monotonic() - started
            assert cp.returncode == 0, f"the invited pairing failed during the flood: {cp.stderr}\n{a.log_tail()}"
            assert pair_took < 5, f"the invited pairing took {pair_took:.1f} s during the flood"

            started = time.monotonic()
            b.serve("127.0.0.10:0")
            wait_for(lambda: b.peer(a.peer_id)["connected"], 20,
                     "the partner to connect during the flood", interval=0.2,
                     diag=lambda: f"{b.log_tail()}\n{a.log_tail()}")
            partner_took = time.monotonic() - started
            assert spoofed.initials > 300 and stalling.initials > 50, (spoofed.initials, stalling.initials)
        print(f"\nduring a flood of {spoofed.initials} spoofed Initials and {stalling.initials} more that answered "
              f"{stalling.retries_answered} Retries: invited pairing {pair_took:.2f} s, partner connected "
              f"{partner_took:.2f} s after its daemon was started")
        assert c.peer(a.peer_id)["state"] != "ended" and a.peer(c.peer_id)["state"] != "ended"
    finally:
        for s in (c, b, a):
            s.cleanup()


# =========================================================================== one endpoint, in process

def run(fn, *args, timeout: float = 90):
    async def main():
        with trio.fail_after(timeout):
            return await fn(*args)

    return trio.run(main)


async def _accepting(endpoint, nursery) -> None:
    async def loop():
        async for _ in endpoint:
            pass

    nursery.start_soon(loop)


async def _connect_from(host: str, server, peer: Identity, timeout: float) -> float | None:
    """Seconds a client at `host` takes to connect and authenticate to `server`; None if it could
    not within `timeout` (its handshake timeout)."""
    started = trio.current_time()
    took = None
    async with open_endpoint(Identity(os.urandom(32)), host, 0, listen=False,
                             config=TransportConfig(handshake_timeout=timeout)) as client:
        try:
            conn = await client.connect(server.local_address, expected_peer=peer.peer_id)
        except ConnectionClosed:
            return None
        took = trio.current_time() - started
        await conn.aclose()
    return took


def test_spoofed_initials_get_a_retry_and_no_state():
    """Beyond `retry_threshold` pending handshakes an Initial gets a Retry, not a connection: a
    flood that never answers holds no more than that many slots, and a client gets in at once."""
    server = Identity(os.urandom(32))

    async def main():
        async with open_endpoint(server, "127.0.0.1", 0) as srv, trio.open_nursery() as nursery:
            await _accepting(srv, nursery)
            with HandshakeFlood(srv.local_address, spoofed_hosts(2, 4), rate=100.0):
                await trio.sleep(3)
                assert len(srv._pending) <= srv._cfg.retry_from
                took = await _connect_from("127.0.0.30", srv, server, 5)
                assert srv.retries_sent > 100
                assert len(srv._pending) <= srv._cfg.retry_from
            assert took is not None and took < 2, took
            nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.aioquic_too
def test_a_flood_that_answers_retry_cannot_keep_a_newcomer_out_but_enough_hosts_can_keep_a_stranger_out():
    """Handshakes that proved their address and then stall: from 4 hosts, a newcomer from a fifth
    evicts one (fair share per host); from as many hosts as there are pending slots, one each,
    only a client at a host `known_host` names (a partner's) gets in."""
    server = Identity(os.urandom(32))
    known = "127.0.0.40"

    async def fair_share():
        cfg = TransportConfig(max_pending=8, max_pending_per_host=4, handshake_timeout=30)
        async with open_endpoint(server, "127.0.0.1", 0, config=cfg) as srv, trio.open_nursery() as nursery:
            await _accepting(srv, nursery)
            with HandshakeFlood(srv.local_address, spoofed_hosts(2, 4), ports_per_host=4, rate=20.0,
                                answer_retry=True) as flood:
                with trio.fail_after(20):
                    while len(srv._pending) < 8 or any(not c._validated for c in srv._pending):
                        await trio.sleep(0.1)
                took = await _connect_from("127.0.0.30", srv, server, 5)
                assert flood.retries_answered >= 8 and srv.evicted >= 1
            assert took is not None and took < 2, took
            nursery.cancel_scope.cancel()

    async def many_hosts():
        cfg = TransportConfig(max_pending=8, max_pending_per_host=1, handshake_timeout=30)
        async with open_endpoint(server, "127.0.0.1", 0, config=cfg, known_host=lambda ip: ip == known) as srv, \
                trio.open_nursery() as nursery:
            await _accepting(srv, nursery)
            with HandshakeFlood(srv.local_address, spoofed_hosts(2, 8), ports_per_host=1, rate=20.0,
                                answer_retry=True):
                with trio.fail_after(20):
                    while len(srv._pending) < 8 or any(not c._validated for c in srv._pending):
                        await trio.sleep(0.1)
                # the documented limit: 8 hosts hold all 8 slots, one each, against a stranger
                assert await _connect_from("127.0.0.30", srv, server, 3) is None
                took = await _connect_from(known, srv, server, 5)
            assert took is not None and took < 2, took
            nursery.cancel_scope.cancel()

    run(fair_share)
    run(many_hosts)
