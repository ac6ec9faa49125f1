"""QUIC transport: a sans-IO QUIC machine (aioquic's, or qh3's: `library`) driven by trio UDP sockets.

This module owns the UDP socket, connection demultiplexing, timers, connection state and
every resource bound. It sits on top of the other transport modules and none of them
imports it: `machine` adapts aioquic itself (the only module touching its internals) and
keeps the receive credit, `stream` is one stream (`Connection` implements its
`stream.StreamHost` interface), `relay` frames relayed datagrams, `auth` authenticates the
peer on stream 0 before a connection is handed to the application, `udp` makes the system
calls that move datagrams (batched with UDP GSO / GRO). Nothing here knows about files.

Objects
-------
`Endpoint`   one UDP socket in one trio event loop. It dials (`connect`) and, when
             listening, accepts (`accept`, `async for conn in endpoint`). Datagrams are
             routed by destination connection id; unknown ids are dropped unless they
             are a well-formed client Initial and the endpoint admits it (below).
             Garbage is dropped and counted (`dropped_datagrams`), never raised.
`Connection` one authenticated QUIC connection: `open_stream()`, incoming streams via
             `accept_stream()` / `async for stream in conn`, `close()` / `aclose()`,
             `wait_closed()`, `peer_id`, `peer_public_key`, `channel_binding`.
`Stream`     see `stream`: `send(data, end=False)`, `send_eof()`, `receive_some()`,
             `receive_exactly(n)`, `receive_all(limit)`, `reset()`, `aclose()`.
`TransportConfig`  every bound and window (below).

Concurrency: everything runs in the endpoint's nursery: one task reads the socket (in
batches, then lets each touched connection process events and transmit), one drains the
send backlog, and per connection a timer task (aioquic `get_timer` / `handle_timer`)
and an establishment task (handshake + authentication). aioquic is only called from the
trio thread, sends never block (non-blocking socket; a bounded backlog while the kernel
buffer is full). What one transmit yields for one destination goes out in as few system
calls as `udp` can (GSO: up to 64 datagrams a call), and a read may bring several
datagrams (GRO): when they are all 1-RTT packets of one connection, its QUIC machine takes
them in one call (`BpfsQuic.receive_segments`; qh3's core parses them natively), else they
are split apart and routed one by one (`TransportConfig.udp_offload`).

Bounds (`TransportConfig`)
--------------------------
- connections per endpoint (`max_connections`), of which unauthenticated server-side
  ones (`max_pending`, and `max_pending_per_host` from one host: an IPv4 address, an IPv6
  /64, a relay); a deadline for the handshake + authentication (`handshake_timeout`);
  `idle_timeout`.
- concurrent peer-opened streams per connection (`max_streams`; no unidirectional ones).
- bytes buffered per stream (`max_stream_data`) and per connection (`max_data`): credit
  follows what the application consumed, so a slow reader throttles the sender (see
  `machine.Credit`, one per connection). Until the peer is authenticated both windows
  are `preauth_window`.
- bytes queued for sending per stream (`send_buffer`): `Stream.send` waits.
- datagram bytes from a pending incoming connection (a stranger that has not yet
  authenticated): `preauth_window + PREAUTH_HANDSHAKE_BYTES`; the rest is dropped and
  counted (`Connection.preauth_dropped`). An honest client sends only its handshake and
  97-byte hello before the server's hello, so it never comes near. This is the hard
  bound on what a stranger can make the QUIC machine buffer: aioquic's receive windows
  already stop at `preauth_window`, but qh3's native core fixes its windows at
  construction (`machine_qh3`) and would otherwise take half the post-authentication
  windows, in order or not, from anyone who completed a handshake.

Admission of a new incoming connection (a handshake flood must not keep peers out)
-------------------------------------------------------------------------------------
A client Initial is answered with a QUIC Retry (`retry`) instead of a connection whenever
`retry_threshold` connections are pending, or its host has `max_pending_per_host` pending, or
the endpoint is full: only a client that receives packets at its source address comes back,
with a token. Initials from spoofed or throwaway addresses then cost one small Retry each and
no state. A connection has *proved its address* when it came back with a valid token or
completed the QUIC handshake. When the endpoint is full, a connection that proved its address
makes room by evicting a pending one (which is closed and forgotten at once), in this order:
the oldest that did not prove its address (from its own host first when that host is at its
limit); else, for a client at a host `known_host` names (a partner's), the oldest of the host
with the most pending that is not known; else the oldest of the host with the most pending,
if that host has at least two more pending than the newcomer's. So to keep a peer out, a flood
must complete handshakes from at least as many distinct hosts as `max_pending` (and from
hosts other than known partners' to keep those out). Retry proves an address, not an
identity: authentication below still decides who the peer is.

Authentication (see `auth` and `machine.export_binding`): the client opens stream 0 and
both sides exchange Ed25519-signed hellos bound to this connection's TLS handshake; only
then does `connect` return / `accept` yield the connection, with `peer_id` set.
"""

from __future__ import annotations

import collections
import ipaddress
import itertools
import logging
import math
import os
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import trio
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.packet import QuicPacketType, QuicProtocolVersion, pull_quic_header
from aioquic.quic.rangeset import RangeSet

from . import library, machine
from .errors import (AuthenticationError, Code, ConnectionClosed, LimitExceeded, NoAnswer, PeerRefused, StreamClosed,
                     StreamReset, TransportError, WrongPeer)
from .machine import CID_LENGTH
from .relay import RELAY_OVERHEAD, RelayPath, is_quic, parse_relay_frame, relay_frame
from .retry import RetryTokens, retry_packet
from .stream import Stream, StreamHost
from .udp import MAX_SEGMENTS, UdpSocket, split

__all__ = [
    "AuthenticationError", "Code", "Connection", "ConnectionClosed", "Endpoint", "LimitExceeded", "NoAnswer",
    "PeerRefused", "RelayPath", "Stream", "StreamClosed", "StreamHost", "StreamReset", "TransportConfig",
    "TransportError", "WrongPeer", "open_endpoint",
]

log = logging.getLogger(__name__)

_MIN_INITIAL_SIZE = 1200  # RFC 9000 section 14.1: client Initial datagrams are padded to this
_RECV_BATCH = 64  # datagrams read per wake-up before processing (a GRO read may bring up to 63 more)
_MAX_SEND_BACKLOG = 4096  # datagrams queued while the kernel send buffer is full
_MAX_RELAY_SESSIONS = 256  # relay sessions an endpoint accepts frames for (the oldest go first)
# Datagram bytes a pending (not yet authenticated) incoming connection may send beyond
# `preauth_window` before the rest is dropped: its QUIC handshake and hello, retransmissions
# included, take a few KiB.
PREAUTH_HANDSHAKE_BYTES = 64 << 10


@dataclass(frozen=True)
class TransportConfig:
    """The bounds and windows of an `Endpoint` and its connections (immutable; checked
    on construction).

    Attributes:
        max_datagram_size:    UDP payload size, 1200..65527 (a relayed connection keeps
                              its datagrams, relay header included, within it).
        idle_timeout:         seconds without any packet from the peer before the
                              connection ends.
        handshake_timeout:    seconds for the QUIC handshake plus authentication.
        max_data:             receive window per connection (bytes buffered, unread).
        max_stream_data:      receive window per stream.
        preauth_window:       both windows until the peer is authenticated.
        send_buffer:          unsent bytes queued per stream before `Stream.send` waits.
        max_connections:      connections per endpoint, in any state.
        max_pending:          accepted but not yet authenticated connections per endpoint.
        max_pending_per_host: of those, from one host (an IPv4 address, an IPv6 /64; a
                              relay counts as its host).
        retry_threshold:      pending connections from which a new client must first prove
                              its address with a QUIC Retry (0: always; None: max_pending // 4,
                              at least 1). See the module docstring.
        max_streams:          concurrent streams the peer may open per connection.
        socket_buffer:        SO_RCVBUF / SO_SNDBUF of the endpoint's socket.
        congestion_control:   "reno" or "cubic" (aioquic's; qh3 always runs CUBIC with HyStart++).
        udp_offload:          batch datagrams per system call with UDP GSO / GRO where the
                              kernel offers them (see `udp`); False: one datagram per call.
        quic_library:         the QUIC state machine: "qh3" (the default: Rust packet layer,
                              see `machine_qh3`) or "aioquic" (pure Python, see `machine`;
                              replicates at about a quarter of qh3's speed, at four times
                              its CPU, over loopback). The default
                              comes from the environment variable BPFS_QUIC when set. Either
                              side may use either: they interoperate.
    """

    max_datagram_size: int = 1452  # UDP payload: fills a 1500-byte MTU over IPv6 (40 + 8 bytes of headers)
    idle_timeout: float = 30.0  # seconds without any packet from the peer
    handshake_timeout: float = 10.0  # QUIC handshake + authentication, seconds
    max_data: int = 16 << 20  # receive window per connection (max bytes buffered)
    max_stream_data: int = 16 << 20  # receive window per stream (max bytes buffered)
    preauth_window: int = 256 << 10  # both windows until the peer is authenticated
    send_buffer: int = 4 << 20  # unsent bytes queued per stream before send() waits
    max_connections: int = 64  # per endpoint, any state
    max_pending: int = 16  # per endpoint, accepted but not yet authenticated
    max_pending_per_host: int = 4  # of those, from one host (IPv4 address, IPv6 /64)
    retry_threshold: int | None = None  # pending connections from which Initials get a Retry first
    max_streams: int = 64  # concurrent streams the peer may open per connection
    socket_buffer: int = 4 << 20  # SO_RCVBUF / SO_SNDBUF
    congestion_control: str = "reno"  # "reno" or "cubic" (aioquic only: qh3 always runs CUBIC)
    udp_offload: bool = True  # UDP GSO / GRO where the kernel has them (see `udp`)
    quic_library: str = field(default_factory=lambda: os.environ.get("BPFS_QUIC") or "qh3")

    def __post_init__(self):
        library.load_library(self.quic_library)  # ValueError / ImportError now, not at the first connection
        if not 1200 <= self.max_datagram_size <= 65527:
            raise ValueError("max_datagram_size must be within 1200..65527")
        if self.preauth_window < 4096 or self.preauth_window > min(self.max_data, self.max_stream_data):
            raise ValueError("preauth_window must be >= 4096 and <= max_data, max_stream_data")
        for name in ("idle_timeout", "handshake_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_connections", "max_pending", "max_pending_per_host", "max_streams", "send_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.retry_threshold is not None and not 0 <= self.retry_threshold <= self.max_pending:
            raise ValueError("retry_threshold must be within 0..max_pending")

    @property
    def retry_from(self) -> int:
        """`retry_threshold`, or its default (a quarter of `max_pending`, at least 1)."""
        return max(1, self.max_pending // 4) if self.retry_threshold is None else self.retry_threshold


# --------------------------------------------------------------------------- connection

class Connection:
    """A QUIC connection to one authenticated peer (made by `Endpoint.connect` /
    `Endpoint.accept`, never directly).

    Attributes:
        is_client:       True if we dialled.
        idle_timeout:    the idle timeout this side offers (the endpoint's, unless `connect` chose one).
        remote_address:  the peer's (host, port), or a `RelayPath` if relayed.
        peer_id:         (property) the authenticated peer's id (an error until authenticated).
        peer_public_key: (property) its Ed25519 public key (32 bytes; an error until authenticated).
        channel_binding: 32 bytes bound to this connection's TLS handshake (see
                         `machine.export_binding`); None before the handshake completes.
        closed:          (property) closed or closing.
        close_info:      (property) the `ConnectionClosed` saying why, once closed.

    It owns its QUIC machine (`machine.BpfsQuic`), its receive credit (`machine.Credit`)
    and its streams, and implements `stream.StreamHost` for them: `terminated`,
    `send_waiters`, `check_open()`, `transmit()`, `release_stream()` (transport
    plumbing; applications need only the methods below and `Stream`'s).
    """

    def __init__(self, endpoint: "Endpoint", *, is_client: bool, address, odcid: bytes | None = None,
                 retry_scid: bytes | None = None, accept: Callable[[bytes], bool] | None = None,
                 idle_timeout: float | None = None):
        self._ep = endpoint
        self._cfg = cfg = endpoint._cfg
        self.idle_timeout = cfg.idle_timeout if idle_timeout is None else idle_timeout
        self.is_client = is_client
        self.remote_address = address
        self._accept = accept
        self._credit = machine.Credit(cfg.preauth_window)  # both windows: preauth until authenticated
        self._streams: dict[int, Stream] = {}
        self._retired = RangeSet()  # peer-initiated stream indices we are done with
        self.send_waiters: set[Stream] = set()  # streams waiting in send() for room
        self._in_send, self._in_recv = trio.open_memory_channel(cfg.max_streams)
        self._auth_stream: Stream | None = None
        self._early: list[Stream] = []  # server streams received before we verified it
        self._auth_stream_ready = trio.Event()
        self._handshake_done = trio.Event()
        self._established = trio.Event()  # set when authenticated or closed
        self._terminated_event = trio.Event()
        self._terminated = False
        self._authenticated = False
        self._close_info: ConnectionClosed | None = None
        self._heard = False  # a datagram came in for this connection
        self._started = trio.current_time()
        self._refused: PeerRefused | None = None  # why authentication refused the peer
        self._timer_wake = trio.Event()
        self._armed = math.inf
        self._cids: set[bytes] = set()
        self._counted_pending = False  # counts towards the endpoint's max_pending
        self.preauth_received = 0  # datagram bytes received while pending (see `Endpoint._deliver`)
        self.preauth_dropped = 0  # datagrams dropped past the endpoint's pre-authentication budget
        self._host = _host_key(address)  # what per-host bounds count by
        self._validated = retry_scid is not None  # the peer proved its address (Retry or handshake)
        self._known = False  # at a host the endpoint's known_host() names (server side)
        self.channel_binding: bytes | None = None
        self._peer_public_key: bytes | None = None  # see `peer_public_key`
        self._peer_id: str | None = None  # see `peer_id`
        # A relayed datagram carries the relay frame's header too: keep it within the same size.
        size = cfg.max_datagram_size - (RELAY_OVERHEAD if isinstance(address, RelayPath) else 0)
        self._quic = library.make_quic(self._credit, is_client=is_client, odcid=odcid, retry_scid=retry_scid,
                                       idle_timeout=self.idle_timeout,
                                       max_datagram_size=size, congestion_control=cfg.congestion_control,
                                       max_streams=cfg.max_streams, library=cfg.quic_library,
                                       max_data=cfg.max_data, max_stream_data=cfg.max_stream_data)

    def __repr__(self) -> str:
        who = self._peer_id or "unauthenticated"
        return f"<Connection {'to' if self.is_client else 'from'} {self.remote_address} {who}>"

    @property
    def peer_id(self) -> str:
        """The authenticated peer's id: every connection `connect` returns or `accept` yields has one."""
        if self._peer_id is None:
            raise RuntimeError(f"{self!r} is not authenticated yet: no peer id")
        return self._peer_id

    @property
    def peer_public_key(self) -> bytes:
        """The authenticated peer's Ed25519 public key (as `peer_id`)."""
        if self._peer_public_key is None:
            raise RuntimeError(f"{self!r} is not authenticated yet: no peer key")
        return self._peer_public_key

    @property
    def _consumed(self) -> int:
        """Bytes of the connection consumed so far (`machine.Credit.consumed`; kept for tests)."""
        return self._credit.consumed

    # ---- public API

    @property
    def closed(self) -> bool:
        return self._terminated or self._close_info is not None

    @property
    def close_info(self) -> ConnectionClosed | None:
        return self._close_info

    async def open_stream(self) -> Stream:
        """A new outgoing stream (the peer sees it when we first send on it)."""
        await trio.lowlevel.checkpoint()
        self.check_open()
        if not self._authenticated:
            raise TransportError("connection is not authenticated yet")
        return self._open_stream_now()

    async def accept_stream(self) -> Stream:
        """The next stream the peer opened; `ConnectionClosed` once the connection ends."""
        try:
            return await self._in_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise self._close_info or ConnectionClosed(reason="closed") from None

    def __aiter__(self) -> AsyncIterator[Stream]:
        return self._iter_streams()

    async def _iter_streams(self):
        while True:
            try:
                yield await self.accept_stream()
            except ConnectionClosed:
                return

    def close(self, error_code: int = Code.NO_ERROR, reason: str = "") -> None:
        """Start closing (CONNECTION_CLOSE goes out now); pending operations fail."""
        if self._terminated:
            return
        if self._close_info is None:
            self._close_info = ConnectionClosed(error_code, reason, by_peer=False)
        self._quic.close(error_code=error_code, reason_phrase=reason[:200])
        self.transmit()
        self._wake_all()

    async def aclose(self, error_code: int = Code.NO_ERROR, reason: str = "") -> None:
        """Close and wait (briefly) for the close to be sent and the state torn down."""
        self.close(error_code, reason)
        with trio.move_on_after(3):
            await self._terminated_event.wait()

    async def wait_closed(self) -> ConnectionClosed:
        await self._terminated_event.wait()
        return self._close_info or ConnectionClosed(reason="terminated")  # (set by then: as `_wake_all`)

    # ---- stream.StreamHost (what our streams use)

    @property
    def terminated(self) -> bool:
        """The connection's state is torn down: the QUIC machine takes no more calls."""
        return self._terminated

    def check_open(self) -> None:
        """Raise the reason (`ConnectionClosed`) if the connection is closed or closing."""
        if self._close_info is not None:
            raise self._close_info
        if self._terminated:
            raise ConnectionClosed(reason="terminated")

    def transmit(self) -> None:
        """Send what the QUIC machine has to send, wake writers that have room again,
        re-arm the timer if it moved earlier."""
        if self._terminated:
            return
        quic = self._quic
        datagrams = quic.datagrams_to_send(now=trio.current_time())
        if datagrams:
            self._ep._send(datagrams)
        if self.send_waiters:
            for stream in list(self.send_waiters):
                stream.on_transmit()
        timer = quic.get_timer()
        if timer is not None and timer < self._armed:
            self._timer_wake.set()

    def release_stream(self, stream: Stream) -> None:
        """Drop our state once both directions are over (and the peer's, so late data
        or a RESET_STREAM can still be credited to the connection window)."""
        if stream.finished and self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]
            self._credit.forget(stream.stream_id)
            if self._peer_initiated(stream.stream_id):
                i = stream.stream_id >> 2
                self._retired.add(i, i + 1)

    # ---- internals: streams

    def _new_stream(self, sid: int) -> Stream:
        self._credit.open(sid)
        stream = self._streams[sid] = Stream(self, sid, quic=self._quic, credit=self._credit,
                                             send_buffer=self._cfg.send_buffer)
        return stream

    def _open_stream_now(self) -> Stream:
        sid = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(sid, b"")  # creates it inside aioquic
        return self._new_stream(sid)

    def _peer_initiated(self, sid: int) -> bool:
        return (sid & 1) == (1 if self.is_client else 0)

    def _on_stream_data(self, ev: events.StreamDataReceived) -> None:
        sid = ev.stream_id
        stream = self._streams.get(sid)
        if stream is None:
            if not self._peer_initiated(sid) or (sid >> 2) in self._retired:
                self._credit.drop(len(ev.data))  # a stream we already dropped
                return
            if not self._authenticated and not self.is_client and (sid != 0 or self._auth_stream is not None):
                # a client opens stream 0 only, and others once it has our hello
                self._protocol_violation("stream opened before authentication")
                return
            stream = self._new_stream(sid)
            if not self._authenticated and not self.is_client:
                self._auth_stream = stream
                self._auth_stream_ready.set()
            elif not self._authenticated:
                # the server may use the connection as soon as its hello is out; hold
                # its streams (within the pre-auth window) until we verified it
                self._early.append(stream)
            else:
                try:
                    self._in_send.send_nowait(stream)
                except (trio.WouldBlock, trio.ClosedResourceError):
                    stream.reset(Code.STREAM_REFUSED)
        stream.on_data(ev.data, ev.end_stream)

    def _protocol_violation(self, reason: str) -> None:
        log.info("closing %r: %s", self, reason)
        self.close(Code.PROTOCOL_VIOLATION, reason)

    # ---- internals: the QUIC machine

    def _handle_events(self) -> None:
        quic = self._quic
        while (ev := quic.next_event()) is not None:  # (`type(ev) is` each time: mypy narrows that)
            if type(ev) is events.StreamDataReceived:
                self._on_stream_data(ev)
            elif type(ev) is events.StreamReset:
                stream = self._streams.get(ev.stream_id)
                if stream is not None:
                    stream.on_reset(ev.error_code)
            elif type(ev) is events.StopSendingReceived:
                stream = self._streams.get(ev.stream_id)
                if stream is not None:
                    stream.on_stop_sending(ev.error_code)
                    self.release_stream(stream)
            elif type(ev) is events.HandshakeCompleted:
                self._validated = True  # the peer received our handshake packets: its address is real
                try:
                    self.channel_binding = machine.export_binding(quic)
                except AuthenticationError as exc:
                    self.close(Code.AUTH_FAILED, str(exc))
                self._handshake_done.set()
            elif type(ev) is events.ConnectionIdIssued:
                self._ep._register(ev.connection_id, self)
            elif type(ev) is events.ConnectionIdRetired:
                self._ep._unregister(ev.connection_id, self)
            elif type(ev) is events.ConnectionTerminated:
                self._on_terminated(ev)

    def _on_terminated(self, ev: events.ConnectionTerminated) -> None:
        if self._terminated:
            return
        if self._close_info is None:
            by_peer = self._quic.peer_closed  # else aioquic ended it here (idle timeout)
            if self.is_client and not by_peer and not self._heard:
                self._close_info = NoAnswer(_show(self.remote_address), trio.current_time() - self._started)
            else:
                reason = ev.reason_phrase
                if not by_peer and reason == "Idle timeout":
                    reason = f"nothing heard from the peer for {self.idle_timeout:.0f} s (idle timeout)"
                self._close_info = ConnectionClosed(ev.error_code, reason, by_peer=by_peer)
        self._tear_down()

    def _tear_down(self) -> None:
        self._terminated = True
        self._ep._forget(self)
        self._wake_all()
        self._terminated_event.set()

    def _evict(self, reason: str) -> None:
        """An unauthenticated server-side connection makes room for another (see the module
        docstring): CONNECTION_CLOSE goes out, and the state is dropped now, not after draining."""
        if self._terminated:
            return
        self.close(Code.REFUSED, reason)
        if self._counted_pending:
            self._ep._pending_done(self)
        self._tear_down()

    def _wake_all(self) -> None:
        exc = self._close_info or ConnectionClosed(reason="terminated")
        for stream in list(self._streams.values()):
            stream.on_connection_lost(exc)
        self._in_send.close()
        self._handshake_done.set()
        self._auth_stream_ready.set()
        self._established.set()
        self._timer_wake.set()

    def _after_input(self) -> None:
        self._handle_events()
        self.transmit()

    async def _timer_loop(self) -> None:
        quic = self._quic
        overdue = 0  # consecutive rounds that found the timer already due
        while not self._terminated:
            timer = quic.get_timer()
            now = trio.current_time()
            if timer is not None and now >= timer:
                quic.handle_timer(now=now)
                self._handle_events()
                self.transmit()
                overdue += 1
                if overdue > 100:  # a timer that does not move: do not spin
                    overdue = 0
                    await trio.sleep(machine.TIMER_GRANULARITY)
                else:
                    await trio.lowlevel.checkpoint()
                continue
            overdue = 0
            self._timer_wake = trio.Event()
            self._armed = timer if timer is not None else math.inf
            with trio.move_on_at(self._armed):
                await self._timer_wake.wait()
        self._armed = -math.inf

    def _on_authenticated(self, key: bytes) -> None:
        from ..identity import peer_id

        self._peer_public_key = key
        self._peer_id = peer_id(key)
        self._authenticated = True
        self._credit.widen(self._cfg.max_data, self._cfg.max_stream_data)
        for stream in self._early:  # server streams that overtook the server's hello
            try:
                self._in_send.send_nowait(stream)
            except (trio.WouldBlock, trio.ClosedResourceError):
                stream.reset(Code.STREAM_REFUSED)
        self._early.clear()
        self.transmit()  # announce the larger windows now
        if not self.is_client:
            try:
                self._ep._incoming_send.send_nowait(self)
            except (trio.WouldBlock, trio.ClosedResourceError):
                self.close(Code.REFUSED, "endpoint is not accepting connections")

    async def _establish(self) -> None:
        """Handshake, then authentication on stream 0, within `handshake_timeout`."""
        ep = self._ep
        try:
            with trio.fail_after(self._cfg.handshake_timeout):
                await self._handshake_done.wait()
                self.check_open()
                if self.is_client:
                    stream = self._open_stream_now()
                    if stream.stream_id != 0:
                        raise TransportError("authentication stream is not stream 0")
                else:
                    await self._auth_stream_ready.wait()
                    self.check_open()
                    assert self._auth_stream is not None  # set with _auth_stream_ready
                    stream = self._auth_stream
                key = await ep._authenticator.authenticate(self, stream, accept=self._accept or (lambda key: True))
                # From here to _on_authenticated() nothing may await: the peer may use
                # the connection as soon as our last hello is out.
                self.check_open()
                if not isinstance(key, bytes) or len(key) != 32:
                    raise AuthenticationError("authenticator returned no Ed25519 key")
                if not stream.closed:
                    stream.reset()
        except trio.TooSlowError:
            if self.is_client and not self._heard and self._close_info is None:
                self._close_info = NoAnswer(_show(self.remote_address), trio.current_time() - self._started)
            self.close(Code.TIMEOUT, "handshake or authentication timed out")
        except PeerRefused as exc:
            self._refused = exc
            self.close(Code.REFUSED, "peer refused")
            log.info("%r: %s", self, exc)
        except AuthenticationError as exc:
            self.close(Code.AUTH_FAILED, "authentication failed")
            log.info("%r: %s", self, exc)
        except TransportError as exc:
            if not self.closed:
                self.close(Code.PROTOCOL_VIOLATION, "authentication failed")
            log.info("%r: %s", self, exc)
        else:
            self._on_authenticated(key)
        finally:
            if self._counted_pending:
                ep._pending_done(self)
            self._established.set()


# --------------------------------------------------------------------------- endpoint

class Endpoint:
    """One UDP socket: dials and (if `listen`) accepts authenticated QUIC connections.
    Made by `open_endpoint`.

    Attributes:
        local_address:     the socket's (host, port).
        socket_buffers:    (SO_RCVBUF, SO_SNDBUF) as the kernel granted them.
        udp:               the socket's datagram I/O (`udp.UdpSocket`: whether GSO / GRO are
                           on, system calls and datagrams counted).
        dropped_datagrams: datagrams dropped as garbage, unroutable or unwanted.
        coalesced_runs:    reads of datagrams GRO coalesced that their connection's QUIC machine
                           took in one call (`_route_run`).
        retries_sent:      client Initials answered with a Retry (see the module docstring).
        evicted:           pending connections evicted to make room for one that proved its address.
        connections:       (property) the live connections, in any state.
    """

    def __init__(self, sock: socket.socket, authenticator, config: TransportConfig, nursery: trio.Nursery, *,
                 listen: bool, accept_peer: Callable[[str], bool] | None,
                 on_datagram: Callable[[bytes, tuple], None] | None = None,
                 known_host: Callable[[str], bool] | None = None,
                 admitting: Callable[[], bool] | None = None):
        self._sock = sock
        self.udp = UdpSocket(sock, offload=config.udp_offload)
        self._admitting = admitting
        self._authenticator = authenticator
        self._cfg = config
        self._nursery = nursery
        self._listen = listen
        self._accept_peer = accept_peer
        self._by_cid: dict[bytes, Connection] = {}
        self._connections: set[Connection] = set()
        self._pending: dict[Connection, None] = {}  # unauthenticated server-side ones, oldest first
        self._pending_by_host: dict[str, int] = {}
        self._known_host = known_host
        self._retry = RetryTokens()
        self.retries_sent = 0
        self.evicted = 0
        self._incoming_send, self._incoming_recv = trio.open_memory_channel(config.max_pending)
        self._backlog: collections.deque = collections.deque()
        self._backlog_wake = trio.Event()
        self.dropped_datagrams = 0
        self.coalesced_runs = 0
        self._preauth_budget = config.preauth_window + PREAUTH_HANDSHAKE_BYTES
        self._on_datagram = on_datagram
        self._relay_sessions: dict[bytes, tuple[str, int]] = {}
        self.local_address = sock.getsockname()[:2]
        self.socket_buffers = (sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                               sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))

    @property
    def connections(self) -> list[Connection]:
        return list(self._connections)

    # ---- public API

    async def connect(self, address, *, expected_peer: str | None = None,
                      idle_timeout: float | None = None) -> Connection:
        """Dial `address` (ip, port), authenticate, and return the connection. With
        `expected_peer` the peer must have that peer id (else `AuthenticationError`). With
        `idle_timeout` this connection offers its own instead of the endpoint's (QUIC then
        takes the lower of both sides')."""
        await trio.lowlevel.checkpoint()
        if len(self._connections) >= self._cfg.max_connections:
            raise TransportError("too many connections")
        accept = None
        if expected_peer is not None:
            from ..identity import peer_id

            accept = lambda key: peer_id(key) == expected_peer  # noqa: E731
        if not isinstance(address, RelayPath):
            address = (str(ipaddress.ip_address(address[0])), int(address[1]))  # no DNS here
        conn = Connection(self, is_client=True, address=address, accept=accept, idle_timeout=idle_timeout)
        self._connections.add(conn)
        conn._quic.connect(address, now=trio.current_time())
        self._register(conn._quic.host_cid, conn)
        self._nursery.start_soon(conn._timer_loop)
        self._nursery.start_soon(conn._establish)
        conn.transmit()
        await conn._established.wait()
        if not conn._authenticated:
            info = conn._close_info
            if isinstance(conn._refused, WrongPeer):
                raise WrongPeer(f"could not authenticate {_show(address)}: it is {conn._refused.peer_id}, not the peer "
                                f"we dialled", conn._refused.peer_id)
            if info is not None and not isinstance(info, NoAnswer) and info.error_code in (Code.AUTH_FAILED,
                                                                                           Code.REFUSED):
                raise AuthenticationError(f"could not authenticate {address}: {info.reason}")
            raise info or ConnectionClosed(reason="connection failed")
        return conn

    async def accept(self) -> Connection:
        """The next authenticated incoming connection."""
        if not self._listen:
            raise TransportError("endpoint is not listening")
        return await self._incoming_recv.receive()

    def __aiter__(self):
        return self._iter_connections()

    async def _iter_connections(self):
        while True:
            try:
                yield await self.accept()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return

    def close_all(self, error_code: int = Code.SHUTDOWN, reason: str = "shutting down") -> None:
        for conn in list(self._connections):
            conn.close(error_code, reason)

    # ---- datagrams beside QUIC (see `relay`)

    def send_datagram(self, data: bytes, addr) -> None:
        """Send one raw datagram from this endpoint's socket (a punch probe, a relayed frame)."""
        self._sendto(data, addr)

    def add_relay_session(self, path: RelayPath) -> None:
        """Accept relay frames for `path.session` from `path`'s relay: their payloads are this
        endpoint's QUIC datagrams from (and answers go back to) the address `path`."""
        self._relay_sessions.pop(path.session, None)
        self._relay_sessions[path.session] = path.relay
        while len(self._relay_sessions) > _MAX_RELAY_SESSIONS:
            self._relay_sessions.pop(next(iter(self._relay_sessions)))

    def remove_relay_session(self, session: bytes) -> None:
        self._relay_sessions.pop(session, None)

    def _side_datagram(self, data: bytes, addr) -> Connection | None:
        frame = parse_relay_frame(data)
        if frame is not None:
            session, payload = frame
            relay = self._relay_sessions.get(session)
            if relay is not None and relay == tuple(addr[:2]) and is_quic(payload):
                return self._route(payload, RelayPath(relay[0], relay[1], session))
        if self._on_datagram is not None:
            self._on_datagram(data, addr)
        else:
            self.dropped_datagrams += 1  # punch probes, stray or stale relay frames
        return None

    def _sendto(self, data: bytes, addr) -> None:
        self._send([(data, addr)])

    def _send(self, datagrams: list[tuple[bytes, Any]]) -> None:
        """Send datagrams (data, address or `RelayPath`) now, a run for one destination in
        as few calls as `udp` can; what the kernel has no room for waits in the backlog (in
        order, at most `_MAX_SEND_BACKLOG`; beyond that they are dropped, as lost packets)."""
        if any(isinstance(addr, RelayPath) for _, addr in datagrams):
            datagrams = [(relay_frame(addr.session, data), addr.relay) if isinstance(addr, RelayPath) else (data, addr)
                         for data, addr in datagrams]
        backlog = self._backlog
        if not backlog:
            done = self._send_runs(datagrams)
            if done == len(datagrams):
                return
            datagrams = datagrams[done:]
            self._backlog_wake.set()
        backlog.extend(datagrams[:_MAX_SEND_BACKLOG - len(backlog)])

    def _send_runs(self, datagrams: list[tuple[bytes, Any]]) -> int:
        """Send `datagrams`, each run for one address in one `UdpSocket.send`; how many
        went (fewer than all: the kernel buffer is full)."""
        send, total, start = self.udp.send, len(datagrams), 0
        while start < total:
            addr = datagrams[start][1]
            end = start + 1
            while end < total and datagrams[end][1] == addr:
                end += 1
            run = [data for data, _ in datagrams[start:end]]
            sent = send(run, addr)
            start += sent
            if sent < len(run):
                break
        return start

    async def _send_loop(self) -> None:
        sock, backlog = self._sock, self._backlog
        while True:
            await self._backlog_wake.wait()
            self._backlog_wake = trio.Event()
            while backlog:
                await trio.lowlevel.wait_writable(sock)
                while backlog:
                    batch = list(itertools.islice(backlog, MAX_SEGMENTS))
                    sent = self._send_runs(batch)
                    for _ in range(sent):
                        backlog.popleft()
                    if sent < len(batch):
                        break

    async def _receive_loop(self) -> None:
        sock, receive = self._sock, self.udp.receive_coalesced
        while True:
            await trio.lowlevel.wait_readable(sock)
            touched: dict[Connection, None] = {}
            got = 0
            for _ in range(_RECV_BATCH):  # reads, of one datagram each or (GRO) several
                try:
                    data, size, addr = receive()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # e.g. ECONNREFUSED from an earlier ICMP error
                    continue
                if len(addr) > 2:  # IPv6: (host, port, flowinfo, scope_id); paths are (host, port)
                    addr = addr[:2]
                if size and (conn := self._route_run(data, size, addr)) is not None:
                    touched[conn] = None  # the whole run, in one call
                    got += -(-len(data) // size)
                else:
                    datagrams = split(data, size) if size else [data]
                    for data in datagrams:
                        conn = self._route(data, addr) if is_quic(data) else self._side_datagram(data, addr)
                        if conn is not None:
                            touched[conn] = None
                    got += len(datagrams)
                if got >= _RECV_BATCH:
                    break
            for conn in touched:
                conn._after_input()

    def _route_run(self, data: bytes, size: int, addr) -> Connection | None:
        """Datagrams GRO coalesced (one sender, `size` bytes each): when all are 1-RTT packets
        of one connection that is past authentication, its machine takes them in one call
        (`receive_segments`) and that connection is returned; else None, and nothing is done
        (the caller routes them one by one)."""
        if len(data) <= CID_LENGTH or data[0] & 0xC0 != 0x40:
            return None
        cid = data[1:1 + CID_LENGTH]
        conn = self._by_cid.get(cid)
        if conn is None or conn._counted_pending:
            return None
        end = 1 + CID_LENGTH
        for offset in range(size, len(data), size):
            if data[offset] & 0xC0 != 0x40 or data[offset + 1:offset + end] != cid:
                return None
        conn._heard = True
        self.coalesced_runs += 1
        try:
            conn._quic.receive_segments(data, size, addr, now=trio.current_time())
        except Exception:  # the library drops bad packets itself; this is a last resort
            log.exception("the QUIC library failed on datagrams; closing %r", conn)
            conn.close(Code.INTERNAL, "internal error")
        return conn

    def _route(self, data: bytes, addr) -> Connection | None:
        if len(data) > CID_LENGTH and not data[0] & 0x80:
            # short header (1-RTT): the destination cid follows the first byte
            conn = self._by_cid.get(data[1:1 + CID_LENGTH])
            if conn is None:
                self.dropped_datagrams += 1
                return None
            return self._deliver(conn, data, addr)
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        except Exception:  # aioquic raises ValueError and friends on garbage
            self.dropped_datagrams += 1
            return None
        conn = self._by_cid.get(header.destination_cid)
        if conn is None:
            conn = self._new_server_connection(header, data, addr)
            if conn is None:
                self.dropped_datagrams += 1
                return None
        return self._deliver(conn, data, addr)

    def _deliver(self, conn: Connection, data: bytes, addr) -> Connection | None:
        conn._heard = True
        if conn._counted_pending:
            # a stranger: at most `preauth_budget` bytes of datagrams reach its QUIC machine
            conn.preauth_received += len(data)
            if conn.preauth_received > self._preauth_budget:
                conn.preauth_dropped += 1
                self.dropped_datagrams += 1
                return None
        try:
            conn._quic.receive_datagram(data, addr, now=trio.current_time())
        except Exception:  # aioquic drops bad packets itself; this is a last resort
            log.exception("aioquic failed on a datagram; closing %r", conn)
            conn.close(Code.INTERNAL, "internal error")
        return conn

    def _new_server_connection(self, header, data: bytes, addr) -> Connection | None:
        if (
            not self._listen
            or header.packet_type != QuicPacketType.INITIAL
            or (self._admitting is not None and not self._admitting())
            or header.version not in (QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2)
            or len(data) < _MIN_INITIAL_SIZE
            or not 8 <= len(header.destination_cid) <= 20
        ):
            return None
        cfg = self._cfg
        host = _host_key(addr)
        now = trio.current_time()
        if header.token:
            # the client answers our Retry: the token must be ours, for this address and this id
            odcid = self._retry.check(header.token, addr, header.destination_cid, now)
            if odcid is None:
                return None
            retry_scid = header.destination_cid
        else:
            if (len(self._pending) >= cfg.retry_from or len(self._pending) >= cfg.max_pending
                    or self._pending_by_host.get(host, 0) >= cfg.max_pending_per_host
                    or len(self._connections) >= cfg.max_connections):
                self._sendto(retry_packet(self._retry, header, addr, now), addr)
                self.retries_sent += 1
                return None
            odcid, retry_scid = header.destination_cid, None
        known = retry_scid is not None and self._known_host is not None and bool(self._known_host(str(addr[0])))
        if not self._make_room(host, validated=retry_scid is not None, known=known):
            return None
        accept = None
        if self._accept_peer is not None:
            from ..identity import peer_id

            policy = self._accept_peer
            accept = lambda key: bool(policy(peer_id(key)))  # noqa: E731
        conn = Connection(self, is_client=False, address=addr, odcid=odcid, retry_scid=retry_scid, accept=accept)
        conn._known = known
        self._connections.add(conn)
        self._pending[conn] = None
        self._pending_by_host[host] = self._pending_by_host.get(host, 0) + 1
        conn._counted_pending = True
        self._register(header.destination_cid, conn)
        self._register(conn._quic.host_cid, conn)
        self._nursery.start_soon(conn._timer_loop)
        self._nursery.start_soon(conn._establish)
        return conn

    def _make_room(self, host: str, *, validated: bool, known: bool) -> bool:
        """Whether a new pending connection from `host` fits, evicting others for it if it
        proved its address (the order is in the module docstring)."""
        cfg = self._cfg
        for _ in range(3):  # each round frees one pending slot, one connection and (maybe) one of the host's
            mine = self._pending_by_host.get(host, 0)
            if mine >= cfg.max_pending_per_host:
                victim = self._oldest(lambda c: c._host == host and not c._validated) if validated else None
            elif len(self._pending) >= cfg.max_pending or len(self._connections) >= cfg.max_connections:
                victim = self._victim(host, mine, known) if validated else None
            else:
                return True
            if victim is None:
                return False
            self.evicted += 1
            victim._evict("too many handshakes pending")
        return False

    def _oldest(self, pred) -> Connection | None:
        return next((c for c in self._pending if pred(c)), None)

    def _victim(self, host: str, mine: int, known: bool) -> Connection | None:
        victim = self._oldest(lambda c: not c._validated)
        if victim is not None:
            return victim
        counts: dict[str, int] = {}
        for c in self._pending:
            if c._host != host and not c._known:
                counts[c._host] = counts.get(c._host, 0) + 1
        if not counts:
            return None
        top = max(counts, key=counts.__getitem__)
        if known or counts[top] >= mine + 2:
            return self._oldest(lambda c: c._host == top and not c._known)
        return None

    def _pending_done(self, conn: Connection) -> None:
        conn._counted_pending = False
        self._pending.pop(conn, None)
        host = conn._host
        left = self._pending_by_host.get(host, 1) - 1
        if left > 0:
            self._pending_by_host[host] = left
        else:
            self._pending_by_host.pop(host, None)

    def _register(self, cid: bytes, conn: Connection) -> None:
        if not conn._terminated:
            self._by_cid[cid] = conn
            conn._cids.add(cid)

    def _unregister(self, cid: bytes, conn: Connection) -> None:
        if self._by_cid.get(cid) is conn:
            del self._by_cid[cid]
        conn._cids.discard(cid)

    def _forget(self, conn: Connection) -> None:
        for cid in list(conn._cids):
            self._unregister(cid, conn)
        self._connections.discard(conn)


def _show(addr) -> str:
    """An address as people write it: 192.0.2.7:7450, [2001:db8::1]:7450, or a relay path."""
    if isinstance(addr, RelayPath):
        return str(addr)
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _host_key(addr) -> str:
    """What per-host bounds count by: the IPv4 address, the IPv6 /64 (one subscriber's prefix:
    an IPv6 host has as many addresses as it likes within it), or a relay's host."""
    try:
        ip = ipaddress.ip_address(str(addr[0]).split("%", 1)[0])
    except ValueError:
        return str(addr[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def _make_socket(host: str, port: int, buffer_size: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        for opt, force in ((socket.SO_RCVBUF, getattr(socket, "SO_RCVBUFFORCE", None)),
                           (socket.SO_SNDBUF, getattr(socket, "SO_SNDBUFFORCE", None))):
            sock.setsockopt(socket.SOL_SOCKET, opt, buffer_size)
            # Linux reports double the usable size; below the request means capped by
            # net.core.[rw]mem_max: try the privileged variant, quietly.
            if force is not None and sock.getsockopt(socket.SOL_SOCKET, opt) < buffer_size:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, buffer_size)
                except OSError:
                    pass
        sock.setblocking(False)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


@asynccontextmanager
async def open_endpoint(authenticator, host: str = "127.0.0.1", port: int = 0, *,
                        config: TransportConfig | None = None, listen: bool = True,
                        accept_peer: Callable[[str], bool] | None = None,
                        on_datagram: Callable[[bytes, tuple], None] | None = None,
                        known_host: Callable[[str], bool] | None = None,
                        admitting: Callable[[], bool] | None = None):
    """An `Endpoint` on a new UDP socket, running until the block exits (then every
    connection is closed). `authenticator` is an `Identity` (Ed25519 authentication,
    see `auth`) or an object with `authenticate(conn, stream, accept)`.
    `accept_peer(peer_id) -> bool` filters incoming connections. `on_datagram(data, addr)` gets
    the datagrams that are not QUIC (first byte without the fixed bit) and not a relay frame of a
    session this endpoint accepts (`add_relay_session`); without it they are dropped.
    `known_host(ip) -> bool` names the hosts of known peers (partners): their clients, once they
    proved their address, may evict any other pending connection (see the module docstring).
    `admitting() -> bool` says whether a listening endpoint takes new incoming connections now
    (None: always); while it says no, client Initials are dropped unanswered, as by an endpoint
    that does not listen (the socket stays bound: its connections out and their replies go on)."""
    from .auth import Ed25519Authenticator

    if not hasattr(authenticator, "authenticate"):
        authenticator = Ed25519Authenticator(authenticator)
    config = config or TransportConfig()
    sock = _make_socket(host, port, config.socket_buffer)
    try:
        async with trio.open_nursery() as nursery:
            ep = Endpoint(sock, authenticator, config, nursery, listen=listen, accept_peer=accept_peer,
                          on_datagram=on_datagram, known_host=known_host, admitting=admitting)
            nursery.start_soon(ep._receive_loop)
            nursery.start_soon(ep._send_loop)
            try:
                yield ep
            finally:
                ep.close_all()
                ep._incoming_send.close()
                nursery.cancel_scope.cancel()
    finally:
        sock.close()
