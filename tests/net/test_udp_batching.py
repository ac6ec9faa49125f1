"""bpfs.net.udp: datagrams batched with UDP GSO on send and split back after UDP GRO on receive,
over real loopback sockets, and the fallback to one datagram per call (by config, by the
environment, and when the kernel refuses GSO or has no GRO); then the QUIC endpoint on top.

The sockets are real; the only stand-ins are socket subclasses that note each send call on its
way to the kernel, one whose GRO option the kernel "lacks" and one whose buffer is "full"
(EAGAIN): the kernel does not refuse those on demand. Nothing here depends on timing: every
datagram sent is waited for (a timeout only guards against a hang).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import socket
import struct
import sys

import pytest
import trio

from bpfs.identity import Identity
from bpfs.net import udp
from bpfs.net.quic import TransportConfig, open_endpoint
from bpfs.net.udp import MAX_GSO_BYTES, MAX_SEGMENTS, UdpSocket

SO_NO_CHECK = 11  # Linux: no UDP checksums on send; the kernel then refuses GSO (EINVAL)


def _kernel_has_gso() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as r, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        r.bind(("127.0.0.1", 0))
        try:
            s.sendmsg([b"x" * 100, b"y" * 100], [(udp.SOL_UDP, udp.UDP_SEGMENT, struct.pack("=H", 100))], 0,
                      r.getsockname())
            r.setsockopt(udp.SOL_UDP, udp.UDP_GRO, 1)
        except OSError:
            return False
    return True


pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(not _kernel_has_gso(), reason="needs Linux with UDP GSO and GRO (4.18 / 5.0)")]


class Recording(socket.socket):
    """A real UDP socket that notes every send it makes: ("gso" | "one", segment sizes, errno or 0)."""

    def __init__(self, family=socket.AF_INET):
        super().__init__(family, socket.SOCK_DGRAM)
        self.calls: list[tuple[str, list[int], int]] = []

    def sendmsg(self, buffers, ancdata=(), flags=0, address=None):
        kind = "gso" if any(level == udp.SOL_UDP and t == udp.UDP_SEGMENT for level, t, _ in ancdata) else "one"
        try:
            n = super().sendmsg(buffers, ancdata, flags, address)
        except OSError as exc:
            self.calls.append((kind, [len(b) for b in buffers], exc.errno or -1))
            raise
        self.calls.append((kind, [len(b) for b in buffers], 0))
        return n

    def sendto(self, data, address):
        try:
            n = super().sendto(data, address)
        except OSError as exc:
            self.calls.append(("one", [len(data)], exc.errno or -1))
            raise
        self.calls.append(("one", [len(data)], 0))
        return n


class NoGro(socket.socket):
    """A real UDP socket on a kernel "without" UDP_GRO (before 5.0): the option is refused."""

    def setsockopt(self, level, option, value, *rest):
        if (level, option) == (udp.SOL_UDP, udp.UDP_GRO):
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")
        return super().setsockopt(level, option, value, *rest)


class FullAfter(Recording):
    """A real UDP socket whose send buffer is "full" (EAGAIN) after `room` successful calls,
    until `drain()`."""

    def __init__(self, room: int):
        super().__init__()
        self.room = room

    def drain(self, room: int = 1 << 30) -> None:
        self.room = room

    def _check(self):
        if self.room <= 0:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        self.room -= 1

    def sendmsg(self, buffers, ancdata=(), flags=0, address=None):
        self._check()
        return super().sendmsg(buffers, ancdata, flags, address)

    def sendto(self, data, address):
        self._check()
        return super().sendto(data, address)


def bound(sock: socket.socket) -> socket.socket:
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def receiver(*, offload: bool = True, cls=socket.socket) -> UdpSocket:
    sock = cls(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # (capped by rmem_max: >= 400 KB)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(10)  # blocking reads: a datagram that does not come fails the test, late
    return UdpSocket(sock, offload=offload)


def payloads(sizes: list[int], tag: int = 0) -> list[bytes]:
    """Datagrams of these sizes, distinct if >= 3 bytes: a tag, the index, then a pattern."""
    return [(bytes([tag, i >> 8 & 255, i & 255]) + bytes((i + k) & 255 for k in range(n)))[:n]
            for i, n in enumerate(sizes)]


def receive(rx: UdpSocket, count: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < count:
        datagrams, _addr = rx.receive()
        got += datagrams
    return got


def send_all(tx: UdpSocket, rx: UdpSocket, *groups: list[bytes]) -> list[bytes]:
    """Send each group of datagrams to `rx` with one `send` (read in between: a receive buffer
    holds one group); what arrived."""
    got: list[bytes] = []
    for part in groups:
        assert tx.send(part, rx.sock.getsockname()) == len(part)
        got += receive(rx, len(part))
    return got


def gso_calls(sizes: list[int]) -> list[list[int]]:
    """The segments of each GSO call the policy makes: runs of one size (the last of a run may be
    shorter), at most MAX_SEGMENTS and MAX_GSO_BYTES each (written out, not reused from udp)."""
    calls: list[list[int]] = []
    i = 0
    while i < len(sizes):
        run = [sizes[i]]
        i += 1
        while (i < len(sizes) and len(run) < MAX_SEGMENTS and (len(run) + 1) * run[0] <= MAX_GSO_BYTES
               and sizes[i] <= run[0] and run[-1] == run[0]):
            run.append(sizes[i])
            i += 1
        calls.append(run)
    return calls


# =========================================================================== batched path

def test_gso_sends_equal_size_runs_and_gro_splits_them_back_intact():
    tx = UdpSocket(bound(Recording()))
    rx = receiver()
    assert tx.gso and rx.gro
    groups = [[1200] * 130 + [300], [1452] * 51 + [40], [1424] * 90, [100] * 200 + [1452, 1452, 1452]]
    sizes = [n for g in groups for n in g]
    sent = payloads(sizes)
    got = send_all(tx, rx, sent[:131], sent[131:183], sent[183:273], sent[273:])
    assert got == sent  # every datagram, intact, in order, in its own size (the short ones too)
    calls = [segs for kind, segs, err in tx.sock.calls]
    assert calls == [c for g in groups for c in gso_calls(g)]
    # 65470 // 1200 = 54, // 1452 = 45, // 1424 = 45 (46 of 1424 bytes made a packet past 64 KiB
    # with its headers: the kernel cut it up, and the reads below were one datagram each)
    assert [len(c) for c in calls] == [54, 54, 23, 45, 7, 45, 45, 64, 64, 64, 8, 3]
    assert calls[2][-1] == 300 and calls[4][-1] == 40  # a run's last segment may be shorter
    for kind, segs, err in tx.sock.calls:
        assert kind == "gso" and err == 0
        assert len(segs) <= MAX_SEGMENTS and sum(segs) <= MAX_GSO_BYTES
        assert all(n == segs[0] for n in segs[:-1]) and segs[-1] <= segs[0]
    assert (tx.send_calls, tx.sent) == (len(calls), len(sent))
    # loopback hands each GSO call to a GRO socket whole: one read per call, split back here
    assert rx.received == len(sent) and rx.recv_calls == len(calls)


def test_runs_break_at_a_larger_datagram_and_singles_go_plain():
    tx = UdpSocket(bound(Recording()))
    rx = receiver()
    sizes = [1000, 1000, 500, 1000, 1200, 1200, 1200, 64, 1452, 60000, 30000, 30000, 30000]
    sent = payloads(sizes)
    assert send_all(tx, rx, sent) == sent
    assert [(kind, segs) for kind, segs, _ in tx.sock.calls] == [
        ("gso", [1000, 1000, 500]), ("one", [1000]), ("gso", [1200, 1200, 1200, 64]), ("one", [1452]),
        ("one", [60000]), ("gso", [30000, 30000]), ("one", [30000])]


def test_gso_datagrams_reach_a_socket_without_gro_one_by_one():
    tx = UdpSocket(bound(Recording()))
    rx = receiver(offload=False)
    assert not rx.gro
    sent = payloads([1452] * 100 + [700])
    assert send_all(tx, rx, sent) == sent
    assert tx.send_calls == 3 and rx.recv_calls == rx.received == len(sent)  # the kernel cut them apart


def test_gso_over_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        sock = Recording(socket.AF_INET6)
        sock.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    sock.setblocking(False)
    tx = UdpSocket(sock)
    r = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    r.bind(("::1", 0))
    r.settimeout(10)
    rx = UdpSocket(r)
    sent = payloads([1232] * 80 + [99])
    assert send_all(tx, rx, sent) == sent
    assert tx.send_calls == 2 and rx.recv_calls == 2


# =========================================================================== fallback

def test_offload_off_by_config_or_environment_sends_one_datagram_per_call(monkeypatch):
    tx = UdpSocket(bound(Recording()), offload=False)
    rx = receiver(offload=False)
    assert not tx.gso and not tx.gro
    sent = payloads([1452] * 100 + [10])
    assert send_all(tx, rx, sent) == sent
    assert [kind for kind, _, _ in tx.sock.calls] == ["one"] * len(sent)
    assert rx.recv_calls == len(sent)

    monkeypatch.setenv("BPFS_UDP_OFFLOAD", "0")
    quiet = UdpSocket(bound(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)))
    assert not quiet.gso and not quiet.gro
    quiet.sock.close()


def test_kernel_refusing_gso_falls_back_for_good_and_says_so_once(caplog):
    caplog.set_level(logging.DEBUG, logger="bpfs.net.udp")
    sock = bound(Recording())
    sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)  # a real refusal: GSO needs checksums (EINVAL)
    tx = UdpSocket(sock)
    rx = receiver()
    assert tx.gso
    first = payloads([1452] * 100 + [300], tag=1)
    assert send_all(tx, rx, first) == first  # nothing lost to the refusal
    assert not tx.gso
    second = payloads([1200] * 70, tag=2)
    assert send_all(tx, rx, second) == second
    gso = [c for c in sock.calls if c[0] == "gso"]
    assert gso == [("gso", [1452] * 45, errno.EINVAL)]  # tried once, never again
    assert [c for c in sock.calls if c[0] == "one"] == [("one", [n], 0) for n in [1452] * 100 + [300] + [1200] * 70]
    assert len([r for r in caplog.records if "GSO refused" in r.getMessage()]) == 1
    assert rx.recv_calls == rx.received == len(first) + len(second)


def test_a_destination_error_drops_the_call_but_keeps_gso():
    tx = UdpSocket(bound(Recording()))
    rx = receiver()
    bad = ("127.0.0.1", 0)  # EINVAL for a single datagram as for GSO: not the offload's fault
    assert tx.send(payloads([1000] * 10), bad) == 10  # dropped, as lost packets
    assert tx.gso
    assert [(k, e) for k, _, e in tx.sock.calls] == [("gso", errno.EINVAL), ("one", errno.EINVAL)]
    sent = payloads([1000] * 10)
    assert send_all(tx, rx, sent) == sent
    assert tx.sock.calls[-1] == ("gso", [1000] * 10, 0)


def test_no_gro_in_the_kernel_reads_one_datagram_a_call():
    rx = receiver(cls=NoGro)
    assert not rx.gro
    tx = UdpSocket(bound(Recording()))
    assert tx.gso  # GSO is tried on its own
    sent = payloads([1452] * 50 + [3])
    assert send_all(tx, rx, sent) == sent
    assert rx.recv_calls == len(sent) and tx.send_calls == 2


def test_a_full_send_buffer_stops_at_the_call_and_keeps_the_rest():
    sock = FullAfter(room=2)
    bound(sock)
    tx = UdpSocket(sock)
    rx = receiver()
    sent = payloads([1452] * 100 + [500, 500])
    to = rx.sock.getsockname()
    assert tx.send(sent, to) == 90  # two calls of 45 went, the third met EAGAIN
    got = receive(rx, 90)
    sock.drain(room=0)
    assert tx.send(sent[90:], to) == 0  # still full: nothing lost, nothing skipped
    sock.drain()
    assert tx.send(sent[90:], to) == 12
    assert got + receive(rx, 12) == sent
    assert tx.gso  # EAGAIN says nothing about offload


# =========================================================================== the QUIC endpoint on top

async def _transfer(server_config: TransportConfig, client_config: TransportConfig, *, refuse_gso=False):
    data = os.urandom(3 << 20)
    async with open_endpoint(Identity(os.urandom(32)), config=server_config) as srv, \
            open_endpoint(Identity(os.urandom(32)), config=client_config, listen=False) as cli:
        if refuse_gso:
            cli.udp.sock.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)
        async with trio.open_nursery() as nursery:
            async def serve():
                conn = await srv.accept()
                stream = await conn.accept_stream()
                h = hashlib.sha256()
                while chunk := await stream.receive_some(1 << 20):
                    h.update(chunk)
                await stream.send(h.digest(), end=True)

            nursery.start_soon(serve)
            conn = await cli.connect(srv.local_address)
            stream = await conn.open_stream()
            await stream.send(data, end=True)
            assert await stream.receive_all(64) == hashlib.sha256(data).digest()
            await conn.aclose()
        return cli.udp, srv.udp, srv.coalesced_runs


@pytest.mark.aioquic_too
def test_endpoint_batches_a_transfer_with_offload_on():
    async def main():
        with trio.fail_after(60):
            return await _transfer(TransportConfig(), TransportConfig())

    tx, rx, runs = trio.run(main)
    assert tx.gso and rx.gro
    assert tx.sent > 2000 and tx.send_calls < tx.sent  # 3 MiB in 1452-byte datagrams, batched
    assert rx.received > 2000 and rx.recv_calls < rx.received  # and read so
    # ... and a coalesced read went to the QUIC machine whole (`receive_segments`): the data
    # arrived intact (the server's SHA-256 above), so the run path keeps order and content
    assert runs > 0


def test_endpoint_without_offload_or_when_the_kernel_refuses_it():
    async def main(config, refuse):
        with trio.fail_after(60):
            return await _transfer(config, config, refuse_gso=refuse)

    off = TransportConfig(udp_offload=False)
    tx, rx, runs = trio.run(main, off, False)
    assert not (tx.gso or tx.gro or rx.gso or rx.gro)
    assert tx.send_calls == tx.sent and rx.recv_calls == rx.received and runs == 0

    tx, rx, runs = trio.run(main, TransportConfig(), True)  # the client's kernel refuses GSO: it falls back
    assert not tx.gso and rx.gso and rx.gro
    assert tx.send_calls == tx.sent > 2000


def test_a_coalesced_read_goes_whole_only_when_every_datagram_is_for_one_connection(monkeypatch):
    """`Endpoint._route_run` hands a GRO read to one connection's machine in one call only when
    every datagram in it is a 1-RTT packet with that connection's id; otherwise (another
    connection's id, a long header, a datagram too short for an id) it declines and the
    datagrams go one by one. Crafted buffers into a real endpoint with a live connection."""
    from bpfs.net.machine import CID_LENGTH

    async def main():
        async with open_endpoint(Identity(os.urandom(32))) as srv, \
                open_endpoint(Identity(os.urandom(32)), listen=False) as cli:
            await cli.connect(srv.local_address)
            sconn = await srv.accept()
            cid = next(iter(sconn._cids))
            assert len(cid) == CID_LENGTH
            taken = []
            monkeypatch.setattr(sconn._quic, "receive_segments",
                                lambda data, size, addr, now: taken.append((data, size)))
            other = bytes(CID_LENGTH)

            def seg(first: int, dcid: bytes, n: int = 100) -> bytes:
                return (bytes([first]) + dcid).ljust(n, b"\x01")

            addr = cli.local_address
            for bad in (seg(0x41, cid) + seg(0x41, other),  # another connection's id
                        seg(0xC1, cid) + seg(0x41, cid),  # a long header first
                        seg(0x41, cid) + seg(0xC1, cid),  # ... or later
                        seg(0x41, cid) + seg(0x41, cid)[:4]):  # a last datagram too short for an id
                assert srv._route_run(bad, 100, addr) is None
            assert taken == [] and srv.coalesced_runs == 0
            good = seg(0x41, cid) * 3 + seg(0x45, cid, 60)
            assert srv._route_run(good, 100, addr) is sconn
            assert taken == [(good, 100)] and srv.coalesced_runs == 1

    trio.run(main)
