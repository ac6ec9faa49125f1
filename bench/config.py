"""Workload names and the sizes of a full run and of a ``--quick`` run."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024
GiB = 1024 * MiB

#: Timed workloads reported as rates (MB/s, ops/s, files/s; higher is better).
RATES = ("seq_write", "seq_read", "create", "stat", "unlink", "untar")
#: The many-file tree, one sequence on the same tree per target and run, each step timed on its own
#: and reported in seconds (lower is better): extract its gzip'd tar, md5sum -c every file (cold),
#: ls -lR (cold), rm -rf.
TREE = ("tree_extract", "tree_md5", "tree_ls", "tree_rm")
#: Timed workloads, repeated ``--runs`` times on every target.
TIMED = RATES + TREE
#: Deduplication figures (bpfs and restic), measured once: the sizes are deterministic.
DEDUP = ("dedup_copy", "dedup_insert")
#: Replication to a partner over loopback and recovery from it (bpfs, the raw aioquic ceiling, rsync).
NETWORK = ("replication",)
#: Through a broker over loopback: pairing by code, request rates, the relay (bench/rendezvous/).
RENDEZVOUS = ("rendezvous",)
#: Storage audits of a partner over loopback: bytes and holder CPU per audit, simulated detection (bench/audit.py).
AUDIT = ("audit",)
#: Recovery from one partner next to two over loopback (bench/recovery.py).
RECOVERY = ("recovery",)
ALL = TIMED + DEDUP + NETWORK + RENDEZVOUS + AUDIT + RECOVERY
#: Names ``--only`` also accepts, each standing for several workloads.
GROUPS = {"tree": TREE}


def expand(names: list[str]) -> tuple[list[str], list[str]]:
    """(the workloads ``names`` stand for, in ``ALL`` order; the names that are neither a workload
    nor a group). Hyphens count as underscores: ``tree-md5`` is ``tree_md5``."""
    wanted: set[str] = set()
    unknown = []
    for name in names:
        name = name.strip().replace("-", "_")
        if name in GROUPS:
            wanted.update(GROUPS[name])
        elif name in ALL:
            wanted.add(name)
        elif name:
            unknown.append(name)
    return [w for w in ALL if w in wanted], unknown

#: Filesystems for the timed workloads, in column order.
TARGETS = ("raw", "gocryptfs", "bpfs")
#: Everything ``--targets`` accepts: restic takes part in the dedup figures only.
ALL_TARGETS = TARGETS + ("restic",)

#: Passphrase used for every store created by the benchmark (all throw-away).
PASSPHRASE = "bench-passphrase"

#: Block size of the dd-like sequential write and read.
BLOCK = 1 * MiB


@dataclass(frozen=True)
class Sizes:
    """How big each workload is."""

    seq_bytes: int  # the sequential write/read file
    nfiles: int  # create/stat/unlink
    src_files: int  # files in the generated source tarball
    src_bytes: int  # total bytes of those files
    tree_files: int  # files in the many-file tree (tree_extract, tree_md5, tree_ls, tree_rm)
    tree_median: int  # their median size in bytes (log-normal sizes)
    tree_sigma: float  # the log-normal's shape: the standard deviation of log(size)
    tree_bytes: int  # the tree copied in twice (dedup_copy)
    insert_bytes: int  # the file that gets one byte inserted at its start (dedup_insert)
    repl_bytes: int  # replicated to a partner, then recovered (replication)
    relay_bytes: int  # sent through the broker's relay, and directly (rendezvous)
    broker_requests: int  # pings, lookups, announcements on open connections, each (rendezvous)
    broker_connects: int  # announcements each on a new connection (rendezvous)
    audit_bytes: int  # held by a partner that is then audited (audit)
    recovery_bytes: int  # recovered from one partner, then from two (recovery)


FULL = Sizes(
    seq_bytes=1 * GiB,
    nfiles=10_000,
    src_files=5_000,
    src_bytes=60_000_000,
    tree_files=36_000,  # about 167 MB in 3,000 folders, a 170 MB .tar.gz
    tree_median=4096,
    tree_sigma=0.5,
    tree_bytes=1 * GiB,
    insert_bytes=256 * MiB,
    repl_bytes=1 * GiB,
    relay_bytes=256 * MiB,
    broker_requests=20_000,
    broker_connects=2_000,
    audit_bytes=1 * GiB,
    recovery_bytes=1 * GiB,
)

QUICK = Sizes(
    seq_bytes=256 * MiB,
    nfiles=2_000,
    src_files=1_500,
    src_bytes=18_000_000,
    tree_files=3_000,  # about 14 MB in 250 folders
    tree_median=4096,
    tree_sigma=0.5,
    tree_bytes=256 * MiB,
    insert_bytes=64 * MiB,
    repl_bytes=256 * MiB,
    relay_bytes=64 * MiB,
    broker_requests=5_000,
    broker_connects=500,
    audit_bytes=256 * MiB,
    recovery_bytes=256 * MiB,
)


def human_bytes(n: int) -> str:
    """1073741824 -> '1GiB', 268435456 -> '256MiB', 60000000 -> '60MB'."""
    for unit, size in (("GiB", GiB), ("MiB", MiB)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    if n >= 1_000_000:
        return f"{n / 1e6:.0f}MB"
    return f"{n}B"
