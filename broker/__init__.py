"""The bpfs broker: a small public rendezvous server for bpfs stores.

It helps stores find each other (signed, expiring announcements looked up by token), pair by
short code (mailboxes), get through NAT (punch requests) and, when that fails, relays their
end-to-end encrypted QUIC traffic. It never learns keys or file data. Modules, one job each:

- `protocol`: the wire contract (messages, bounds, derivations) shared with the client.
- `config`:   `BrokerConfig`, every bound, loaded from TOML.
- `state`:    the pure state machine: announcements, lookups, mailboxes, rate limits.
- `persist`:  LMDB journal of announcements, remembered seqs and mailboxes.
- `relay`:    relay sessions and the per-datagram forwarding path.
- `logs`:     structured one-line events (text or JSON).
- `server`:   `serve()`: the endpoint, the handlers, pushes, periodic work.
- `cli`:      the `bpfs-broker` command.

It imports from bpfs only `bpfs.net` and `bpfs.identity`.
"""
