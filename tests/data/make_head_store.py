"""Make tests/data/head-store.tar.gz: a store written by bpfs as it was before the drive-thief
hardening (commit 9e1357c), for tests/mount/test_security_drive.py to open with today's code.

Run it with that commit's code first on the path, for example:

    mkdir /tmp/bpfs-head-src && git archive 9e1357c bpfs | tar -x -C /tmp/bpfs-head-src
    PYTHONPATH=/tmp/bpfs-head-src .venv/bin/python tests/data/make_head_store.py tests/data/head-store.tar.gz

The store's passphrase is conftest.PASSPHRASE; `head-store.json` inside the archive holds its
recovery secret, peer id, the retained snapshot's signed root (base64), the partner planted in
its ledger and what its files hold.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
import time

PASSPHRASE = "bpfs test passphrase: correct horse battery staple"
PARTNER_KEY = bytes(range(32))
PAIR_KEY = "5ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7e75ec7"
ADDRESS = "198.51.100.77:40404"


def run(*args, env):
    return subprocess.run([sys.executable, "-m", "bpfs", *args], env=env, check=True, capture_output=True,
                          text=True)


def main(out: str) -> None:
    import bpfs
    assert "bpfs-head-src" in bpfs.__file__, f"run with the old code first on PYTHONPATH, not {bpfs.__file__}"
    from bpfs import keyfile
    from bpfs.identity import Identity
    from bpfs.peering.ledger import Invite, Ledger, Partner
    from bpfs.snapshot import export_snapshot
    from bpfs.store import StoreFolder, key_path

    env = dict(os.environ, BPFS_PASSPHRASE=PASSPHRASE, BPFS_BROKER="none")
    work = tempfile.mkdtemp(prefix="bpfs-head-store-")
    store, mnt = os.path.join(work, "store"), os.path.join(work, "mnt")
    os.mkdir(mnt)
    info = json.loads(run("init", store, "--kdf", "interactive", "--json", env=env).stdout)
    run("mount", store, mnt, "--listen", "none", env=env)
    rng = random.Random(1234)
    files = {}
    try:
        for d in ("a", "b"):
            os.makedirs(os.path.join(mnt, d, "node_modules"))
            for name in ("same.txt", "index.js", "package.json"):
                p = os.path.join(mnt, d, "node_modules", name)
                with open(p, "wb") as f:
                    f.write(f"{d}/{name}\n".encode())
                os.setxattr(p, "user.tag", b"tagged " + d.encode())
        for i in range(40):
            with open(os.path.join(mnt, "a", f"entry-{i:02d}"), "wb") as f:
                f.write(b"x" * i)
        with open(os.path.join(mnt, "pieces.bin"), "wb") as f:  # three extents: each fsync drains
            for _ in range(3):
                f.write(rng.randbytes(100_000))
                f.flush()
                os.fsync(f.fileno())
        with open(os.path.join(mnt, "sparse.img"), "wb") as f:
            f.seek(20 << 20)
            f.write(rng.randbytes(5000))
        os.link(os.path.join(mnt, "pieces.bin"), os.path.join(mnt, "b", "pieces-link.bin"))
        os.symlink("a/node_modules", os.path.join(mnt, "link"))
        with open(os.path.join(mnt, ".backupignore"), "w") as f:
            f.write("*.local\n")
        with open(os.path.join(mnt, "kept.local"), "wb") as f:
            f.write(b"stays on this drive\n")
        for root, _, names in os.walk(mnt):
            for name in names:
                p = os.path.join(root, name)
                if not os.path.islink(p):
                    files[os.path.relpath(p, mnt)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    finally:
        run("umount", mnt, env=env)

    keys = keyfile.unlock(key_path(store), PASSPHRASE.encode())
    ledger = Ledger(store)
    peer = Identity(PARTNER_KEY)
    ledger.put_partner(Partner(peer.peer_id, peer.public_key.hex(), ADDRESS, 1 << 30, 1 << 30,
                               paired_at=time.time(), pair_key=PAIR_KEY, beacon_slot=3,
                               beacon="be" * 32, observed="203.0.113.9:5555"))
    ledger.put_invite(Invite(Identity(bytes(32)).peer_id, 1 << 20, 1 << 20, time.time() + 3600, pair_key="ab" * 32))
    partners = json.dumps([{"peer_id": peer.peer_id, "public_key": peer.public_key.hex(), "address": ADDRESS,
                            "pair_key": PAIR_KEY}]).encode()
    ledger.close()
    opened = StoreFolder(store, keys)
    try:
        manifest = export_snapshot(opened.index, keys, opened.packs, partners=partners)
    finally:
        opened.close()
    for junk in ("daemon.json", "lock"):
        if os.path.exists(os.path.join(store, junk)):
            os.unlink(os.path.join(store, junk))
    for name in os.listdir(os.path.join(store, "log")):
        os.unlink(os.path.join(store, "log", name))
    doc = {"passphrase": PASSPHRASE, "recovery_secret": info["recovery_secret"], "peer_id": info["peer_id"],
           "root": base64.b64encode(manifest.root).decode(), "generation": manifest.generation,
           "partner": {"peer_id": peer.peer_id, "pair_key": PAIR_KEY, "address": ADDRESS}, "files": files}
    with open(os.path.join(work, "head-store.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with tarfile.open(out, "w:gz") as tar:
        tar.add(store, arcname="store")
        tar.add(os.path.join(work, "head-store.json"), arcname="head-store.json")
    print(out, os.path.getsize(out), "bytes")


if __name__ == "__main__":
    main(sys.argv[1])
