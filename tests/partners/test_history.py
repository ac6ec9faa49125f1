"""History at partners: what a deletion, the retention policy and a stolen key can and cannot do.

Real daemons (A's mount, B's `bpfs serve`), real QUIC on loopback. A partner keeps every root the
owner's policy keeps, not only the newest; a root or the packs it needs go only through a signed
release and the grace period; a root from the future or with an absurd generation is refused; a
root signed with the owner's key that the owner did not make is an alarm in `bpfs status`, and
the owner's next snapshot outranks it. What the partner holds is read from its store (the
ledger's `hosted` table, its roots folder) while its daemon runs.
"""

from __future__ import annotations

import json
import random
import time

from tests.helpers.partners import host_port, misbehaving_run, pair, wait_for

from bpfs.identity import peer_id_bytes
from bpfs.keyfile import KeyRing
from bpfs.net.quic import open_endpoint
from bpfs.net.rpc import RemoteError, request
from bpfs.peering import protocol as P
from bpfs.peering.ledger import Ledger
from bpfs.snapshot import SignedRoot

MiB = 1 << 20


def held_roots(holder, owner_id: str) -> dict[int, bool]:
    """generation -> released, of the owner's roots the holder keeps (its ledger)."""
    ledger = Ledger(str(holder.path))
    try:
        raw = peer_id_bytes(bytes.fromhex(ledger.partner(owner_id).public_key))
        return {obj: bool(rec.released_at) for _, kind, obj, rec in ledger.all_hosted(raw)
                if kind == P.ROOT and rec.complete}
    finally:
        ledger.close()


def write_files(a, tag: str, n: int = 5) -> None:
    d = a.mnt / tag
    d.mkdir(exist_ok=True)
    rng = random.Random(tag)
    for i in range(n):
        (d / f"f{i}.bin").write_bytes(rng.randbytes(50_000))


def latest_generation(a) -> int:
    return a.status()["latest_generation"]


def test_a_deletion_and_a_sync_keep_the_past_at_the_partner(stores, tmp_path):
    """rm -rf of everything, then `bpfs sync`: the partner still holds the root from before the
    deletion (not released), and the packs that root needs."""
    a, b = stores.owner("A"), stores.server("B")
    b.serve()
    a.mount()
    pair(a, b)
    write_files(a, "v1")
    a.sync()
    before = latest_generation(a)
    packs_before = set(b.hosted_packs(a.peer_id))
    for p in (a.mnt / "v1").iterdir():
        p.unlink()
    (a.mnt / "v1").rmdir()
    a.sync()
    after = latest_generation(a)
    assert after > before
    roots = held_roots(b, a.peer_id)
    assert roots.get(before) is False and roots.get(after) is False, roots
    assert packs_before <= set(b.hosted_packs(a.peer_id)), "packs of the root before the deletion went"
    ledger = Ledger(str(b.path))
    try:
        raw = peer_id_bytes(bytes.fromhex(ledger.partner(a.peer_id).public_key))
        released = [obj for _, kind, obj, rec in ledger.all_hosted(raw) if kind == P.PACK and rec.released_at]
    finally:
        ledger.close()
    assert not set(released) & packs_before, "packs the retained root needs were released"


def test_retention_thins_roots_at_the_partner_through_signed_releases(stores, tmp_path):
    """With a policy keeping the 2 newest snapshots only, older roots are released at the
    partner (kept there for the grace period, not deleted), and nothing the policy keeps is."""
    a, b = stores.owner("A"), stores.server("B")
    (a.path / "bpfs.toml").write_text('[history]\nkeep_within = 0\nkeep_daily = 0\nkeep_weekly = 0\n'
                                      'keep_monthly = 0\nkeep_last = 2\n')
    b.serve()
    a.mount()
    pair(a, b)
    gens = []
    for i in range(4):
        write_files(a, f"r{i}", 2)
        a.sync()
        gens.append(latest_generation(a))
    kept = set(gens[-2:])

    def settled():
        roots = held_roots(b, a.peer_id)
        return all(roots.get(g) is False for g in kept) and all(roots.get(g) is True for g in gens[:-2] if g in roots)

    wait_for(settled, 30, "old roots released at B", diag=lambda: f"{held_roots(b, a.peer_id)}\n{a.log_tail()}")
    roots = held_roots(b, a.peer_id)
    assert {g for g, released in roots.items() if released} >= set(gens[:2]) & set(roots), roots
    for g in gens[:2]:  # released, but still there: the grace period protects them
        assert (b.hosted_dir(a.peer_id) / "roots" / f"{g:016x}.root").exists()


def test_roots_signed_with_a_stolen_key(stores, tmp_path):
    """Malware holding A's key sends B (a) an old snapshot re-signed with generation 2^62 and (b)
    one re-signed a little above A's newest: B refuses (a) and keeps (b); A sees (b) at its
    next connection to B, raises an alarm in `bpfs status`, and its next snapshot outranks it,
    so `bpfs sync` succeeds and B's newest root is A's own again."""
    a, b = stores.owner("A"), stores.server("B")
    b.port = _free_port()
    b.serve(f"127.0.0.1:{b.port}")
    a.mount()
    pair(a, b, f"127.0.0.1:{b.port}")
    write_files(a, "v1")
    a.sync()
    gen = latest_generation(a)
    blob = (b.hosted_dir(a.peer_id) / "roots" / f"{gen:016x}.root").read_bytes()
    keys = KeyRing.from_recovery_secret(a.recovery_secret)

    def resigned(generation: int) -> bytes:
        old = SignedRoot.decode(blob)
        unsigned = SignedRoot(old.peer_id, generation, old.sealed_manifest, b"", time.time_ns())
        return SignedRoot(old.peer_id, generation, old.sealed_manifest,
                          keys.identity.sign(unsigned.signed_message()), unsigned.created_ns).encode()

    outcomes = {}

    async def upload_as_a():
        async with open_endpoint(keys.identity, listen=False) as ep:
            conn = await ep.connect(host_port(f"127.0.0.1:{b.port}"), expected_peer=b.peer_id)
            for name, generation in (("absurd", 1 << 62), ("plausible", gen + 5000)):
                root = resigned(generation)
                try:
                    ack = await request(conn, P.PutPiece(P.ROOT, generation, len(root), 0, root,
                                                         P.object_digest(root)), registry=P.PARTNER)
                    outcomes[name] = "accepted" if ack.complete else "partial"
                except RemoteError as e:
                    outcomes[name] = (e.code, e.message)

    misbehaving_run(upload_as_a, timeout=60)
    assert outcomes["absurd"][0] == P.Refusal.ROLLBACK and "jumps" in outcomes["absurd"][1], outcomes
    assert outcomes["plausible"] == "accepted", outcomes
    assert max(held_roots(b, a.peer_id)) == gen + 5000

    # A reconnects to B (B restarts on its port), notices, and outranks the forged root
    b.stop()
    b.serve(f"127.0.0.1:{b.port}")
    wait_for(lambda: any(p.get("root_alarm") for p in a.status()["partners"]), 60, "the alarm in A's status",
             diag=lambda: a.log_tail())
    out = a.bpfs("status").stdout
    assert "ALARM" in out and str(gen + 5000) in out, out
    write_files(a, "v2")
    cp = a.sync(check=False)
    assert cp.returncode == 0, cp.stderr
    newest = latest_generation(a)
    assert newest > gen + 5000
    roots = held_roots(b, a.peer_id)
    assert max(roots) == newest and roots[newest] is False, roots
    # B serves A's own newest root as its newest (what a recovery takes)
    info = {}

    async def ask():
        async with open_endpoint(keys.identity, listen=False) as ep:
            conn = await ep.connect(host_port(f"127.0.0.1:{b.port}"), expected_peer=b.peer_id)
            info["root"] = await request(conn, P.GetRoot(), registry=P.PARTNER)

    misbehaving_run(ask, timeout=30)
    assert info["root"].generation == newest
    assert json.loads(a.bpfs("status", "--json").stdout)["partners"][0]["root_alarm"]


def _free_port() -> int:
    from tests.helpers.netlab import free_udp_port

    return free_udp_port()

