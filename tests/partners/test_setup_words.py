"""Pairing directly, in words that work as printed (issue 13, "Defaults and setup"): `bpfs pair
--accept` prints the command for the other side with the addresses this store really listens on
(a placeholder only when nothing listens), and `bpfs peers` with no partners names pairing by code
first."""

from __future__ import annotations

import re
import shlex

from tests.helpers.partners import Store


def test_pair_accept_prints_the_addresses_it_listens_on_and_the_command_works(stores):
    b = stores.server("B")
    b.serve("127.0.0.1:0")
    a = Store(b.path.parent / "store-A")
    cp = b.bpfs("pair", "--accept", a.peer_id)
    assert "THIS_HOST" not in cp.stdout, cp.stdout
    m = re.search(r"^\s*(bpfs pair --direct \S+ --expect \S+)\s*$", cp.stdout, re.M)
    assert m, cp.stdout
    cmd = shlex.split(m.group(1))
    assert cmd[3] == b.address() and cmd[5] == b.peer_id, cp.stdout
    # the printed command, run on the other side, pairs
    a.bpfs("pair", *cmd[2:])
    assert [r["peer_id"] for r in a.peers()] == [b.peer_id]


def test_pair_accept_without_a_daemon_says_what_the_address_will_be_found_by(tmp_path):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    cp = b.bpfs("pair", "--accept", a.peer_id)
    assert "THIS_HOST" not in cp.stdout and "bpfs pair --direct HOST:PORT --expect " + b.peer_id in cp.stdout, \
        cp.stdout
    assert "bpfs serve" in cp.stdout and "bpfs id" in cp.stdout, cp.stdout


def test_peers_without_partners_names_pairing_by_code_first(tmp_path):
    a = Store(tmp_path / "a")
    out = a.bpfs("peers").stdout
    assert "no partners" in out, out
    assert "bpfs pair CODE" in out and "--direct" in out, out
    assert out.index("bpfs pair") < out.index("bpfs pair CODE") < out.index("--direct"), out
