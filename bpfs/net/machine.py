"""The QUIC state machine: aioquic's `QuicConnection`, adapted, and its TLS material.

Owns the interface every QUIC machine offers the rest of `bpfs.net` (`BpfsQuic`), the
aioquic adapter (`AioquicMachine`, `export_binding` and the helpers below), the
receive-credit policy (`Credit`), the per-process TLS certificate, the wire constants
(`ALPN`, `CID_LENGTH`, `TIMER_GRANULARITY`) and `make_quic` for aioquic (`library` picks
between it and qh3's adapter, `machine_qh3`). It imports nothing else from `bpfs.net` but
`errors`: `machine_qh3`, `library`, `stream` and `quic` build on it, never the reverse. `check_aioquic()` verifies
at import time that the internals listed below are still there, so an aioquic upgrade
fails loudly instead of silently losing a bound (`machine_qh3.check_qh3()` does the same
for qh3).

What we change, and why:

- Receive credit (`Credit`; `_write_connection_limits`, `_write_stream_limits`): aioquic
  doubles a window whenever half of it has *arrived*, so memory grows with whatever the
  peer sends. We grant credit as the application *consumes*: limit = consumed + window,
  raised in steps of a quarter window, never for a stream the peer's MAX_STREAMS still
  blocks.
- Stream limits (`_limit_peer_streams`): the peer may open `max_streams` bidirectional
  streams at a time and no unidirectional ones.
- Pacing (`_Pacer`, `_install_pacer`): bursts of `TIMER_GRANULARITY` worth of the pacing
  rate, because a trio sleep lasts at least a millisecond (see the class).

aioquic internals used (all here, all checked by `check_aioquic`)
-------------------------------------------------------------------
- `QuicConnection._write_connection_limits` / `_write_stream_limits` (overridden),
  `QuicConnection._local_max_data` (a `Limit`: `value`, `sent`, `used`): the MAX_DATA
  and MAX_STREAM_DATA hooks of `AioquicMachine`, and `AioquicMachine.credit_due`.
- `QuicConnection._streams` (`QuicStream.max_stream_data_local`, `is_blocked`,
  `receiver.highest_offset`, `sender.highest_offset`): `AioquicMachine._write_stream_limits`,
  `AioquicMachine.credit_due`, `AioquicMachine.sent_offset`, `AioquicMachine.received_offset`.
- `QuicConnection._local_max_streams_bidi` / `_local_max_streams_uni`: `_limit_peer_streams`.
- `QuicConnection._loss._pacer` (a `QuicPacketPacer`: `update_rate`, `bucket_max`) and
  `QuicConnection._max_datagram_size`: `_install_pacer`, `_Pacer`.
- `QuicConnection.tls` (`tls.Context.key_schedule`, `session_resumed`;
  `tls.KeySchedule.generation`, `derive_secret`): `export_binding`. (`tls` only exists
  once a handshake starts, so `check_aioquic` checks the `tls` classes instead.)

Everything else (`quic` and `stream`, through `BpfsQuic`) uses aioquic's public API only: `connect`,
`receive_datagram`, `datagrams_to_send`, `next_event`, `get_timer`, `handle_timer`,
`close`, `host_cid`, `get_next_available_stream_id`, `send_stream_data`, `reset_stream`,
`stop_stream`, the events, `pull_quic_header` for routing, and `encode_quic_retry` with the
constructor's `retry_source_connection_id` for address validation (`retry`).

Channel binding (`export_binding`)
----------------------------------
aioquic has no public TLS exporter, so we derive one the way TLS 1.3 derives its own
secrets (RFC 8446 section 7.1), from the master secret and the full handshake transcript:

    exporter = HKDF-Expand-Label(master_secret, "bpfs cbind v1",
                                 Transcript-Hash(ClientHello .. client Finished), Hash.length)
    binding  = BLAKE2b-256(person="bpfs-net-cbind", u8 len(exporter) || exporter
                                                    || u8 len(odcid) || odcid)

Both ends compute the same value; nobody else can (it depends on the ECDHE secret). The
transcript covers both hellos, the server certificate and its CertificateVerify, and the
QUIC transport parameters, which carry both sides' initial source connection ids and
the original destination connection id (odcid, also mixed in explicitly). A relay that
terminates QUIC separately towards each side has two different handshakes, hence two
different bindings, so a signature over one is useless on the other. Session
resumption is never offered (a resumed session is refused here: no certificate, other
key schedule). The TLS certificate is a throwaway self-signed one generated per process
and is *not* identity; identity is the Ed25519 signature over the binding (see `auth`).
qh3 runs the same Python TLS 1.3 code (a fork of aioquic's `tls` module), so
`export_binding` serves both libraries unchanged and a store on one talks to a store on
the other (same ALPN, same binding).
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from typing import Any, Protocol

from aioquic import tls
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.recovery import QuicPacketPacer
from aioquic.quic.stream import QuicStream

from .errors import AuthenticationError

ALPN = "bpfs/1"
CID_LENGTH = 8
TIMER_GRANULARITY = 0.002  # epoll sleeps in whole milliseconds; pace in bursts this long


_CERT: tuple | None = None


def process_certificate():
    """A throwaway self-signed certificate, one per process (QUIC servers need one; it
    is not identity: see the module docstring)."""
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


def export_binding(quic: BpfsQuic) -> bytes:
    """The channel binding of a completed handshake (see the module docstring).

    aioquic internals (qh3 has the same ones: `machine_qh3`): `quic.tls`
    (`Context.key_schedule`, `Context.session_resumed`) and the key schedule's `generation`
    and `derive_secret`; also the public `original_destination_connection_id`."""
    tls_context = quic.tls
    schedule = tls_context.key_schedule
    if schedule is None or schedule.generation != 3 or tls_context.session_resumed:
        raise AuthenticationError("no full TLS 1.3 handshake to bind to")
    exporter = schedule.derive_secret(b"bpfs cbind v1")
    odcid = quic.original_destination_connection_id
    h = hashlib.blake2b(digest_size=32, person=b"bpfs-net-cbind")
    h.update(bytes([len(exporter)]) + exporter + bytes([len(odcid)]) + odcid)
    return h.digest()


def check_aioquic() -> None:
    """`ImportError` unless the installed aioquic has every internal this module relies
    on (listed in the module docstring)."""

    def unsupported(what: str) -> ImportError:
        return ImportError(f"bpfs.net: unsupported aioquic (no {what})")

    for attr in ("_write_connection_limits", "_write_stream_limits", "_handle_connection_close_frame", "get_timer",
                 "handle_timer"):
        if not callable(getattr(QuicConnection, attr, None)):
            raise unsupported(f"QuicConnection.{attr}")
    probe = QuicConnection(configuration=QuicConfiguration(is_client=True))
    for attr in ("_local_max_data", "_local_max_streams_bidi", "_local_max_streams_uni", "_streams", "_loss",
                 "_max_datagram_size", "original_destination_connection_id"):
        if not hasattr(probe, attr):
            raise unsupported(f"QuicConnection.{attr}")
    for limit in ("_local_max_data", "_local_max_streams_bidi", "_local_max_streams_uni"):
        for attr in ("value", "sent", "used"):
            if not hasattr(getattr(probe, limit), attr):
                raise unsupported(f"QuicConnection.{limit}.{attr}")
    if not isinstance(getattr(probe._loss, "_pacer", None), QuicPacketPacer):
        raise unsupported("QuicPacketRecovery._pacer")
    if not hasattr(probe._loss._pacer, "bucket_max") or not callable(getattr(QuicPacketPacer, "update_rate", None)):
        raise unsupported("QuicPacketPacer.bucket_max / update_rate")
    stream = QuicStream(stream_id=0)
    for attr in ("max_stream_data_local", "is_blocked", "receiver.highest_offset", "sender.highest_offset"):
        obj = stream
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise unsupported(f"QuicStream.{attr}")
            obj = getattr(obj, part)
    # `QuicConnection.tls` itself only exists once a handshake starts: check its class.
    check_tls(tls, unsupported)


def check_tls(tls_module, unsupported) -> None:
    """Raise `unsupported(what)` unless `tls_module` (aioquic's `tls`, or qh3's fork of it) has
    what `export_binding` reads: `Context.key_schedule`, `Context.session_resumed`,
    `KeySchedule.derive_secret` and `KeySchedule.generation`."""
    if not hasattr(tls_module.Context(is_client=True), "key_schedule"):
        raise unsupported("tls.Context.key_schedule")
    if not isinstance(getattr(tls_module.Context, "session_resumed", None), property):
        raise unsupported("tls.Context.session_resumed")
    if not callable(getattr(tls_module.KeySchedule, "derive_secret", None)):
        raise unsupported("tls.KeySchedule.derive_secret")
    if not hasattr(tls_module.KeySchedule(tls_module.CipherSuite.AES_128_GCM_SHA256), "generation"):
        raise unsupported("tls.KeySchedule.generation")


check_aioquic()


# --------------------------------------------------------------------------- credit

class Credit:
    """Receive credit of one connection: what its application consumed, and how far
    beyond that the peer may send. Owned by the connection (`quic.Connection`); its
    streams record consumption here (`take`, `drop`) and the machine turns it into
    MAX_DATA / MAX_STREAM_DATA frames, so credit is granted only as the reader takes
    data. Plain bookkeeping: no aioquic, no I/O.

    Attributes:
        conn_window:   bytes the peer may have sent on the connection beyond `consumed`.
        stream_window: bytes the peer may have sent on one stream beyond what its
                       reader consumed.
        consumed:      bytes of the connection consumed: read by the application, or
                       dropped unread (abandoned or reset streams, streams forgotten).

    Per-stream consumption is kept for the streams the connection tracks, from `open`
    to `forget`; a stream not tracked gets no more stream credit.
    """

    __slots__ = ("_streams", "conn_window", "consumed", "stream_window")

    def __init__(self, window: int):
        self.conn_window = window
        self.stream_window = window
        self.consumed = 0
        self._streams: dict[int, int] = {}  # stream id -> bytes its reader consumed

    def widen(self, conn_window: int, stream_window: int) -> None:
        """Set the windows (the post-authentication ones)."""
        self.conn_window = conn_window
        self.stream_window = stream_window

    def open(self, stream_id: int) -> None:
        """Start tracking the consumption of `stream_id`."""
        self._streams[stream_id] = 0

    def forget(self, stream_id: int) -> None:
        """Stop tracking `stream_id` (both directions and the peer's are over)."""
        self._streams.pop(stream_id, None)

    def take(self, stream_id: int, n: int) -> None:
        """The reader of `stream_id` consumed `n` bytes: credit the stream and the connection."""
        self.consumed += n
        if stream_id in self._streams:
            self._streams[stream_id] += n

    def drop(self, n: int) -> None:
        """`n` bytes of the connection nobody will read: credit the connection only."""
        self.consumed += n

    def connection_limit(self) -> int:
        """The MAX_DATA the consumption so far allows."""
        return self.consumed + self.conn_window

    def stream_limit(self, stream_id: int) -> int | None:
        """The MAX_STREAM_DATA the consumption of `stream_id` allows (None if not tracked)."""
        consumed = self._streams.get(stream_id)
        return None if consumed is None else consumed + self.stream_window

    def stream_consumed(self, stream_id: int) -> int | None:
        """Bytes the reader of `stream_id` consumed (None if not tracked)."""
        return self._streams.get(stream_id)


# --------------------------------------------------------------------------- the machine interface

class BpfsQuic(Protocol):
    """What `quic` and `stream` use of a QUIC machine: aioquic's sans-IO calls (the same
    ones in qh3), the events of `aioquic.quic.events` (whatever the library), and three
    helpers. `AioquicMachine` and `machine_qh3.Qh3Machine` implement it.

    Attributes:
        peer_closed: the peer sent CONNECTION_CLOSE (the machine's own ends, such as its
                     idle timeout, leave it False).

    Helpers:
        credit_due(stream_id):      whether a transmit now would grant the peer credit
                                    (the reader of `stream_id` just consumed data).
        sent_offset(stream_id):     how far into the stream the machine has sent (each byte
                                    at least once); None once it has dropped the stream.
        received_offset(stream_id): the highest offset received on the stream (its final
                                    size once reset); None if the machine does not say
                                    (then the stream counts what it was given).
    """

    peer_closed: bool

    @property
    def host_cid(self) -> bytes: ...

    @property
    def original_destination_connection_id(self) -> bytes: ...

    @property
    def tls(self) -> Any: ...

    def connect(self, addr: Any, now: float) -> None: ...

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None: ...

    def receive_segments(self, data: bytes, size: int, addr: Any, now: float) -> None:
        """Datagrams from `addr` that GRO coalesced into `data` (each `size` bytes, the last
        possibly shorter), all 1-RTT packets for this connection: as `receive_datagram` on
        each, in order (`udp.split`); a library may take them in one call."""

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None: ...

    def next_event(self) -> events.QuicEvent | None: ...

    def close(self, error_code: int = ..., frame_type: int | None = None, reason_phrase: str = "") -> None: ...

    def get_next_available_stream_id(self, is_unidirectional: bool = False) -> int: ...

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None: ...

    def reset_stream(self, stream_id: int, error_code: int) -> None: ...

    def stop_stream(self, stream_id: int, error_code: int) -> None: ...

    def credit_due(self, stream_id: int) -> bool: ...

    def sent_offset(self, stream_id: int) -> int | None: ...

    def received_offset(self, stream_id: int) -> int | None: ...


# --------------------------------------------------------------------------- aioquic hooks

class _Pacer(QuicPacketPacer):
    """aioquic's pacer allows bursts of at most 16 packets, then asks to wait a few
    microseconds; a trio sleep lasts at least a millisecond (epoll), which capped a
    stream at ~20 MB/s. Allow bursts worth `TIMER_GRANULARITY` of the pacing rate, as
    kernel pacing with a coarse timer does (the congestion window still bounds what is
    in flight). Relies on `QuicPacketPacer.update_rate` and `bucket_max`."""

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window=congestion_window, smoothed_rtt=smoothed_rtt)
        self.bucket_max = max(self.bucket_max, TIMER_GRANULARITY)


def _install_pacer(quic: QuicConnection) -> None:
    """Replace the pacer of `quic`'s loss recovery by `_Pacer`. aioquic internals:
    `QuicConnection._loss._pacer`, `QuicConnection._max_datagram_size`."""
    quic._loss._pacer = _Pacer(max_datagram_size=quic._max_datagram_size)


def _limit_peer_streams(quic: QuicConnection, *, bidi: int, uni: int) -> None:
    """Let the peer open at most `bidi` bidirectional and `uni` unidirectional streams at
    a time (announced in the transport parameters). aioquic internals:
    `QuicConnection._local_max_streams_bidi` / `_local_max_streams_uni` (`Limit.value`,
    `Limit.sent`)."""
    for limit, value in ((quic._local_max_streams_bidi, bidi), (quic._local_max_streams_uni, uni)):
        limit.value = limit.sent = value


def receive_one_by_one(machine: BpfsQuic, data: bytes, size: int, addr: Any, now: float) -> None:
    """`receive_segments` as `receive_datagram` on each datagram of the run, in order (the
    same slicing as `udp.split`, which this layer does not import)."""
    for i in range(0, len(data), size):
        machine.receive_datagram(data[i:i + size], addr, now)


class AioquicMachine(QuicConnection):
    """aioquic's `QuicConnection` with consumption-based receive credit, our stream
    limits and our pacer (a `BpfsQuic`); the named helpers (`credit_due`, `sent_offset`,
    `received_offset`) are the only way the rest of `bpfs.net` looks inside it.

    Attributes:
        credit: the owning connection's `Credit`; MAX_DATA / MAX_STREAM_DATA follow it.
        peer_closed: the peer sent CONNECTION_CLOSE (aioquic's own ends, such as its idle
                     timeout, leave it False).
    """

    def __init__(self, credit: Credit, *, max_streams: int, **kwargs):
        super().__init__(**kwargs)
        self.credit = credit
        self.peer_closed = False  # the peer sent CONNECTION_CLOSE (else aioquic ended it here: idle timeout)
        _limit_peer_streams(self, bidi=max_streams, uni=0)
        _install_pacer(self)

    def receive_segments(self, data: bytes, size: int, addr: Any, now: float) -> None:
        receive_one_by_one(self, data, size, addr, now)

    # ---- helpers (aioquic internals: `_streams`, `_local_max_data`)

    def credit_due(self, stream_id: int) -> bool:
        """Whether a quarter of a window was consumed since the last MAX_STREAM_DATA of
        `stream_id` or the last MAX_DATA, i.e. a transmit now would raise a limit.
        aioquic internals: `_streams` (`QuicStream.max_stream_data_local`), `_local_max_data`."""
        credit = self.credit
        qs = self._streams.get(stream_id)
        if qs is not None and qs.max_stream_data_local:
            target = credit.stream_limit(stream_id)
            if target is not None and target - qs.max_stream_data_local >= credit.stream_window // 4:
                return True
        return credit.connection_limit() - self._local_max_data.value >= credit.conn_window // 4

    def sent_offset(self, stream_id: int) -> int | None:
        """How far into stream `stream_id` aioquic has sent (each byte at least once);
        None once aioquic has dropped the stream. aioquic internals: `_streams`
        (`QuicStream.sender.highest_offset`)."""
        qs = self._streams.get(stream_id)
        return qs.sender.highest_offset if qs is not None else None

    def received_offset(self, stream_id: int) -> int | None:
        """The highest offset received on stream `stream_id` (its final size once the peer
        reset it); None once aioquic has dropped the stream. aioquic internals: `_streams`
        (`QuicStream.receiver.highest_offset`)."""
        qs = self._streams.get(stream_id)
        return qs.receiver.highest_offset if qs is not None else None

    # ---- overridden aioquic hooks

    def _handle_connection_close_frame(self, context, frame_type, buf) -> None:
        self.peer_closed = True
        super()._handle_connection_close_frame(context, frame_type, buf)

    def _write_connection_limits(self, builder, space) -> None:
        credit = self.credit
        limit = self._local_max_data
        target = credit.connection_limit()
        if target - limit.value >= credit.conn_window // 4:
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
            credit = self.credit
            target = credit.stream_limit(stream.stream_id)
            if target is not None and target - stream.max_stream_data_local >= credit.stream_window // 4:
                stream.max_stream_data_local = target
        receiver = stream.receiver
        highest, receiver.highest_offset = receiver.highest_offset, 0  # disable doubling
        try:
            super()._write_stream_limits(builder=builder, space=space, stream=stream)
        finally:
            receiver.highest_offset = highest


def make_quic(credit: Credit, *, is_client: bool, odcid: bytes | None, idle_timeout: float,
              max_datagram_size: int, congestion_control: str, max_streams: int,
              retry_scid: bytes | None = None) -> BpfsQuic:
    """A QUIC machine of `library` granting receive credit from `credit` (its current windows
    are the initial ones: the pre-authentication windows), letting the peer open `max_streams`
    bidirectional streams, with our ALPN, connection id length and, on the server side,
    the process certificate. A server connection whose client answered a Retry gets the id
    that Retry gave (`retry_scid`) and the client's first destination id (`odcid`, from the
    token): the handshake's transport parameters must repeat both (RFC 9000 section 7.3).
    (aioquic's; `library.make_quic` picks between it and qh3's.)"""
    qcfg = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        connection_id_length=CID_LENGTH,
        idle_timeout=idle_timeout,
        max_datagram_size=max_datagram_size,
        max_data=credit.conn_window,
        max_stream_data=credit.stream_window,
        congestion_control_algorithm=congestion_control,
        verify_mode=ssl.CERT_NONE,  # the certificate is not identity; see auth
    )
    if not is_client:
        qcfg.certificate, qcfg.private_key = process_certificate()
    extra = {} if is_client else {"original_destination_connection_id": odcid,
                                  "retry_source_connection_id": retry_scid}
    return AioquicMachine(credit, max_streams=max_streams, configuration=qcfg, **extra)
