"""Replication and recovery over loopback, per QUIC library and UDP I/O mode: bpfs next to the raw ceiling and rsync.

Run: ``python -m bench.replication [--quick] [--runs N] [--gib X] [--library aioquic,qh3]
[--offload on,off] [--no-recovery]`` (as root: it drops the page cache before each timed
transfer and starts a private sshd); ``python -m bench`` runs it too (workload ``replication``,
every combination). Each combination of QUIC library (``--library``: aioquic, qh3; the
environment variable BPFS_QUIC of every bpfs process, which the daemons inherit) and UDP I/O mode
(``--offload``: on = UDP GSO + GRO, off = one datagram per system call; BPFS_UDP_OFFLOAD=1 / 0)
is measured in every run, by default all four (``--quick``: 256 MiB and one run, a few
minutes). For each, in a fresh directory:

- bpfs replication: new stores, B served by ``bpfs serve B --listen 127.0.0.1:0``, A
  mounted with ``--listen 127.0.0.1:0``; B invites A (``pair B --accept A --offer 4G --ask 4G``).
  The data (incompressible, generated from a seed) is copied into A's mount and fsync'ed
  into packs while A has no partner yet, so nothing replicates early. Timed: ``bpfs pair A
  --direct 127.0.0.1:PORT --expect B --yes`` then ``bpfs sync A`` (A's mount daemon does the
  replication); throughput = data bytes / seconds. CPU: user + system time of A's mount
  daemon (sender) and B's serve daemon (receiver) over that interval, per GiB of data.
  Afterwards (untimed) the daemons are checked from /proc: their BPFS_QUIC and BPFS_UDP_OFFLOAD,
  and qh3's native module mapped into them or not; a mismatch is reported as a problem.
- raw ceiling: ``bench/quic_ceiling.py``'s process mode (one stream, sender here, receiver in a
  child process, bpfs.net transport) with the same library and I/O mode, moving the same number
  of bytes, with the datagram size and congestion control of bpfs's ``TransportConfig`` defaults
  (qh3: CUBIC, its only one); the datagrams per system call of each end are recorded.
- bpfs recovery, per library, in the first ``--offload`` mode given (default on): a store C
  serves and invites A too. After the replication A is unmounted (its disk is "lost"); timed:
  ``bpfs recover NEW --from 127.0.0.1:PORT --expect B`` (recovery secret in BPFS_RECOVERY), from
  B alone. Then, untimed, A is mounted again, a small file written (so that a new snapshot lists
  C among A's partners), A paired with C and synced, A unmounted; timed: ``bpfs recover NEW2
  --from B``: C comes from the snapshot's partner list and the packs from both at once (the
  ``partners`` of ``bpfs recover --json`` says which sent bytes). CPU of the recover process and
  of each partner daemon. Checked afterwards, untimed: NEW and NEW2 mount and the file's SHA-256
  matches. (bench/recovery.py measures the same with partners behind limited uplinks too.)
- rsync, once per run: ``rsync -a`` of the same data as a plain file over ssh to a private sshd
  on 127.0.0.1 (throwaway host and client keys, default ciphers). CPU: the client (rsync + ssh)
  and the sshd side (its session and the remote rsync), per GiB.

The order of the transfers (bpfs and ceiling of each combination, rsync) rotates from run to
run. Medians over runs are printed with min-max, per combination: throughput of bpfs and of the
ceiling, their ratio (taken within each run), CPU s/GiB of each end and of both, recovery time
from one partner and from two; then the aims of issue 15.

Modules: ``harness`` (the stores, their daemons and the sshd: set-up and tear-down; the library
and I/O environment), ``measure`` (the timed transfers, their CPU, the runs), ``report``
(medians, the printed section), ``cli`` (``python -m bench.replication``).
"""

from bench.replication.harness import (LIBRARIES, OFFLOADS, QUOTA, SYNC_TIMEOUT, BpfsPair, ReplicationError, Sshd,
                                       make_source, quic_env)
from bench.replication.measure import (quic_ceiling, recover, recover_into, recover_one_and_two, replicate, rsync,
                                       run_replication)
from bench.replication.report import combo_key, print_report, report_lines, summarize

__all__ = [
    "LIBRARIES", "OFFLOADS", "QUOTA", "SYNC_TIMEOUT", "BpfsPair", "ReplicationError", "Sshd", "make_source",
    "quic_env", "quic_ceiling", "recover", "recover_into", "recover_one_and_two", "replicate", "rsync",
    "run_replication", "combo_key", "print_report", "report_lines", "summarize",
]
