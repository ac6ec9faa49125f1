"""`max_file_size` (issue 13, "Defaults and setup"): files larger than it stay on the drive like
`.backupignore`d ones, and move between the lanes as they cross it; `bpfs status` counts them."""

from __future__ import annotations

import os
import random

from tests.helpers.partners import MiB, pair, wait_for, write_random

KiB = 1 << 10


def _kept_local(store) -> tuple[int, int]:
    dur = store.status().get("durability") or {}
    return dur.get("local_files", -1), dur.get("local_bytes", -1)


def test_files_over_max_file_size_stay_local_move_when_they_cross_it_and_are_counted(stores):
    a = stores.owner("A")
    b = stores.server("B")
    (a.path / "bpfs.toml").write_text('[replication]\nmax_file_size = "1M"\n')
    b.serve()
    a.mount()
    pair(a, b)
    big, small = a.mnt / "big.bin", a.mnt / "small.bin"
    write_random(big, 3 * MiB, seed=1)
    write_random(small, 100 * KiB, seed=2)
    a.sync()
    held = b.hosted(a.peer_id)["pack_bytes"]
    assert 100 * KiB <= held < 1 * MiB, f"B holds {held} bytes: the small file and metadata only, not the big one"
    wait_for(lambda: _kept_local(a) == (1, 3 * MiB), 30, "status counting the big file as kept local",
             diag=lambda: str(a.status().get("durability")))
    text = a.bpfs("status").stdout
    assert "1 file (3.0 MiB) kept local (.backupignore, max_file_size)" in text, text

    # cut below the limit: it replicates
    os.truncate(big, 500 * KiB)
    a.sync()
    grown = b.hosted(a.peer_id)["pack_bytes"]
    assert grown - held >= 500 * KiB, f"B went from {held} to {grown} bytes: the truncated file was not sent"
    wait_for(lambda: _kept_local(a)[0] == 0, 30, "status counting nothing kept local",
             diag=lambda: str(a.status().get("durability")))

    # grown past the limit: what it gains stays local, and it is counted again
    with open(small, "ab") as f:
        f.write(random.Random(3).randbytes(2 * MiB))
    a.sync()
    after = b.hosted(a.peer_id)["pack_bytes"]
    assert after - grown < 1 * MiB, f"B went from {grown} to {after} bytes: the grown file was sent"
    wait_for(lambda: _kept_local(a) == (1, 2 * MiB + 100 * KiB), 30, "status counting the grown file",
             diag=lambda: str(a.status().get("durability")))
    # both read back whole
    assert os.path.getsize(big) == 500 * KiB and os.path.getsize(small) == 2 * MiB + 100 * KiB
