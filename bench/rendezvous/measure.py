"""The measurements of the rendezvous benchmark: pairing by code next to direct pairing, request
rates against the broker next to pings, the relay next to a direct connection, and the runs
that rotate them (``run_rendezvous``)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Callable

import trio

from bench import config, proc
from bench.cleanup import Cleanup
from bench.config import human_bytes
from bench.rendezvous.harness import (ANNOUNCERS, CONFIG_NOTE, CONNECTIONS, IN_FLIGHT, TARGETS, BrokerProcess,
                                      RendezvousError, SimStore, Stores, log_time)
from bench.rendezvous.report import mbps, summarize
from bench.standalone import log_stderr

from bpfs.identity import Identity
from bpfs.net.codec import Ping
from bpfs.net.quic import RelayPath, TransportConfig, open_endpoint
from bpfs.net.rpc import Dispatcher, RemoteError, request
from bpfs.rendezvous import wire as P

CHUNK = 1 << 20
REQUEST_TIMEOUT = 60.0
PAIR_TIMEOUT = 180.0


# -- sizes ----------------------------------------------------------------------------------------

def sizes_of(sizes: config.Sizes) -> dict:
    return {"relay_bytes": sizes.relay_bytes, "requests": sizes.broker_requests, "connects": sizes.broker_connects}


FULL = sizes_of(config.FULL)
QUICK = sizes_of(config.QUICK)


# -- pairing by code, and directly (the reference) ------------------------------------------------

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
        stores.create("A", "--broker", broker.where)
        stores.create("B", "--broker", broker.where)
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
                    res[name] = await _timed(broker, partial(_announce_all, broker, fresh, ANNOUNCERS), connects)
                else:
                    fn = phases[name]
                    res[name] = await _timed(broker, partial(_spread, n, IN_FLIGHT, fn), n)
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
    token = P.lookup_token(rng.randbytes(32), bytes(32), 0, ida.public_key)  # opaque to the broker
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
        if log_time(doc) <= res["relay"]["start"]:
            before_stats = doc
    end_stats = broker.relay_stats_after(res["relay"]["end"])
    if end_stats is not None:
        for key in ("bytes_relayed", "frames_relayed", "frames_dropped", "dropped_rate", "dropped_cap",
                    "dropped_address"):
            res["relay"][key] = end_stats.get(key, 0) - before_stats.get(key, 0)
    return res


# -- the runs -------------------------------------------------------------------------------------

FIGURES = ("pairing", "rates", "relay")


def run_rendezvous(tmp: Path, sizes: dict, runs: int, cleanup: Cleanup, log: Callable[[str], None] = log_stderr,
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
    log(f"rendezvous: broker {broker.peer_id} on {broker.where} (pid {broker.proc.pid})")
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
                    log(f"  run {run} relay {mbps(r['relay']):.1f} MB/s, direct {mbps(r['direct']):.1f} MB/s "
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


def _error(out: dict, target: str, run, step: str, e: BaseException, log, daemon_log: str = "") -> None:
    msg = f"{type(e).__name__}: {e}"
    if isinstance(e, BaseExceptionGroup):
        msg += "".join(f"\n  {type(x).__name__}: {x}" for x in e.exceptions)
    out["errors"].append({"target": target, "run": run, "step": step, "error": msg,
                          "traceback": traceback.format_exc(), "daemon_log": daemon_log})
    log(f"  run {run} {target}: FAILED in {step}: {msg}")

