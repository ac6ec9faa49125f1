"""Partners: pairing, holding partners' data, replicating ours, and recovering from them.

Layers (each uses only the ones below it):
  service     the partner service of a daemon (or of one CLI command): endpoint, links, holder,
              replicator, and the operations the CLI asks for (pair, peers, status, sync, unpair)
  control     the Unix socket through which the CLI asks a running daemon
  replicator  what of ours goes to which partner, when; roots; releases; bandwidth and window
  recovery    rebuilding a store from a partner
  holder      serving partners' requests: pairing, quotas, hosted objects, grace deletions
  links       one cached authenticated connection per partner, redialled with backoff
  ledger      what we agreed and what is where (LMDB in STORE/partners)
  protocol    the messages
The transport (`bpfs.net`) knows nothing of this; nothing here knows about files or FUSE.
"""
