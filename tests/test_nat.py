"""Two homes behind two home routers pair by code through a broker and back up to each other.

The network is made by the test (tests/netlab.py `NatLab`): a public network with the broker,
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
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, cleanup_mount, wait_until
from netlab import nat_lab, natlab_missing
from test_partners import MARKER, Store

pytestmark = [pytest.mark.timeout(420),
              pytest.mark.skipif(natlab_missing() is not None, reason=str(natlab_missing()))]

MiB = 1 << 20
BROKER_PORT = 7451
DATA = 6 * MiB


def start_broker(lab, tmp: Path) -> subprocess.Popen:
    ready = tmp / "broker-ready.json"
    config = tmp / "broker.toml"
    config.write_text('relay_rate = "64M"\nrelay_burst = "4M"\n')
    proc = lab.broker_ns.popen([PYTHON, "-m", "broker", "--listen", f"0.0.0.0:{BROKER_PORT}", "--state-dir",
                                tmp / "broker-state", "--ready-file", ready, "--config", config, "-v"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp / "broker.log", "wb"))
    assert wait_until(lambda: ready.exists() or proc.poll() is not None, timeout=30), "broker did not start"
    assert proc.poll() is None, (tmp / "broker.log").read_text()
    return proc


def logs(tmp: Path, *stores: Store) -> str:
    out = [f"--- broker ---\n{(tmp / 'broker.log').read_text(errors='replace')[-4000:]}"]
    out += [s.log_tail(60) for s in stores]
    return "\n".join(out)


@pytest.mark.parametrize("mode, path", [("cone", "direct"), ("symmetric", "via relay"), ("firewall", "via relay")])
def test_homes_behind_nat_pair_by_code_and_replicate(tmp_path, mode, path):
    with nat_lab(mode, mode) as lab:
        broker = start_broker(lab, tmp_path)
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
                f"{joined.stderr}\n{err}\n{logs(tmp_path, a, b)}"
            assert json.loads(joined.stdout)["peer_id"] == a.peer_id

            data = MARKER * (DATA // len(MARKER))
            (mnt / "secret.bin").write_bytes(data + os.urandom(MiB))
            cp = a.bpfs("sync", "--timeout", "240", check=False, timeout=300)
            assert cp.returncode == 0, f"{cp.stderr}\n{logs(tmp_path, a, b)}"
            assert b.hosted(a.peer_id)["pack_bytes"] >= DATA
            assert a.partner_status(b.peer_id)["path"] == path, logs(tmp_path, a, b)
            assert a.peer(b.peer_id)["state"] == ("connected via relay" if path == "via relay" else "connected")
        finally:
            capture.stop()
            cleanup_mount(mnt, a.path, env=a.env)
            for s in (a, b):
                s.bpfs("stop", check=False, timeout=120)
            broker.terminate()
            broker.wait(timeout=30)
        seen = capture.payload_bytes()
        assert seen, "the capture on the broker's interface saw nothing"
        assert MARKER not in seen  # the broker's wire carries ciphertext only
        if path == "direct":
            assert len(seen) < DATA // 4, f"{len(seen)} bytes crossed the broker: the data did not go direct"
        else:
            assert len(seen) > DATA, f"only {len(seen)} bytes crossed the broker: where did the data go?"
