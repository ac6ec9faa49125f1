"""bpfs networking: QUIC transport, peer authentication, message codec, request/response.

Modules, bottom up (each imports only modules listed before it):

- `errors`:  exceptions and application error codes.
- `machine`: aioquic's QuicConnection adapted (consumption-based credit, stream limits,
  pacing), the per-process TLS certificate and the channel binding. The only module
  that touches aioquic internals.
- `stream`:  one QUIC stream: bounded buffered reads, bounded writes, reset.
- `quic`:    `Endpoint` (one trio UDP socket; dials and listens), `Connection`,
  `open_endpoint`, `TransportConfig`; every resource bounded.
- `auth`:    mutual Ed25519 authentication bound to the connection (stream 0).
- `codec`:   typed, versioned, size-bounded messages; `encode` / `decode` / `ProtocolError`.
- `rpc`:     one request per stream; `Dispatcher` with per-peer rate limits.

Networking only: nothing here knows about files, chunks or stores.
"""
