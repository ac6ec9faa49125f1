"""The holder side of the partner protocol, against real QUIC on loopback and a real LMDB ledger.

Each test runs a `Holder` (what every daemon serves) on a real endpoint and talks to it as one
or more partners would, message by message, to check what the end-to-end tests cannot reach
precisely: quota refusals, ordering, digests, rollback, signed releases and the grace period.
"""

from __future__ import annotations

import os
import struct
from contextlib import asynccontextmanager

import pytest
import trio

from bpfs.config import Config
from bpfs.identity import Identity, peer_id_bytes
from bpfs.net.codec import HEADER
from bpfs.net.quic import ConnectionClosed, TransportError, open_endpoint
from bpfs.net.rpc import RemoteError, request
from bpfs.peering import protocol as P
from bpfs.peering.holder import Holder
from bpfs.peering.ledger import Ledger, Partner
from bpfs.snapshot import _ROOT_HEAD, _SIGN_DOMAIN, ROOT_MAGIC, ROOT_VERSION

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


class Clock:
    def __init__(self):
        self.now = 1_800_000_000.0

    def __call__(self):
        return self.now


def digest(data: bytes) -> bytes:
    """The digest the last piece carries: the object's tree root (bpfs.packtree)."""
    return P.object_digest(data)


def make_root(identity: Identity, generation: int, size: int = 400, created: float = Clock().now) -> bytes:
    """A well-formed root signed by `identity`, made at `created` (unix seconds; the holders
    here run on Clock); the holder cannot open the manifest anyway."""
    sealed = os.urandom(size)
    body = _ROOT_HEAD.pack(ROOT_MAGIC, ROOT_VERSION, peer_id_bytes(identity.public_key), generation,
                           int(created * 1e9), len(sealed)) + sealed
    return body + identity.sign(_SIGN_DOMAIN + body)


@asynccontextmanager
async def holder_running(tmp_path, *, grace_days=30.0):
    me = Identity(os.urandom(32))
    ledger = Ledger(str(tmp_path))
    clock = Clock()
    holder = Holder(str(tmp_path), me, ledger, Config(grace_days=grace_days), listen_port=lambda: 0,
                    on_paired=lambda p, conn: None, on_unpaired=lambda p: None, clock=clock)
    holder.clock = clock
    try:
        async with open_endpoint(me) as ep:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(holder.dispatcher.serve, ep)
                holder.address = ep.local_address
                yield holder
                nursery.cancel_scope.cancel()
    finally:
        ledger.close()


@asynccontextmanager
async def partner_of(holder: Holder, quota: int = 64 * MiB, identity: Identity | None = None):
    """A client endpoint of a store paired with the holder (recorded in the holder's ledger)."""
    ident = identity or Identity(os.urandom(32))
    if quota is not None:
        holder.ledger.put_partner(Partner(ident.peer_id, ident.public_key.hex(), None, we_keep=quota, they_keep=quota))
    async with open_endpoint(ident, listen=False) as ep:
        conn = await ep.connect(holder.address)
        conn.identity = ident
        yield conn


async def call(conn, msg):
    return await request(conn, msg, registry=P.PARTNER, timeout=20)


async def upload(conn, kind, obj_id, data: bytes, piece: int = P.PIECE):
    ack = None
    for off in range(0, len(data), piece):
        part = data[off:off + piece]
        last = off + len(part) >= len(data)
        ack = await call(conn, P.PutPiece(kind, obj_id, len(data), off, part, digest(data) if last else None))
    return ack


def run(fn, tmp_path, **kw):
    async def main():
        with trio.fail_after(50):
            async with holder_running(tmp_path, **kw) as holder:
                await fn(holder)

    trio.run(main)


def test_strangers_get_nothing_but_pairing(tmp_path):
    async def body(holder):
        async with partner_of(holder, quota=None) as conn:
            with pytest.raises(RemoteError, match="not paired"):
                await call(conn, P.Usage())
            with pytest.raises(RemoteError, match="not paired"):
                await call(conn, P.PutPiece(P.PACK, 1, 10, 0, b"x" * 10, digest(b"x" * 10)))
            with pytest.raises(RemoteError, match="not invited") as exc:
                await call(conn, P.PairRequest(offer=5 * MiB, ask=9 * MiB, listen_port=7450, pair_key=bytes(32)))
            assert conn.identity.peer_id in exc.value.message  # says exactly what to run on the other side
            holder.invite(conn.identity.peer_id, offer=8 * MiB, ask=2 * MiB, valid_for=60)
            reply = await call(conn, P.PairRequest(offer=5 * MiB, ask=9 * MiB, listen_port=7450, pair_key=bytes(32)))
            assert (reply.keep_for_you, reply.keep_for_me) == (8 * MiB, 2 * MiB)  # the smaller of each pair
            p = holder.ledger.partner(conn.identity.peer_id)
            assert p.we_keep == 8 * MiB and p.address == "127.0.0.1:7450"
            usage = await call(conn, P.Usage())
            assert (usage.quota, usage.used, usage.packs) == (8 * MiB, 0, 0)

    run(body, tmp_path)


def test_expired_invitation_is_refused(tmp_path):
    async def body(holder):
        async with partner_of(holder, quota=None) as conn:
            holder.invite(conn.identity.peer_id, offer=MiB, ask=MiB, valid_for=60)
            holder.clock.now += 61
            with pytest.raises(RemoteError, match="not invited"):
                await call(conn, P.PairRequest(offer=MiB, ask=MiB, listen_port=0, pair_key=bytes(32)))

    run(body, tmp_path)


def test_quota_is_enforced_with_a_clear_refusal(tmp_path):
    async def body(holder):
        async with partner_of(holder, quota=3 * MiB) as conn:
            first = os.urandom(2 * MiB)
            ack = await upload(conn, P.PACK, 1, first)
            assert ack.complete and ack.held == len(first)
            with pytest.raises(RemoteError) as exc:
                await upload(conn, P.PACK, 2, os.urandom(2 * MiB))
            assert exc.value.code == P.Refusal.QUOTA
            assert "quota exceeded" in exc.value.message and "3.0 MiB" in exc.value.message
            usage = await call(conn, P.Usage())
            assert usage.used == 2 * MiB and usage.packs == 1 and usage.highest_pack == 1
            got = await call(conn, P.GetPiece(P.PACK, 1, 0, P.PIECE))
            assert got.data == first[:P.PIECE]  # what was accepted is intact and readable

    run(body, tmp_path)


def test_resume_acknowledges_held_pieces_and_out_of_order_closes_only_that_connection(tmp_path):
    async def body(holder):
        data = os.urandom(3 * MiB + 123)
        async with partner_of(holder) as conn:
            await call(conn, P.PutPiece(P.PACK, 7, len(data), 0, data[:MiB], None))
            await call(conn, P.PutPiece(P.PACK, 7, len(data), MiB, data[MiB:2 * MiB], None))
        async with partner_of(holder, identity=conn.identity) as conn2:  # a new connection: resume
            have = await call(conn2, P.Have(P.PACK, [7, 8]))
            assert list(have.sizes) == [2 * MiB, 0] and list(have.complete) == [False, False]
            ack = await call(conn2, P.PutPiece(P.PACK, 7, len(data), MiB, data[MiB:2 * MiB], None))
            assert ack.held == 2 * MiB and not ack.complete  # a repeat is acknowledged, not appended
            async with partner_of(holder) as other:
                await upload(other, P.PACK, 1, b"other partner's pack")
                with pytest.raises((TransportError, RemoteError)):
                    await call(conn2, P.PutPiece(P.PACK, 7, len(data), 3 * MiB, data[3 * MiB:], digest(data)))
                with trio.fail_after(5):
                    await conn2.wait_closed()
                assert (await call(other, P.Usage())).packs == 1  # the other partner is still served
        async with partner_of(holder, identity=conn.identity) as conn3:
            ack = await upload_from(conn3, data, 2 * MiB)
            assert ack.complete
            stored = open(holder.path(peer_id_bytes(conn.identity.public_key), P.PACK, 7), "rb").read()
            assert stored == data

    run(body, tmp_path)


async def upload_from(conn, data, start):
    ack = None
    for off in range(start, len(data), P.PIECE):
        part = data[off:off + P.PIECE]
        last = off + len(part) >= len(data)
        ack = await call(conn, P.PutPiece(P.PACK, 7, len(data), off, part, digest(data) if last else None))
    return ack


def test_an_object_that_does_not_match_its_digest_is_discarded(tmp_path):
    async def body(holder):
        async with partner_of(holder) as conn:
            data = os.urandom(MiB + 5)
            await call(conn, P.PutPiece(P.PACK, 3, len(data), 0, data[:MiB], None))
            with pytest.raises(RemoteError) as exc:
                await call(conn, P.PutPiece(P.PACK, 3, len(data), MiB, data[MiB:], digest(b"something else")))
            assert exc.value.code == P.Refusal.BAD_DIGEST
            usage = await call(conn, P.Usage())
            assert usage.used == 0 and usage.packs == 0
            assert list((await call(conn, P.Have(P.PACK, [3]))).sizes) == [0]

    run(body, tmp_path)


def test_digests_are_checked_from_the_bytes_received_and_else_from_the_file(tmp_path):
    """A holder hashes an upload as its pieces arrive and does not read the pack back; an upload
    whose start it did not see (begun before a restart), or whose file changed under it, is
    hashed from the file instead. Either way a matching pack is kept with a correct sidecar and
    proves, and bytes that do not match the digest are refused."""
    from bpfs.packtree import Sidecar
    from bpfs.peering.auditor import judge
    from bpfs.peering.ledger import Outcome

    async def body(holder):
        data = os.urandom(2 * MiB + 4097)
        async with partner_of(holder) as conn:
            owner = peer_id_bytes(conn.identity.public_key)
            # 1: hashed on arrival (the pack is never read back)
            await call(conn, P.PutPiece(P.PACK, 1, len(data), 0, data[:MiB], None))
            part = holder.path(owner, P.PACK, 1) + ".part"
            assert holder._receiving[part].hasher.size == MiB
            assert (await upload_from_id(conn, 1, data, MiB)).complete
            assert not holder._receiving
            # 2: the first piece arrived before a restart (this holder never saw it)
            await call(conn, P.PutPiece(P.PACK, 2, len(data), 0, data[:MiB], None))
            holder._receiving.clear()
            assert (await upload_from_id(conn, 2, data, MiB)).complete
            # 3: the file grew behind the holder's back: the bytes received no longer tell
            await call(conn, P.PutPiece(P.PACK, 3, len(data), 0, data[:MiB], None))
            with open(holder.path(owner, P.PACK, 3) + ".part", "ab") as f:
                f.write(os.urandom(10))
            with pytest.raises(RemoteError) as exc:  # 10 stray bytes are in the file now
                await upload_from_id(conn, 3, data, MiB)
            assert exc.value.code == P.Refusal.BAD_DIGEST
            await call(conn, P.PutPiece(P.PACK, 3, len(data), 0, data[:MiB], None))
            with open(holder.path(owner, P.PACK, 3) + ".part", "ab") as f:
                f.write(data[MiB:MiB + 10])  # the right bytes, but not through the holder
            assert (await upload_from_id(conn, 3, data, MiB)).complete
            # 4: hashed on arrival, and not what the digest says
            await call(conn, P.PutPiece(P.PACK, 4, len(data), 0, data[:MiB], None))
            with pytest.raises(RemoteError) as exc:
                await upload_from_id(conn, 4, data[:MiB] + os.urandom(len(data) - MiB), MiB, digest(data))
            assert exc.value.code == P.Refusal.BAD_DIGEST
            for obj in (1, 2, 3):
                path = holder.path(owner, P.PACK, obj)
                assert open(path, "rb").read() == data
                kept = Sidecar.decode(open(path[:-len(".pack")] + ".tree", "rb").read())
                assert kept is not None and kept.blocks == Sidecar.of_file(path).blocks and kept.root == digest(data)
            nonce = os.urandom(32)
            reply = await call(conn, _prove(nonce, [1, 2, 3], 4))
            assert [p.status for p in reply.proofs] == [P.ProofStatus.HELD] * 3
            for obj, proof in zip((1, 2, 3), reply.proofs):
                assert judge(proof, nonce, obj, digest(data), len(data), 4) == Outcome.OK
            assert list((await call(conn, P.Have(P.PACK, [4]))).sizes) == [0]

    run(body, tmp_path)


async def upload_from_id(conn, obj_id, data, start, last_digest=None):
    ack = None
    for off in range(start, len(data), P.PIECE):
        part = data[off:off + P.PIECE]
        last = off + len(part) >= len(data)
        ack = await call(conn, P.PutPiece(P.PACK, obj_id, len(data), off, part,
                                          (last_digest or digest(data)) if last else None))
    return ack


def test_roots_are_kept_as_history_and_must_be_signed_and_plausible(tmp_path):
    """Every root is kept (the owner's history), older ones too; a root signed by someone else or
    forged is refused, and so is one made in the future or whose generation jumps further than
    the time since the newest root allows (a key in the wrong hands cannot outrank the future)."""
    async def body(holder):
        async with partner_of(holder) as conn:
            me, now = conn.identity, holder.clock.now
            assert (await call(conn, P.GetRoot())).generation == 0
            five = make_root(me, 5, created=now - 3600)
            assert (await upload(conn, P.ROOT, 5, five)).complete
            assert (await upload(conn, P.ROOT, 4, make_root(me, 4, created=now - 7200))).complete  # history
            with pytest.raises(RemoteError) as exc:  # older, yet made after the newest
                await upload(conn, P.ROOT, 3, make_root(me, 3, created=now))
            assert exc.value.code == P.Refusal.ROLLBACK
            with pytest.raises(RemoteError) as exc:  # made in the future
                await upload(conn, P.ROOT, 9, make_root(me, 9, created=now + 3600))
            assert exc.value.code == P.Refusal.ROLLBACK and "future" in exc.value.message
            with pytest.raises(RemoteError) as exc:  # an absurd jump: 2^62 one hour after generation 5
                await upload(conn, P.ROOT, 1 << 62, make_root(me, 1 << 62, created=now))
            assert exc.value.code == P.Refusal.ROLLBACK and "jumps" in exc.value.message
            with pytest.raises(RemoteError) as exc:  # signed by someone else
                await upload(conn, P.ROOT, 6, make_root(Identity(os.urandom(32)), 6))
            assert exc.value.code == P.Refusal.BAD_ROOT
            forged = bytearray(make_root(me, 7))
            forged[_ROOT_HEAD.size + 3] ^= 1
            with pytest.raises(RemoteError) as exc:
                await upload(conn, P.ROOT, 7, bytes(forged))
            assert exc.value.code == P.Refusal.BAD_ROOT
            good = make_root(me, 8)
            assert (await upload(conn, P.ROOT, 8, good)).complete
            info = await call(conn, P.GetRoot())
            assert (info.generation, info.size, info.digest) == (8, len(good), digest(good))
            assert (await call(conn, P.GetPiece(P.ROOT, 8, 0, P.PIECE))).data == good
            assert (await call(conn, P.GetPiece(P.ROOT, 5, 0, P.PIECE))).data == five  # still there
            listing = await call(conn, P.ListRoots(0, 10))
            assert list(listing.generations) == [4, 5, 8] and list(listing.released) == [False] * 3
            assert list(listing.digests)[1] == digest(five)
            holder_raw = peer_id_bytes(holder.identity.public_key)
            await call(conn, P.Release(P.ROOT, [8], me.sign(P.release_message(holder_raw, P.ROOT, [8]))))
            assert (await call(conn, P.GetRoot())).generation == 5  # the newest not released
            assert list((await call(conn, P.ListRoots(0, 10))).released) == [False, False, True]
            holder.clock.now += holder.config.grace_seconds + 1
            holder.sweep()
            assert list((await call(conn, P.ListRoots(0, 10))).generations) == [4, 5]

    run(body, tmp_path)


def test_release_needs_the_owners_signature_and_waits_for_the_grace_period(tmp_path):
    async def body(holder):
        async with partner_of(holder) as conn:
            me = conn.identity
            for pid in (1, 2):
                await upload(conn, P.PACK, pid, os.urandom(1000))
            holder_raw = peer_id_bytes(holder.identity.public_key)
            with pytest.raises(RemoteError, match="not signed"):
                await call(conn, P.Release(P.PACK, [1], Identity(os.urandom(32)).sign(
                    P.release_message(holder_raw, P.PACK, [1]))))
            with pytest.raises(RemoteError, match="not signed"):  # a signature for another holder
                await call(conn, P.Release(P.PACK, [1], me.sign(P.release_message(b"\0" * 20, P.PACK, [1]))))
            with pytest.raises(RemoteError, match="not signed"):  # a signature for releasing roots, not packs
                await call(conn, P.Release(P.PACK, [1], me.sign(P.release_message(holder_raw, P.ROOT, [1]))))
            done = await call(conn, P.Release(P.PACK, [1], me.sign(P.release_message(holder_raw, P.PACK, [1]))))
            assert done.count == 1
            holder.clock.now += 30 * 86400 - 10
            assert holder.sweep() == 0
            assert list((await call(conn, P.Have(P.PACK, [1]))).complete) == [True]  # still there in the grace period
            holder.clock.now += 20
            assert holder.sweep() == 1
            assert list((await call(conn, P.Have(P.PACK, [1, 2]))).complete) == [False, True]
            assert (await call(conn, P.Usage())).used == 1000

    run(body, tmp_path)


def test_ended_partnership_keeps_data_for_the_grace_period_then_forgets(tmp_path):
    async def body(holder):
        async with partner_of(holder) as conn:
            await upload(conn, P.PACK, 1, os.urandom(5000))
            assert (await call(conn, P.Unpair("testing"))).count == 1
            with pytest.raises(RemoteError, match="ended"):
                await upload(conn, P.PACK, 2, b"more")
            assert (await call(conn, P.GetPiece(P.PACK, 1, 0, 10))).data  # still readable (recovery)
            holder.clock.now += 31 * 86400
            assert holder.sweep() == 1
            assert holder.ledger.partner(conn.identity.peer_id) is None

    run(body, tmp_path)


def test_garbage_frames_close_that_connection_only(tmp_path):
    async def body(holder):
        async with partner_of(holder) as good, partner_of(holder) as bad:
            await upload(good, P.PACK, 1, b"good data")
            stream = await bad.open_stream()
            await stream.send(HEADER.pack(1, P.PutPiece.TYPE, 40) + b"\xff" * 40, end=True)
            with trio.fail_after(5):
                closed = await bad.wait_closed()
            assert isinstance(closed, ConnectionClosed)
            big = await (await_new_stream(good))  # the good partner is unaffected
            assert big.packs == 1

    run(body, tmp_path)


async def await_new_stream(conn):
    return await call(conn, P.Usage())


def test_oversized_frames_are_refused_before_being_read(tmp_path):
    async def body(holder):
        async with partner_of(holder, quota=None) as stranger:
            stream = await stranger.open_stream()
            # a stranger announces a 1 MiB request: refused from its header alone
            await stream.send(HEADER.pack(1, P.PutPiece.TYPE, MiB), end=False)
            reply = await stream.receive_all(4096)
            assert b"not paired" in reply
            stream.reset()
            stream = await stranger.open_stream()
            await stream.send(HEADER.pack(1, P.PairRequest.TYPE, 4096) + b"\0" * 4096, end=True)
            reply = await stream.receive_all(4096)
            assert b"oversized" in reply

    run(body, tmp_path)


def test_release_message_binds_holder_kind_and_ids():
    a = P.release_message(b"h" * 20, P.PACK, [1, 2])
    assert a != P.release_message(b"g" * 20, P.PACK, [1, 2])
    assert a != P.release_message(b"h" * 20, P.ROOT, [1, 2])
    assert a != P.release_message(b"h" * 20, P.PACK, [1, 2, 3])
    assert a != P.release_message(b"h" * 20, P.PACK, [2, 1])
    assert struct.unpack_from("<I", a, len(a) - 20)[0] == 2


# ----- storage audits and repairs ---------------------------------------------------------------
def _prove(nonce, packs, leaves=2):
    return P.Prove(P.AUDIT_VERSION, nonce, packs, leaves)


def test_audits_prove_held_packs_and_say_what_is_not(tmp_path):
    """Proofs verify against the root the owner knows; a pack lost on disk, one never received
    and one released are each told apart; a forged version or an oversized request is refused."""
    from bpfs.peering.auditor import judge
    from bpfs.peering.ledger import Outcome

    async def body(holder):
        async with partner_of(holder) as conn:
            packs = {i: os.urandom(200_000 + i * 5000) for i in (1, 2, 3)}
            for pid, data in packs.items():
                assert (await upload(conn, P.PACK, pid, data)).complete
            nonce = os.urandom(32)
            reply = await call(conn, _prove(nonce, [1, 2, 3, 9]))
            assert [p.status for p in reply.proofs] == [P.ProofStatus.HELD] * 3 + [P.ProofStatus.NOT_HELD]
            for pid, proof in zip((1, 2, 3), reply.proofs):
                assert judge(proof, nonce, pid, digest(packs[pid]), len(packs[pid]), 2) == Outcome.OK
                # the same answer does not pass for another nonce (other leaves) or another pack
                assert judge(proof, os.urandom(32), pid, digest(packs[pid]), len(packs[pid]), 2) != Outcome.OK
            assert judge(reply.proofs[0], nonce, 1, digest(packs[2]), len(packs[1]), 2) != Outcome.OK
            owner = holder.ledger.partner(conn.identity.peer_id).raw_id
            os.unlink(holder.path(owner, P.PACK, 2))
            signed = P.release_message(peer_id_bytes(holder.identity.public_key), P.PACK, [3])
            await call(conn, P.Release(P.PACK, [3], conn.identity.sign(signed)))
            reply = await call(conn, _prove(nonce, [2, 3]))
            assert [p.status for p in reply.proofs] == [P.ProofStatus.MISSING, P.ProofStatus.RELEASED]
            with pytest.raises(RemoteError, match="audit version"):
                await call(conn, P.Prove(P.AUDIT_VERSION + 1, nonce, [1], 1))
            with pytest.raises(RemoteError, match="at most"):
                await call(conn, P.Prove(P.AUDIT_VERSION, nonce, list(range(1, 20)), 32))
            with pytest.raises(RemoteError, match="at most"):
                await call(conn, P.Prove(P.AUDIT_VERSION, nonce, [1, 1], 1))

    run(body, tmp_path)


def test_audit_budget_is_enforced_per_owner(tmp_path):
    """An owner asking for more proofs than the budget allows is refused with when to retry;
    another owner is not affected."""
    from bpfs.peering.holder import AUDIT_BURST

    async def body(holder):
        async with partner_of(holder) as conn, partner_of(holder) as other:
            assert (await upload(conn, P.PACK, 1, os.urandom(100_000))).complete
            assert (await upload(other, P.PACK, 1, os.urandom(100_000))).complete
            asked = 0
            with pytest.raises(RemoteError, match="retry in") as exc:
                while asked <= AUDIT_BURST:
                    await call(conn, _prove(os.urandom(32), [1], P.MAX_PROOF_LEAVES))
                    asked += P.MAX_PROOF_LEAVES
            assert exc.value.code == P.Refusal.AUDIT_LIMIT
            assert asked == AUDIT_BURST  # the whole burst was served, then refused
            reply = await call(other, _prove(os.urandom(32), [1], P.MAX_PROOF_LEAVES))
            assert reply.proofs[0].status == P.ProofStatus.HELD

    run(body, tmp_path)


def test_repair_replaces_a_damaged_copy_only_with_the_bytes_first_accepted(tmp_path):
    """A repair upload mends a copy that failed an audit; bytes that do not hash to the digest
    the holder first accepted are refused and the copy stays as it was."""
    async def body(holder):
        async with partner_of(holder) as conn:
            data = os.urandom(3 * MiB + 77)
            assert (await upload(conn, P.PACK, 5, data)).complete
            owner = holder.ledger.partner(conn.identity.peer_id).raw_id
            path = holder.path(owner, P.PACK, 5)
            with open(path, "r+b") as f:
                f.seek(MiB)
                f.write(b"rot" * 100)
            damaged = open(path, "rb").read()
            other = os.urandom(len(data))
            with pytest.raises(RemoteError) as exc:  # something else under the same id and digest
                for off in range(0, len(other), P.PIECE):
                    part = other[off:off + P.PIECE]
                    await call(conn, P.PutPiece(P.PACK, 5, len(other), off, part,
                                                digest(data) if off + len(part) >= len(other) else None, True))
            assert exc.value.code == P.Refusal.BAD_DIGEST
            assert open(path, "rb").read() == damaged
            with pytest.raises(RemoteError, match="different object"):
                await call(conn, P.PutPiece(P.PACK, 5, len(data), len(data), b"", digest(other), True))
            for off in range(0, len(data), P.PIECE):
                part = data[off:off + P.PIECE]
                ack = await call(conn, P.PutPiece(P.PACK, 5, len(data), off, part,
                                                  digest(data) if off + len(part) >= len(data) else None, True))
            assert ack.complete and open(path, "rb").read() == data
            listing = await call(conn, P.ListHeld(P.PACK, 0, 10))
            assert list(listing.ids) == [5] and list(listing.digests) == [digest(data)]

    run(body, tmp_path)
