"""Security hardening, what the broker (or a stranger at it) can do: pairing codes and lookup
tokens (issue 12).

Real `bpfs-broker` processes and real store daemons (`bpfs serve`) over QUIC on loopback for the
codes and the replayed tokens; for the days tokens rotate by, a real broker in this process
(`broker.server.serve`) and the stores' own broker clients (`BrokerClient`, and the recovery's
`Lookups`), each with a clock of its own, over real QUIC as well.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
from contextlib import asynccontextmanager

import pytest
import trio

from bpfs.config import BrokerAddress
from bpfs.identity import Identity
from bpfs.net.quic import open_endpoint
from bpfs.net.rpc import RemoteError, request
from bpfs.peering.sources import Lookups
from bpfs.rendezvous import wire as P
from bpfs.rendezvous.beacon import beacon_lookup_key
from bpfs.rendezvous.brokers import BrokerClient
from bpfs.rendezvous.pairing import DEFAULT_WORDS
from bpfs.rendezvous.words import WORDS
from broker.config import BrokerConfig
from broker.server import serve as serve_broker
from tests.helpers.broker import BrokerProcess
from tests.helpers.cli import PYTHON, REPO, run_on_a_terminal
from tests.helpers.partners import Store, wait_for

pytestmark = pytest.mark.timeout(300)

COMPARE = "Compare peer ids through another channel"


def serve(store: Store, broker: str, listen: str = "127.0.0.1:0") -> None:
    store.bpfs("serve", "--listen", listen, "--broker", broker)


def stop(store: Store) -> None:
    store.bpfs("stop", check=False, timeout=120)


def pair_command(store: Store, *args) -> list[str]:
    return [PYTHON, "-m", "bpfs", "pair", str(store.path), *args]


def active_peers(store: Store) -> set[str]:
    return {r["peer_id"] for r in store.peers() if r["state"] != "ended"}


# =========================================================================== pairing codes

def test_codes_have_three_words_and_both_sides_are_told_to_compare_peer_ids(tmp_path):
    broker = BrokerProcess(tmp_path / "broker").start()
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    try:
        serve(a, broker.where)
        serve(b, broker.where)
        creator = subprocess.Popen(pair_command(a, "--yes"), cwd=REPO, env=a.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        line = creator.stdout.readline()
        m = re.match(r"^code: (\S+)", line)
        assert m, f"`bpfs pair` printed no code: {line!r}"
        code = m.group(1)
        number, *words = code.split("-")
        assert DEFAULT_WORDS == 3 and len(words) == 3 and all(w in WORDS for w in words), code
        # the printed code line itself says whom the partner must see, and to compare
        assert a.peer_id in line and "compare peer ids" in line, line

        rc, shown, _ = run_on_a_terminal(pair_command(b, code), b.env, "y", prompt=r"do you pair with it\?[^\n]*$")
        out, err = creator.communicate(timeout=120)
        assert rc == 0 and creator.returncode == 0, f"{shown}\n{err}"
        # the joiner's question: the creator's peer id, and to check it over another channel
        question = shown[shown.index(f"Partner {a.peer_id}"):]
        assert COMPARE in question and f"must show {a.peer_id}" in question and b.peer_id in question, shown
        assert f"Is {a.peer_id} the peer id your partner sees" in question, shown
        # the creator (--yes) was shown the same advice about the joiner, and its own id to tell
        assert COMPARE in err and f"must show {b.peer_id}" in err and a.peer_id in err, err
        assert active_peers(a) == {b.peer_id} and active_peers(b) == {a.peer_id}

        # a code of two words is refused before anything reaches the broker (it would only burn a code)
        cp = b.bpfs("pair", f"{number}-{words[0]}-{words[1]}", "--yes", check=False)
        assert cp.returncode == 2 and "NUMBER-WORD-WORD-WORD" in cp.stderr, cp.stderr
        cp = a.bpfs("pair", "--words", "2", "--yes", check=False)
        assert cp.returncode == 2 and "--words" in cp.stderr, cp.stderr
    finally:
        stop(b)
        stop(a)
        broker.stop()


def test_a_source_that_joins_too_many_codes_is_refused_with_a_reason(tmp_path):
    """Each join is a guess at a live code: 4 from one address at once, then one every 10 minutes,
    whatever identity asks (identities are free); then a store's `bpfs pair CODE` from that
    address is refused too, with the reason."""
    broker = BrokerProcess(tmp_path / "broker").start()
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")

    async def guess():
        async with open_endpoint(Identity(os.urandom(32)), "127.0.0.1", 0, listen=False) as ep:
            conn = await ep.connect(broker.address, expected_peer=broker.peer_id)
            refusals = []
            for nameplate in range(1, 8):
                try:
                    await request(conn, P.MailboxJoin(nameplate), registry=P.BROKER, timeout=20)
                    refusals.append(None)
                except RemoteError as e:
                    refusals.append(e)
            return refusals

    try:
        refusals = trio.run(guess)
        assert all(r is not None and r.code == P.Refusal.NOT_FOUND for r in refusals[:4]), refusals
        assert all(r is not None and r.code == P.Refusal.LIMIT for r in refusals[4:]), refusals
        text = refusals[4].message
        assert text.startswith("too many attempts to join a code from this address") and "guess" in text \
            and text.endswith("retry in 600 s"), text

        serve(a, broker.where)
        serve(b, broker.where)
        creator = subprocess.Popen(pair_command(a, "--yes", "--json"), cwd=REPO, env=a.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        code = json.loads(creator.stdout.readline())["code"]
        cp = b.bpfs("pair", code, "--yes", check=False, timeout=60)
        assert cp.returncode == 1, cp.stderr
        assert cp.stderr.strip().startswith("bpfs: the broker refused: too many attempts to join a code from this "
                                            "address") and "\n" not in cp.stderr.strip(), cp.stderr
        creator.kill()
        creator.communicate(timeout=30)
    finally:
        stop(b)
        stop(a)
        broker.stop()


# =========================================================================== lookup tokens

# A broker that writes down every token it is shown (what a curious broker operator could do).
RECORDING_PREAMBLE = """
import os
import broker.state as _state

_real_find = _state.BrokerState.find

def _recording_find(self, token):
    with open(os.environ["TOKEN_LOG"], "a") as f:
        f.write(bytes(token).hex() + "\\n")
    return _real_find(self, token)

_state.BrokerState.find = _recording_find
"""


def test_a_token_one_broker_saw_finds_nothing_at_another(tmp_path):
    """A and B pair by code through broker X, which records every token it is shown; B then
    looks A up there. A moves to broker Y (and to a new port): X's operator replaying what it
    recorded at Y finds nothing, while B, pointed at Y, finds A there."""
    log = tmp_path / "tokens.txt"
    x = BrokerProcess(tmp_path / "x", preamble=RECORDING_PREAMBLE, env={**os.environ, "TOKEN_LOG": str(log)}).start()
    y = BrokerProcess(tmp_path / "y").start()
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    try:
        serve(a, x.where)
        serve(b, x.where)
        creator = subprocess.Popen(pair_command(a, "--yes", "--json"), cwd=REPO, env=a.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        code = json.loads(creator.stdout.readline())["code"]
        b.bpfs("pair", code, "--yes", timeout=120)
        assert creator.wait(timeout=120) == 0, creator.stderr.read()
        stop(b)
        serve(b, x.where)  # B dials A again: every dial asks the broker first
        wait_for(lambda: log.exists() and log.read_text().strip(), 60, "B to look A up at broker X",
                 diag=b.log_tail)
        wait_for(lambda: b.peer(a.peer_id)["connected"], 60, "B to reach A",
                 diag=b.log_tail)
        stop(a)
        stop(b)
        recorded = {bytes.fromhex(t) for t in log.read_text().split()}

        serve(a, y.where, listen=f"127.0.0.1:{_free_port()}")  # a new port: B's record of A is stale
        wait_for(lambda: any(e.get("event") == "announce" for e in y.events()), 60, "A to announce to broker Y",
                 diag=a.log_tail)

        async def replay():
            async with open_endpoint(Identity(os.urandom(32)), "127.0.0.1", 0, listen=False) as ep:
                conn = await ep.connect(y.address, expected_peer=y.peer_id)
                out = []
                for token in recorded:
                    try:
                        out.append(await request(conn, P.Lookup(token, []), registry=P.BROKER, timeout=20))
                    except RemoteError as e:
                        out.append(e.code)
                return out

        assert trio.run(replay) == [P.Refusal.NOT_FOUND] * len(recorded)

        serve(b, y.where)  # B finds A at broker Y (today's token for Y), though A moved
        wait_for(lambda: b.peer(a.peer_id)["connected"], 90, "B to find A through broker Y",
                 diag=lambda: f"{b.log_tail()}\n{a.log_tail()}")
    finally:
        stop(b)
        stop(a)
        x.stop()
        y.stop()


def _free_port() -> int:
    from tests.helpers.netlab import free_udp_port

    return free_udp_port()


def test_tokens_differ_by_broker_day_and_kind():
    pair_key, target = os.urandom(32), Identity(os.urandom(32)).public_key
    x, y = Identity(os.urandom(32)).public_key, Identity(os.urandom(32)).public_key
    key = P.pair_lookup_key(pair_key, target)
    tokens = {key.token(x, 20_000), key.token(x, 20_001), key.token(y, 20_000), key.token(y, 20_001),
              beacon_lookup_key(pair_key).token(x, 20_000)}
    assert len(tokens) == 5
    assert key.token(x, 20_000) == P.lookup_token(pair_key, x, 20_000, target)  # deterministic
    assert key.verifiers(x, [20_000]) == [P.verifier(key.token(x, 20_000))]
    # the days an announcement lists: one most of the day, two near midnight, the current first
    day = 20_000 * P.EPOCH_SECONDS
    assert P.announced_epochs(day + 12 * 3600, 600) == [20_000]
    assert P.announced_epochs(day + 86400 - 300, 600) == [20_000, 20_001]
    assert P.announced_epochs(day + 300, 600) == [20_000, 19_999]
    with pytest.raises(ValueError):
        P.lookup_token(pair_key[:16], x, 20_000, target)
    assert "LookupKey" in repr(key) and pair_key.hex() not in repr(key)


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@asynccontextmanager
async def clients(tmp_path, broker_clock: Clock):
    """A broker in this process on its own clock; yields (broker, connect), where `connect(identity,
    clock, lookup_keys)` starts a store's broker client (announcing `lookup_keys`, if any)."""
    async with trio.open_nursery() as nursery:
        broker = await nursery.start(functools.partial(serve_broker, now=broker_clock), BrokerConfig(listen="127.0.0.1:0"),
                                     Identity(os.urandom(32)), str(tmp_path / "broker-state"))
        address = BrokerAddress(broker.address[0], broker.address[1], broker.peer_id)

        async def connect(identity: Identity, clock: Clock, lookup_keys=()):
            ep = await nursery.start(_endpoint, identity)
            client = BrokerClient(identity, ep, [address], addresses=lambda: ["192.0.2.7:7450"],
                                  lookup_keys=lambda: list(lookup_keys), standing=lambda: bool(lookup_keys),
                                  now=clock)
            nursery.start_soon(client.run)
            if lookup_keys:
                await client.announced()
            else:
                client.hold()
            return client

        try:
            yield broker, connect, address, nursery
        finally:
            nursery.cancel_scope.cancel()


async def _endpoint(identity: Identity, task_status=trio.TASK_STATUS_IGNORED):
    async with open_endpoint(identity, "127.0.0.1", 0) as ep:
        task_status.started(ep)
        await trio.sleep_forever()


async def _lookup_refused(client: BrokerClient, token: bytes) -> int:
    conn = await client.connection()
    with pytest.raises(RemoteError) as info:
        await request(conn, P.Lookup(token, []), registry=P.BROKER, timeout=20)
    return info.value.code


def test_tokens_rotate_daily_and_lookups_work_across_midnight(tmp_path):
    """Day E: found. Day E+2: a token of day E finds nothing (for a pair and for a recovery
    beacon), today's does. Just before and just after midnight, with the two stores' clocks ten
    minutes apart either way: found."""
    E = 20_500
    noon = E * P.EPOCH_SECONDS + 12 * 3600
    broker_clock, target_clock, asker_clock = Clock(noon), Clock(noon), Clock(noon)
    target, asker, lost = (Identity(os.urandom(32)) for _ in range(3))
    pair = P.pair_lookup_key(os.urandom(32), target.public_key)
    beacon = beacon_lookup_key(os.urandom(32))  # what the lost store gave the target for its slot

    def set_clocks(broker_t, target_t, asker_t):
        broker_clock.t, target_clock.t, asker_clock.t = broker_t, target_t, asker_t

    async def main():
        async with clients(tmp_path, broker_clock) as (broker, connect, address, nursery):
            t = await connect(target, target_clock, [pair, beacon])
            s = await connect(asker, asker_clock)
            recovering = Lookups(await nursery.start(_endpoint, lost), [address], nursery, now=asker_clock)
            assert list((await s.lookup(pair)).addresses) == ["192.0.2.7:7450"]
            assert list((await recovering.lookup(beacon)).addresses) == ["192.0.2.7:7450"]
            old_pair, old_beacon = pair.token(broker.public_key, E), beacon.token(broker.public_key, E)

            # two days later everyone's clock says E+2: the target announces again
            set_clocks(noon + 2 * 86400, noon + 2 * 86400, noon + 2 * 86400)
            t.changed()
            await t.announced()
            assert await _lookup_refused(s, old_pair) == P.Refusal.NOT_FOUND
            assert await _lookup_refused(s, old_beacon) == P.Refusal.NOT_FOUND
            assert list((await s.lookup(pair)).addresses) == ["192.0.2.7:7450"]
            assert list((await recovering.lookup(beacon)).addresses) == ["192.0.2.7:7450"]

            midnight = (E + 3) * P.EPOCH_SECONDS
            for target_t, asker_t in ((midnight - 300, midnight + 300), (midnight + 300, midnight - 300),
                                      (midnight - 60, midnight - 60), (midnight + 60, midnight + 60)):
                set_clocks(target_t, target_t, asker_t)
                t.changed()
                await t.announced()
                found = await s.lookup(pair)
                assert list(found.addresses) == ["192.0.2.7:7450"], (target_t - midnight, asker_t - midnight)
                assert list((await recovering.lookup(beacon)).addresses) == ["192.0.2.7:7450"]

    trio.run(main)
