"""Replication and recovery over loopback: bpfs next to the raw aioquic ceiling and rsync over ssh.

Run: ``python -m bench.replication [--quick] [--runs N] [--gib X]`` (as root: it drops the
page cache before each timed transfer and starts a private sshd); ``python -m bench``
runs it too (workload ``replication``). Each run, in a fresh directory:

- bpfs replication: two new stores, B served by ``bpfs serve B --listen 127.0.0.1:0``, A
  mounted with ``--listen 127.0.0.1:0``; B invites A (``pair B --accept A --offer 4G --ask 4G``).
  The data (incompressible, generated from a seed) is copied into A's mount and fsync'ed
  into packs while A has no partner yet, so nothing replicates early. Timed: ``bpfs pair A
  --direct 127.0.0.1:PORT --expect B --yes`` then ``bpfs sync A`` (A's mount daemon does the
  replication); throughput = data bytes / seconds. CPU: user + system time of A's mount
  daemon and B's serve daemon over that interval, per GiB of data.
- raw aioquic ceiling: ``bench/quic_ceiling.py``'s process mode (one stream, sender here,
  receiver in a child process, bpfs.net transport) moving the same number of bytes, with the
  datagram size and congestion control of bpfs's ``TransportConfig`` defaults.
- rsync: ``rsync -a`` of the same data as a plain file over ssh to a private sshd on
  127.0.0.1 (throwaway host and client keys, default ciphers). CPU: the client (rsync + ssh)
  and the sshd side (its session and the remote rsync), per GiB.
- bpfs recovery: A is unmounted (its disk is "lost"), then timed: ``bpfs recover NEW --from
  127.0.0.1:PORT --expect B`` (recovery secret in BPFS_RECOVERY); CPU of the recover process
  and of B's daemon. Checked afterwards, untimed: NEW mounts and the file's SHA-256 matches.

The order of bpfs / ceiling / rsync rotates from run to run. Medians over runs are printed
with min-max, and the ratios bpfs/ceiling, bpfs/rsync and recovery time against the aim.

Modules: ``harness`` (the stores, their daemons and the sshd: set-up and tear-down), ``measure``
(the timed transfers, their CPU, the runs), ``report`` (medians, the printed section), ``cli``
(``python -m bench.replication``).
"""

from bench.replication.harness import QUOTA, SYNC_TIMEOUT, BpfsPair, ReplicationError, Sshd, make_source
from bench.replication.measure import quic_ceiling, recover, replicate, rsync, run_replication
from bench.replication.report import print_report, report_lines, summarize

__all__ = [
    "QUOTA", "SYNC_TIMEOUT", "BpfsPair", "ReplicationError", "Sshd", "make_source", "quic_ceiling", "recover",
    "replicate", "rsync", "run_replication", "print_report", "report_lines", "summarize",
]
