"""Benchmark harness for bpfs (run it with ``python -m bench`` or ``make bench``).

It compares bpfs against the raw disk (a plain directory) and gocryptfs, all on
the same disk, against restic for the deduplication figures, and its replication
and recovery against the raw aioquic ceiling and rsync over ssh, and the rendezvous figures
(pairing by code, lookups, the relay) against direct pairing, pings and a direct connection. Every
filesystem instance lives in a temporary directory under the work directory and
is unmounted and removed at the end, also after an error or Ctrl-C.

Modules, one job each:

- ``cli``        command-line flags and the top-level flow
- ``config``     workload names and the full / ``--quick`` sizes
- ``proc``       running commands, the mount table, dropping caches, daemon RSS
- ``cleanup``    unmounting and removing everything on exit or on a signal
- ``targets``    the filesystems under test: raw, gocryptfs, bpfs
- ``datagen``    deterministic test data (random blocks, source tarball, the many-file tree, trees)
- ``workloads``  the timed workloads (sequential write/read, files, untar, the many-file tree:
                 extract, md5sum -c, ls -lR, rm -rf)
- ``runner``     repeats the timed workloads over runs and targets
- ``dedup``      the deduplication figures for bpfs and restic
- ``replication`` (a package: ``harness``, ``measure``, ``report``, ``cli``) replication to a
                 partner over loopback and recovery, next to the raw aioquic ceiling
                 (``quic_ceiling``) and rsync over ssh to a private sshd
- ``rendezvous`` (a package: ``harness``, ``measure``, ``report``, ``cli``) pairing by code,
                 lookups and the relay through a broker over loopback, next to direct pairing,
                 pings and a direct connection
- ``recovery``   recovery from one partner next to two; ``audit`` storage audits
- ``standalone`` what each of those does when run on its own (``python -m bench.NAME``)
- ``stats``      medians, minima and maxima
- ``report``     the printed table and the JSON file

The mount table, process checks, the broker process and the folder sizes come from the test
suite's helpers (``tests/helpers/``), so the benchmarks and the tests rely on the same code; run
from the repository root, as ``make bench`` does.
"""
