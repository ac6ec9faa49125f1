"""Which QUIC library a connection's state machine comes from (`TransportConfig.quic_library`).

`LIBRARIES`: "qh3" (the default; adapted in `machine_qh3`, imported only when chosen, since it
checks the installed qh3 on import) or "aioquic" (adapted in `machine`). `make_quic` builds the
machine of the chosen library; both implement `machine.BpfsQuic`. This module only chooses: it
sits above both adapters so that neither imports the other.
"""

from __future__ import annotations

from . import machine
from .machine import BpfsQuic, Credit

LIBRARIES = ("qh3", "aioquic")


def load_library(library: str) -> None:
    """Import the adapter of `library` (one of `LIBRARIES`): `ValueError` if unknown,
    `ImportError` if it is not installed or not the version `bpfs.net` was checked against."""
    if library not in LIBRARIES:
        raise ValueError(f"quic_library must be one of {', '.join(LIBRARIES)}, not {library!r}")
    if library == "qh3":
        from . import machine_qh3  # noqa: F401  (checks qh3 on import)


def make_quic(credit: Credit, *, library: str, is_client: bool, odcid: bytes | None, idle_timeout: float,
              max_datagram_size: int, congestion_control: str, max_streams: int,
              retry_scid: bytes | None = None, max_data: int | None = None,
              max_stream_data: int | None = None) -> BpfsQuic:
    """The QUIC machine of `library` (see `machine.make_quic` for the arguments). `max_data` /
    `max_stream_data` are the post-authentication windows: aioquic needs them not (its credit
    follows `credit` as it widens), qh3 fixes part of them in its core at construction (see
    `machine_qh3`); qh3 always uses CUBIC, whatever `congestion_control` says."""
    if library == "aioquic":
        return machine.make_quic(credit, is_client=is_client, odcid=odcid, idle_timeout=idle_timeout,
                                 max_datagram_size=max_datagram_size, congestion_control=congestion_control,
                                 max_streams=max_streams, retry_scid=retry_scid)
    load_library(library)
    from . import machine_qh3

    return machine_qh3.make_qh3(credit, is_client=is_client, odcid=odcid, retry_scid=retry_scid,
                                idle_timeout=idle_timeout, max_datagram_size=max_datagram_size,
                                max_streams=max_streams, max_data=max_data or credit.conn_window,
                                max_stream_data=max_stream_data or credit.stream_window)
