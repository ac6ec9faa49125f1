"""Batched UDP datagram I/O on one non-blocking socket: UDP GSO to send, UDP GRO to receive.

Owns the system calls that move datagrams through the socket `quic.Endpoint` made, and
nothing above them: no QUIC, no trio, no waiting (the endpoint waits for readiness and keeps
the send backlog). One class, `UdpSocket`:

- `send(datagrams, addr)` hands datagrams for one destination to the kernel, as few calls as
  it can: with GSO (Linux UDP_SEGMENT) one `sendmsg` carries a run of equal-size datagrams
  (the last of a run may be shorter), at most `MAX_SEGMENTS` of them and `MAX_GSO_BYTES` in
  all, and the kernel (or the NIC) cuts them apart. It stops at the first call the kernel
  buffer has no room for (EAGAIN) and says how many datagrams it got rid of; an error on a
  call (ICMP errors surfacing, unreachable) drops that call's datagrams, as a lost packet.
- `receive_coalesced()` reads one buffer; with GRO (Linux UDP_GRO) the kernel may have
  coalesced several datagrams of one sender into it, back to back (equal sizes, the last may
  be shorter), and says their size in a control message, which it returns with the buffer (a
  QUIC library can take such a run in one call). `receive()` splits them apart again, so its
  caller sees the same datagrams either way; `split` does it for a coalesced read.

Fallback: offload is asked for when the socket is made (`offload=True`). If the kernel has no
UDP_GRO, receiving reads one datagram per call. If a GSO send is refused (EIO, EINVAL,
ENOPROTOOPT, EOPNOTSUPP, EMSGSIZE: an old kernel, a device without checksum offload, a
segment larger than the route's MTU) and the first of its datagrams then goes out alone, GSO
is off for this socket from then on (logged once, at debug) and the rest follow one by one; if
that datagram fails alone too, the destination was the problem: the call's datagrams are
dropped and GSO stays on. GRO and GSO fall back each on its own (a 4.18 kernel has GSO only). The environment variable
``BPFS_UDP_OFFLOAD=0`` turns offload off for every socket (as `TransportConfig.udp_offload`
does per endpoint), for comparison or a kernel that gets it wrong. Elsewhere than Linux:
one datagram per call.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import sys
from typing import Any, Sequence

log = logging.getLogger(__name__)

SOL_UDP = 17  # the socket module lacks these on some Pythons: Linux's values
UDP_SEGMENT = 103  # <linux/udp.h>: GSO segment size (send, u16)
UDP_GRO = 104  # <linux/udp.h>: GRO on (setsockopt); segment size of a read (cmsg, int)
MAX_SEGMENTS = 64  # datagrams per GSO call (the kernel takes 64 or 128, depending on its age)
# Payload of one GSO call. A device takes a GSO packet of at most 64 KiB (its gso_max_size,
# 65536), counting the link-layer header too: with more, the kernel cuts it into datagrams in
# software, and a GRO receiver reads them one by one. So 64 KiB less an Ethernet header with a
# VLAN tag (18), an IPv6 header (40) and the UDP header (8). (65535 - 28, the IPv4 length field's
# bound, made 46 datagrams of 1424 bytes a call over loopback, which arrived one per read.)
MAX_GSO_BYTES = 65536 - 18 - 40 - 8
RECV_SIZE = 65536  # one read: a datagram, or GRO's coalesced datagrams (within one IP packet)

_CMSG_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
# a refused GSO send (rather than a refused destination: then plain sends fail too)
_GSO_REFUSED = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE})


def offload_wanted(config_says: bool) -> bool:
    """Whether to try GSO / GRO: the endpoint's config says so, the environment does not
    forbid it (``BPFS_UDP_OFFLOAD=0``) and this is Linux."""
    return config_says and sys.platform.startswith("linux") and os.environ.get("BPFS_UDP_OFFLOAD", "1") != "0"


class UdpSocket:
    """Datagram I/O on `sock` (non-blocking, bound): see the module docstring.

    Attributes:
        gso:         sends batch datagrams with UDP_SEGMENT (turned off for good if refused).
        gro:         the kernel may coalesce received datagrams (UDP_GRO is on).
        send_calls / sent:     system calls that sent, datagrams they carried.
        recv_calls / received: system calls that read a datagram, datagrams they gave.
    """

    __slots__ = ("gro", "gso", "received", "recv_calls", "send_calls", "sent", "sock")

    def __init__(self, sock: socket.socket, *, offload: bool = True):
        self.sock = sock
        self.gso = self.gro = False
        self.send_calls = self.sent = self.recv_calls = self.received = 0
        if offload_wanted(offload) and _CMSG_SPACE:
            self.gso = True  # no probe: the first refused send turns it off (see `send`)
            try:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError as exc:  # an older kernel (before 5.0)
                log.debug("UDP GRO unavailable on this socket, one datagram per read: %s", exc)

    # ---- send

    def send(self, datagrams: Sequence[bytes], addr: Any) -> int:
        """Send `datagrams` (each one UDP payload) to `addr`, in order. Returns how many the
        kernel took or that were dropped on an error; fewer than all means the kernel's buffer
        is full (EAGAIN) and the rest are still the caller's."""
        total = len(datagrams)
        done = 0
        while done < total:
            if not self.gso:
                return done + self._send_each(datagrams, done, total, addr)
            end, size = self._run(datagrams, done, total)
            if end - done == 1:
                if not self._send_one(datagrams[done], addr):
                    return done
                done = end
                continue
            try:
                self.sock.sendmsg(datagrams[done:end], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, addr)
            except (BlockingIOError, InterruptedError):
                return done
            except OSError as exc:
                if exc.errno in _GSO_REFUSED:
                    alone = self._alone(exc, datagrams[done], addr)
                    if alone is None:
                        return done
                    if alone:  # GSO is off now: the rest go one by one
                        done += 1
                        continue
                else:
                    log.debug("sendmsg %s: %s", addr, exc)  # dropped, as a lost packet: QUIC recovers
            else:
                self.send_calls += 1
                self.sent += end - done
            done = end
        return done

    @staticmethod
    def _run(datagrams: Sequence[bytes], start: int, total: int) -> tuple[int, int]:
        """(end, segment size) of the longest GSO call from `start`: datagrams of the first
        one's size, then at most one shorter; within `MAX_SEGMENTS` and `MAX_GSO_BYTES`."""
        size = len(datagrams[start])
        if not size:
            return start + 1, size
        limit = min(total, start + MAX_SEGMENTS, start + max(1, MAX_GSO_BYTES // size))
        end = start + 1
        while end < limit:
            n = len(datagrams[end])
            if n > size or n == 0:
                break
            end += 1
            if n < size:  # a shorter one ends the run
                break
        return end, size

    def _alone(self, exc: OSError, data: bytes, addr: Any) -> bool | None:
        """A GSO call failed with `exc`, an error that may be the offload's: send its first
        datagram alone. True: that went, so the kernel refused the offload: GSO is off for
        good. False: that failed too, the destination is at fault (GSO stays on, the call's
        datagrams are dropped). None: no room in the kernel buffer, undecided."""
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as again:
            log.debug("sendmsg %s: %s (one datagram alone: %s)", addr, exc, again)
            return False
        self.send_calls += 1
        self.sent += 1
        self.gso = False
        log.debug("UDP GSO refused (%s): one datagram per call on this socket from now on", exc)
        return True

    def _send_each(self, datagrams: Sequence[bytes], start: int, total: int, addr: Any) -> int:
        for i in range(start, total):
            if not self._send_one(datagrams[i], addr):
                return i - start
        return total - start

    def _send_one(self, data: bytes, addr: Any) -> bool:
        """Send one datagram; False if the kernel buffer is full (else sent, or dropped on an error)."""
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:  # ICMP errors surfacing, unreachable, ...: QUIC recovers
            log.debug("sendto %s: %s", addr, exc)
        else:
            self.send_calls += 1
            self.sent += 1
        return True

    # ---- receive

    def receive(self) -> tuple[list[bytes], Any]:
        """The datagrams of one read and their sender's address, as the socket module gives
        it. Raises `BlockingIOError` when there is nothing to read, `OSError` as a read does
        (e.g. ECONNREFUSED from an earlier ICMP error)."""
        data, size, addr = self.receive_coalesced()
        return (split(data, size) if size else [data]), addr

    def receive_coalesced(self) -> tuple[bytes, int, Any]:
        """One read: (buffer, segment size, sender's address). A segment size of 0: the
        buffer is one datagram; else it holds datagrams of that size coalesced by GRO, back
        to back, the last possibly shorter (`split` gives them apart). Raises as `receive`."""
        if not self.gro:
            data, addr = self.sock.recvfrom(RECV_SIZE)
            self.recv_calls += 1
            self.received += 1
            return data, 0, addr
        data, ancdata, _flags, addr = self.sock.recvmsg(RECV_SIZE, _CMSG_SPACE)
        self.recv_calls += 1
        size = 0
        for level, kind, value in ancdata:
            if level == SOL_UDP and kind == UDP_GRO:
                size = int.from_bytes(value[:4] if len(value) >= 4 else value[:2], sys.byteorder)
        if 0 < size < len(data):
            self.received += -(-len(data) // size)
            return data, size, addr
        self.received += 1
        return data, 0, addr


def split(data: bytes, size: int) -> list[bytes]:
    """The datagrams of a buffer GRO coalesced with segment size `size`."""
    return [data[i:i + size] for i in range(0, len(data), size)]
