"""The `bpfs` command line: one module per group of commands, the shared options declared once.

- `app`: the command group and `main` (errors become one line on stderr and an exit code).
- `options`: the store argument (`[STORE]` or `--store`, default $BPFS_STORE, else
  ~/.local/share/bpfs/store), `--json`, `--passphrase-file`, and reaching a store's daemon.
- `store`: init, verify, id, snapshots.
- `mount`: mount, umount, serve, stop.
- `partners`: pair, peers, unpair, status, sync, challenge, reputation.
- `recover`: recover.
"""

from __future__ import annotations

from . import mount, partners, recover, store  # noqa: F401  (each registers its commands)
from .app import cli, main

__all__ = ["cli", "main"]
