"""The set-up of the rendezvous benchmark: the broker process (the test suite's ``BrokerProcess``
with the bench's config, its CPU, memory and relay counters), the served stores of the pairing
figure (``Stores``), the stores simulated in this process (``SimStore``), and the shape of the
load the measurements put on the broker."""

from __future__ import annotations

import datetime
import json
import os
import random
import subprocess
import time
from pathlib import Path

from bench import proc
from bench.cleanup import Cleanup
from bench.targets import REPO, bpfs_command, bpfs_env, store_log_tail

from bpfs.identity import Identity
from bpfs.rendezvous import wire as P
from tests.helpers import broker as test_broker
from tests.helpers.broker import RAISED_RATES

CONNECTIONS = 4  # connections of the one asking identity (pings, lookups)
IN_FLIGHT = 64  # requests outstanding at any time (pings, lookups, announcements)
ANNOUNCERS = 16  # new connections being set up at once (announcements on new connections)
TARGETS = 64  # stores announced (then disconnected) for the lookups to find

#: The bench broker's settings: every key it changes from the defaults, and why (printed).
BROKER_CONFIG = """\
# bench/rendezvous: bounds raised so that they do not shape the figures
relay_rate = "64G"            # default 4M (bytes/s per identity): the relay figure would read 4 MiB/s
relay_burst = "1G"            # default 1M
relay_daily_bytes = "1T"      # default 8G a day
max_keys_per_source = 100000  # default 64: this one process announces many stores from 127.0.0.1
max_connections_per_source = 1024  # default 16
max_pending = 256
max_pending_per_source = 64   # default 8
request_rate = 1000000.0      # default 50 requests/s per identity
request_burst = 1000000.0     # default 100
stats_interval = 1            # a relay_stats log line every second (the dropped-frame counts)
""" + RAISED_RATES + """
[rates.mailbox_open]
per_minute = 1000
burst = 100
source_per_minute = 1000
source_burst = 100

[rates.mailbox_join]
per_minute = 1000
burst = 100
source_per_minute = 1000
source_burst = 100
"""
CONFIG_NOTE = ("the bench broker raises its relay caps (relay_rate 64 GiB/s, relay_burst 1 GiB, "
               "relay_daily_bytes 1 TiB; defaults 4 MiB/s, 1 MiB, 8 GiB a day), its request rates and "
               "its per-source connection and key counts (one process on 127.0.0.1 plays many stores)")


class RendezvousError(RuntimeError):
    """A step went wrong: a refusal, a command that failed, data that differs."""


# -- the broker process ---------------------------------------------------------------------------

class BrokerProcess(test_broker.BrokerProcess):
    """The test suite's broker program (tests/helpers/broker.py: ``python -m broker --listen
    127.0.0.1:0``, JSON log) with BROKER_CONFIG and without debug logs, its state in ``base``, its
    pid registered with the cleanup."""

    def __init__(self, base: Path, cleanup: Cleanup):
        super().__init__(base, config=BROKER_CONFIG, env={**os.environ, **bpfs_env()}, verbose=False)
        self.base = base
        self.cleanup = cleanup

    def start(self) -> "BrokerProcess":
        try:
            super().start()
        except AssertionError:
            self.stop()
            raise RendezvousError(f"the broker did not start: {self.log_tail()}") from None
        finally:
            if self.proc is not None:
                self.cleanup.add_pid(self.proc.pid)
        return self

    def cpu(self) -> float:
        cpu = proc.cpu_seconds(self.proc.pid) if self.proc else None
        if cpu is None:
            raise RendezvousError(f"the broker process is gone: {self.log_tail()}")
        return cpu

    def rss(self) -> int | None:
        return proc.vm_hwm(self.proc.pid) if self.proc else None

    def relay_stats_after(self, t: float, timeout: float = 5.0) -> dict | None:
        """The first relay_stats log line written after unix time ``t`` (the broker's counters)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for doc in self.events("relay_stats"):
                if log_time(doc) > t:
                    return doc
            time.sleep(0.2)
        return None

    def log_tail(self, n: int = 15) -> str:
        return super().log_tail(n)


def log_time(doc: dict) -> float:
    return datetime.datetime.strptime(doc["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


# -- served stores (pairing) and simulated ones (requests) -----------------------------------------

class Stores:
    """New stores in ``base`` and their ``bpfs serve`` daemons, stopped by ``destroy``."""

    def __init__(self, base: Path, cleanup: Cleanup):
        self.base = base
        self.cleanup = cleanup
        self.ids: dict[str, str] = {}
        self.served: list[Path] = []
        self.problems: list[str] = []
        # No store talks to a broker unless told to (--broker on serve): not the public default.
        self.env = {**bpfs_env(), "BPFS_BROKER": "none"}

    def bpfs(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return proc.run(bpfs_command(*args), env=self.env, cwd=REPO, timeout=timeout)

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(bpfs_command(*args), env={**os.environ, **self.env}, cwd=REPO,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)

    def create(self, name: str, *serve_args: str) -> Path:
        path = self.base / name
        info = json.loads(self.bpfs("init", str(path), "--kdf", "interactive", "--json").stdout)
        self.ids[name] = info["peer_id"]
        self.served.append(path)
        self.bpfs("serve", str(path), "--listen", "127.0.0.1:0", *serve_args)
        try:
            pid = int(json.loads((path / "daemon.json").read_text())["pid"])
            self.cleanup.add_pid(pid)
        except (OSError, ValueError, KeyError, TypeError):
            self.problems.append(f"{name}: `bpfs serve` returned but daemon.json has no readable pid")
        return path

    def address(self, name: str) -> str:
        info = json.loads(self.bpfs("id", "--store", str(self.base / name), "--json").stdout)
        addrs = [a for a in info.get("addresses") or [] if a.startswith("127.0.0.1:")]
        if not addrs:
            raise RendezvousError(f"`bpfs id --store {name} --json` gives no 127.0.0.1 address: {info}")
        return addrs[0]

    def partners(self, name: str) -> set[str]:
        rows = json.loads(self.bpfs("peers", str(self.base / name), "--json").stdout)
        return {r["peer_id"] for r in rows if r.get("state") != "ended"}

    def log_tail(self, lines: int = 10) -> str:
        return store_log_tail(self.served, lines)

    def destroy(self) -> None:
        for path in self.served:
            if (path / "daemon.json").exists():
                try:
                    self.bpfs("stop", str(path), timeout=120)
                except proc.CommandError as e:
                    self.problems.append(f"`bpfs stop {path.name}` failed: {str(e).splitlines()[0]}")


class SimStore:
    """A store simulated in this process: identity, addresses, one partner's lookup token."""

    def __init__(self, rng: random.Random):
        self.identity = Identity(rng.randbytes(32))
        self.public_key = self.identity.public_key
        self.token = P.lookup_token(rng.randbytes(32), bytes(32), 0, self.public_key)  # opaque to the broker
        n = rng.randrange(1 << 24)
        self.addresses = [f"10.{n >> 16}.{n >> 8 & 255}.{n & 255}:{1024 + n % 60000}"]
        self.seq = 0

    def announce_msg(self, broker_public_key: bytes) -> P.Announce:
        self.seq += 1
        return P.signed_announcement(self.identity, broker_public_key, self.seq, time.time() + 600, self.addresses,
                                     [P.verifier(self.token)])

