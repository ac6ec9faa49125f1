"""Two homes behind two home routers pair by code through a broker and back up to each other.

The network is made by the test (tests/helpers/netlab/ `NatLab`): a public network with the broker,
two home routers (iptables MASQUERADE and a stateful firewall, in network namespaces) and a
home behind each. Real `bpfs-broker`, real store daemons inside the homes (a FUSE mount in home
A, `bpfs serve` in home B), the real CLI. Neither home can reach the other's address; neither
router lets anything in that its home did not ask for.

- cone NATs (what most home routers do): the stores pair by code and replicate *directly*,
  through the holes they punched; the broker's interface carries only the small rendezvous
  traffic, not the data.
- symmetric NATs (a new public port per destination): hole punching cannot work; replication
  goes through the broker's relay, `bpfs status` says "via relay", and the data crosses the
  broker's interface only as ciphertext. The same behind routers that pass UDP only to and from
  the broker (a firewall).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.helpers.broker import BrokerProcess
from tests.helpers.cli import PYTHON, REPO
from tests.helpers.mounts import cleanup_mount
from tests.helpers.netlab import nat_lab, natlab_missing
from tests.helpers.partners import MARKER, Store

pytestmark = [pytest.mark.timeout(420),
              pytest.mark.skipif(natlab_missing() is not None, reason=str(natlab_missing()))]

MiB = 1 << 20
BROKER_PORT = 7451
DATA = 6 * MiB


def logs(broker: BrokerProcess, *stores: Store) -> str:
    out = [f"--- broker ---\n{broker.log_tail(60)}"]
    out += [s.log_tail(60) for s in stores]
    return "\n".join(out)


@pytest.mark.aioquic_too(only=["cone-direct", "symmetric-via relay"])  # firewall: the same relay path
@pytest.mark.parametrize("mode, path", [("cone", "direct"), ("symmetric", "via relay"), ("firewall", "via relay")])
def test_homes_behind_nat_pair_by_code_and_replicate(tmp_path, mode, path):
    with nat_lab(mode, mode) as lab:
        broker = BrokerProcess(tmp_path, listen=f"0.0.0.0:{BROKER_PORT}", prefix=lab.broker_ns.prefix,
                               config='relay_rate = "64M"\nrelay_burst = "4M"\n').start()
        broker_at = f"{lab.broker_ip}:{BROKER_PORT}"
        a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        capture = lab.capture(tmp_path / "capture").start()
        try:
            lab.home_a.bpfs("mount", a.path, mnt, "--listen", "0.0.0.0:7450", "--broker", broker_at, env=a.env)
            lab.home_b.bpfs("serve", b.path, "--listen", "0.0.0.0:7450", "--broker", broker_at, env=b.env)
            creator = lab.home_a.popen([PYTHON, "-m", "bpfs", "pair", a.path, "--yes", "--json"], cwd=REPO,
                                       env=a.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            code = json.loads(creator.stdout.readline())["code"]
            joined = lab.home_b.bpfs("pair", b.path, code, "--yes", "--json", env=b.env, check=False, timeout=180)
            out, err = creator.communicate(timeout=180)
            assert joined.returncode == 0 and creator.returncode == 0, \
                f"{joined.stderr}\n{err}\n{logs(broker, a, b)}"
            assert json.loads(joined.stdout)["peer_id"] == a.peer_id

            data = MARKER * (DATA // len(MARKER))
            (mnt / "secret.bin").write_bytes(data + os.urandom(MiB))
            cp = a.bpfs("sync", "--timeout", "240", check=False, timeout=300)
            assert cp.returncode == 0, f"{cp.stderr}\n{logs(broker, a, b)}"
            assert b.hosted(a.peer_id)["pack_bytes"] >= DATA
            assert a.partner_status(b.peer_id)["path"] == path, logs(broker, a, b)
            assert a.peer(b.peer_id)["path"] == path and a.peer(b.peer_id)["connected"]
        finally:
            capture.stop()
            cleanup_mount(mnt, a.path, env=a.env)
            for s in (a, b):
                s.bpfs("stop", check=False, timeout=120)
            broker.stop()
        seen = capture.payload_bytes()
        stats = capture.stats()
        assert seen, "the capture on the broker's interface saw nothing"
        # every byte of every UDP payload was captured (GSO super-packets of up to 64 KiB
        # included), so what follows covers them all
        assert stats["truncated_frames"] == 0, stats
        assert MARKER not in seen  # the broker's wire carries ciphertext only
        if path == "direct":
            assert len(seen) < DATA // 4, f"{len(seen)} bytes crossed the broker: the data did not go direct"
        else:
            assert len(seen) > DATA, f"only {len(seen)} bytes crossed the broker: where did the data go?"
