"""Packet capture without tcpdump: ``PacketCapture`` runs ``capture_main`` (an AF_PACKET
TPACKET_V2 ring on one interface, optionally in a namespace) in a child process, which writes
every UDP payload seen (IPv4 fragments reassembled) and an index of the datagrams to files."""

from __future__ import annotations

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


def _udp_of_frame(frame: bytes, frags: dict):
    """(src, sport, dst, dport, payload) of an Ethernet frame carrying UDP over IPv4 (fragments
    reassembled) or IPv6 (no extension headers); else None."""
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
        body = ip[40:40 + int.from_bytes(ip[4:6], "big")]
        src, dst = socket.inet_ntop(socket.AF_INET6, ip[8:24]), socket.inet_ntop(socket.AF_INET6, ip[24:40])
    else:
        return None
    if len(body) < 8:
        return None
    ulen = int.from_bytes(body[4:6], "big")
    payload = body[8:ulen] if ulen >= 8 else body[8:]
    return src, int.from_bytes(body[0:2], "big"), dst, int.from_bytes(body[2:4], "big"), payload


def capture_main(args) -> None:
    """Capture the UDP on one interface (run it in the interface's namespace) until stdin closes.

    OUT gets every UDP payload's bytes, back to back (grep it); OUT.jsonl one line a datagram
    (t, dir in/out, src, dst, len, off: where its payload starts in OUT, stored: how many bytes
    of it are there); OUT.stats.json at the end (frames, udp, kernel drops, truncated frames).

    A TPACKET_V2 ring (as libpcap uses): the kernel copies each frame into the ring the moment
    it passes the interface.  A plain recvfrom() on an AF_PACKET socket copies only when it is
    called, and the frame's buffer may be shared with the packet's journey on: a NAT
    namespace behind a veth rewrites the headers of forwarded fragments in place, so what a
    late recvfrom() sees of a sent fragment is the NAT's version, not what left.
    """
    sol_packet, packet_version, packet_rx_ring, packet_statistics, tpacket_v2 = 263, 10, 5, 6, 1
    frame_size, block_size, block_nr = args.frame_size, 1 << 22, 8  # 32 MiB: 16384 frames of 2 KiB
    frame_nr = block_size // frame_size * block_nr
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: nothing until bind
    sock.setsockopt(sol_packet, packet_version, tpacket_v2)
    sock.setsockopt(sol_packet, packet_rx_ring, struct.pack("IIII", block_size, block_nr, frame_size, frame_nr))
    ring = mmap.mmap(sock.fileno(), block_size * block_nr, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    slots = memoryview(ring).cast("I")  # slots[k * frame_size // 4]: the status of frame k
    sock.bind((args.iface, ETH_P_ALL))
    out = open(args.out, "wb")
    idx = open(args.out + ".jsonl", "w")
    frags: dict = {}
    frames = udp = offset = truncated = 0
    head = 0
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    print("ready capturing", args.iface, flush=True)
    stopping = False
    while True:
        events = sel.select(0.05)
        for key, _ in events:
            if key.data == "stdin" and not sys.stdin.readline():
                stopping = True
                sel.unregister(sys.stdin)
        # Every frame the kernel has handed over (TP_STATUS_USER), in ring order from where we
        # are.  Not just "while the next slot is ours": under load the kernel can leave a slot
        # behind and go on filling the next ones (seen here in bursts with drops), which would stall
        # a strictly in-order reader for good.
        statuses = slots[::frame_size // 4].tolist()
        ready = sorted((i for i, st in enumerate(statuses) if st & 1), key=lambda i: (i - head) % frame_nr)
        got_any = bool(ready)
        for slot in ready:
            base = slot * frame_size
            # struct tpacket2_hdr: status, len, snaplen, mac, net, sec, nsec, ...; sockaddr_ll at 32
            tp_len, tp_snaplen, tp_mac = struct.unpack_from("IIH", ring, base + 4)
            pkttype = ring[base + 32 + 10]
            frame = ring[base + tp_mac:base + tp_mac + tp_snaplen]
            struct.pack_into("I", ring, base, 0)  # back to the kernel
            head = (slot + 1) % frame_nr
            frames += 1
            if tp_snaplen < tp_len:
                truncated += 1
            parsed = _udp_of_frame(frame, frags)
            if parsed is None:
                continue
            src, sport, dst, dport, payload = parsed
            stored = payload if not args.snaplen else payload[:args.snaplen]
            out.write(stored)
            idx.write(json.dumps({"t": round(time.time(), 6), "dir": _PKTTYPE.get(pkttype, str(pkttype)),
                                  "src": format_hostport((src, sport)), "dst": format_hostport((dst, dport)),
                                  "len": len(payload), "off": offset, "stored": len(stored)}) + "\n")
            offset += len(stored)
            udp += 1
        if not got_any:
            out.flush()
            idx.flush()
            if stopping and not events:  # stdin closed and 50 ms without a frame: done
                break
    # struct tpacket_stats {unsigned tp_packets, tp_drops}: since the socket was opened
    drops = struct.unpack("II", sock.getsockopt(sol_packet, packet_statistics, 8))[1]
    out.close()
    idx.close()
    with open(args.out + ".stats.json", "w") as f:
        json.dump({"frames": frames, "udp": udp, "bytes": offset, "kernel_drops": drops,
                   "truncated_frames": truncated}, f)
    slots.release()
    ring.close()
    sock.close()


@dataclass
class CapturedDatagram:
    t: float
    direction: str  # "in" (to this interface), "out" (sent from it), "other" (seen, for someone else)
    src: tuple
    dst: tuple
    length: int  # of the whole UDP payload
    payload: bytes  # its stored bytes (all unless snaplen cut it)


class PacketCapture:
    """Capture every UDP datagram on one interface (of a namespace: ``prefix``) to files.

    ``path`` gets the payload bytes back to back (``payload_bytes()``, ``count(needle)``);
    ``records()`` lists the datagrams (direction, addresses, payload); ``stats()`` after stop
    (kernel_drops should be 0).  A Python AF_PACKET socket in a child process: no tcpdump.
    Everything seen after start() returns is captured; stop() (or leaving the ``with``)
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
