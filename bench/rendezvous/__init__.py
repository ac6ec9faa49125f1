"""Rendezvous through a broker over loopback: pairing by code, request rates, and the relay.

Run: ``python -m bench.rendezvous [--quick] [--runs N] [--json FILE] [--workdir DIR]``;
``python -m bench`` runs it too (workload ``rendezvous``). One broker process (``python -m broker``
on 127.0.0.1, its own state directory) serves the whole run. Its config raises the bounds that
would otherwise measure the broker's policy rather than the broker: the relay's per-identity
rate, burst and daily allowance (defaults 4 MiB/s, 1 MiB, 8 GiB a day: the relay figure would
read 4 MiB/s), the per-identity and per-source request rates, and the per-source connection and
key counts (this one process on 127.0.0.1 plays many stores). The report says so.

Each figure comes with a reference measured in the same run (the order rotates from run to run):

- pairing by code: two new stores (``bpfs init --kdf interactive``) served by ``bpfs serve
  --listen 127.0.0.1:0 --broker BROKER``. Timed from starting ``bpfs pair A --yes --json`` (the
  joiner, ``bpfs pair B CODE --yes --json``, starts as soon as the code line appears) until both
  exited 0. Reference: direct pairing between two other new served stores, ``bpfs pair D --accept
  C`` then ``bpfs pair C --direct D_ADDR --expect D --yes``. Ratio: code / direct (seconds).
- request rates, this process against the broker: ``Ping`` round trips (the reference: transport
  and request/response layers with a handler that does nothing), ``Lookup``s that hit (tokens of
  stores that announced and then disconnected, so the broker pushes no Punch), and
  ``Announce``s of stores each over its own open connection (seq growing); IN_FLIGHT requests
  outstanding at any time over CONNECTIONS connections. Ratios to pings/s. Also announcements
  each on a new connection (QUIC handshake + authentication + announce, ANNOUNCERS at a time),
  which is what a store coming online costs. CPU ms per request of the broker and of this
  process are shown: the client side is Python too, and whichever is busier bounds the rate.
- relay: two QUIC endpoints in this process (one trio loop, so sender and receiver share one
  core; the broker has its own process), each with a broker connection. A announces; B opens a
  relay session (RelayOpen: the broker offers it to A over A's connection and A accepts it), dials
  A through the relay and sends DATA bytes on one stream, SHA-256 checked at A. Reference: the
  same endpoints, a direct connection, the same bytes. MB/s of both and the ratio, the broker's
  CPU seconds per relayed GiB (/proc/PID/stat utime + stime) and the frames it dropped (from its
  relay_stats log line).

Modules: ``harness`` (the broker process, the served and simulated stores: set-up and tear-down),
``measure`` (the timed pairings, request rates and transfers; the runs), ``report`` (medians,
ratios, the printed section), ``cli`` (``python -m bench.rendezvous``).
"""

from bench.rendezvous.harness import BROKER_CONFIG, CONFIG_NOTE, BrokerProcess, RendezvousError
from bench.rendezvous.measure import FIGURES, FULL, QUICK, run_rendezvous, sizes_of
from bench.rendezvous.report import print_report, report_lines, summarize

__all__ = [
    "BROKER_CONFIG", "CONFIG_NOTE", "BrokerProcess", "RendezvousError", "FIGURES", "FULL", "QUICK", "run_rendezvous",
    "sizes_of", "print_report", "report_lines", "summarize",
]
