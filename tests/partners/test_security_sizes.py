"""What a partner learns from sizes and timing: packs come in a few padded sizes, and small
changes are batched instead of each going out as a pack and a root of its own.

Real stores: a mounted owner replicating over QUIC on loopback to a `bpfs serve` holder; the
holder's view is the pack files it keeps for the owner (`Store.hosted_packs`).
"""

from __future__ import annotations

import random
import time

from bpfs.packs import PAD_MIN, padded_pack_size
from tests.helpers.partners import pair, wait_for

MiB = 1 << 20

QUICK_ROOTS = """
[replication]
snapshot_interval = 5
batch_delay = 0
"""

BATCHED = """
[replication]
snapshot_interval = 2
batch_bytes = "1M"
batch_delay = 25
"""


def _setup(stores, toml: str):
    a, b = stores.owner("A"), stores.server("B")
    (a.path / "bpfs.toml").write_text(toml)
    b.serve()
    a.mount()
    pair(a, b)
    return a, b


def _sizes(holder, owner) -> list[int]:
    return sorted(p.stat().st_size for p in holder.hosted_packs(owner.peer_id).values())


def test_a_partner_sees_few_padded_packs_for_many_tiny_files(stores):
    a, b = _setup(stores, QUICK_ROOTS)
    rng = random.Random(12)
    a.sync()
    before = set(b.hosted_packs(a.peer_id))
    for i in range(1000):
        (a.mnt / f"note-{i:04d}.txt").write_bytes(rng.randbytes(40))
    a.sync()
    tiny = {pid: p.stat().st_size for pid, p in b.hosted_packs(a.peer_id).items() if pid not in before}
    # one large file next to it, in a later round
    (a.mnt / "big.bin").write_bytes(rng.randbytes(40 * MiB))
    a.sync()
    seen = set(before) | set(tiny)
    big = {pid: p.stat().st_size for pid, p in b.hosted_packs(a.peer_id).items() if pid not in seen}

    # 1,000 files of 40 bytes: a handful of packs (data and snapshot metadata), not 1,000
    assert 1 <= len(tiny) <= 4, f"1,000 tiny files became {len(tiny)} packs at the partner: {sorted(tiny.values())}"
    for sizes in (tiny, big):
        odd = {pid: n for pid, n in sizes.items() if padded_pack_size(n) != n}
        assert not odd, f"packs whose size is not one of the padded sizes: {odd}"
    assert min(tiny.values()) >= PAD_MIN
    assert sum(big.values()) >= 40 * MiB


def test_small_changes_wait_for_more_data_or_the_batch_delay(stores):
    a, b = _setup(stores, BATCHED)
    a.sync()  # a root to start from; `bpfs sync` never waits
    start = a.status()["latest_generation"]
    (a.mnt / "small.txt").write_bytes(b"a small change " * 3)
    time.sleep(8)  # four snapshot intervals
    assert a.status()["latest_generation"] == start, "a 45-byte change got a root of its own at once"

    # enough new data: the next interval takes a root
    (a.mnt / "more.bin").write_bytes(random.Random(3).randbytes(2 * MiB))
    wait_for(lambda: a.status()["latest_generation"] > start, 30, "a root after 2 MiB of new data")
    after_data = a.status()["latest_generation"]

    # a small change alone goes out once the newest root is batch_delay (25 s) old
    (a.mnt / "small2.txt").write_bytes(b"another small change")
    t0 = time.monotonic()
    wait_for(lambda: a.status()["latest_generation"] > after_data, 60, "a root after the batch delay")
    waited = time.monotonic() - t0
    assert waited >= 15, f"the small change got its root after {waited:.1f} s, not after the batch delay"
