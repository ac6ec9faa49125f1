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
- ``datagen``    deterministic test data (random blocks, source tarball, trees)
- ``workloads``  the timed workloads (sequential write/read, files, untar)
- ``runner``     repeats the timed workloads over runs and targets
- ``dedup``      the deduplication figures for bpfs and restic
- ``replication`` replication to a partner over loopback and recovery, next to the raw
                 aioquic ceiling (``quic_ceiling``) and rsync over ssh to a private sshd
- ``rendezvous`` pairing by code, lookups and the relay through a broker over loopback, next to
                 direct pairing, pings and a direct connection
- ``stats``      medians, minima and maxima
- ``report``     the printed table and the JSON file
"""
