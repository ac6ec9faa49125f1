"""Packet capture without tcpdump: ``PacketCapture`` runs ``capture_main`` (an AF_PACKET
TPACKET_V3 ring on one interface, optionally in a namespace) in a child process, which writes
every UDP payload seen, whole (IPv4 fragments reassembled, GSO super-packets included), and an
index of the datagrams to files."""

from __future__ import annotations

import fcntl
import json
import mmap
import selectors
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.netlab.procs import LineProcess
from tests.helpers.netlab.sockets import format_hostport, parse_hostport


# --------------------------------------------------------------------------- packet capture

ETH_P_ALL = 0x0003
_PKTTYPE = {0: "in", 1: "in", 2: "in", 3: "other", 4: "out"}
# Ethernet pads a frame to 60 bytes: never more than this after the end of an IP packet.  A
# longer tail means the packet's length field does not cover it (see _udp_of_frame).
_LINK_PAD = 64


def _udp_of_frame(frame: bytes, frags: dict):
    """(src, sport, dst, dport, payload) of an Ethernet frame carrying UDP over IPv4 (fragments
    reassembled) or IPv6 (no extension headers); else None.

    The payload runs to the end of the IP packet, whatever the UDP length field says: for a GSO
    super-packet (many datagrams handed down in one send, to be cut apart by the device, and
    seen whole at the tap on a veth or a NAT forwarding it) it is the datagrams back to back.
    The IP length bounds it (it cuts off link padding) unless it is 0 (as it is for a packet
    over 64 KiB) or says much less than the frame holds: then the payload runs to the end of
    the frame.  (This kernel shows a UDP GSO packet with the IP and UDP lengths of the whole.)"""
    if len(frame) < 14:
        return None
    etype, off = int.from_bytes(frame[12:14], "big"), 14
    while etype in (0x8100, 0x88A8) and len(frame) >= off + 4:
        etype, off = int.from_bytes(frame[off + 2:off + 4], "big"), off + 4
    ip = frame[off:]
    if etype == 0x0800:
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
            return None
        ihl, total = (ip[0] & 15) * 4, int.from_bytes(ip[2:4], "big")
        if total >= ihl and len(ip) - total <= _LINK_PAD:
            ip = ip[:total]
        src, dst = socket.inet_ntop(socket.AF_INET, ip[12:16]), socket.inet_ntop(socket.AF_INET, ip[16:20])
        body = ip[ihl:]
        flags = int.from_bytes(ip[6:8], "big")
        more, frag_off = flags & 0x2000, (flags & 0x1FFF) * 8
        if more or frag_off:
            if len(frags) > 4096:
                frags.clear()
            key = (src, dst, ip[4:6])
            parts = frags.setdefault(key, {})
            parts[frag_off] = body
            if not more:
                parts["end"] = frag_off + len(body)
            end, pos, chunks = parts.get("end"), 0, []
            if end is None:
                return None
            while pos < end:
                chunk = parts.get(pos)
                if not chunk:
                    return None
                chunks.append(chunk)
                pos += len(chunk)
            del frags[key]
            body = b"".join(chunks)
    elif etype == 0x86DD:
        if len(ip) < 40 or ip[6] != 17:
            return None
        plen = int.from_bytes(ip[4:6], "big")
        body = ip[40:40 + plen] if plen and len(ip) - 40 - plen <= _LINK_PAD else ip[40:]
        src, dst = socket.inet_ntop(socket.AF_INET6, ip[8:24]), socket.inet_ntop(socket.AF_INET6, ip[24:40])
    else:
        return None
    if len(body) < 8:
        return None
    return src, int.from_bytes(body[0:2], "big"), dst, int.from_bytes(body[2:4], "big"), body[8:]


def _mtu(sock: socket.socket, iface: str) -> int:
    """The MTU of iface (in the socket's namespace: /sys may show another's)."""
    siocgifmtu = 0x8921
    req = struct.pack("16si", iface.encode()[:15], 0)
    return struct.unpack_from("i", fcntl.ioctl(sock.fileno(), siocgifmtu, req), 16)[0]


def capture_main(args) -> None:
    """Capture the UDP on one interface (run it in the interface's namespace) until stdin closes.

    OUT gets every UDP payload's bytes, back to back (grep it); OUT.jsonl one line a datagram
    (t, dir in/out, src, dst, len, off: where its payload starts in OUT, stored: how many bytes
    of it are there); OUT.stats.json at the end (frames, udp, bytes, kernel drops, truncated
    frames; over_mtu: UDP packets longer than the interface's MTU, i.e. GSO super-packets, whose
    line in OUT.jsonl stands for all their datagrams, their payloads back to back; max_udp: the
    longest UDP payload).

    An AF_PACKET ring (as libpcap uses): the kernel copies each frame into the ring the moment
    it passes the interface.  A plain recvfrom() on an AF_PACKET socket copies only when it is
    called, and the frame's buffer may be shared with the packet's journey on: a NAT
    namespace behind a veth rewrites the headers of forwarded fragments in place, so what a
    late recvfrom() sees of a sent fragment is the NAT's version, not what left.

    TPACKET_V3 (as libpcap does), not V2: V2 cuts every frame to one fixed-size slot, and a UDP
    GSO send (bpfs/net/udp.py: up to 64 datagrams in one sendmsg) crosses a veth, and a NAT
    namespace forwarding it, as one super-packet of up to 64 KiB: in 2 KiB slots all but its
    first datagram went unseen.  V3 packs frames of any size back to back into large blocks
    (each frame can be as long as a block), which the kernel hands over when full or after
    ``block_timeout`` ms (so a quiet link's frames show up too); the reader walks a block's
    frames (tpacket3_hdr.tp_next_offset) and gives it back.  The kernel fills the blocks in
    turn and never skips one: when the next is still the reader's it drops (and counts) frames
    until it is back, so they are read in the order of their sequence numbers.
    """
    sol_packet, packet_version, packet_rx_ring, packet_statistics, tpacket_v3 = 263, 10, 5, 6, 2
    block_size, block_nr, tov = args.block_size, args.blocks, args.block_timeout
    frame_size = 1 << 11  # V3 only checks it (block_size / frame_size * block_nr == frame_nr)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: nothing until bind
    sock.setsockopt(sol_packet, packet_version, tpacket_v3)
    # struct tpacket_req3: block_size, block_nr, frame_size, frame_nr, retire_blk_tov (ms),
    # sizeof_priv, feature_req_word
    sock.setsockopt(sol_packet, packet_rx_ring, struct.pack("7I", block_size, block_nr, frame_size,
                                                            block_size // frame_size * block_nr, tov, 0, 0))
    ring = mmap.mmap(sock.fileno(), block_size * block_nr, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    # struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1: block_status (8),
    # num_pkts (12), offset_to_first_pkt (16), blk_len (20), seq_num (24, u64), timestamps
    words = memoryview(ring).cast("I")  # words[k * block_size // 4 + 2]: the status of block k
    sock.bind((args.iface, ETH_P_ALL))
    mtu = _mtu(sock, args.iface)
    out = open(args.out, "wb")
    idx = open(args.out + ".jsonl", "w")
    frags: dict = {}
    frames = udp = offset = truncated = over_mtu = max_udp = 0
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    print("ready capturing", args.iface, flush=True)
    stopped_at = None
    last_block = time.monotonic()
    quiet = 0.05 + 2 * tov / 1000  # after stdin closes: this long without a block, and done
    per_block = block_size // 4
    while True:
        events = sel.select(0.05)
        for key, _ in events:
            if key.data == "stdin" and not sys.stdin.readline():
                stopped_at = time.monotonic()
                sel.unregister(sys.stdin)
        ready = [k for k in range(block_nr) if words[k * per_block + 2] & 1]  # TP_STATUS_USER
        ready.sort(key=lambda k: struct.unpack_from("Q", ring, k * block_size + 24)[0])
        for k in ready:
            base = k * block_size
            num_pkts, pos = struct.unpack_from("II", ring, base + 12)
            pos += base
            for _ in range(num_pkts):
                # struct tpacket3_hdr: next_offset, sec, nsec, snaplen, len, status, mac, net, ...
                # (48 bytes); then struct sockaddr_ll, pkttype at its byte 10
                nxt, sec, nsec, tp_snaplen, tp_len, _, tp_mac, tp_net = struct.unpack_from("6I2H", ring, pos)
                pkttype = ring[pos + 48 + 10]
                frame = ring[pos + tp_mac:pos + tp_mac + tp_snaplen]
                pos += nxt
                frames += 1
                if tp_snaplen < tp_len:
                    truncated += 1
                parsed = _udp_of_frame(frame, frags)
                if parsed is None:
                    continue
                src, sport, dst, dport, payload = parsed
                if tp_len - (tp_net - tp_mac) > mtu:  # a GSO (or GRO) super-packet
                    over_mtu += 1
                max_udp = max(max_udp, len(payload))
                stored = payload if not args.snaplen else payload[:args.snaplen]
                out.write(stored)
                idx.write(json.dumps({"t": round(sec + nsec / 1e9, 6), "dir": _PKTTYPE.get(pkttype, str(pkttype)),
                                      "src": format_hostport((src, sport)), "dst": format_hostport((dst, dport)),
                                      "len": len(payload), "off": offset, "stored": len(stored)}) + "\n")
                offset += len(stored)
                udp += 1
            words[k * per_block + 2] = 0  # back to the kernel (TP_STATUS_KERNEL)
        now = time.monotonic()
        if ready:
            last_block = now
        else:
            out.flush()
            idx.flush()
            # stdin closed, and no block for a while after it (a frame seen before it is handed
            # over within the block timeout): done
            if stopped_at is not None and now - max(stopped_at, last_block) >= quiet:
                break
    # struct tpacket_stats_v3 {unsigned tp_packets, tp_drops, tp_freeze_q_cnt}: since the socket was opened
    drops = struct.unpack("III", sock.getsockopt(sol_packet, packet_statistics, 12))[1]
    out.close()
    idx.close()
    with open(args.out + ".stats.json", "w") as f:
        json.dump({"frames": frames, "udp": udp, "bytes": offset, "kernel_drops": drops,
                   "truncated_frames": truncated, "mtu": mtu, "over_mtu": over_mtu, "max_udp": max_udp}, f)
    words.release()
    ring.close()
    sock.close()


@dataclass
class CapturedDatagram:
    t: float
    direction: str  # "in" (to this interface), "out" (sent from it), "other" (seen, for someone else)
    src: tuple
    dst: tuple
    length: int  # of the whole UDP payload (of a GSO super-packet: its datagrams' payloads back to back)
    payload: bytes  # its stored bytes (all unless snaplen cut it)


class PacketCapture:
    """Capture every UDP datagram on one interface (of a namespace: ``prefix``) to files.

    ``path`` gets the payload bytes back to back (``payload_bytes()``, ``count(needle)``);
    ``records()`` lists the datagrams (direction, addresses, payload; a GSO super-packet is one
    record); ``stats()`` after stop (kernel_drops and truncated_frames should be 0; over_mtu
    counts the GSO super-packets).  Once it has ended, reading what it captured
    (``payload_bytes``, ``count``, ``records``, ``wait_for``) raises AssertionError if it cut
    any frame: a check that something is *not* there would cover only part of what passed.
    A Python AF_PACKET socket in a child process: no tcpdump.  Everything seen after start() returns is captured; stop() (or leaving the ``with``)
    takes what is still in flight, then ends it.  snaplen > 0 keeps only that many bytes of
    each payload (for bulk transfers).
    """

    def __init__(self, path, iface: str, *, prefix: list[str] | None = None, snaplen: int = 0):
        self.path = Path(path)
        self.index_path = Path(f"{self.path}.jsonl")
        self.stats_path = Path(f"{self.path}.stats.json")
        self.iface = iface
        self.prefix = prefix
        self.snaplen = snaplen
        self._proc: LineProcess | None = None

    def start(self) -> "PacketCapture":
        self.stats_path.unlink(missing_ok=True)  # a previous run's
        self._proc = LineProcess(["capture", "--iface", self.iface, "--out", self.path, "--snaplen", self.snaplen],
                                  prefix=self.prefix)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.close(timeout=10)
            self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.proc.poll() is None

    def __enter__(self) -> "PacketCapture":
        return self.start() if self._proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def payload_bytes(self) -> bytes:
        cut = self.stats().get("truncated_frames", 0)
        if cut:
            raise AssertionError(f"the capture on {self.iface} cut {cut} frames: not every byte that passed is "
                                 f"in {self.path} ({self.stats()})")
        return self.path.read_bytes() if self.path.exists() else b""

    def count(self, needle: bytes) -> int:
        return self.payload_bytes().count(needle)

    def records(self) -> list[CapturedDatagram]:
        """The datagrams captured so far (while running: up to the last idle moment)."""
        data = self.payload_bytes()
        out = []
        if not self.index_path.exists():
            return out
        for line in self.index_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                break  # a line still being written
            out.append(CapturedDatagram(r["t"], r["dir"], parse_hostport(r["src"]), parse_hostport(r["dst"]),
                                        r["len"], data[r["off"]:r["off"] + r["stored"]]))
        return out

    def wait_for(self, needle: bytes, timeout: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if needle in self.payload_bytes():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text()) if self.stats_path.exists() else {}
