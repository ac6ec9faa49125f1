"""bpfs networking: QUIC transport, peer authentication, message codec, request/response.

Layers, bottom up (each module imports only those above it in this list):

- `quic`:  aioquic's sans-IO QuicConnection driven by trio UDP sockets. `Endpoint` (one
  UDP socket, listens and dials), `Connection`, `Stream`; every resource bounded.
- `auth`:  mutual Ed25519 authentication bound to the QUIC/TLS session (channel binding).
- `codec`: typed, versioned, size-bounded messages; `encode` / `decode` / `ProtocolError`.
- `rpc`:   one request per QUIC stream; a dispatcher with per-peer rate limits.

Networking only: nothing here knows about files, chunks or stores.
"""
