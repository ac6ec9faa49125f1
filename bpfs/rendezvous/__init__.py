"""bpfs rendezvous: finding partners and pairing through brokers, from a store's side.

Modules, bottom up:

- `words`:    the 256 words of pairing codes.
- `pairing`:  the code's format, the SPAKE2 exchange and the messages it seals (no I/O).
- `beacon`:   recovery beacons: the keys with which partners can be found after a disaster.
- `brokers`:  broker addresses resolved, the one broker connection a store holds, its signed
              announcement, what the broker pushes (punch requests, relay offers), requests.
- `dialer`:   reaching a partner: known addresses, then the broker's (hole punching), then the
              broker's relay; every path must authenticate the partner's identity.
- `codepair`: a pairing by code, step by step (creator: open, wait, decide; joiner: join, decide).

The wire messages between a store and a broker, and the lookup tokens bound to a broker and a
day (`LookupKey`), are `bpfs.rendezvous.wire`. The partner service
(`bpfs.peering.service`) owns these objects; nothing here knows of files, ledgers or holders.
"""
