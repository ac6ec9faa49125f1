"""What a partner sees of 1,000 tiny files and of one large file: pack count and sizes at the holder.

    python -m bench.partner_view [BPFS_PYTHON]

BPFS_PYTHON is the interpreter of the bpfs to measure (default: this one), so that an older
checkout's venv can be measured beside this one (issue 12's before and after). Prints one JSON
line; quoted in README "What a partner can and cannot see"."""
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

PY = sys.argv[1] if len(sys.argv) > 1 else sys.executable
env = {**os.environ, "BPFS_PASSPHRASE": "correct horse battery", "BPFS_BROKER": "none"}

def bpfs(*args, check=True):
    cp = subprocess.run([PY, "-m", "bpfs", *map(str, args)], env=env, capture_output=True, text=True, timeout=600)
    if check and cp.returncode:
        raise SystemExit(f"bpfs {args}: {cp.stderr}")
    return cp.stdout

def held(b, owner):
    d = b / "hosted" / owner / "packs"
    return {p.name: p.stat().st_size for p in d.glob("*/*.pack")} if d.exists() else {}

with tempfile.TemporaryDirectory() as t:
    t = Path(t)
    a, b, mnt = t / "A", t / "B", t / "mnt"
    mnt.mkdir()
    aid = json.loads(bpfs("init", a, "--kdf", "interactive", "--json"))["peer_id"]
    bid = json.loads(bpfs("init", b, "--kdf", "interactive", "--json"))["peer_id"]
    bpfs("serve", b, "--listen", "127.0.0.1:0")
    addr = json.loads(bpfs("id", b, "--json"))["addresses"][0]
    bpfs("pair", b, "--accept", aid)
    bpfs("mount", a, mnt, "--listen", "127.0.0.1:0")
    try:
        bpfs("pair", a, "--direct", addr, "--expect", bid)
        bpfs("sync", a)
        h0 = held(b, aid)
        rng = random.Random(1)
        for i in range(1000):
            (mnt / f"f{i:04d}.txt").write_bytes(rng.randbytes(40))
        bpfs("sync", a)
        h1 = held(b, aid)
        tiny = sorted(v for k, v in h1.items() if k not in h0)
        (mnt / "big.bin").write_bytes(rng.randbytes(40 << 20))
        bpfs("sync", a)
        h2 = held(b, aid)
        big = sorted(v for k, v in h2.items() if k not in h1)
        print(json.dumps({"tiny_files_1000x40B": {"packs": len(tiny), "sizes": tiny},
                          "one_file_40MiB": {"packs": len(big), "sizes": big}}))
    finally:
        bpfs("umount", mnt, check=False)
        bpfs("stop", b, check=False)
