"""Network errors in words a person understands (issue 13): what was dialled and what happened,
never a QUIC close code: no listener, a broker that is down, a host that does not resolve, a wrong
`--expect`, a partner that died."""

from __future__ import annotations

import socket
import time

from tests.helpers.partners import Store, pair, wait_for


def _silent_udp_port():
    """A UDP socket bound on loopback that never answers (no bpfs store there), and its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def _one_line(cp) -> str:
    lines = cp.stderr.strip().splitlines()
    assert cp.returncode != 0 and lines and "Traceback" not in cp.stderr, cp.stderr
    return lines[-1]


def test_no_store_listening_says_so(tmp_path):
    a = Store(tmp_path / "a")
    sock, port = _silent_udp_port()
    try:
        cp = a.bpfs("pair", "--direct", f"127.0.0.1:{port}", "--yes", check=False, timeout=60)
    finally:
        sock.close()
    last = _one_line(cp)
    assert last.startswith(f"bpfs: no bpfs store answered at 127.0.0.1:{port} within "), cp.stderr
    assert "code 0x" not in cp.stderr and "by peer" not in cp.stderr and "Idle timeout" not in cp.stderr


def test_broker_down_and_unresolvable_broker_say_so(tmp_path):
    a = Store(tmp_path / "a")
    sock, port = _silent_udp_port()
    try:
        cp = a.bpfs("pair", "--broker", f"127.0.0.1:{port}", "--yes", check=False, timeout=60)
    finally:
        sock.close()
    last = _one_line(cp)
    assert last == f"bpfs: no bpfs broker answered at 127.0.0.1:{port} within {last.split()[-2]} s", cp.stderr
    t0 = time.monotonic()
    cp = a.bpfs("pair", "--broker", "no-such-host.invalid", "--yes", check=False, timeout=60)
    took = time.monotonic() - t0
    last = _one_line(cp)
    assert last.startswith("bpfs: cannot find the broker no-such-host.invalid"), cp.stderr
    assert took < 5, f"an unresolvable broker took {took:.1f} s to fail"


def test_wrong_expect_names_the_peer_that_answered(stores, tmp_path):
    a = stores.server("A")
    b = stores.server("B")
    other = Store(tmp_path / "other")
    b.serve()
    b.bpfs("pair", "--accept", a.peer_id)
    cp = a.bpfs("pair", "--direct", b.address(), "--expect", other.peer_id, check=False, timeout=60)
    last = _one_line(cp)
    assert f"has peer id {b.peer_id}, not {other.peer_id}" in last, cp.stderr
    assert not a.peers()


def test_a_dead_partners_last_error_says_it_is_unreachable(stores):
    a = stores.server("A")
    b = stores.server("B")
    b.serve()
    a.serve()
    pair(a, b)
    b.kill9()
    a.stop()
    a.serve()  # dials B at once (its replicator), and finds nobody there

    def last_error():
        rows = [p for p in a.status()["partners"] if p["peer_id"] == b.peer_id]
        return rows[0].get("last_error") if rows else None

    wait_for(lambda: last_error(), 60, "a last error for the dead partner", interval=1.0)
    err = last_error()
    assert "unreachable" in err and "no bpfs store answered at" in err, err
    assert "by peer" not in err and "Idle timeout" not in err and "code 0x" not in err, err


def test_a_code_with_unknown_words_says_which_in_one_line(tmp_path):
    a = Store(tmp_path / "a")
    cp = a.bpfs("pair", "12-zzzz-yyyy", "--yes", check=False, timeout=60)
    assert cp.returncode == 2 and len(cp.stderr.strip().splitlines()) == 1, cp.stderr
    assert "'zzzz' and 'yyyy' are not in the list of code words" in cp.stderr, cp.stderr


def test_recover_through_a_broker_that_is_down_says_so_in_the_brokers_words(tmp_path):
    """`bpfs recover` looks partners up through its own broker connection: a broker that does not
    answer is named as `bpfs pair` names it, once (it said "no broker reachable (...)" around it)."""
    import json

    from tests.helpers.cli import bpfs_env, run_bpfs

    owner = Store(tmp_path / "owner")
    sock, port = _silent_udp_port()
    try:
        cp = run_bpfs("recover", tmp_path / "new", "--kdf", "interactive", "--broker", f"127.0.0.1:{port}",
                      env=bpfs_env(BPFS_RECOVERY=owner.recovery_secret), check=False, timeout=120)
    finally:
        sock.close()
    last = _one_line(cp)
    assert f"(broker: no bpfs broker answered at 127.0.0.1:{port} within " in last, cp.stderr
    assert "no broker reachable" not in last and "code 0x" not in cp.stderr, cp.stderr
    assert json is not None and not (tmp_path / "new" / "key.json").exists()  # nothing half-made is left
