"""Pairing by code through a real broker, finding partners through it, and a lying broker.

Real `bpfs-broker` processes (`python -m broker`) with their LMDB state, real store daemons
(`bpfs serve`, `bpfs mount`) pointed at them with `--broker`, the real CLI, QUIC over loopback.
The NAT cases (hole punching, the relay) are in test_nat.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from bpfs.config import DEFAULT_PORT
from tests.helpers.broker import BrokerProcess
from tests.helpers.cli import PYTHON, REPO, one_line_error
from tests.helpers.mounts import Mount
from tests.helpers.netlab import free_udp_port
from tests.helpers.partners import MARKER, Store
from tests.helpers.procs import wait_until

pytestmark = pytest.mark.timeout(300)


# =========================================================================== a broker process

@pytest.fixture
def broker(tmp_path):
    b = BrokerProcess(tmp_path).start()
    yield b
    b.stop()


def serve(store: Store, broker_address: str):
    store.bpfs("serve", "--listen", "127.0.0.1:0", "--broker", broker_address)


def stop(store: Store) -> None:
    store.bpfs("stop", check=False, timeout=120)


@contextmanager
def serving(tmp: Path, broker_address: str, *names: str):
    """New stores, each served by `bpfs serve` pointed at the broker; stopped afterwards."""
    stores = [Store(tmp / name) for name in names]
    try:
        for s in stores:
            serve(s, broker_address)
        yield stores
    finally:
        for s in stores:
            stop(s)


def start_code(store: Store, *extra, env=None) -> tuple[subprocess.Popen, str]:
    """`bpfs pair STORE --yes --json`: the process (still waiting) and the code it printed."""
    proc = subprocess.Popen([PYTHON, "-m", "bpfs", "pair", str(store.path), "--yes", "--json", *extra], cwd=REPO,
                            env=env or store.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line, f"`bpfs pair` printed no code: {proc.stderr.read() if proc.poll() is not None else ''}"
    return proc, json.loads(line)["code"]


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, dict | None, str]:
    out, err = proc.communicate(timeout=timeout)
    doc = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
    return proc.returncode, doc, err


def peer_ids(store: Store) -> set[str]:
    return {r["peer_id"] for r in store.peers() if r["state"] != "ended"}


# =========================================================================== tests

def test_pair_by_code_then_replicate_through_a_partner_found_by_the_broker(tmp_path, broker):
    a = Store(tmp_path / "a")
    b = Store(tmp_path / "b")
    mnt = Mount(a.path, tmp_path / "mnt", env=a.env)
    mnt.mount("--listen", "127.0.0.1:0", "--broker", broker.where)
    serve(b, broker.where)
    try:
        proc, code = start_code(a, "--offer", "300M", "--ask", "200M")
        number, *words = code.split("-")
        assert number.isdigit() and len(words) == 3 and all(w.isalpha() for w in words), code
        joined = b.bpfs("pair", code, "--yes", "--json", "--offer", "500M", "--ask", "100M", timeout=120)
        rc, created, err = finish(proc)
        assert rc == 0, err
        joined = json.loads(joined.stdout)
        assert created["peer_id"] == b.peer_id and joined["peer_id"] == a.peer_id
        # Quotas as with --direct: B keeps min(A's ask 200M, B's offer 500M) of A's data, A keeps
        # min(B's ask 100M, A's offer 300M) of B's; both sides saw and recorded the same.
        assert a.peer(b.peer_id)["they_keep"] == 200 << 20 and a.peer(b.peer_id)["we_keep"] == 100 << 20
        assert b.peer(a.peer_id)["we_keep"] == 200 << 20 and b.peer(a.peer_id)["they_keep"] == 100 << 20
        assert "100.0 MiB" in err and "200.0 MiB" in err  # what the creator's user was shown
    except BaseException:
        mnt.cleanup()
        stop(b)
        raise
    # Forget every address: the partners must find each other through the broker alone.
    try:
        data = MARKER * 50_000 + os.urandom(1 << 20)
        mnt.path("f.bin").write_bytes(data)
        a.sync(timeout=120)
        assert b.hosted(a.peer_id)["packs"] >= 1
        assert a.partner_status(b.peer_id)["path"] == "direct"
    finally:
        mnt.cleanup()
        stop(b)


def test_partners_find_each_other_after_their_addresses_change(tmp_path, broker):
    with serving(tmp_path, broker.where, "a", "b") as (a, b):
        proc, code = start_code(a)
        b.bpfs("pair", code, "--yes", timeout=120)
        assert finish(proc)[0] == 0
        # Both move to new ports: the addresses each recorded are now wrong.
        stop(a)
        stop(b)
        # A's first broker does not answer: the next one on its list is used
        a.bpfs("serve", "--listen", f"127.0.0.1:{free_udp_port()}", "--broker", f"127.0.0.1:{free_udp_port()}",
               "--broker", broker.where)
        b.bpfs("serve", "--listen", f"127.0.0.1:{free_udp_port()}", "--broker", broker.where)
        old = a.peer(b.peer_id)["address"]
        assert wait_until(lambda: a.peer(b.peer_id)["connected"] or b.peer(a.peer_id)["connected"], timeout=90), \
            f"{old}\n{a.log_tail()}\n{b.log_tail()}"
        assert wait_until(lambda: a.id_json().get("broker") == f"{broker.where}/{broker.peer_id}"
                          or a.id_json().get("broker") == broker.where, timeout=30), a.id_json()


def test_wrong_code_fails_cleanly_on_both_sides_and_burns_the_code(tmp_path, broker):
    with serving(tmp_path, broker.where, "a", "b") as (a, b):
        proc, code = start_code(a)
        *first, last = code.split("-")
        wrong = "-".join([*first, 'acid' if last != 'acid' else 'acorn'])
        cp = b.bpfs("pair", wrong, "--yes", check=False, timeout=120)
        rc, _, err = finish(proc)
        assert cp.returncode == 1 and rc == 1, (cp.stderr, err)
        assert "did not match" in one_line_error(cp)
        assert "did not match" in err.strip().splitlines()[-1]
        assert not peer_ids(a) and not peer_ids(b)
        # the code is used up: even the right one is refused now
        cp = b.bpfs("pair", code, "--yes", check=False, timeout=60)
        assert cp.returncode != 0 and "code" in one_line_error(cp).lower()
        assert not peer_ids(a) and not peer_ids(b)
        # not a code at all: usage error, nothing sent
        cp = b.bpfs("pair", "12-notaword-x", "--yes", check=False)
        assert cp.returncode == 2


def test_pairing_in_progress_survives_a_broker_restart(tmp_path, broker):
    with serving(tmp_path, broker.where, "a", "b") as (a, b):
        proc, code = start_code(a)
        time.sleep(0.5)
        broker.kill()  # kill -9: only what is in its LMDB survives
        broker.start()
        cp = b.bpfs("pair", code, "--yes", "--json", check=False, timeout=180)
        rc, created, err = finish(proc, timeout=180)
        assert cp.returncode == 0 and rc == 0, (cp.stderr, err, broker.log_tail())
        assert peer_ids(a) == {b.peer_id} and peer_ids(b) == {a.peer_id}


def test_pair_by_code_without_a_daemon_and_without_a_broker(tmp_path, broker):
    a = Store(tmp_path / "a")
    b = Store(tmp_path / "b")
    # no daemon: the command runs the service itself (unlocking the store) with --broker
    env = dict(a.env, BPFS_LISTEN="127.0.0.1:0")
    proc, code = start_code(a, "--broker", broker.where, env=env)
    cp = b.bpfs("pair", code, "--yes", "--broker", broker.where, env=dict(b.env, BPFS_LISTEN="127.0.0.1:0"),
                check=False, timeout=120)
    rc, created, err = finish(proc)
    assert cp.returncode == 0 and rc == 0, (cp.stderr, err)
    assert peer_ids(a) == {b.peer_id}
    # no broker configured: pairing by code says what to do, exit 1 or 2, nothing changes; in one
    # line even when the command's own partner service finds its port taken (the default port,
    # held here; a mount on this machine held it once, and the fallback's warning was a second line)
    c = Store(tmp_path / "c")
    with _holding_udp_port(DEFAULT_PORT):
        cp = c.bpfs("pair", "--yes", check=False, env=dict(c.env, BPFS_LISTEN="127.0.0.1:0"), timeout=60)
    assert cp.returncode in (1, 2) and "broker" in one_line_error(cp), cp.stderr
    assert not peer_ids(c)


@contextmanager
def _holding_udp_port(port: int):
    """The UDP port is taken while inside: by this socket, or already by another process."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            pass  # someone else holds it: just as taken
        yield
    finally:
        s.close()


# =========================================================================== a lying broker

# The broker replaces the stores' SPAKE2 messages with its own: a man in the middle who does
# not know the code (it guesses one) and tries to run the key exchange with each side.
MITM_PREAMBLE = """
import broker.state as _state
from bpfs.rendezvous.pairing import CREATOR, JOINER, Exchange
_real_put = _state.BrokerState.mailbox_put
_fake = {}

def _swapping_put(self, nameplate, side, seq, body, *args, **kwargs):
    if seq == 0:
        ex = _fake.setdefault((nameplate, side), Exchange(f"{nameplate}-acid-acid", CREATOR))
        body = ex.message
    return _real_put(self, nameplate, side, seq, body, *args, **kwargs)

_state.BrokerState.mailbox_put = _swapping_put
"""


def test_a_broker_that_swaps_the_key_exchange_is_detected_and_nothing_is_paired(tmp_path):
    evil = BrokerProcess(tmp_path, preamble=MITM_PREAMBLE).start()
    try:
        with serving(tmp_path, evil.where, "a", "b") as (a, b):
            proc, code = start_code(a)
            cp = b.bpfs("pair", code, "--yes", check=False, timeout=120)
            rc, _, err = finish(proc)
            assert cp.returncode == 1 and rc == 1, (cp.stderr, err, evil.log_tail())
            assert "did not match" in one_line_error(cp) and "did not match" in err
            assert not peer_ids(a) and not peer_ids(b)
    finally:
        evil.stop()


# The broker answers every lookup with the address of another store (an impostor it controls)
# and refuses to relay: the joiner must not pair with the impostor.
LIAR_PREAMBLE = """
import os
import broker.server as _server
import bpfs.rendezvous.wire as _P
from bpfs.net.rpc import Reject

async def _lying_lookup(self, conn, info, msg):
    impostor = os.environ["IMPOSTOR"]
    return _P.Found([impostor], impostor, True)

async def _no_relay(self, conn, info, msg):
    raise Reject("relay refused", _P.Refusal.RELAY_REFUSED)

_server.Broker._lookup = _lying_lookup
_server.Broker._relay_open = _no_relay
"""


def test_a_broker_that_points_to_an_impostor_cannot_make_us_pair_with_it(tmp_path):
    a = Store(tmp_path / "a")
    b = Store(tmp_path / "b")
    c = Store(tmp_path / "c")  # the impostor
    c.bpfs("serve", "--listen", "127.0.0.1:0")
    c.bpfs("pair", "--accept", b.peer_id)  # an impostor answers handshakes (this one expects a pairing)
    os.environ["IMPOSTOR"] = c.address()
    try:
        liar = BrokerProcess(tmp_path, preamble=LIAR_PREAMBLE).start()
    finally:
        del os.environ["IMPOSTOR"]
    serve(a, liar.where)
    serve(b, liar.where)
    try:
        proc, code = start_code(a)
        cp = b.bpfs("pair", code, "--yes", check=False, timeout=120)
        rc, _, err = finish(proc, timeout=180)
        assert cp.returncode == 1, cp.stderr
        last = cp.stderr.strip().splitlines()[-1]  # after the partner's offer, shown for confirmation
        assert last.startswith("bpfs: could not reach") and "could not authenticate" in last and \
            "relay refused" in last, cp.stderr
        assert rc == 1 and f"{b.peer_id} could not pair: could not reach" in err, err  # the joiner said why
        assert not peer_ids(a) and not peer_ids(b) and not peer_ids(c)
    finally:
        for s in (a, b, c):
            stop(s)
        liar.stop()


def test_the_brokers_log_does_not_say_who_paired_with_whom(tmp_path, broker):
    """A pairing by code, lookups and announcements: even at debug level, the broker's log names
    neither store (no peer id, no address) on any event but a refusal or an error, so its logs
    cannot tell who paired with, looked up or relayed to whom, or where a store is."""
    with serving(tmp_path, broker.where, "a", "b") as (a, b):
        proc, code = start_code(a)
        b.bpfs("pair", code, "--yes", "--json", timeout=120)
        rc, _, err = finish(proc)
        assert rc == 0, err
        assert wait_until(lambda: broker.events("announce"), timeout=30)  # both announce, now partners
    events = broker.events()
    assert any(e["event"] == "mailbox_join" for e in events), "the pairing went through this broker"
    names = {a.peer_id, b.peer_id}
    leaks = [e for e in events if e["event"] not in ("refused", "internal_error", "listening")
             and (names & {str(v) for v in e.values()} or any(":" in str(v) and str(v)[0].isdigit()
                                                               for k, v in e.items() if k in ("addr", "target")))]
    assert not leaks, leaks[:5]
