"""The QUIC state machine on qh3: qh3's `QuicConnection` adapted to `machine.BpfsQuic`.

qh3 (the default `TransportConfig.quic_library`; ``BPFS_QUIC=aioquic`` chooses aioquic) is a
fork of aioquic whose packet layer (packets, recovery, congestion control, flow control,
streams) is native code (`qh3._hazmat.QuicConnectionCore`, Rust) behind a Python facade
with aioquic's sans-IO calls; TLS 1.3 stays in Python (`qh3.tls`, aioquic's `tls` module,
forked). This module is the only one touching qh3, and the only qh3 internals it relies on
are listed below and checked by `check_qh3()` at import, together with the exact version
(`QH3_VERSION`): qh3 declares its `_hazmat` module and underscore names outside its API
guarantees, so any other version is refused rather than trusted.

What `machine` does for aioquic, and how it is done here
--------------------------------------------------------
- Receive credit granted as the reader consumes (aioquic: `_write_connection_limits`,
  `_write_stream_limits`). The native core has no credit hook: it grants MAX_DATA /
  MAX_STREAM_DATA for the bytes of each stream-data event *when that event is polled*
  from it (window fixed at construction, raised once half of it is used). So credit is
  steered by polling: the facade's `_drain_core` polls through `_Gate`, which holds back
  the first stream-data event that would take the bytes delivered and not yet consumed
  (`Credit`) beyond the *gate* (of the connection, or of its stream) and polls nothing
  more until the reader has made room; `credit_due` / `get_timer` then ask for a
  `handle_timer`, which resumes. The window is split: the core is built with half of the
  post-authentication windows (`max_data`, `max_stream_data`; what a fast reader keeps in
  flight), the gate is the rest (before authentication, the pre-authentication window), so
  bytes received and not consumed stay within the configured window as with aioquic, plus
  the one held-back event (at most 64 KiB). Unlike aioquic:
  - the core's events come in one queue, so while an event is held back everything behind
    it waits too: other streams' data already received, resets, the peer's close. A stalled
    reader stalls the connection's other streams once the gate is full (aioquic: once the
    connection window is, which only differs by what was already in flight). A peer
    flooding control frames behind a held-back event could grow that queue: past
    `MAX_EVENTS_BEHIND` events its datagrams are dropped until the reader catches up.
    Once the core is closing or closed nothing is held back.
  - the core's windows cannot change after construction, so before authentication the
    core announces half of the post-authentication windows (aioquic: the
    pre-authentication window). bpfs.net delivers no more than the pre-authentication
    window to an unauthenticated peer's streams, and an incoming connection that has not
    authenticated gets at most `preauth_window + quic.PREAUTH_HANDSHAKE_BYTES` of
    datagrams into the core (`quic.Endpoint._deliver`; the rest is dropped), so a stranger
    cannot make the core buffer more than that. A server *we dialled* is not held to that
    budget (an honest server may start sending as soon as its hello is out): before its
    hello verifies, it could make the core buffer up to the announced windows, 8 MiB per
    connection by default.
- Stream limits (aioquic: `_limit_peer_streams`): the core and the transport parameters
  (`_create_core`, `_Bridge`) say `max_streams` bidirectional streams and no unidirectional
  ones (qh3 hard-codes 100 and 103). The core raises MAX_STREAMS as peer streams finish.
  qh3 refuses to open a stream beyond the *peer's* limit (aioquic queues it): such a
  stream's data, reset and STOP_SENDING wait here until MAX_STREAMS lets it open
  (`send_stream_data`, `_flush_blocked`).
- Pacing (aioquic: `_install_pacer`): nothing to do. The core paces with a token bucket
  of one congestion window (not reachable from Python), so a 1 ms trio sleep never starves
  it the way aioquic's 16-packet bucket did. Congestion control is the core's CUBIC (with
  HyStart++) whatever `TransportConfig.congestion_control` says.
- Channel binding (`machine.export_binding`, unchanged): `QuicConnection.tls` is qh3's
  Python `tls.Context`, with aioquic's `key_schedule` (`generation`, `derive_secret`)
  and `session_resumed`; session tickets are neither offered nor accepted (no ticket
  callbacks, no `session_ticket`). Same ALPN, same derivation: bindings match across
  libraries, so an aioquic store and a qh3 store authenticate each other.

Also fixed here: the facade splits a datagram into packets and passes each to the core,
which counts only that packet towards the anti-amplification allowance, so a client Initial
padded with bytes after the packet (aioquic pads that way) left a qh3 server 3 x 504
bytes, too few for its first flight (and the core raises instead of waiting): trailing
bytes that are not a QUIC packet are passed with the packet before them
(`receive_datagram`). Addresses: the core speaks (host, port) tuples; a `RelayPath`
(or any address object bpfs.net gave) is mapped back for `datagrams_to_send`. DATAGRAM
frames and path MTU probing (which would exceed `max_datagram_size`) are off; the core's
errors close the connection instead of escaping into the endpoint's tasks.

qh3 internals used (all here, all checked by `check_qh3`; qh3 2.1.0 exactly)
-----------------------------------------------------------------------------
- `QuicConnection._core` (a `qh3._hazmat.QuicConnectionCore`: constructor keywords as
  `_CORE_ARGS`, `next_event`, `poll_transmit`, `receive_gro_buffer`, `receive_datagram` and its report tuple
  (`[2]` packets, `[5]` events added), `get_send_buffer_size`, `stream_limits[0]`,
  `state`, `handle_timer`, `close`) and its native event tuples (`"stream_data"`,
  `"peer_closed"`, `"streams_available"`, `"stream_finished"`).
- `QuicConnection._create_core` / `_create_tls` (replaced: our windows, stream limits and
  transport parameters), `_drain_core` (wrapped: polls through `_Gate`),
  `receive_datagram` (replaced, with the facade's `_receive_version_negotiation`,
  `_receive_retry`, `_learn_remote_source_cid`), `_record_local_stream`, `_events`,
  `_configuration`, `_is_client`, `_version`, `_remote_addr`, `_retry_source_connection_id`,
  `_original_destination_connection_id`, `_session_ticket_fetcher` / `_handler`,
  `_quic_logger`, `_set_version`, `_close_event`, `_handshake_complete`.
- `qh3.quic.tls_bridge.QuicTlsBridge` (subclassed: `serialize_transport_parameters`) and
  `qh3.quic.packet.pull_quic_transport_parameters` / `push_quic_transport_parameters`.
- `qh3.tls.Context.key_schedule` / `session_resumed`, `qh3.tls.KeySchedule.generation` /
  `derive_secret` (`machine.export_binding`).
- Public: `QuicConfiguration` (`load_cert_chain` with PEM), `QuicConnectionError`, the
  events of `qh3.quic.events`, `qh3._hazmat.pull_quic_header`.
"""

from __future__ import annotations

import inspect
import logging
import ssl
from typing import Any

from aioquic.quic import events
from qh3 import __version__ as _qh3_version
from qh3 import tls as qh3_tls
from qh3._hazmat import Buffer, QuicConnectionCore
from qh3._hazmat import pull_quic_header as _pull_quic_header
from qh3.quic import events as qh3_events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError
from qh3.quic.packet import (QuicErrorCode, QuicPacketType, QuicProtocolVersion, pull_quic_transport_parameters,
                             push_quic_transport_parameters)
from qh3.quic.tls_bridge import QuicTlsBridge

from .machine import ALPN, CID_LENGTH, Credit, check_tls, process_certificate, receive_one_by_one

__all__ = ["MAX_EVENTS_BEHIND", "QH3_VERSION", "Qh3Machine", "check_qh3", "make_qh3"]

log = logging.getLogger(__name__)

QH3_VERSION = "2.1.0"  # the only version whose internals were checked (pyproject pins it)
MAX_EVENTS_BEHIND = 1 << 16  # core events queued behind a held-back one before datagrams are dropped
_FIXED_BIT = 0x40  # every QUIC packet has it (RFC 9000 section 17); padding after a packet has not
_NOW = float("-inf")  # a timer already due
_MAX_ADDRESSES = 4  # address objects remembered per connection (see `_remember`)
_OPEN_STATES = ("first_flight", "connected")  # QuicConnectionCore.state before any close

# QuicConnectionCore's constructor, which `Qh3Machine._create_core` calls by keyword.
_CORE_ARGS = (
    "is_client", "version", "local_addr", "remote_addr", "source_cid", "destination_cid", "peer_address_validated",
    "active_connection_id_limit", "max_datagram_size", "probe_datagram_size", "idle_timeout", "ack_delay_exponent",
    "max_datagram_frame_size", "peer_max_datagram_frame_size", "connection_receive_window", "connection_send_limit",
    "stream_receive_window", "stream_send_limit_bidi_local", "stream_send_limit_bidi_remote",
    "stream_send_limit_uni", "max_stream_reassembly", "local_max_streams_bidi", "local_max_streams_uni",
    "peer_max_streams_bidi", "peer_max_streams_uni", "initial_rtt", "max_ack_delay", "initial_time",
)


def check_qh3() -> None:
    """`ImportError` unless the installed qh3 is `QH3_VERSION` and has every internal this
    module relies on (listed in the module docstring)."""

    def unsupported(what: str) -> ImportError:
        return ImportError(f"bpfs.net: unsupported qh3 {_qh3_version} (no {what}); bpfs.net needs qh3=={QH3_VERSION}")

    if _qh3_version != QH3_VERSION:
        raise ImportError(f"bpfs.net: qh3 {_qh3_version} is installed, bpfs.net was checked against qh3=={QH3_VERSION} "
                          f"only (pip install qh3=={QH3_VERSION}, or use quic_library='aioquic')")
    try:
        params = tuple(inspect.signature(QuicConnectionCore).parameters)
    except (TypeError, ValueError):
        params = ()
    if params != _CORE_ARGS:
        raise unsupported("QuicConnectionCore constructor as expected")
    for attr in ("next_event", "poll_transmit", "receive_datagram", "receive_gro_buffer", "get_send_buffer_size",
                 "stream_limits", "state",
                 "handle_timer", "get_timer", "close", "send_stream"):
        if not hasattr(QuicConnectionCore, attr):
            raise unsupported(f"QuicConnectionCore.{attr}")
    for attr in ("_create_core", "_create_tls", "_drain_core", "_drain_tls", "_receive_version_negotiation",
                 "_receive_retry", "_learn_remote_source_cid", "_record_local_stream", "_call_core", "_set_version",
                 "receive_datagram", "datagrams_to_send", "get_timer", "handle_timer", "next_event", "send_stream_data",
                 "reset_stream", "stop_stream", "close", "connect", "get_next_available_stream_id"):
        if not callable(getattr(QuicConnection, attr, None)):
            raise unsupported(f"QuicConnection.{attr}")
    if not isinstance(getattr(QuicConnection, "tls", None), property):
        raise unsupported("QuicConnection.tls")
    probe = QuicConnection(configuration=QuicConfiguration(is_client=True))
    for attr in ("_core", "_tls", "_events", "_configuration", "_is_client", "_version", "_remote_addr",
                 "_retry_source_connection_id", "_original_destination_connection_id", "_session_ticket_fetcher",
                 "_session_ticket_handler", "_quic_logger", "_close_event", "_handshake_complete", "host_cid"):
        if not hasattr(probe, attr):
            raise unsupported(f"QuicConnection.{attr}")
    if not callable(getattr(QuicTlsBridge, "serialize_transport_parameters", None)):
        raise unsupported("QuicTlsBridge.serialize_transport_parameters")
    bridge_params = inspect.signature(QuicTlsBridge).parameters
    for name in ("version", "local_initial_source_connection_id", "remote_initial_source_connection_id",
                 "original_destination_connection_id", "retry_source_connection_id", "session_ticket_fetcher",
                 "session_ticket_handler", "quic_logger", "version_change_handler"):
        if name not in bridge_params:
            raise unsupported(f"QuicTlsBridge({name}=)")
    check_tls(qh3_tls, unsupported)


check_qh3()


_PEM: tuple[bytes, bytes] | None = None


def _process_certificate_pem() -> tuple[bytes, bytes]:
    """`machine.process_certificate()` as PEM (certificate, PKCS#8 key): qh3 loads no
    `cryptography` objects."""
    global _PEM
    if _PEM is None:
        from cryptography.hazmat.primitives import serialization

        cert, key = process_certificate()
        _PEM = (cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return _PEM


def _gate(window: int, core_window: int) -> int:
    """What bpfs.net may hold of a `window` of which the core holds `core_window`."""
    return window - core_window if window > core_window else window


class _Bridge(QuicTlsBridge):
    """qh3's TLS bridge announcing our stream limits (qh3 hard-codes 100 bidirectional and
    103 unidirectional streams) and no DATAGRAM frames."""

    def __init__(self, configuration: QuicConfiguration, *, max_streams: int, **kwargs: Any):
        self._bpfs_max_streams = max_streams  # before super().__init__: it serializes
        super().__init__(configuration, **kwargs)

    def serialize_transport_parameters(self) -> bytes:
        params = pull_quic_transport_parameters(Buffer(data=super().serialize_transport_parameters()))
        params.initial_max_streams_bidi = self._bpfs_max_streams
        params.initial_max_streams_uni = 0
        params.max_datagram_frame_size = None
        buf = Buffer(capacity=3 * self.configuration.max_datagram_size)
        push_quic_transport_parameters(buf, params)
        return buf.data


class _Gate:
    """Stands in for the native core while the facade's `_drain_core` polls it: its
    `next_event` is `Qh3Machine._next_native` (which may hold an event back); everything
    else goes to the core."""

    __slots__ = ("_core", "_machine")

    def __init__(self, core: QuicConnectionCore, machine: Qh3Machine):
        self._core = core
        self._machine = machine

    def next_event(self):
        return self._machine._next_native(self._core)

    def __getattr__(self, name: str):
        return getattr(self._core, name)


# Blocked-stream operations, replayed in order once the peer's MAX_STREAMS lets the stream open.
_DATA, _RESET, _STOP = 0, 1, 2


class Qh3Machine(QuicConnection):
    """qh3's `QuicConnection` as a `machine.BpfsQuic`: consumption-based receive credit
    through polling (`_Gate`), our stream limits, aioquic's events (`next_event`), bpfs.net
    address objects, and core errors turned into a closed connection.

    Attributes:
        credit:       the owning connection's `Credit`: what the gate lets through follows it.
        peer_closed:  the peer sent CONNECTION_CLOSE.
        gated_drops:  datagrams dropped because `MAX_EVENTS_BEHIND` events were queued behind a
                      held-back one.
    """

    def __init__(self, credit: Credit, *, max_streams: int, core_windows: tuple[int, int], **kwargs: Any):
        self.credit = credit
        self.peer_closed = False
        self.gated_drops = 0
        self._max_streams = max_streams
        self._core_conn, self._core_stream = core_windows
        self._delivered = 0  # stream bytes handed to bpfs.net (events polled)
        self._delivered_s: dict[int, int] = {}  # ... per stream
        self._held: tuple | None = None  # a native stream-data event polled and held back
        self._behind = 0  # events the core queued since one was held back
        self._written: dict[int, int] = {}  # bytes given to send_stream_data, per stream
        self._blocked: dict[int, list[tuple[int, Any, bool]]] = {}  # streams the peer's MAX_STREAMS holds back
        self._blocked_bytes: dict[int, int] = {}
        self._unblock = False  # the peer raised MAX_STREAMS: try `_flush_blocked`
        self._addresses: dict[tuple[str, int], Any] = {}  # (host, port) -> the address object bpfs.net gave
        self._failed = False
        super().__init__(**kwargs)

    # ---- receive credit: the gate

    def _fits(self, native: tuple) -> bool:
        """Whether the stream-data event `native` may go to bpfs.net now (see the module
        docstring). Always unless the core is "connected" (before: the handshake; after:
        closing or closed, when holding back only delays the end)."""
        n = len(native[2])
        credit = self.credit
        held = self._delivered - credit.consumed
        if held > 0 and held + n > _gate(credit.conn_window, self._core_conn):
            return self._core is None or self._core.state != "connected"
        consumed = credit.stream_consumed(native[1])
        if consumed is not None:
            held = self._delivered_s.get(native[1], 0) - consumed
            if held > 0 and held + n > _gate(credit.stream_window, self._core_stream):
                return self._core is None or self._core.state != "connected"
        return True

    def _next_native(self, core: QuicConnectionCore):
        """The next native event for the facade, or None (none, or one held back)."""
        native = self._held
        if native is not None:
            if not self._fits(native):
                return None
            self._held = None
            self._behind = 0
        else:
            native = core.next_event()
            while native is not None and native[0] == "peer_closed":
                # what the facade does with it, without its warning per closed connection
                self.peer_closed = True
                self._close_event = qh3_events.ConnectionTerminated(native[2], native[3],
                                                                    native[4].decode("utf8", "replace"))
                native = core.next_event()
            if native is None:
                return None
            kind = native[0]
            if kind == "stream_data":
                if not self._fits(native):
                    self._held = native
                    return None
            else:
                if kind == "streams_available":
                    self._unblock = True
                elif kind == "stream_finished":
                    self._delivered_s.pop(native[1], None)
                    self._written.pop(native[1], None)
                return native
        sid, n = native[1], len(native[2])
        self._delivered += n
        self._delivered_s[sid] = self._delivered_s.get(sid, 0) + n
        return native

    def _resumable(self) -> bool:
        held = self._held
        return held is not None and self._fits(held)

    def _drain_core(self) -> None:
        core = self._core
        if core is None:
            return
        self._core = _Gate(core, self)  # type: ignore[assignment]
        try:
            super()._drain_core()
        finally:
            self._core = core

    # ---- machine.BpfsQuic helpers

    def credit_due(self, stream_id: int) -> bool:
        """Whether the reader made room for a held-back event (then `get_timer` is due and
        `handle_timer` polls on, granting the peer credit)."""
        return self._resumable()

    def sent_offset(self, stream_id: int) -> int | None:
        written = self._written.get(stream_id)
        if written is None:
            return None
        unsent = self._blocked_bytes.get(stream_id, 0)
        if self._core is not None and stream_id not in self._blocked:
            try:
                unsent += self._core.get_send_buffer_size(stream_id)
            except (RuntimeError, ValueError):
                pass
        return written - unsent

    def received_offset(self, stream_id: int) -> int | None:
        # The core credits the unread rest of a reset stream itself (FlowController.consume_reset).
        return None

    # ---- the core, built our way

    def _create_core(self, remote_addr, initial_dcid: bytes, now: float) -> None:
        cfg = self._configuration
        assert self._version is not None  # the facade sets it first
        self._core = QuicConnectionCore(
            is_client=self._is_client, version=self._version, local_addr=("0.0.0.0", 0), remote_addr=remote_addr,
            source_cid=self.host_cid, destination_cid=initial_dcid,
            peer_address_validated=self._is_client or self._retry_source_connection_id is not None,
            active_connection_id_limit=cfg.active_connection_id_limit or (2 if self._is_client else 8),
            max_datagram_size=cfg.max_datagram_size, probe_datagram_size=False, idle_timeout=cfg.idle_timeout,
            ack_delay_exponent=3, max_datagram_frame_size=None, peer_max_datagram_frame_size=None,
            connection_receive_window=cfg.max_data, connection_send_limit=0, stream_receive_window=cfg.max_stream_data,
            stream_send_limit_bidi_local=0, stream_send_limit_bidi_remote=0, stream_send_limit_uni=0,
            max_stream_reassembly=cfg.max_stream_data, local_max_streams_bidi=self._max_streams,
            local_max_streams_uni=0, peer_max_streams_bidi=0, peer_max_streams_uni=0, initial_rtt=cfg.initial_rtt,
            max_ack_delay=0.025, initial_time=now,
        )
        self._applied_transport_parameters = None
        self._pre_handshake_state_replayed = False

    def _create_tls(self, remote_source_cid: bytes | None) -> QuicTlsBridge:
        bridge = _Bridge(
            self._configuration,
            max_streams=self._max_streams,
            version=self._version,
            local_initial_source_connection_id=self.host_cid,
            remote_initial_source_connection_id=remote_source_cid,
            original_destination_connection_id=self._original_destination_connection_id,
            retry_source_connection_id=self._retry_source_connection_id,
            session_ticket_fetcher=self._session_ticket_fetcher,
            session_ticket_handler=self._session_ticket_handler,
            quic_logger=self._quic_logger,
            version_change_handler=self._set_version,
        )
        self._tls = bridge
        return bridge

    # ---- addresses

    def _remember(self, addr) -> tuple[str, int]:
        """The (host, port) the core speaks for `addr`, remembering `addr` (a tuple or a
        `RelayPath`) to give it back in `datagrams_to_send`. A few per connection: the core
        validates a new path before it sends there."""
        key = (str(addr[0]), int(addr[1]))
        known = self._addresses
        if known.get(key) is not addr:
            known.pop(key, None)
            known[key] = addr
            while len(known) > _MAX_ADDRESSES:
                known.pop(next(iter(known)))
        return key

    def connect(self, addr, now: float) -> None:
        super().connect(self._remember(addr), now)

    # ---- sans-IO calls

    def receive_datagram(self, data: bytes, addr, now: float) -> None:
        """The facade's `receive_datagram`, with trailing padding counted (module docstring)
        and datagrams dropped while too many events wait behind a held-back one."""
        if self._failed:
            return
        address = self._remember(addr)
        core = self._core
        if core is None:
            cfg = self._configuration
            if self._is_client or len(data) < 1200:
                return
            try:
                header = _pull_quic_header(data, 0, cfg.connection_id_length)
            except ValueError:
                return
            if header[1] != int(QuicPacketType.INITIAL) or header[0] not in cfg.supported_versions:
                return
            self._remote_addr = address
            self._version = header[0]
            self._create_core(address, header[3], now)
            self._create_tls(remote_source_cid=None)
        else:
            if self._held is not None and self._behind > MAX_EVENTS_BEHIND and core.state == "connected":
                self.gated_drops += 1
                return
            if self._receive_version_negotiation(data, address, now) or self._receive_retry(data, address, now):
                return
        cid_length = self._configuration.connection_id_length
        offset, end = 0, len(data)
        while offset < end:
            try:
                packet_end = _pull_quic_header(data, offset, cid_length)[9]
            except ValueError:
                packet_end = end
            if packet_end <= offset or (packet_end < end and not data[packet_end] & _FIXED_BIT):
                packet_end = end  # the rest is padding, not a packet: it counts with this one
            packet = data[offset:packet_end] if offset or packet_end < end else data
            core = self._core  # (a Retry makes another)
            assert core is not None
            report = self._call_core(core.receive_datagram, packet, address, now, end)
            if report[2]:
                self._learn_remote_source_cid(packet)
            if self._held is not None:
                self._behind += report[5]
            self._drain_core()
            offset = packet_end
        if self._unblock:
            self._flush_blocked()

    def receive_segments(self, data: bytes, size: int, addr, now: float) -> None:
        """1-RTT datagrams GRO coalesced (`machine.BpfsQuic.receive_segments`): once the
        handshake is complete and no event is held back, the core takes the whole run in one
        call (`receive_gro_buffer`) and its events are drained once; else one by one. (If the
        drain holds an event back, the run's events behind it are not counted towards
        `MAX_EVENTS_BEHIND`: at most one run's, 64 datagrams' worth; the next datagrams are.)"""
        core = self._core
        if self._failed or core is None or self._held is not None or not self._handshake_complete:
            receive_one_by_one(self, data, size, addr, now)
            return
        self._call_core(core.receive_gro_buffer, data, size, self._remember(addr), now)
        self._drain_core()
        if self._unblock:
            self._flush_blocked()

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        core = self._core
        if core is None or self._failed:
            return []
        out = []
        poll, known = core.poll_transmit, self._addresses
        try:
            while (transmit := poll(now)) is not None:
                dest = transmit[1]
                out.append((transmit[0], known.get((dest[0], dest[1]), dest)))
        except RuntimeError as exc:
            self._fail(exc)
        return out

    def get_timer(self) -> float | None:
        if self._events or self._resumable():
            return _NOW  # events for bpfs.net, or room for a held-back one: handle_timer now
        if self._failed:
            return None
        return super().get_timer()

    def handle_timer(self, now: float) -> None:
        if self._failed or self._core is None:
            return
        try:
            if self._held is not None:
                self._drain_core()
            super().handle_timer(now)
        except QuicConnectionError as exc:
            self._fail(exc)
        if self._unblock:
            self._flush_blocked()

    def next_event(self) -> events.QuicEvent | None:  # type: ignore[override]
        """The next event, as aioquic's event classes (what `quic` dispatches on)."""
        queue = self._events
        while queue:  # (`type(ev) is` each time: mypy narrows that)
            ev = queue.popleft()
            if type(ev) is qh3_events.StreamDataReceived:
                return events.StreamDataReceived(data=ev.data, end_stream=ev.end_stream, stream_id=ev.stream_id)
            if type(ev) is qh3_events.StreamReset:
                return events.StreamReset(error_code=ev.error_code, stream_id=ev.stream_id)
            if type(ev) is qh3_events.StopSendingReceived:
                return events.StopSendingReceived(error_code=ev.error_code, stream_id=ev.stream_id)
            if type(ev) is qh3_events.HandshakeCompleted:
                return events.HandshakeCompleted(alpn_protocol=ev.alpn_protocol,
                                                 early_data_accepted=ev.early_data_accepted,
                                                 session_resumed=ev.session_resumed)
            if type(ev) is qh3_events.ConnectionIdIssued:
                return events.ConnectionIdIssued(connection_id=ev.connection_id)
            if type(ev) is qh3_events.ConnectionIdRetired:
                return events.ConnectionIdRetired(connection_id=ev.connection_id)
            if type(ev) is qh3_events.ConnectionTerminated:
                return events.ConnectionTerminated(error_code=ev.error_code, frame_type=ev.frame_type,
                                                   reason_phrase=ev.reason_phrase)
            # ProtocolNegotiated, PingAcknowledged, ...: nothing bpfs.net uses
        return None

    # ---- streams

    def _opens_later(self, stream_id: int) -> bool:
        """Whether `stream_id` is ours and beyond the peer's MAX_STREAMS (qh3 refuses to
        open it; aioquic queues it)."""
        if stream_id in self._blocked:
            return True
        core = self._core
        if core is None or (stream_id & 1) != (0 if self._is_client else 1) or stream_id & 2:
            return False
        return (stream_id >> 2) >= core.stream_limits[0]

    def _block(self, stream_id: int, op: int, arg: Any, flag: bool = False) -> None:
        if stream_id not in self._blocked:
            self._blocked[stream_id] = []
            self._record_local_stream(stream_id)  # the next stream gets the next id, as in aioquic
        self._blocked[stream_id].append((op, arg, flag))

    def _flush_blocked(self) -> None:
        """Open the streams the peer's MAX_STREAMS now allows, replaying what waited."""
        self._unblock = False
        if not self._blocked or self._core is None:
            return
        limit = self._core.stream_limits[0]
        for sid in sorted(self._blocked):
            if (sid >> 2) >= limit:
                break
            ops = self._blocked.pop(sid)
            self._blocked_bytes.pop(sid, None)
            try:
                for op, arg, flag in ops:
                    if op == _DATA:
                        super().send_stream_data(sid, arg, flag)
                    elif op == _RESET:
                        super().reset_stream(sid, arg)
                    else:
                        super().stop_stream(sid, arg)
            except QuicConnectionError as exc:
                log.debug("stream %d: %s", sid, exc)

    def _closing(self) -> bool:
        """The connection is over or ending (the core may say so before bpfs.net has seen
        the ConnectionTerminated event)."""
        core = self._core
        return self._failed or self._close_event is not None or (core is not None and core.state not in _OPEN_STATES)

    def _stream_error(self, exc: Exception) -> None:
        """A core error on a stream call: silent on a closing connection (aioquic accepts
        such calls, and bpfs.net learns of the end from its event), ValueError otherwise
        (what `stream` catches: the stream was reset or finished meanwhile)."""
        if not self._closing():
            raise ValueError(str(exc)) from None

    def send_stream_data(self, stream_id: int, data, end_stream: bool = False) -> None:
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if self._closing():
            pass  # as aioquic: accepted, never sent
        elif self._opens_later(stream_id):
            self._block(stream_id, _DATA, bytes(data), end_stream)
            self._blocked_bytes[stream_id] = self._blocked_bytes.get(stream_id, 0) + n
        else:
            try:
                super().send_stream_data(stream_id, data, end_stream)
            except QuicConnectionError as exc:
                self._stream_error(exc)
        self._written[stream_id] = self._written.get(stream_id, 0) + n

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        if self._closing():
            return
        if self._opens_later(stream_id):
            self._block(stream_id, _RESET, error_code)
            self._blocked_bytes.pop(stream_id, None)
            return
        try:
            super().reset_stream(stream_id, error_code)
        except (QuicConnectionError, AssertionError) as exc:  # (AssertionError: no core yet)
            self._stream_error(exc)

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        if self._closing():
            return
        if self._opens_later(stream_id):
            self._block(stream_id, _STOP, error_code)
            return
        try:
            super().stop_stream(stream_id, error_code)
        except (QuicConnectionError, AssertionError) as exc:  # (AssertionError: no core yet)
            self._stream_error(exc)

    def close(self, error_code: int = QuicErrorCode.NO_ERROR, frame_type: int | None = None,
              reason_phrase: str = "") -> None:
        try:
            super().close(error_code=error_code, frame_type=frame_type, reason_phrase=reason_phrase)
        except QuicConnectionError as exc:
            self._fail(exc)

    # ---- errors

    def _fail(self, exc: BaseException) -> None:
        """The core raised: end the connection (bpfs.net sees it terminated) rather than let
        the error escape into the endpoint's tasks."""
        if self._failed:
            return
        self._failed = True
        log.warning("qh3 failed on a connection (%s); closing it", exc)
        self._events.append(qh3_events.ConnectionTerminated(error_code=QuicErrorCode.INTERNAL_ERROR, frame_type=None,
                                                            reason_phrase="internal error (qh3)"))


def make_qh3(credit: Credit, *, is_client: bool, odcid: bytes | None, retry_scid: bytes | None, idle_timeout: float,
             max_datagram_size: int, max_streams: int, max_data: int, max_stream_data: int) -> Qh3Machine:
    """A `Qh3Machine` (see `machine.make_quic`): the core gets half of the post-authentication
    windows, the gate the rest (module docstring)."""
    core_conn, core_stream = max(1, max_data // 2), max(1, max_stream_data // 2)
    qcfg = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        connection_id_length=CID_LENGTH,
        idle_timeout=idle_timeout,
        max_datagram_size=max_datagram_size,
        probe_datagram_size=False,  # probes would exceed max_datagram_size (relay paths)
        max_data=core_conn,
        max_stream_data=core_stream,
        verify_mode=ssl.CERT_NONE,  # the certificate is not identity; see auth
        initial_rtt=0.1,  # as aioquic
        supported_versions=[QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2],  # as aioquic
    )
    if not is_client:
        qcfg.load_cert_chain(*_process_certificate_pem())
    extra = {} if is_client else {"original_destination_connection_id": odcid,
                                  "retry_source_connection_id": retry_scid}
    return Qh3Machine(credit, max_streams=max_streams, core_windows=(core_conn, core_stream), configuration=qcfg,
                      **extra)
