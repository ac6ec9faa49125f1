"""A store listens only with a reason (issue 13, "Defaults and setup"): a store without partners
and without a pairing in progress answers no one on the network, however it was told to listen;
an invitation opens it to the invited peer's pairing, and from then on (it has a partner) it
answers as before. Real daemons, real QUIC over loopback."""

from __future__ import annotations

from tests.helpers.partners import Store


def test_a_store_without_partners_answers_no_one_until_it_expects_a_pairing(stores, tmp_path):
    b = stores.server("B")
    b.serve("127.0.0.1:0")
    address = b.address()  # bound (its port is known for the pairing to come), but not answering
    a = Store(tmp_path / "a")

    cp = a.bpfs("pair", "--direct", address, "--expect", b.peer_id, check=False, timeout=90)
    last = cp.stderr.strip().splitlines()[-1]
    assert cp.returncode != 0 and "Traceback" not in cp.stderr, cp.stderr
    assert last.startswith(f"bpfs: no bpfs store answered at {address} within "), cp.stderr
    assert f"bpfs pair --accept {a.peer_id}" in last, cp.stderr  # says what to run on the other side
    assert not a.peers()

    b.bpfs("pair", "--accept", a.peer_id)  # a reason: it expects this pairing now
    a.bpfs("pair", "--direct", address, "--expect", b.peer_id)
    assert [r["peer_id"] for r in a.peers()] == [b.peer_id]

    # with a partner, it answers anyone again (a stranger learns who is there, and nothing more)
    stranger = Store(tmp_path / "stranger")
    other = Store(tmp_path / "other")
    cp = stranger.bpfs("pair", "--direct", address, "--expect", other.peer_id, check=False, timeout=90)
    assert f"has peer id {b.peer_id}, not {other.peer_id}" in cp.stderr, cp.stderr
