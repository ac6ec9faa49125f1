"""The QUIC state machine: aioquic's `QuicConnection`, adapted, and its TLS material.

This module is the only one that touches aioquic internals; `check_aioquic()` verifies at
import time that they are still there, so an aioquic upgrade fails loudly instead of
silently losing a bound. What we change, and why:

- Receive credit (`_write_connection_limits`, `_write_stream_limits`): aioquic doubles a
  window whenever half of it has *arrived*, so memory grows with whatever the peer sends.
  We grant credit as the application *consumes*: limit = consumed + window, raised in
  steps of a quarter window, never for a stream the peer's MAX_STREAMS still blocks.
- Stream limits: the peer may open `max_streams` bidirectional streams at a time and no
  unidirectional ones (`_local_max_streams_bidi/_uni`).
- Pacing (`_Pacer`): bursts of `TIMER_GRANULARITY` worth of the pacing rate, because a
  trio sleep lasts at least a millisecond (see the class).

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
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from typing import TYPE_CHECKING

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.recovery import QuicPacketPacer

from .errors import AuthenticationError

if TYPE_CHECKING:
    from .quic import Connection

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


def export_binding(quic: QuicConnection) -> bytes:
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


def check_aioquic() -> None:
    for attr in ("_write_connection_limits", "_write_stream_limits", "get_timer", "handle_timer"):
        if not callable(getattr(QuicConnection, attr, None)):
            raise ImportError(f"bpfs.net: unsupported aioquic (no QuicConnection.{attr})")
    probe = QuicConnection(configuration=QuicConfiguration(is_client=True))
    for attr in ("_local_max_data", "_local_max_streams_bidi", "_local_max_streams_uni", "_streams", "_loss"):
        if not hasattr(probe, attr):
            raise ImportError(f"bpfs.net: unsupported aioquic (no QuicConnection.{attr})")
    if not isinstance(getattr(probe._loss, "_pacer", None), QuicPacketPacer):
        raise ImportError("bpfs.net: unsupported aioquic (no QuicPacketRecovery._pacer)")


check_aioquic()


class _Pacer(QuicPacketPacer):
    """aioquic's pacer allows bursts of at most 16 packets, then asks to wait a few
    microseconds; a trio sleep lasts at least a millisecond (epoll), which capped a
    stream at ~20 MB/s. Allow bursts worth `TIMER_GRANULARITY` of the pacing rate, as
    kernel pacing with a coarse timer does (the congestion window still bounds what is
    in flight)."""

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window=congestion_window, smoothed_rtt=smoothed_rtt)
        self.bucket_max = max(self.bucket_max, TIMER_GRANULARITY)


class BpfsQuic(QuicConnection):
    """QuicConnection with consumption-based receive credit and our stream limits."""

    def __init__(self, owner: "Connection", **kwargs):
        super().__init__(**kwargs)
        self._owner = owner
        cfg = owner._cfg
        for limit, value in ((self._local_max_streams_bidi, cfg.max_streams), (self._local_max_streams_uni, 0)):
            limit.value = limit.sent = value
        self._loss._pacer = _Pacer(max_datagram_size=self._max_datagram_size)

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




def make_quic(owner, *, is_client: bool, odcid: bytes | None, max_datagram_size: int | None = None) -> BpfsQuic:
    """The QUIC machine of `owner` (a `quic.Connection`), configured from `owner._cfg`
    with the pre-authentication windows (and a smaller datagram size if given)."""
    cfg = owner._cfg
    qcfg = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        connection_id_length=CID_LENGTH,
        idle_timeout=cfg.idle_timeout,
        max_datagram_size=max_datagram_size or cfg.max_datagram_size,
        max_data=cfg.preauth_window,
        max_stream_data=cfg.preauth_window,
        congestion_control_algorithm=cfg.congestion_control,
        verify_mode=ssl.CERT_NONE,  # the certificate is not identity; see auth
    )
    if not is_client:
        qcfg.certificate, qcfg.private_key = process_certificate()
    return BpfsQuic(owner, configuration=qcfg, original_destination_connection_id=odcid)
