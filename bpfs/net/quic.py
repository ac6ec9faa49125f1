"""QUIC transport: aioquic's sans-IO `QuicConnection` driven by trio UDP sockets.

This module owns the UDP socket, the QUIC state machines, their timers, streams, flow
control and every resource bound. It knows nothing about files; peer authentication is
delegated to an *authenticator* (see `bpfs.net.auth`) that runs on stream 0 before a
connection is handed to the application.

Objects
-------
`Endpoint`  one UDP socket in one trio event loop. It dials (`connect`) and, when
            listening, accepts (`accept`, `async for conn in endpoint`). Datagrams are
            demultiplexed by destination connection id; unknown ids are dropped unless
            they are a well-formed client Initial and the endpoint has room.
`Connection` one authenticated QUIC connection: `open_stream()`, incoming streams via
            `accept_stream()` / `async for stream in conn`, `close()`, `peer_id`.
`Stream`    one bidirectional QUIC stream: `send(data, end=False)`, `send_eof()`,
            `receive_some()`, `receive_exactly(n)`, `receive_all(limit)`, `reset()`.

Concurrency: everything runs in the endpoint's nursery; per connection one timer task
(aioquic `get_timer` / `handle_timer`) and one establishment task (handshake + auth).
All aioquic calls happen on the trio thread; sends never block the event loop (a
non-blocking socket, with a bounded backlog when the kernel buffer is full).

Bounds (see `TransportConfig`)
------------------------------
- connections per endpoint (`max_connections`), of which unauthenticated server-side
  ones (`max_pending`); a handshake + authentication deadline (`handshake_timeout`).
- concurrent peer-opened streams per connection (`max_streams`, QUIC MAX_STREAMS;
  unidirectional streams are refused outright).
- bytes buffered per stream (`max_stream_data`) and per connection (`max_data`).
  aioquic grows its receive windows by itself whenever data *arrives*; we replace that
  with credit based on what the application has *consumed* (TCP-like): the peer may send
  at most `window` bytes beyond what our reader has taken, so a slow reader throttles a
  fast sender instead of growing memory. Before authentication the windows are
  `preauth_window`, so an unauthenticated peer costs little memory.
- bytes queued for sending per stream (`send_buffer`): `Stream.send` waits.

aioquic internals we rely on (checked at import time by `_check_aioquic`):
`QuicConnection._write_connection_limits`, `_write_stream_limits`, `_local_max_data`,
`_local_max_streams_bidi/_uni`, `_streams`, `tls.key_schedule` (for the channel binding).

Channel binding (`Connection.channel_binding`)
----------------------------------------------
aioquic has no public TLS exporter, so we derive one the way TLS 1.3 derives its own
secrets (RFC 8446 section 7.1), from the master secret and the full handshake transcript:

    exporter = HKDF-Expand-Label(master_secret, "bpfs cbind v1",
                                 Transcript-Hash(ClientHello .. client Finished), Hash.length)
    binding  = BLAKE2b-256(person="bpfs-net-cbind", u8 len(exporter) || exporter
                                                    || u8 len(odcid) || odcid)

Both ends compute the same value; nobody else can (it depends on the ECDHE secret).
The transcript covers both hellos, the server certificate and its CertificateVerify,
and the QUIC transport parameters, which carry both sides' initial source connection
ids and the original destination connection id (odcid, also mixed in explicitly). A
relay that terminates QUIC separately towards each side has two different handshakes,
hence two different bindings, so a signature over one is useless on the other. The
TLS certificate itself is a throwaway self-signed one generated per process and is
*not* identity: identity is the Ed25519 signature over the binding (see `auth`).
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import logging
import math
import socket
import ssl
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import trio
from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicPacketType, QuicProtocolVersion, pull_quic_header
from aioquic.quic.rangeset import RangeSet
from aioquic.quic.recovery import QuicPacketPacer

log = logging.getLogger("bpfs.net")

ALPN = "bpfs/1"
CID_LENGTH = 8
_MIN_INITIAL_SIZE = 1200  # RFC 9000 section 14.1: client Initial datagrams are padded to this
_RECV_BATCH = 64  # datagrams read per wake-up before processing
_MAX_SEND_BACKLOG = 4096  # datagrams queued while the kernel send buffer is full
_TIMER_GRANULARITY = 0.002  # epoll sleeps in whole milliseconds; pace in bursts this long


# --------------------------------------------------------------------------- errors

class TransportError(Exception):
    """Base class for transport failures (never carries key material)."""


class ConnectionClosed(TransportError):
    """The connection is closed; `error_code` / `reason` say why, `by_peer` who did it."""

    def __init__(self, error_code: int = 0, reason: str = "", by_peer: bool = False):
        super().__init__(f"connection closed (code {error_code:#x}{', by peer' if by_peer else ''}): {reason}")
        self.error_code = error_code
        self.reason = reason
        self.by_peer = by_peer


class AuthenticationError(TransportError):
    """The peer failed authentication, or is not the peer we wanted."""


class PeerRefused(AuthenticationError):
    """The peer proved its identity, but policy does not accept that identity."""


class StreamReset(TransportError):
    """The peer reset (or asked us to stop) this stream."""

    def __init__(self, error_code: int):
        super().__init__(f"stream reset by peer (code {error_code:#x})")
        self.error_code = error_code


class LimitExceeded(TransportError):
    """More data than the caller allowed (e.g. `receive_all(limit)`)."""


class StreamClosed(TransportError):
    """The local side already finished or reset this stream."""


# Application error codes (CONNECTION_CLOSE / RESET_STREAM / STOP_SENDING).
class Code:
    NO_ERROR = 0x0
    PROTOCOL_VIOLATION = 0x1
    AUTH_FAILED = 0x2
    REFUSED = 0x3
    TIMEOUT = 0x4
    SHUTDOWN = 0x5
    INTERNAL = 0x6
    STREAM_CANCELLED = 0x10
    STREAM_REFUSED = 0x11


# --------------------------------------------------------------------------- config

@dataclass(frozen=True)
class TransportConfig:
    max_datagram_size: int = 1452  # UDP payload; 1500 MTU - 20 IPv4 - 8 UDP - 20 spare
    idle_timeout: float = 30.0  # seconds without any packet from the peer
    handshake_timeout: float = 10.0  # QUIC handshake + authentication, seconds
    max_data: int = 16 << 20  # receive window per connection (max bytes buffered)
    max_stream_data: int = 16 << 20  # receive window per stream (max bytes buffered)
    preauth_window: int = 256 << 10  # both windows until the peer is authenticated
    send_buffer: int = 4 << 20  # unsent bytes queued per stream before send() waits
    max_connections: int = 64  # per endpoint, any state
    max_pending: int = 16  # per endpoint, accepted but not yet authenticated
    max_streams: int = 64  # concurrent streams the peer may open per connection
    socket_buffer: int = 4 << 20  # SO_RCVBUF / SO_SNDBUF
    congestion_control: str = "reno"  # "reno" or "cubic"

    def __post_init__(self):
        if not 1200 <= self.max_datagram_size <= 65527:
            raise ValueError("max_datagram_size must be within 1200..65527")
        if self.preauth_window < 4096 or self.preauth_window > min(self.max_data, self.max_stream_data):
            raise ValueError("preauth_window must be >= 4096 and <= max_data, max_stream_data")
        for name in ("idle_timeout", "handshake_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_connections", "max_pending", "max_streams", "send_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


# --------------------------------------------------------------------------- TLS bits

_CERT: tuple | None = None


def _process_certificate():
    """A throwaway self-signed certificate, one per process (TLS needs one; it is not
    identity: see the module docstring)."""
    global _CERT
    if _CERT is None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bpfs")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256())
        )
        _CERT = (cert, key)
    return _CERT


def _export_binding(quic: QuicConnection) -> bytes:
    """The channel binding of a completed handshake (see the module docstring)."""
    tls = quic.tls
    schedule = tls.key_schedule
    if schedule is None or schedule.generation != 3 or tls.session_resumed:
        raise AuthenticationError("no full TLS 1.3 handshake to bind to")
    exporter = schedule.derive_secret(b"bpfs cbind v1")
    odcid = quic.original_destination_connection_id
    h = hashlib.blake2b(digest_size=32, person=b"bpfs-net-cbind")
    h.update(bytes([len(exporter)]) + exporter + bytes([len(odcid)]) + odcid)
    return h.digest()


def _check_aioquic() -> None:
    for attr in ("_write_connection_limits", "_write_stream_limits", "get_timer", "handle_timer"):
        if not callable(getattr(QuicConnection, attr, None)):
            raise ImportError(f"bpfs.net.quic: unsupported aioquic (no QuicConnection.{attr})")
    probe = QuicConnection(configuration=QuicConfiguration(is_client=True))
    for attr in ("_local_max_data", "_local_max_streams_bidi", "_local_max_streams_uni", "_streams", "_loss"):
        if not hasattr(probe, attr):
            raise ImportError(f"bpfs.net.quic: unsupported aioquic (no QuicConnection.{attr})")
    if not isinstance(getattr(probe._loss, "_pacer", None), QuicPacketPacer):
        raise ImportError("bpfs.net.quic: unsupported aioquic (no QuicPacketRecovery._pacer)")


_check_aioquic()


class _Pacer(QuicPacketPacer):
    """aioquic's pacer allows bursts of at most 16 packets, then asks to wait a few
    microseconds; a trio sleep lasts at least a millisecond (epoll), which capped a
    stream at ~20 MB/s. Allow bursts worth `_TIMER_GRANULARITY` of the pacing rate, as
    kernel pacing with a coarse timer does (the congestion window still bounds what is
    in flight)."""

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window=congestion_window, smoothed_rtt=smoothed_rtt)
        self.bucket_max = max(self.bucket_max, _TIMER_GRANULARITY)


class _Quic(QuicConnection):
    """QuicConnection with consumption-based receive credit and our stream limits."""

    def __init__(self, owner: "Connection", **kwargs):
        super().__init__(**kwargs)
        self._owner = owner
        cfg = owner._cfg
        for limit, value in ((self._local_max_streams_bidi, cfg.max_streams), (self._local_max_streams_uni, 0)):
            limit.value = limit.sent = value
        self._loss._pacer = _Pacer(max_datagram_size=cfg.max_datagram_size)

    def _write_connection_limits(self, builder, space) -> None:
        owner = self._owner
        limit = self._local_max_data
        target = owner._consumed + owner._conn_window
        if target - limit.value >= owner._conn_window // 4:
            limit.value = target
        used, limit.used = limit.used, 0  # disable aioquic's "double when half used"
        try:
            super()._write_connection_limits(builder=builder, space=space)
        finally:
            limit.used = used

    def _write_stream_limits(self, builder, space, stream) -> None:
        # Never for a stream still blocked by the peer's MAX_STREAMS: the frame would
        # open it at the peer beyond its limit (STREAM_LIMIT_ERROR).
        if stream.max_stream_data_local and not stream.is_blocked:
            owner = self._owner
            ours = owner._streams.get(stream.stream_id)
            if ours is not None:
                target = ours._consumed + owner._stream_window
                if target - stream.max_stream_data_local >= owner._stream_window // 4:
                    stream.max_stream_data_local = target
        receiver = stream.receiver
        highest, receiver.highest_offset = receiver.highest_offset, 0  # disable doubling
        try:
            super()._write_stream_limits(builder=builder, space=space, stream=stream)
        finally:
            receiver.highest_offset = highest


# --------------------------------------------------------------------------- stream

class Stream:
    """One bidirectional QUIC stream. Not safe for two concurrent readers or writers."""

    def __init__(self, conn: "Connection", stream_id: int):
        self._conn = conn
        self.stream_id = stream_id
        self._buf = bytearray()  # received, not yet consumed
        self._consumed = 0  # bytes taken by the reader (credit basis)
        self._received = 0  # bytes delivered by aioquic
        self._eof = False  # FIN received (all data is in _buf)
        self._peer_reset = False  # RESET_STREAM received
        self._recv_error: BaseException | None = None
        self._recv_done = False  # reader saw EOF / reset, or abandoned the stream
        self._recv_wake = trio.Event()
        self._written = 0  # bytes handed to aioquic
        self._send_done = False  # FIN written or stream reset
        self._send_error: BaseException | None = None
        self._send_wake: trio.Event | None = None

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} of {self._conn!r}>"

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read (never more than `max_stream_data`)."""
        return len(self._buf)

    # ---- receiving

    def _on_data(self, data: bytes, end: bool) -> None:
        self._received += len(data)
        if end:
            self._eof = True
        if self._recv_done:  # abandoned: credit the connection, drop the bytes
            self._conn._consumed += len(data)
            self._conn._maybe_forget(self)
            return
        if data:
            self._buf += data
        self._recv_wake.set()

    def _on_reset(self, error_code: int) -> None:
        if self._eof or self._peer_reset:
            return
        self._peer_reset = True
        conn = self._conn
        # Credit everything up to the final size: what we buffered, and what the peer
        # counted against our window but we will never see.
        qs = conn._quic._streams.get(self.stream_id)
        final = qs.receiver.highest_offset if qs is not None else self._received
        conn._consumed += len(self._buf) + max(0, final - self._received)
        self._buf.clear()
        if not self._recv_done:
            self._recv_error = StreamReset(error_code)
            self._recv_done = True
        self._recv_wake.set()
        conn._maybe_forget(self)

    def _on_recv_error(self, exc: BaseException) -> None:
        if self._recv_error is None and not self._eof:
            self._recv_error = exc
        self._recv_wake.set()

    async def _wait_readable(self) -> None:
        while not self._buf and not self._eof:
            if self._recv_error is not None:
                raise self._recv_error
            if self._recv_done:
                raise StreamClosed("stream was reset locally")
            self._recv_wake = trio.Event()
            await self._recv_wake.wait()

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._consumed += len(data)
        conn = self._conn
        conn._consumed += len(data)
        if self._eof and not self._buf:
            self._recv_done = True
            conn._maybe_forget(self)
        conn._credit_check(self)
        return data

    async def receive_some(self, max_bytes: int = 1 << 16) -> bytes:
        """Up to `max_bytes` bytes as soon as any are available; b"" at end of stream."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._wait_readable()
        if not self._buf:
            self._recv_done = True
            self._conn._maybe_forget(self)
            return b""
        return self._take(max_bytes)

    async def receive_exactly(self, n: int) -> bytes:
        """Exactly `n` bytes; `TransportError` if the stream ends first."""
        parts, need = [], n
        while need:
            data = await self.receive_some(need)
            if not data:
                raise TransportError(f"stream ended {need} bytes early")
            parts.append(data)
            need -= len(data)
        return b"".join(parts)

    async def receive_all(self, limit: int) -> bytes:
        """Everything up to the end of the stream; `LimitExceeded` (and the stream is
        stopped) as soon as more than `limit` bytes arrive."""
        parts, total = [], 0
        while True:
            data = await self.receive_some(1 << 20)
            if not data:
                return b"".join(parts)
            total += len(data)
            if total > limit:
                self.reset(Code.PROTOCOL_VIOLATION)
                raise LimitExceeded(f"stream carries more than {limit} bytes")
            parts.append(data)

    # ---- sending

    def _send_room(self) -> bool:
        qs = self._conn._quic._streams.get(self.stream_id)
        sent = qs.sender.highest_offset if qs is not None else self._written
        return self._written - sent < self._conn._cfg.send_buffer

    async def send(self, data: bytes, end: bool = False) -> None:
        """Queue `data` (and FIN if `end`); waits while `send_buffer` bytes are unsent."""
        await trio.lowlevel.checkpoint_if_cancelled()
        conn = self._conn
        view = memoryview(data).cast("B")
        pos, total, step = 0, len(view), conn._cfg.send_buffer
        while True:
            while not self._send_room():
                self._check_send()
                self._send_wake = trio.Event()
                conn._send_waiters.add(self)
                try:
                    await self._send_wake.wait()
                finally:
                    conn._send_waiters.discard(self)
            self._check_send()
            n = min(total - pos, step)
            last = pos + n >= total
            try:
                conn._quic.send_stream_data(self.stream_id, view[pos:pos + n], end_stream=end and last)
            except (RuntimeError, ValueError) as exc:  # reset by STOP_SENDING meanwhile
                raise self._send_error or StreamClosed(str(exc)) from None
            self._written += n
            pos += n
            if end and last:
                self._send_done = True
            conn._transmit()
            if last:
                break
        if end:
            conn._maybe_forget(self)

    async def send_eof(self) -> None:
        await self.send(b"", end=True)

    def _check_send(self) -> None:
        self._conn._check_open()
        if self._send_error is not None:
            raise self._send_error
        if self._send_done:
            raise StreamClosed("stream already finished or reset")

    def _on_send_error(self, exc: BaseException) -> None:
        self._send_error = exc
        self._send_done = True
        if self._send_wake is not None:
            self._send_wake.set()

    # ---- closing

    def reset(self, error_code: int = Code.STREAM_CANCELLED) -> None:
        """Abort both directions: RESET_STREAM our side, STOP_SENDING theirs; unread
        data is dropped."""
        conn = self._conn
        quic = conn._quic
        if conn._terminated:
            self._recv_done = self._send_done = True
            return
        if not self._send_done:
            self._send_done = True
            try:
                quic.reset_stream(self.stream_id, error_code)
            except ValueError:
                pass
        if not self._recv_done:
            self._recv_done = True
            conn._consumed += len(self._buf)
            self._buf.clear()
            if not self._eof and not self._peer_reset:
                try:
                    quic.stop_stream(self.stream_id, error_code)
                except ValueError:
                    pass
        self._recv_wake.set()
        if self._send_wake is not None:
            self._send_wake.set()
        conn._maybe_forget(self)
        conn._transmit()

    async def aclose(self) -> None:
        """Finish our side (FIN) if still open and drop whatever is unread."""
        if not self._send_done and not self._conn._terminated:
            try:
                await self.send_eof()
            except TransportError:
                pass
        if not self._recv_done:
            if self._eof:
                self._conn._consumed += len(self._buf)
                self._buf.clear()
                self._recv_done = True
                self._conn._maybe_forget(self)
            else:
                self.reset()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> "Stream":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.reset()
        else:
            await self.aclose()


# --------------------------------------------------------------------------- connection

class Connection:
    """A QUIC connection to one authenticated peer."""

    def __init__(self, endpoint: "Endpoint", *, is_client: bool, address, odcid: bytes | None = None,
                 accept: Callable[[bytes], bool] | None = None):
        self._ep = endpoint
        self._cfg = cfg = endpoint._cfg
        self.is_client = is_client
        self.remote_address = address
        self._accept = accept
        cert, key = _process_certificate()
        qcfg = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            connection_id_length=CID_LENGTH,
            idle_timeout=cfg.idle_timeout,
            max_datagram_size=cfg.max_datagram_size,
            max_data=cfg.preauth_window,
            max_stream_data=cfg.preauth_window,
            congestion_control_algorithm=cfg.congestion_control,
            verify_mode=ssl.CERT_NONE,  # the certificate is not identity; see auth
        )
        if not is_client:
            qcfg.certificate, qcfg.private_key = cert, key
        self._conn_window = cfg.preauth_window
        self._stream_window = cfg.preauth_window
        self._consumed = 0
        self._streams: dict[int, Stream] = {}
        self._retired = RangeSet()  # peer-initiated stream indices we are done with
        self._send_waiters: set[Stream] = set()
        self._in_send, self._in_recv = trio.open_memory_channel(cfg.max_streams)
        self._auth_stream: Stream | None = None
        self._auth_stream_ready = trio.Event()
        self._handshake_done = trio.Event()
        self._established = trio.Event()  # set when authenticated or closed
        self._terminated_event = trio.Event()
        self._terminated = False
        self._authenticated = False
        self._close_info: ConnectionClosed | None = None
        self._timer_wake = trio.Event()
        self._armed = math.inf
        self._cids: set[bytes] = set()
        self._counted_pending = False  # counts towards the endpoint's max_pending
        self.channel_binding: bytes | None = None
        self.peer_public_key: bytes | None = None
        self.peer_id: str | None = None
        self._quic = _Quic(self, configuration=qcfg, original_destination_connection_id=odcid)

    def __repr__(self) -> str:
        who = self.peer_id or "unauthenticated"
        return f"<Connection {'to' if self.is_client else 'from'} {self.remote_address} {who}>"

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
        self._check_open()
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
        self._transmit()
        self._wake_all()

    async def aclose(self, error_code: int = Code.NO_ERROR, reason: str = "") -> None:
        """Close and wait (briefly) for the close to be sent and the state torn down."""
        self.close(error_code, reason)
        with trio.move_on_after(3):
            await self._terminated_event.wait()

    async def wait_closed(self) -> ConnectionClosed:
        await self._terminated_event.wait()
        return self._close_info

    # ---- internals: streams

    def _open_stream_now(self) -> Stream:
        sid = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(sid, b"")  # creates it inside aioquic
        stream = self._streams[sid] = Stream(self, sid)
        return stream

    def _peer_initiated(self, sid: int) -> bool:
        return (sid & 1) == (1 if self.is_client else 0)

    def _maybe_forget(self, stream: Stream) -> None:
        """Drop our state once both directions are over (and the peer's, so late data
        or a RESET_STREAM can still be credited to the connection window)."""
        if (
            stream._recv_done and stream._send_done and (stream._eof or stream._peer_reset)
            and self._streams.get(stream.stream_id) is stream
        ):
            del self._streams[stream.stream_id]
            if self._peer_initiated(stream.stream_id):
                i = stream.stream_id >> 2
                self._retired.add(i, i + 1)

    def _credit_check(self, stream: Stream) -> None:
        """Send MAX_DATA / MAX_STREAM_DATA soon when a quarter of a window was read."""
        qs = self._quic._streams.get(stream.stream_id)
        if qs is not None and qs.max_stream_data_local and (
            stream._consumed + self._stream_window - qs.max_stream_data_local >= self._stream_window // 4
        ):
            self._transmit()
        elif self._consumed + self._conn_window - self._quic._local_max_data.value >= self._conn_window // 4:
            self._transmit()

    def _on_stream_data(self, ev: events.StreamDataReceived) -> None:
        sid = ev.stream_id
        stream = self._streams.get(sid)
        if stream is None:
            if not self._peer_initiated(sid) or (sid >> 2) in self._retired:
                self._consumed += len(ev.data)  # a stream we already dropped
                return
            if not self._authenticated and (sid != 0 or self._auth_stream is not None or self.is_client):
                self._protocol_violation("stream opened before authentication")
                return
            stream = self._streams[sid] = Stream(self, sid)
            if not self._authenticated:
                self._auth_stream = stream
                self._auth_stream_ready.set()
            else:
                try:
                    self._in_send.send_nowait(stream)
                except (trio.WouldBlock, trio.ClosedResourceError):
                    stream.reset(Code.STREAM_REFUSED)
        stream._on_data(ev.data, ev.end_stream)

    def _protocol_violation(self, reason: str) -> None:
        log.info("closing %r: %s", self, reason)
        self.close(Code.PROTOCOL_VIOLATION, reason)

    # ---- internals: the QUIC machine

    def _check_open(self) -> None:
        if self._close_info is not None:
            raise self._close_info
        if self._terminated:
            raise ConnectionClosed(reason="terminated")

    def _handle_events(self) -> None:
        quic = self._quic
        while (ev := quic.next_event()) is not None:
            kind = type(ev)
            if kind is events.StreamDataReceived:
                self._on_stream_data(ev)
            elif kind is events.StreamReset:
                stream = self._streams.get(ev.stream_id)
                if stream is not None:
                    stream._on_reset(ev.error_code)
            elif kind is events.StopSendingReceived:
                stream = self._streams.get(ev.stream_id)
                if stream is not None:
                    stream._on_send_error(StreamReset(ev.error_code))
                    self._maybe_forget(stream)
            elif kind is events.HandshakeCompleted:
                try:
                    self.channel_binding = _export_binding(quic)
                except AuthenticationError as exc:
                    self.close(Code.AUTH_FAILED, str(exc))
                self._handshake_done.set()
            elif kind is events.ConnectionIdIssued:
                self._ep._register(ev.connection_id, self)
            elif kind is events.ConnectionIdRetired:
                self._ep._unregister(ev.connection_id, self)
            elif kind is events.ConnectionTerminated:
                self._on_terminated(ev)

    def _on_terminated(self, ev: events.ConnectionTerminated) -> None:
        if self._terminated:
            return
        self._terminated = True
        if self._close_info is None:
            self._close_info = ConnectionClosed(ev.error_code, ev.reason_phrase, by_peer=True)
        self._ep._forget(self)
        self._wake_all()
        self._terminated_event.set()

    def _wake_all(self) -> None:
        exc = self._close_info or ConnectionClosed(reason="terminated")
        for stream in list(self._streams.values()):
            stream._on_recv_error(exc)
            if stream._send_wake is not None:
                stream._send_wake.set()
        self._in_send.close()
        self._handshake_done.set()
        self._auth_stream_ready.set()
        self._established.set()
        self._timer_wake.set()

    def _transmit(self) -> None:
        if self._terminated:
            return
        quic = self._quic
        sendto = self._ep._sendto
        for data, addr in quic.datagrams_to_send(now=trio.current_time()):
            sendto(data, addr)
        if self._send_waiters:
            for stream in list(self._send_waiters):
                if stream._send_room() or stream._send_done or stream._send_error:
                    stream._send_wake.set()
        timer = quic.get_timer()
        if timer is not None and timer < self._armed:
            self._timer_wake.set()

    def _after_input(self) -> None:
        self._handle_events()
        self._transmit()

    async def _timer_loop(self) -> None:
        quic = self._quic
        while not self._terminated:
            timer = quic.get_timer()
            now = trio.current_time()
            if timer is not None and now >= timer:
                quic.handle_timer(now=now)
                self._handle_events()
                self._transmit()
                await trio.lowlevel.checkpoint()
                continue
            self._timer_wake = trio.Event()
            self._armed = timer if timer is not None else math.inf
            with trio.move_on_at(self._armed):
                await self._timer_wake.wait()
        self._armed = -math.inf

    async def _establish(self) -> None:
        """Handshake, then authentication on stream 0, within `handshake_timeout`."""
        ep = self._ep
        try:
            with trio.fail_after(self._cfg.handshake_timeout):
                await self._handshake_done.wait()
                self._check_open()
                if self.is_client:
                    stream = self._open_stream_now()
                    if stream.stream_id != 0:
                        raise TransportError("authentication stream is not stream 0")
                else:
                    await self._auth_stream_ready.wait()
                    self._check_open()
                    stream = self._auth_stream
                key = await ep._authenticator.authenticate(self, stream, accept=self._accept or (lambda key: True))
                await stream.aclose()
        except trio.TooSlowError:
            self.close(Code.TIMEOUT, "handshake or authentication timed out")
        except PeerRefused as exc:
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
            from ..identity import peer_id

            self.peer_public_key = key
            self.peer_id = peer_id(key)
            self._authenticated = True
            self._conn_window = self._cfg.max_data
            self._stream_window = self._cfg.max_stream_data
            self._transmit()  # announce the larger windows now
            if not self.is_client:
                try:
                    ep._incoming_send.send_nowait(self)
                except (trio.WouldBlock, trio.ClosedResourceError):
                    self.close(Code.REFUSED, "endpoint is not accepting connections")
        finally:
            if self._counted_pending:
                ep._pending -= 1
                self._counted_pending = False
            self._established.set()


# --------------------------------------------------------------------------- endpoint

class Endpoint:
    """One UDP socket: dials and (if `listen`) accepts authenticated QUIC connections."""

    def __init__(self, sock: socket.socket, authenticator, config: TransportConfig, nursery: trio.Nursery, *,
                 listen: bool, accept_peer: Callable[[str], bool] | None):
        self._sock = sock
        self._authenticator = authenticator
        self._cfg = config
        self._nursery = nursery
        self._listen = listen
        self._accept_peer = accept_peer
        self._by_cid: dict[bytes, Connection] = {}
        self._connections: set[Connection] = set()
        self._pending = 0
        self._incoming_send, self._incoming_recv = trio.open_memory_channel(config.max_pending)
        self._backlog: collections.deque = collections.deque()
        self._backlog_wake = trio.Event()
        self.dropped_datagrams = 0
        self.local_address = sock.getsockname()[:2]
        self.socket_buffers = (sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                               sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))

    @property
    def connections(self) -> list[Connection]:
        return list(self._connections)

    # ---- public API

    async def connect(self, address, *, expected_peer: str | None = None) -> Connection:
        """Dial `address` (ip, port), authenticate, and return the connection. With
        `expected_peer` the peer must have that peer id (else `AuthenticationError`)."""
        await trio.lowlevel.checkpoint()
        if len(self._connections) >= self._cfg.max_connections:
            raise TransportError("too many connections")
        accept = None
        if expected_peer is not None:
            from ..identity import peer_id

            accept = lambda key: peer_id(key) == expected_peer  # noqa: E731
        address = (str(address[0]), int(address[1]))
        conn = Connection(self, is_client=True, address=address, accept=accept)
        self._connections.add(conn)
        conn._quic.connect(address, now=trio.current_time())
        self._register(conn._quic.host_cid, conn)
        self._nursery.start_soon(conn._timer_loop)
        self._nursery.start_soon(conn._establish)
        conn._transmit()
        await conn._established.wait()
        if not conn._authenticated:
            info = conn._close_info
            if info is not None and info.error_code in (Code.AUTH_FAILED, Code.REFUSED):
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

    # ---- datagrams

    def _sendto(self, data: bytes, addr) -> None:
        if self._backlog:
            if len(self._backlog) < _MAX_SEND_BACKLOG:
                self._backlog.append((data, addr))
            return
        try:
            self._sock.sendto(data, addr)
        except BlockingIOError:
            self._backlog.append((data, addr))
            self._backlog_wake.set()
        except OSError as exc:  # ICMP errors surfacing, unreachable, ...: QUIC recovers
            log.debug("sendto %s: %s", addr, exc)

    async def _send_loop(self) -> None:
        sock = self._sock
        while True:
            await self._backlog_wake.wait()
            self._backlog_wake = trio.Event()
            while self._backlog:
                await trio.lowlevel.wait_writable(sock)
                while self._backlog:
                    data, addr = self._backlog[0]
                    try:
                        sock.sendto(data, addr)
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        log.debug("sendto %s: %s", addr, exc)
                    self._backlog.popleft()

    async def _receive_loop(self) -> None:
        sock = self._sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            touched: dict[Connection, None] = {}
            for _ in range(_RECV_BATCH):
                try:
                    data, addr = sock.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # e.g. ECONNREFUSED from an earlier ICMP error
                    continue
                conn = self._route(data, addr)
                if conn is not None:
                    touched[conn] = None
            for conn in touched:
                conn._after_input()

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
            or header.version not in (QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2)
            or len(data) < _MIN_INITIAL_SIZE
            or len(header.destination_cid) < 8
            or len(self._connections) >= self._cfg.max_connections
            or self._pending >= self._cfg.max_pending
        ):
            return None
        accept = None
        if self._accept_peer is not None:
            from ..identity import peer_id

            policy = self._accept_peer
            accept = lambda key: bool(policy(peer_id(key)))  # noqa: E731
        conn = Connection(self, is_client=False, address=addr, odcid=header.destination_cid, accept=accept)
        self._connections.add(conn)
        self._pending += 1
        conn._counted_pending = True
        self._register(header.destination_cid, conn)
        self._register(conn._quic.host_cid, conn)
        self._nursery.start_soon(conn._timer_loop)
        self._nursery.start_soon(conn._establish)
        return conn

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
                        accept_peer: Callable[[str], bool] | None = None):
    """An `Endpoint` on a new UDP socket, running until the block exits (then every
    connection is closed). `authenticator` is an `Identity` (Ed25519 authentication,
    see `auth`) or an object with `authenticate(conn, stream, accept)`.
    `accept_peer(peer_id) -> bool` filters incoming connections."""
    from .auth import Ed25519Authenticator

    if not hasattr(authenticator, "authenticate"):
        authenticator = Ed25519Authenticator(authenticator)
    config = config or TransportConfig()
    sock = _make_socket(host, port, config.socket_buffer)
    try:
        async with trio.open_nursery() as nursery:
            ep = Endpoint(sock, authenticator, config, nursery, listen=listen, accept_peer=accept_peer)
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
