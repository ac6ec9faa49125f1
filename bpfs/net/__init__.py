"""bpfs networking: QUIC transport, peer authentication, message codec, request/response.

Modules, bottom up (each imports only modules listed before it; no circle):

- `errors`:  exceptions and application error codes.
- `codec`:   typed, versioned, size-bounded messages; `encode` / `decode` / `ProtocolError`.
- `relay`:   datagrams beside QUIC on the same socket: relay frames (`RelayPath`), punch probes.
- `udp`:     the socket's system calls: datagrams for one destination batched per call (UDP GSO),
  coalesced reads split apart (UDP GRO), one datagram per call where the kernel refuses.
- `machine`: the interface of a QUIC machine (`BpfsQuic`), aioquic's QuicConnection adapted
  to it (`AioquicMachine`: consumption-based credit, stream limits, pacing), the
  per-connection receive credit (`Credit`), the per-process TLS certificate and the channel
  binding. The only module that touches aioquic internals, each behind a named helper;
  `check_aioquic` verifies them at import.
- `machine_qh3`: qh3 (Rust core, the same sans-IO calls) adapted to `BpfsQuic`; the only
  module that touches qh3 internals, checked by `check_qh3` against the pinned version.
  The default; imported only when chosen.
- `library`: which of the two a connection uses (`TransportConfig.quic_library`, `BPFS_QUIC`).
- `auth`:    mutual Ed25519 authentication bound to the connection (stream 0).
- `retry`:   address validation with QUIC Retry: the tokens and the Retry packet.
- `stream`:  one QUIC stream: bounded buffered reads, bounded writes, reset; `StreamHost`,
  the interface a stream needs from its connection.
- `quic`:    `Endpoint` (one trio UDP socket, its I/O through `udp`; dials and listens),
  `Connection` (implements `StreamHost`), `open_endpoint`, `TransportConfig`; every resource
  bounded, and a handshake flood answered with Retry and kept from crowding out peers that
  prove their address. Re-exports the errors, `RelayPath` and `Stream`.
- `rpc`:     one request per stream; `Dispatcher` with per-peer rate limits.

Networking only: nothing here knows about files, chunks or stores.
"""
