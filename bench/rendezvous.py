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
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import trio

from bench import config, proc, stats
from bench.cleanup import Cleanup
from bench.config import GiB, MiB, human_bytes
from bench.targets import REPO, bpfs_command, bpfs_env, store_log_tail

from bpfs.identity import Identity
from bpfs.net.codec import Ping
from bpfs.net.quic import RelayPath, TransportConfig, open_endpoint
from bpfs.net.rpc import Dispatcher, RemoteError, request
from bpfs.rendezvous import wire as P

CONNECTIONS = 4  # connections of the one asking identity (pings, lookups)
IN_FLIGHT = 64  # requests outstanding at any time (pings, lookups, announcements)
ANNOUNCERS = 16  # new connections being set up at once (announcements on new connections)
TARGETS = 64  # stores announced (then disconnected) for the lookups to find
CHUNK = 1 << 20
REQUEST_TIMEOUT = 60.0
PAIR_TIMEOUT = 180.0

#: The bench broker's settings: every key it changes from the defaults, and why (printed).
BROKER_CONFIG = """\
# bench/rendezvous.py: bounds raised so that they do not shape the figures
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

[rates.announce]
per_minute = 1000000
burst = 1000000
source_per_minute = 1000000
source_burst = 1000000

[rates.lookup]
per_minute = 1000000
burst = 1000000
source_per_minute = 1000000
source_burst = 1000000

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


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class RendezvousError(RuntimeError):
    """A step went wrong: a refusal, a command that failed, data that differs."""


# -- sizes ----------------------------------------------------------------------------------------

def sizes_of(sizes: config.Sizes) -> dict:
    return {"relay_bytes": sizes.relay_bytes, "requests": sizes.broker_requests, "connects": sizes.broker_connects}


FULL = sizes_of(config.FULL)
QUICK = sizes_of(config.QUICK)


# -- the broker process ---------------------------------------------------------------------------

class BrokerProcess:
    """``python -m broker --listen 127.0.0.1:0`` with BROKER_CONFIG and a state directory in ``base``."""

    def __init__(self, base: Path, cleanup: Cleanup):
        self.base = base
        self.cleanup = cleanup
        self.log_path = base / "broker.log"
        self.proc: subprocess.Popen | None = None
        self.peer_id = ""
        self.address: tuple[str, int] = ("", 0)

    @property
    def text_address(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        config, ready = self.base / "broker.toml", self.base / "ready.json"
        config.write_text(BROKER_CONFIG)
        env = {**os.environ, **bpfs_env()}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker", "--listen", "127.0.0.1:0", "--state-dir", str(self.base / "state"),
                 "--config", str(config), "--ready-file", str(ready), "--log-format", "json"],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True)
        self.cleanup.add_pid(self.proc.pid)
        deadline = time.monotonic() + 30
        while not ready.exists() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not ready.exists():
            self.stop()
            raise RendezvousError(f"the broker did not start: {self.log_tail()}")
        doc = json.loads(ready.read_text())
        host, port = doc["address"].rsplit(":", 1)
        self.peer_id, self.address = doc["peer_id"], (host, int(port))

    def cpu(self) -> float:
        cpu = proc.cpu_seconds(self.proc.pid) if self.proc else None
        if cpu is None:
            raise RendezvousError(f"the broker process is gone: {self.log_tail()}")
        return cpu

    def rss(self) -> int | None:
        return proc.vm_hwm(self.proc.pid) if self.proc else None

    def events(self, name: str) -> list[dict]:
        out = []
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return out
        needle = f'"event":"{name}"'
        for line in lines:
            if needle not in line:
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event") == name:
                out.append(doc)
        return out

    def relay_stats_after(self, t: float, timeout: float = 5.0) -> dict | None:
        """The first relay_stats log line written after unix time ``t`` (the broker's counters)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for doc in self.events("relay_stats"):
                if _ts(doc) > t:
                    return doc
            time.sleep(0.2)
        return None

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no broker log)"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- pairing by code, and directly (the reference) ------------------------------------------------

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


def _finish(p: subprocess.Popen, what: str, deadline: float) -> tuple[float, str]:
    """Wait for ``p`` (until the monotonic ``deadline``); (the time it exited, its stdout)."""
    try:
        out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise RendezvousError(f"{what} did not finish within {PAIR_TIMEOUT:.0f} s") from None
    t = time.perf_counter()
    if p.returncode != 0:
        raise RendezvousError(f"{what} exited {p.returncode}: {proc._tail(err or out)}")
    return t, out


def pair_by_code(stores: Stores, a: str, b: str) -> dict:
    """Timed: ``bpfs pair A --yes --json``, the joiner with the code as soon as it is printed."""
    deadline = time.monotonic() + PAIR_TIMEOUT
    t0 = time.perf_counter()
    creator = stores.popen("pair", str(stores.base / a), "--yes", "--json")
    try:
        line = creator.stdout.readline()
        t_code = time.perf_counter()
        try:
            code = json.loads(line)["code"]
        except (ValueError, KeyError, TypeError):
            creator.kill()
            _, err = creator.communicate()
            raise RendezvousError(f"`bpfs pair A` printed no code: {line!r} {proc._tail(err)}") from None
        joiner = stores.popen("pair", str(stores.base / b), code, "--yes", "--json")
        t_joined, _ = _finish(joiner, "`bpfs pair B CODE`", deadline)
        t_created, _ = _finish(creator, "`bpfs pair A`", deadline)
    finally:
        if creator.poll() is None:
            creator.kill()
            creator.communicate()
    if stores.partners(a) != {stores.ids[b]} or stores.partners(b) != {stores.ids[a]}:
        raise RendezvousError("after pairing by code, `bpfs peers` does not show the two stores as partners")
    return {"seconds": max(t_joined, t_created) - t0, "code_seconds": t_code - t0,
            "joiner_seconds": t_joined - t0, "creator_seconds": t_created - t0}


def pair_direct(stores: Stores, c: str, d: str, d_address: str) -> dict:
    """Timed: ``bpfs pair D --accept C`` then ``bpfs pair C --direct D_ADDR --expect D --yes``."""
    t0 = time.perf_counter()
    stores.bpfs("pair", str(stores.base / d), "--accept", stores.ids[c], timeout=PAIR_TIMEOUT)
    t1 = time.perf_counter()
    stores.bpfs("pair", str(stores.base / c), "--direct", d_address, "--expect", stores.ids[d], "--yes",
                "--json", timeout=PAIR_TIMEOUT)
    t2 = time.perf_counter()
    if stores.partners(c) != {stores.ids[d]} or stores.partners(d) != {stores.ids[c]}:
        raise RendezvousError("after direct pairing, `bpfs peers` does not show the two stores as partners")
    return {"seconds": t2 - t0, "accept_seconds": t1 - t0, "direct_seconds": t2 - t1}


def pairing_run(base: Path, broker: BrokerProcess, run: int, cleanup: Cleanup, log, sample: dict,
                out: dict) -> None:
    stores = Stores(base, cleanup)
    step = "init and serve four stores"
    try:
        base.mkdir(parents=True)
        stores.create("A", "--broker", broker.text_address)
        stores.create("B", "--broker", broker.text_address)
        stores.create("C")
        stores.create("D")
        d_address = stores.address("D")
        order = ["code", "direct"] if run % 2 else ["direct", "code"]
        for name in order:
            step = f"pairing {name}"
            if name == "code":
                r = sample["pair_code"] = pair_by_code(stores, "A", "B")
                log(f"  run {run} pair by code   {r['seconds']:6.2f} s  (code printed after "
                    f"{r['code_seconds']:.2f} s, joiner done {r['joiner_seconds']:.2f} s, "
                    f"creator {r['creator_seconds']:.2f} s)")
            else:
                r = sample["pair_direct"] = pair_direct(stores, "C", "D", d_address)
                log(f"  run {run} pair directly  {r['seconds']:6.2f} s  (--accept {r['accept_seconds']:.2f} s, "
                    f"--direct {r['direct_seconds']:.2f} s)")
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - recorded, the other figures go on
        _error(out, "pairing", run, step, e, log, stores.log_tail() + "\n--- broker\n" + broker.log_tail())
    finally:
        stores.destroy()
        out["problems"] += [p for p in stores.problems if p not in out["problems"]]


# -- request rates --------------------------------------------------------------------------------

CLIENT_CONFIG = TransportConfig(socket_buffer=1 << 20)


class SimStore:
    """A store simulated in this process: identity, addresses, one partner's lookup token."""

    def __init__(self, rng: random.Random):
        self.identity = Identity(rng.randbytes(32))
        self.public_key = self.identity.public_key
        self.token = P.lookup_token(rng.randbytes(32), self.public_key)
        n = rng.randrange(1 << 24)
        self.addresses = [f"10.{n >> 16}.{n >> 8 & 255}.{n & 255}:{1024 + n % 60000}"]
        self.seq = 0

    def announce_msg(self, broker_public_key: bytes) -> P.Announce:
        self.seq += 1
        return P.signed_announcement(self.identity, broker_public_key, self.seq, time.time() + 600, self.addresses,
                                     [P.verifier(self.token)])


async def _call(conn, msg):
    try:
        return await request(conn, msg, registry=P.BROKER, timeout=REQUEST_TIMEOUT)
    except RemoteError as e:
        raise RendezvousError(f"the broker refused {type(msg).__name__}: {e.message}") from None


async def _announce_fresh(broker: BrokerProcess, store: SimStore) -> None:
    """Announce ``store`` over a new connection authenticated as it (the broker requires that)."""
    failure = None
    async with open_endpoint(store.identity, "127.0.0.1", 0, config=CLIENT_CONFIG, listen=False) as ep:
        conn = await ep.connect(broker.address, expected_peer=broker.peer_id)
        try:
            await _call(conn, store.announce_msg(conn.peer_public_key))
        except RendezvousError as e:  # raised outside the endpoint's nursery, not as an ExceptionGroup
            failure = e
        finally:
            conn.close()
    if failure is not None:
        raise failure


async def _announce_all(broker: BrokerProcess, stores: list[SimStore], at_once: int) -> None:
    limiter = trio.CapacityLimiter(at_once)

    async def one(store):
        async with limiter:
            await _announce_fresh(broker, store)

    async with trio.open_nursery() as nursery:
        for store in stores:
            nursery.start_soon(one, store)


async def _timed(broker: BrokerProcess, work: Callable, n: int) -> dict:
    """Run ``work()`` (an async callable doing ``n`` requests); wall, broker and client CPU."""
    b0, c0, t0 = broker.cpu(), time.process_time(), time.perf_counter()
    await work()
    t1, c1, b1 = time.perf_counter(), time.process_time(), broker.cpu()
    return {"n": n, "seconds": t1 - t0, "cpu_broker": b1 - b0, "cpu_client": c1 - c0}


async def _spread(n: int, workers: int, fn: Callable) -> None:
    """``n`` calls of ``fn(worker)`` by ``workers`` tasks, each one call at a time."""
    counts = [n // workers + (1 if w < n % workers else 0) for w in range(workers)]

    async def worker(w):
        for _ in range(counts[w]):
            await fn(w)

    async with trio.open_nursery() as nursery:
        for w in range(workers):
            nursery.start_soon(worker, w)


async def rates_run(broker: BrokerProcess, n: int, connects: int, run: int) -> dict:
    rng = random.Random(f"rates {run} {os.getpid()}")
    targets = [SimStore(rng) for _ in range(TARGETS)]
    await _announce_all(broker, targets, ANNOUNCERS)  # then disconnected: lookups push no Punch
    res: dict = {}
    async with open_endpoint(Identity(rng.randbytes(32)), "127.0.0.1", 0, config=CLIENT_CONFIG,
                             listen=False) as ep:
        conns = [await ep.connect(broker.address, expected_peer=broker.peer_id) for _ in range(CONNECTIONS)]

        async def ping(w):
            nonce = rng.getrandbits(32)
            reply = await request(conns[w % CONNECTIONS], Ping(nonce), registry=P.BROKER, timeout=REQUEST_TIMEOUT)
            if reply.nonce != nonce:
                raise RendezvousError(f"Pong {reply.nonce} for Ping {nonce}")

        async def lookup(w):
            target = targets[rng.randrange(TARGETS)]
            found = await _call(conns[w % CONNECTIONS], P.Lookup(target.token, []))
            if list(found.addresses) != target.addresses:
                raise RendezvousError(f"lookup found {found.addresses}, expected {target.addresses}")

        # Announcements over open connections: one store (and connection) per task in flight.
        announcers = [SimStore(rng) for _ in range(IN_FLIGHT)]
        async with trio.open_nursery() as nursery:
            eps = []
            for s in announcers:
                eps.append(await nursery.start(_hold_endpoint, s.identity))
            aconns = [await e.connect(broker.address, expected_peer=broker.peer_id) for e in eps]

            async def announce(w):
                await _call(aconns[w], announcers[w].announce_msg(aconns[w].peer_public_key))

            phases = {"ping": ping, "lookup": lookup, "announce": announce, "connect": None}
            names = list(phases)
            shift = (run - 1) % len(names)
            for name in names[shift:] + names[:shift]:
                if name == "connect":
                    fresh = [SimStore(rng) for _ in range(connects)]
                    res[name] = await _timed(broker, lambda: _announce_all(broker, fresh, ANNOUNCERS), connects)
                else:
                    fn = phases[name]
                    res[name] = await _timed(broker, lambda: _spread(n, IN_FLIGHT, fn), n)
            for c in aconns:
                c.close()
            nursery.cancel_scope.cancel()
        for c in conns:
            c.close()
    return res


async def _hold_endpoint(identity: Identity, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with open_endpoint(identity, "127.0.0.1", 0, config=CLIENT_CONFIG, listen=False) as ep:
        task_status.started(ep)
        await trio.sleep_forever()


# -- the relay, next to a direct connection -------------------------------------------------------

async def _send(conn, total: int) -> tuple[float, bytes, bytes]:
    """Send ``total`` random bytes on a new stream; (seconds until the receiver's digest, ours, its)."""
    stream = await conn.open_stream()
    chunk = os.urandom(CHUNK)
    h = hashlib.sha256()
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        piece = chunk[:min(CHUNK, total - sent)]
        await stream.send(piece, end=sent + len(piece) >= total)
        h.update(piece)
        sent += len(piece)
    theirs = await stream.receive_all(32)
    return time.perf_counter() - t0, h.digest(), theirs


async def relay_run(broker: BrokerProcess, nbytes: int, run: int) -> dict:
    rng = random.Random(f"relay {run} {os.getpid()}")
    ida, idb = Identity(rng.randbytes(32)), Identity(rng.randbytes(32))
    token = P.lookup_token(rng.randbytes(32), ida.public_key)
    host, port = broker.address
    res: dict = {}
    async with open_endpoint(ida, "127.0.0.1", 0, listen=True) as a, \
            open_endpoint(idb, "127.0.0.1", 0, listen=True) as b, trio.open_nursery() as nursery:

        async def sink(conn):
            async for stream in conn:
                h = hashlib.sha256()
                while data := await stream.receive_some(CHUNK):
                    h.update(data)
                await stream.send(h.digest(), end=True)

        async def accept():
            async for conn in a:
                nursery.start_soon(sink, conn)

        nursery.start_soon(accept)
        # A's broker connection: it announces, and takes the RelayOffer the broker pushes.
        offers = Dispatcher(P.BROKER)

        @offers.handler(P.RelayOffer)
        async def _offer(conn, msg):
            a.add_relay_session(RelayPath(host, port, bytes(msg.session)))
            return P.Ok()

        @offers.handler(P.RelayClosed)
        async def _closed(conn, msg):
            a.remove_relay_session(bytes(msg.session))
            return P.Ok()

        @offers.handler(P.Punch)
        async def _punch(conn, msg):
            return P.Ok()

        to_broker_a = await a.connect(broker.address, expected_peer=broker.peer_id)
        nursery.start_soon(offers.serve_connection, to_broker_a)
        await _call(to_broker_a, P.signed_announcement(ida, to_broker_a.peer_public_key, 1, time.time() + 600,
                                                       [f"127.0.0.1:{a.local_address[1]}"], [P.verifier(token)]))
        to_broker_b = await b.connect(broker.address, expected_peer=broker.peer_id)
        opened = await _call(to_broker_b, P.RelayOpen(token))
        path = RelayPath(host, port, bytes(opened.session))
        b.add_relay_session(path)

        order = ["relay", "direct"] if run % 2 else ["direct", "relay"]
        for name in order:
            target = path if name == "relay" else a.local_address
            conn = await b.connect(target, expected_peer=ida.peer_id)
            before = broker.cpu(), time.process_time(), time.time()
            seconds, ours, theirs = await _send(conn, nbytes)
            after = broker.cpu(), time.process_time(), time.time()
            if ours != theirs:
                raise RendezvousError(f"{name}: the data's SHA-256 differs at the receiver")
            res[name] = {"bytes": nbytes, "seconds": seconds, "cpu_broker": after[0] - before[0],
                         "cpu_client": after[1] - before[1], "start": before[2], "end": after[2]}
            await conn.aclose()
        for c in (to_broker_a, to_broker_b):
            c.close()
        nursery.cancel_scope.cancel()
    # The broker's counters (cumulative) from the stats lines it logs every second: the last one
    # before the relayed transfer and the first one after it.
    before_stats = {}
    for doc in broker.events("relay_stats"):
        if _ts(doc) <= res["relay"]["start"]:
            before_stats = doc
    end_stats = broker.relay_stats_after(res["relay"]["end"])
    if end_stats is not None:
        for key in ("bytes_relayed", "frames_relayed", "frames_dropped", "dropped_rate", "dropped_cap",
                    "dropped_address"):
            res["relay"][key] = end_stats.get(key, 0) - before_stats.get(key, 0)
    return res


def _ts(doc: dict) -> float:
    return datetime.datetime.strptime(doc["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


# -- the runs -------------------------------------------------------------------------------------

FIGURES = ("pairing", "rates", "relay")


def run_rendezvous(tmp: Path, sizes: dict, runs: int, cleanup: Cleanup, log: Callable[[str], None] = _log,
                   out: dict | None = None, figures: tuple = FIGURES) -> dict:
    """Fill ``out`` (returned) with {'sizes', 'runs': [...], 'errors', 'problems', 'notes', 'summary'}."""
    out = out if out is not None else {}
    out.update(sizes=dict(sizes), runs=[], errors=[], problems=[], notes=[CONFIG_NOTE])
    base = tmp / "rendezvous"
    base.mkdir(parents=True, exist_ok=True)
    cleanup.add_dir(base)
    broker = BrokerProcess(base / "broker", cleanup)
    try:
        broker.start()
    except Exception as e:  # noqa: BLE001
        _error(out, "broker", "-", "start the broker", e, log)
        out["summary"] = summarize(out)
        return out
    out["broker_rss_start"] = broker.rss()
    log(f"rendezvous: broker {broker.peer_id} on {broker.text_address} (pid {broker.proc.pid})")
    try:
        for run in range(1, runs + 1):
            log(f"rendezvous, run {run}/{runs}")
            sample: dict = {"run": run}
            out["runs"].append(sample)
            if "pairing" in figures:
                pairing_run(base / f"pairing-run{run}", broker, run, cleanup, log, sample, out)
            if "rates" in figures:
                try:
                    r = sample["rates"] = trio.run(rates_run, broker, sizes["requests"], sizes["connects"], run)
                    log(f"  run {run} requests/s     " + ", ".join(
                        f"{k} {v['n'] / v['seconds']:.0f}" for k, v in r.items()))
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - recorded (trio may wrap it in an ExceptionGroup)
                    _error(out, "rates", run, "requests", e, log, broker.log_tail())
            if "relay" in figures:
                try:
                    r = sample["relay"] = trio.run(relay_run, broker, sizes["relay_bytes"], run)
                    log(f"  run {run} relay {_mbps(r['relay']):.1f} MB/s, direct {_mbps(r['direct']):.1f} MB/s "
                        f"(broker CPU {r['relay']['cpu_broker']:.2f} s for the relayed "
                        f"{human_bytes(r['relay']['bytes'])})")
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001
                    _error(out, "relay", run, "transfer", e, log, broker.log_tail())
    finally:
        out["broker_rss_peak"] = broker.rss()
        broker.stop()
    out["summary"] = summarize(out)
    return out


def _mbps(r: dict) -> float:
    return r["bytes"] / r["seconds"] / 1e6


def _error(out: dict, target: str, run, step: str, e: BaseException, log, daemon_log: str = "") -> None:
    msg = f"{type(e).__name__}: {e}"
    if isinstance(e, BaseExceptionGroup):
        msg += "".join(f"\n  {type(x).__name__}: {x}" for x in e.exceptions)
    out["errors"].append({"target": target, "run": run, "step": step, "error": msg,
                          "traceback": traceback.format_exc(), "daemon_log": daemon_log})
    log(f"  run {run} {target}: FAILED in {step}: {msg}")


# -- summary and report ---------------------------------------------------------------------------

RATE_NAMES = {"ping": "Ping round trips (reference)", "lookup": "Lookups (hits)",
              "announce": "Announcements on open connections",
              "connect": "Announcements, each on a new connection"}


def summarize(out: dict) -> dict:
    col: dict[str, dict[str, list[float]]] = {}

    def add(name: str, key: str, value) -> None:
        if value is not None:
            col.setdefault(name, {}).setdefault(key, []).append(value)

    for s in out.get("runs", []):
        for name in ("pair_code", "pair_direct"):
            if name in s:
                add(name, "seconds", s[name]["seconds"])
                for k in ("code_seconds", "joiner_seconds", "creator_seconds", "accept_seconds", "direct_seconds"):
                    add(name, k, s[name].get(k))
        for name, r in s.get("rates", {}).items():
            add(name, "rate", r["n"] / r["seconds"])
            add(name, "broker_ms", 1000 * r["cpu_broker"] / r["n"])
            add(name, "client_ms", 1000 * r["cpu_client"] / r["n"])
        for name, r in s.get("relay", {}).items():
            add(name, "mbps", _mbps(r))
            add(name, "client_cpu_gib", r["cpu_client"] / (r["bytes"] / GiB))
            if name == "relay":
                add(name, "broker_cpu_gib", r["cpu_broker"] / (r["bytes"] / GiB))
                add(name, "frames_dropped", r.get("frames_dropped"))
                add(name, "dropped_rate", r.get("dropped_rate"))
    summary = {name: {k: stats.summarize(v) for k, v in keys.items()} for name, keys in col.items()}
    ratios = {}
    r = stats.ratio(summary.get("pair_code", {}).get("seconds"), summary.get("pair_direct", {}).get("seconds"))
    if r is not None:
        ratios["code/direct seconds"] = r
    for name in ("lookup", "announce", "connect"):
        r = stats.ratio(summary.get(name, {}).get("rate"), summary.get("ping", {}).get("rate"))
        if r is not None:
            ratios[f"{name}/ping"] = r
    r = stats.ratio(summary.get("relay", {}).get("mbps"), summary.get("direct", {}).get("mbps"))
    if r is not None:
        ratios["relay/direct"] = r
    summary["ratios"] = ratios
    return summary


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:.2f}" if x >= 0.1 else f"{x:.2g}")


def report_lines(rep: dict) -> list[str]:
    summary = rep.get("summary") or summarize(rep)
    ratios = summary.get("ratios", {})
    lines: list[str] = []
    if "pair_code" in summary or "pair_direct" in summary:
        rows = [["pairing over loopback (4 new served stores a run)", "time", "ratio"]]
        code, direct = summary.get("pair_code", {}), summary.get("pair_direct", {})
        if code:
            rows.append(["by code through the broker (bpfs pair A; bpfs pair B CODE)",
                         stats.cell(code.get("seconds"), "s"), _ratio(ratios.get("code/direct seconds"))])
        if direct:
            rows.append(["directly (reference: --accept, then --direct --expect)",
                         stats.cell(direct.get("seconds"), "s"), "1"])
        lines += _table(rows)
        if code.get("code_seconds"):
            lines.append(f"by code: the code was printed after {code['code_seconds']['median']:.2f} s, the joiner "
                         f"exited after {code['joiner_seconds']['median']:.2f} s, the creator after "
                         f"{code['creator_seconds']['median']:.2f} s (medians; each `bpfs pair` is a new process)")
        lines.append("")
    if any(k in summary for k in RATE_NAMES):
        sizes = rep.get("sizes", {})
        rows = [[f"requests to the broker from one process ({IN_FLIGHT} in flight)", "rate", "vs pings",
                 "broker CPU", "client CPU"]]
        for name, label in RATE_NAMES.items():
            per = summary.get(name)
            if not per:
                continue
            n = sizes.get("connects" if name == "connect" else "requests")
            label = f"{label} ({n:,})" if n else label
            if name == "connect":
                label += f", {ANNOUNCERS} at once"
            rows.append([label, stats.cell(per.get("rate"), "/s"),
                         "1" if name == "ping" else _ratio(ratios.get(f"{name}/ping")),
                         f"{per['broker_ms']['median']:.2f} ms/req", f"{per['client_ms']['median']:.2f} ms/req"])
        lines += _table(rows)
        lines.append(f"pings and lookups: one identity, {CONNECTIONS} connections; lookups find stores that "
                     "announced and disconnected (no Punch pushed); announcements on open connections: "
                     f"{IN_FLIGHT} stores, one connection each. CPU = CPU ms per request of the broker process "
                     "and of this (client) process; the busier one bounds the rate.")
        lines.append("")
    if "relay" in summary or "direct" in summary:
        size = human_bytes(rep.get("sizes", {}).get("relay_bytes", 0))
        rows = [[f"one stream of {size} between two endpoints in one process", "throughput", "ratio",
                 "client CPU s/GiB", "broker CPU s/GiB"]]
        for name, label in (("relay", "through the broker's relay"), ("direct", "directly (reference)")):
            per = summary.get(name)
            if not per:
                continue
            rows.append([label, stats.cell(per.get("mbps"), "MB/s"),
                         _ratio(ratios.get("relay/direct")) if name == "relay" else "1",
                         stats.num(per["client_cpu_gib"]["median"]),
                         stats.num(per["broker_cpu_gib"]["median"]) if per.get("broker_cpu_gib") else "-"])
        lines += _table(rows)
        rel = summary.get("relay", {})
        if rel.get("broker_cpu_gib"):
            lines.append(f"the broker's CPU alone would relay about {GiB / 1e6 / rel['broker_cpu_gib']['median']:.0f} "
                         "MB/s of data per core (1 GiB / its CPU s per relayed GiB)")
        if rel.get("frames_dropped") is not None:
            lines.append(f"frames the relay dropped (median per run): {rel['frames_dropped']['median']:.0f}, of "
                         f"which over the rate cap {rel['dropped_rate']['median']:.0f}")
        lines.append("client CPU = this process (sender and receiver share its one trio loop); broker CPU = the "
                     "broker process while it relayed, per GiB relayed.")
    if rep.get("broker_rss_peak"):
        lines.append(f"broker peak RSS (VmHWM) over the whole run: {rep['broker_rss_peak'] / MiB:.0f} MiB")
    return lines


def print_report(rep: dict, runs: int) -> None:
    stats.print_standalone("bpfs rendezvous through a broker over loopback", rep, runs, report_lines(rep))


# -- standalone -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rendezvous", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"smaller sizes ({human_bytes(QUICK['relay_bytes'])} relayed, {QUICK['requests']:,} "
                        f"requests, {QUICK['connects']:,} new connections)")
    p.add_argument("--runs", type=int, default=3, metavar="N", help="repeat N times (default 3)")
    p.add_argument("--only", metavar="NAME[,NAME]", help=f"figures to measure, from {', '.join(FIGURES)}")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="save the results as JSON (default bench/results/rendezvous[-quick].json)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/bpfs-bench"), metavar="DIR",
                   help="where the stores and the broker's state go (default /var/tmp/bpfs-bench)")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    figures = FIGURES
    if args.only:
        figures = tuple(f for f in FIGURES if f in {n.strip() for n in args.only.split(",")})
        if not figures:
            p.error(f"--only: choose from {', '.join(FIGURES)}")
    sizes = QUICK if args.quick else FULL
    json_path = args.json or REPO / "bench" / "results" / f"rendezvous{'-quick' if args.quick else ''}.json"
    args.workdir.mkdir(parents=True, exist_ok=True)
    rep: dict = {"mode": "quick" if args.quick else "full", "runs_asked": args.runs,
                 "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    interrupted = False
    with Cleanup(_log) as cleanup:
        tmp = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
        cleanup.add_dir(tmp)
        (tmp / "bench.pid").write_text(f"{os.getpid()}\n")
        rep["loadavg_start"] = os.getloadavg()
        try:
            run_rendezvous(tmp, sizes, args.runs, cleanup, _log, out=rep, figures=figures)
        except KeyboardInterrupt:
            interrupted = True
            _log("interrupted: cleaning up")
            rep.setdefault("notes", []).append("interrupted: the results are incomplete")
            rep["summary"] = summarize(rep)
        rep["loadavg_end"] = os.getloadavg()
    print_report(rep, args.runs)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rep, indent=2, default=str) + "\n")
    _log(f"results saved to {json_path}")
    if interrupted:
        return 130
    return 1 if rep.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
