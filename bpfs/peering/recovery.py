"""Recovery: rebuilding a whole store from a partner with the recovery secret.

Owns `bpfs recover NEW_STORE --from HOST:PORT`. Steps, each one resumable:
  1. identity: the recovery secret derives every key, so the new store (created here with a new
     passphrase) has the same peer id, and the partner recognises its owner;
  2. index: the partner's latest signed root is fetched, checked (signature, and the manifest
     opens only with our keys), and the index rebuilt from its metadata chunks (`snapshot`);
  3. data: every data pack the snapshot needs is fetched into STORE/packs as a *.part file,
     continuing from its size after an interruption; each chunk the index places in it is
     authenticated (decrypted, length checked) before the file is renamed into place.
     A pack that does not authenticate is discarded and named in the error: the partner's copy
     is damaged or forged.
Progress lives in STORE/recovery.json (phase, partner, generation, packs needed); running the
same command again continues. The partner becomes a partner of the recovered store again.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time

import trio

from ..config import format_address, format_size, parse_address
from ..errors import BpfsError, IntegrityError, first_error
from ..fsutil import fsync_dir, make_private_dir, write_private_file
from ..keyfile import StoreKeys, read_public
from ..net.quic import TransportConfig, TransportError, open_endpoint
from ..net.rpc import RemoteError, request
from ..passphrase import read_passphrase
from ..store import key_path
from . import protocol as P
from .protocol import PARTNER_IDLE_TIMEOUT

STATE_FILE = "recovery.json"
PARALLEL = 4
ENV_SECRET = "BPFS_RECOVERY"


class RecoveryError(BpfsError):
    pass


def _secret() -> str:
    text = os.environ.get(ENV_SECRET)
    if text:
        return text
    if not sys.stdin.isatty():
        raise RecoveryError(f"no recovery secret: set {ENV_SECRET} or run on a terminal", exit_code=2)
    return getpass.getpass("Recovery secret: ")


def _state_path(store: str) -> str:
    return os.path.join(store, STATE_FILE)


def _load_state(store: str) -> dict | None:
    try:
        with open(_state_path(store)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _save_state(store: str, state: dict) -> None:
    write_private_file(_state_path(store), json.dumps(state).encode())
    fsync_dir(store)


def recover(store: str, source: str, expect: str | None, kdf: str, passphrase_file: str | None, progress=None) -> dict:
    from ..snapshot import create_store_from_recovery_secret

    say = progress or (lambda line: None)
    keys = StoreKeys.from_recovery_secret(_secret())
    address = parse_address(source)
    state = _load_state(store)
    if os.path.exists(key_path(store)):
        if read_public(key_path(store)).get("public_key") != keys.identity.public_key.hex():
            raise RecoveryError(f"{store} holds another store (not the one of this recovery secret)", exit_code=2)
        if state is None:
            raise RecoveryError(f"{store} already holds this store and no recovery is in progress there: "
                                "recover into a new folder", exit_code=2)
    else:
        if os.path.exists(store) and os.listdir(store):
            raise RecoveryError(f"{store} is not empty: recover into a new or empty folder", exit_code=2)
        create_store_from_recovery_secret(store, keys.recovery_secret, read_passphrase(passphrase_file, confirm=True),
                                          kdf)
        state = {"phase": "index", "from": format_address(address)}
        _save_state(store, state)
        say(f"created {store} for peer id {keys.identity.peer_id}")
    started = time.monotonic()
    result = trio.run(_recover, store, keys, address, expect, state, say)
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


async def _recover(store: str, keys: StoreKeys, address, expect: str | None, state: dict, say) -> dict:
    config = TransportConfig(max_data=32 << 20, max_stream_data=8 << 20, socket_buffer=8 << 20,
                             idle_timeout=PARTNER_IDLE_TIMEOUT)
    host = "::" if ":" in address[0] else "0.0.0.0"
    async with open_endpoint(keys.identity, host, 0, config=config, listen=False) as ep:
        try:
            with trio.fail_after(20):
                conn = await ep.connect(address, expected_peer=expect)
        except (TransportError, trio.TooSlowError) as e:
            raise RecoveryError(f"could not connect to {format_address(address)}: {e or 'no answer'}") from None
        try:
            usage = await request(conn, P.Usage(), registry=P.PARTNER)
            info = await request(conn, P.GetRoot(), registry=P.PARTNER)
        except RemoteError as e:
            raise RecoveryError(f"{conn.peer_id} refused: {e.message}") from None
        if info.generation == 0:
            raise RecoveryError(f"{conn.peer_id} holds no snapshot of this store (was `bpfs sync` ever run?)")
        if state["phase"] == "index":
            state = await _rebuild(store, keys, conn, usage, info, state, say)
        if state["phase"] == "data":
            await _fetch_data(store, keys, conn, state, say)
            _queue_for_replication(store, keys, state["packs"])
            state["phase"] = "done"
            _save_state(store, state)
        _adopt_partner(store, keys, conn, usage, address, state)
        os.unlink(_state_path(store))
        fsync_dir(store)
        await conn.aclose()
        return {"store": store, "from": conn.peer_id, "generation": state["generation"],
                "packs": len(state["packs"]), "bytes": state.get("bytes", 0)}


async def _fetch_object(conn, kind: int, obj_id: int, offset: int, length: int) -> bytes:
    out = bytearray()
    while len(out) < length:
        n = min(P.PIECE, length - len(out))
        reply = await request(conn, P.GetPiece(kind, obj_id, offset + len(out), n), registry=P.PARTNER, timeout=60)
        if not reply.data:
            raise RecoveryError(f"the partner's copy of {'pack' if kind == P.PACK else 'root'} {obj_id} is short")
        out += reply.data
    return bytes(out)


async def _rebuild(store, keys, conn, usage, info, state, say) -> dict:
    from ..snapshot import SnapshotError, rebuild_index

    say(f"fetching snapshot root generation {info.generation} ({format_size(info.size)}) from {conn.peer_id}")
    blob = await _fetch_object(conn, P.ROOT, info.generation, 0, info.size)
    token = trio.lowlevel.current_trio_token()

    def fetch_chunk(chunk_id, pack_id, offset, length):
        try:
            return trio.from_thread.run(_fetch_object, conn, P.PACK, pack_id, offset, length, trio_token=token)
        except RemoteError as e:
            raise RecoveryError(e.message) from None

    say("rebuilding the index")
    try:
        manifest = await trio.to_thread.run_sync(
            lambda: rebuild_index(store, keys, blob, fetch_chunk, pack_id_floor=usage.highest_pack))
    except SnapshotError as e:
        if "not freshly created" in str(e) and _rebuilt_generation(store) == info.generation + 1:
            from ..snapshot import open_manifest  # interrupted just after rebuilding it: done already

            manifest = open_manifest(keys, blob)
        else:
            raise RecoveryError(f"the snapshot from {conn.peer_id} is unusable: {e}") from None
    state.update(phase="data", generation=manifest.generation, packs=sorted(manifest.packs))
    _save_state(store, state)
    return state


def _rebuilt_generation(store: str) -> int:
    """The index's generation counter (plain), read without keys; 0 if unreadable."""
    import lmdb

    try:
        env = lmdb.open(os.path.join(store, "index"), readonly=True, lock=False, max_dbs=32, subdir=True)
    except lmdb.Error:
        return 0
    try:
        with env.begin() as txn:
            raw = txn.get(b"generation", db=env.open_db(b"meta", txn=txn, create=False))
        return int.from_bytes(raw, "big") if raw else 0
    except lmdb.Error:
        return 0
    finally:
        env.close()


async def _fetch_data(store, keys, conn, state, say) -> None:
    from ..index import Index
    from ..packs import PackStore

    packs = PackStore(store)
    index = Index(os.path.join(store, "index"), keys, readonly=True)
    try:
        todo = [pid for pid in state["packs"] if not os.path.exists(packs.path(pid))]
        have = {}
        for i in range(0, len(todo), P.MAX_IDS):
            ids = todo[i:i + P.MAX_IDS]
            reply = await request(conn, P.Have(P.PACK, ids), registry=P.PARTNER)
            have.update(zip(ids, zip(reply.sizes, reply.complete, strict=True), strict=True))
        missing = [pid for pid in todo if not have.get(pid, (0, False))[1]]
        if missing:
            raise RecoveryError(f"{conn.peer_id} lacks {len(missing)} of the {len(state['packs'])} packs this "
                                f"snapshot needs (first: {missing[0]:012x}); try another partner")
        total = sum(have[p][0] for p in todo)
        say(f"fetching {len(todo)} packs ({format_size(total)}); {len(state['packs']) - len(todo)} already here")
        done = [0]
        queue = iter(todo)

        async def worker():
            for pid in queue:
                await _fetch_pack(conn, packs, index, keys, pid, have[pid][0])
                done[0] += have[pid][0]

        async def report():
            while True:
                await trio.sleep(2)
                say(f"  {format_size(done[0])} of {format_size(total)}")

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(report)
                async with trio.open_nursery() as workers:
                    for _ in range(min(PARALLEL, len(todo))):
                        workers.start_soon(worker)
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as eg:
            raise first_error(eg) from None
        state["bytes"] = state.get("bytes", 0) + total
    finally:
        index.close()
        packs.close()


async def _fetch_pack(conn, packs, index, keys, pid: int, size: int) -> None:
    path = packs.path(pid)
    part = path + ".part"
    make_private_dir(os.path.dirname(path))
    fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        offset = os.fstat(fd).st_size
        if offset > size:
            os.ftruncate(fd, 0)
            offset = 0
        while offset < size:
            reply = await request(conn, P.GetPiece(P.PACK, pid, offset, min(P.PIECE, size - offset)),
                                  registry=P.PARTNER, timeout=60)
            if not reply.data:
                raise RecoveryError(f"the partner's copy of pack {pid:012x} is short")
            await trio.to_thread.run_sync(os.pwrite, fd, reply.data, offset)
            offset += len(reply.data)
        await trio.to_thread.run_sync(os.fdatasync, fd)
    finally:
        os.close(fd)
    entries = [(cid, index.get_chunk(cid)) for cid in index.chunks_in_pack(pid)]  # the index stays on this thread
    bad = await trio.to_thread.run_sync(_check_pack, keys, part, entries)
    if bad:
        os.unlink(part)
        raise RecoveryError(f"pack {pid:012x} from {conn.peer_id} does not authenticate ({bad}): the partner's "
                            "copy is damaged; run again, or recover from another partner")
    os.replace(part, path)
    fsync_dir(os.path.dirname(path))


def _check_pack(keys, part: str, entries) -> str | None:
    """Authenticate every chunk the index places in this pack; the first problem, or None."""
    from ..crypto import padme

    fd = os.open(part, os.O_RDONLY)
    try:
        for cid, rec in entries:
            if rec is None:
                continue
            sealed = os.pread(fd, rec.sealed_length, rec.offset)
            try:
                plain = keys.data.open(sealed, cid)
            except IntegrityError:
                return f"chunk {cid[:6].hex()} fails authentication"
            if len(sealed) != rec.sealed_length or len(plain) != padme(rec.length):
                return f"chunk {cid[:6].hex()} has the wrong length"
    finally:
        os.close(fd)
    return None


def _queue_for_replication(store, keys, pack_ids) -> None:
    """The recovered packs replicate again (to a new partner; the one we came from has them)."""
    from ..index import Index

    index = Index(os.path.join(store, "index"), keys)
    try:
        for pid in pack_ids:
            rec = index.get_pack(pid)
            if rec is not None and not rec.local:
                index.seal_pack(pid, rec)  # sealed, and in the outbox with its priority
        index.commit()
    finally:
        index.close()


def _adopt_partner(store, keys, conn, usage, address, state) -> None:
    """The partner we recovered from is our partner again, holding every pack it served us."""
    from .ledger import Ledger, Partner

    ledger = Ledger(store)
    try:
        if ledger.partner(conn.peer_id) is None:
            ledger.put_partner(Partner(conn.peer_id, conn.peer_public_key.hex(), format_address(address),
                                       we_keep=usage.quota, they_keep=usage.quota,
                                       root_generation=state["generation"]))
        ledger.mark_sent(conn.peer_id, P.PACK, state["packs"])
    finally:
        ledger.close()
