"""The index's authenticator (issue 12): a keyed sum over every record of every table, kept up
to date with each change, stored sealed, checked on every open. No FUSE, no CLI."""

from __future__ import annotations

import os

import lmdb
import pytest

from bpfs.errors import BpfsError
from bpfs.index import FORMAT, Attr, Index, PackRecord, u64
from bpfs.keyfile import KeyRing


@pytest.fixture
def keys():
    return KeyRing(os.urandom(20))


def reopen(path, keys, readonly=False) -> Index:
    return Index(str(path), keys, readonly=readonly)


def raw_put(path, table: bytes, key: bytes, value: bytes | None) -> None:
    """Change the drive behind bpfs's back (None: delete)."""
    env = lmdb.open(str(path), max_dbs=64)
    try:
        with env.begin(write=True) as txn:
            db = env.open_db(table, txn=txn)
            if value is None:
                txn.delete(key, db=db)
            else:
                txn.put(key, value, db=db)
    finally:
        env.close()


def raw_get(path, table: bytes, key: bytes) -> bytes | None:
    env = lmdb.open(str(path), max_dbs=64, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return txn.get(key, db=env.open_db(table, txn=txn, create=False))
    finally:
        env.close()


def test_the_running_state_follows_puts_overwrites_deletes_and_aborts(tmp_path, keys):
    idx = reopen(tmp_path / "index", keys)
    try:
        assert idx.format == FORMAT
        assert idx._state == idx.scan_state()
        idx.put_attr(Attr(1, 0o40755, 0, 0, 2))
        idx.add_entry(1, b"a", 2)
        idx.put_pack(7, PackRecord(1, 10, 100, True))
        idx.queue_outbox(7)
        assert idx._state == idx.scan_state()
        idx.put_attr(Attr(1, 0o40755, 0, 0, 3))  # an overwrite subtracts the old value
        idx.put_pack(7, PackRecord(2, 20, 100, True))
        assert idx._state == idx.scan_state()
        before = idx._state
        with pytest.raises(RuntimeError):
            with idx.atomic():
                idx.add_entry(1, b"b", 3)
                idx.delete_pack(7)
                assert idx._state == idx.scan_state()
                raise RuntimeError("abort")
        assert idx._state == before == idx.scan_state()
        idx.delete_pack(7)  # deletes (the outbox entry too) and adds a tombstone
        idx.remove_entry(1, b"a")
        assert idx._state == idx.scan_state()
        idx.commit()
        assert idx._state == idx.scan_state()
    finally:
        idx.close()
    # stored sealed, checked on the next opens (read-only ones too)
    reopen(tmp_path / "index", keys, readonly=True).close()
    idx = reopen(tmp_path / "index", keys)
    idx.close()


def test_a_saved_batch_replays_to_a_matching_state(tmp_path, keys):
    idx = reopen(tmp_path / "index", keys)
    idx.put_attr(Attr(1, 0o40755, 0, 0, 2))
    idx.commit()
    idx.put_attr(Attr(2, 0o100644, 0, 0, 1, size=5))
    idx.add_entry(1, b"f", 2)
    idx.save()  # a killed daemon: saved, never committed
    idx.put_attr(Attr(3, 0o100644, 0, 0, 1))  # unsaved: lost
    idx.env.close()
    idx._log.close()
    idx._txn = None
    idx = reopen(tmp_path / "index", keys)
    try:
        assert idx.replayed and idx.get_attr(2).size == 5 and idx.get_attr(3) is None
    finally:
        idx.close()


@pytest.mark.parametrize("change", ["rollback", "plain", "delete-state", "downgrade"])
def test_changes_behind_its_back_are_refused(tmp_path, keys, change):
    path = tmp_path / "index"
    idx = reopen(path, keys)
    idx.put_attr(Attr(1, 0o40755, 0, 0, 2, size=1))
    idx.put_pack(5, PackRecord(0, 0, 100, True, lane=1))  # local: never replicated
    idx.commit()
    old = bytes(idx.txn.get(u64(1), db=idx._db["inodes"]))  # a copy of the drive's record, as a thief takes it
    idx.put_attr(Attr(1, 0o40755, 0, 0, 2, size=2))
    idx.commit()
    idx.close()
    if change == "rollback":  # an old sealed value put back: it opens fine, the sum does not match
        raw_put(path, b"inodes", u64(1), old)
    elif change == "plain":
        raw_put(path, b"outbox", u64(5), b"")
    elif change == "delete-state":
        raw_put(path, b"meta", b"state", None)
    else:  # a format 4 index said to be format 3, to be trusted on first use
        raw_put(path, b"meta", b"format", u64(3))
    for readonly in (True, False):
        with pytest.raises(BpfsError) as e:
            reopen(path, keys, readonly=readonly)
        assert e.value.exit_code == 2 and "does not match its authenticator" in str(e.value)


def test_an_older_index_is_upgraded_on_first_use(tmp_path, keys):
    path = tmp_path / "index"
    idx = reopen(path, keys)
    idx.put_attr(Attr(1, 0o40755, 0, 0, 2))
    idx.commit()
    idx.close()
    raw_put(path, b"meta", b"state", None)  # as format 3 left it
    raw_put(path, b"meta", b"format", u64(3))
    reopen(path, keys, readonly=True).close()  # read as it is
    idx = reopen(path, keys)
    try:
        assert idx.upgraded_from == 3 and idx.format == FORMAT
    finally:
        idx.close()
    assert raw_get(path, b"meta", b"state") is not None
    reopen(path, keys, readonly=True).close()


def test_a_snapshot_view_carries_no_state(tmp_path, keys):
    idx = reopen(tmp_path / "index", keys)
    try:
        idx.put_attr(Attr(1, 0o40755, 0, 0, 2))
        idx.commit()
        with idx.read_view() as records:
            meta = dict(records("meta"))
        assert b"state" not in meta and meta[b"format"] == u64(3)
        assert all(len(v) == 8 for v in meta.values())
    finally:
        idx.close()


def test_killed_between_the_commit_and_the_logs_truncation(tmp_path, keys):
    """The log then still holds batches the checkpoint contains, and changes saved nowhere but in
    the checkpoint: replayed, the records are the committed ones and match the last state."""
    idx = reopen(tmp_path / "index", keys)
    idx.put_attr(Attr(1, 0o40755, 0, 0, 2, size=1))
    idx.save()
    idx.put_attr(Attr(1, 0o40755, 0, 0, 2, size=2))  # not saved before the commit
    idx._log.checkpointed = lambda: None  # killed right after LMDB's commit
    idx.commit()
    idx.env.close()
    idx._log.close()
    idx._txn = None
    idx = reopen(tmp_path / "index", keys)
    try:
        assert idx.replayed and idx.get_attr(1).size == 2
    finally:
        idx.close()


def test_a_failed_atomic_section_puts_back_every_record_and_a_nested_one_only_its_own(tmp_path, keys):
    """`atomic` undoes its writes itself (no LMDB nested transaction): overwritten records get
    their old bytes back, new ones go, deleted ones return; an inner section that fails inside an
    outer one that goes on undoes only the inner writes. The redo log follows: a reopen after a
    kill replays exactly what stayed."""
    idx = reopen(tmp_path / "index", keys)
    try:
        idx.put_attr(Attr(1, 0o40755, 0, 0, 2))
        idx.add_entry(1, b"keep", 2)
        idx.add_entry(1, b"gone", 3)
        idx.commit()
        before = {t: dict(idx.txn.cursor(db=idx._db[t]).iternext()) for t in ("inodes", "dirents")}
        state = idx._state
        with pytest.raises(RuntimeError):
            with idx.atomic():
                idx.put_attr(Attr(1, 0o40755, 0, 0, 9))  # an overwrite
                idx.add_entry(1, b"new", 4)  # a new record
                idx.remove_entry(1, b"gone")  # a delete
                raise RuntimeError("abort")
        after = {t: dict(idx.txn.cursor(db=idx._db[t]).iternext()) for t in ("inodes", "dirents")}
        assert after == before and idx._state == state == idx.scan_state()
        assert idx.get_attr(1).nlink == 2 and idx.lookup(1, b"new") is None and idx.lookup(1, b"gone") == 3

        with idx.atomic():
            idx.add_entry(1, b"outer", 5)
            with pytest.raises(RuntimeError):
                with idx.atomic():
                    idx.add_entry(1, b"inner", 6)
                    idx.remove_entry(1, b"keep")
                    raise RuntimeError("inner abort")
            idx.add_entry(1, b"after", 7)
        assert [idx.lookup(1, n) for n in (b"outer", b"inner", b"keep", b"after")] == [5, None, 2, 7]
        assert idx._state == idx.scan_state()
        idx.save()  # what a killed daemon leaves: the redo log, no commit
    finally:
        idx.close()
    idx = reopen(tmp_path / "index", keys)
    try:
        assert [idx.lookup(1, n) for n in (b"outer", b"inner", b"keep", b"after", b"gone")] == [5, None, 2, 7, 3]
    finally:
        idx.close()
