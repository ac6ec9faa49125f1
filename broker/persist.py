"""The broker's state on disk: announcements, remembered seqs and mailboxes in LMDB.

Owns the environment `STATE/broker.lmdb` (three named databases) and the encoding of what
`broker.state` journals (with the message codec, so entries are strict, bounded and versioned).
`Persist.write(ops)` is the state's journal: one transaction per change, committed before the
broker answers. Commits are not fsynced one by one (`sync=False`): a committed change is in the
page cache, so a killed broker (SIGKILL, a crash) loses nothing and a client retrying a request
after the restart finds its mailbox; `sync()` (every sweep) puts it on disk, so a power loss
costs at most a sweep interval. A mailbox only has to outlive a retry, an announcement is renewed
by its store anyway.

The map is bounded (`map_size`); a write that does not fit raises `state.JournalFull` and the
request is refused. An environment that cannot be opened (corrupt after a power loss) is moved
aside (`broker.lmdb.broken-TIME`) and the broker starts empty: everything in it is soft state that
stores and pairing clients re-send. Relay sessions and rate buckets are never written.

Nothing secret is stored: announcements are what stores publish to the broker, side secrets are
kept as hashes, mailbox bodies are opaque (the pairing exchange encrypts them).
"""

from __future__ import annotations

import logging
import os
import time

import lmdb

from bpfs.net.codec import Bool, Bytes, List, ProtocolError, Record, Registry, Text, UInt, field, message

from bpfs.rendezvous.wire import MAX_BODY, MAX_MAILBOX_MESSAGES, Announce
from .state import Announcement, JournalFull, Mailbox, SeqMemory

log = logging.getLogger(__name__)

DB_NAME = "broker.lmdb"
_TABLES = ("announcement", "seq", "mailbox")

STORE = Registry("bpfs.broker.store", max_frame=(2 * MAX_MAILBOX_MESSAGES + 4) * (MAX_BODY + 16))


@message(STORE, 0x10)
class StoredAnnouncement:
    """The `announcement` table's value (key: the store's public key): a `state.Announcement`."""

    announce: Announce = field(Record(Announce))
    observed: str = field(Text(64))
    source: str = field(Text(64))
    expires: int = field(UInt())  # milliseconds since the epoch


@message(STORE, 0x11)
class StoredSeq:
    """The `seq` table's value (key: the public key): a `state.SeqMemory`."""

    seq: int = field(UInt())
    forget_at: int = field(UInt())  # milliseconds since the epoch


@message(STORE, 0x12)
class StoredMailbox:
    """The `mailbox` table's value (key: the nameplate): a `state.Mailbox`, each side's messages in a
    list of its own."""

    nameplate: int = field(UInt(999_999, min=1))
    sides: list = field(List(Bytes(32, min_len=32), 2))  # hashes of the side secrets
    opener: list = field(List(Bytes(MAX_BODY), MAX_MAILBOX_MESSAGES))
    joiner: list = field(List(Bytes(MAX_BODY), MAX_MAILBOX_MESSAGES))
    opener_closed: bool = field(Bool())
    joiner_closed: bool = field(Bool())
    source: str = field(Text(64))
    expires: int = field(UInt())  # milliseconds since the epoch


def _ms(t: float) -> int:
    return max(0, int(t * 1000))


def _key(table: str, key) -> bytes:
    return key.to_bytes(4, "big") if table == "mailbox" else bytes(key)


def encode(table: str, value) -> bytes:
    if table == "announcement":
        v: Announcement = value
        return STORE.encode(StoredAnnouncement(Announce(v.record, v.signature), v.observed, v.source, _ms(v.expires)))
    if table == "seq":
        return STORE.encode(StoredSeq(value.seq, _ms(value.forget_at)))
    mb: Mailbox = value
    return STORE.encode(StoredMailbox(mb.nameplate, list(mb.sides), list(mb.messages[0]), list(mb.messages[1]),
                                      mb.closed[0], mb.closed[1], mb.source, _ms(mb.expires)))


def decode(table: str, key: bytes, data: bytes):
    msg = STORE.decode(data)
    if table == "announcement" and isinstance(msg, StoredAnnouncement):
        a = msg.announce
        if a.record.public_key != key:
            raise ProtocolError("announcement stored under another key")
        return Announcement(a.record, a.signature, msg.observed, msg.source, msg.expires / 1000)
    if table == "seq" and isinstance(msg, StoredSeq):
        return SeqMemory(msg.seq, msg.forget_at / 1000)
    if table == "mailbox" and isinstance(msg, StoredMailbox) and msg.sides:
        if msg.nameplate.to_bytes(4, "big") != key:
            raise ProtocolError("mailbox stored under another nameplate")
        return Mailbox(msg.nameplate, tuple(msg.sides), (tuple(msg.opener), tuple(msg.joiner)),
                       (msg.opener_closed, msg.joiner_closed), msg.source, msg.expires / 1000)
    raise ProtocolError(f"not a stored {table}")


class Persist:
    """The LMDB environment in `state_dir`; `write` is `BrokerState`'s journal."""

    def __init__(self, state_dir: str, map_size: int = 256 << 20):
        path = os.path.join(state_dir, DB_NAME)
        try:
            self.env = self._open(path, map_size)
        except lmdb.Error as exc:
            aside = f"{path}.broken-{int(time.time())}"
            log.warning("cannot open %s (%s); moving it to %s and starting empty", path, type(exc).__name__, aside)
            os.rename(path, aside)
            self.env = self._open(path, map_size)
        self._dbs = {t: self.env.open_db(t.encode()) for t in _TABLES}
        self.writes = 0

    @staticmethod
    def _open(path: str, map_size: int) -> lmdb.Environment:
        os.makedirs(path, mode=0o700, exist_ok=True)
        return lmdb.open(path, map_size=map_size, max_dbs=len(_TABLES) + 1, subdir=True, sync=False,
                         metasync=False, readahead=False, mode=0o600)

    def write(self, ops: list) -> None:
        """Apply (table, key, value or None) ops in one transaction; `JournalFull` if it does not fit
        (nothing is written then)."""
        try:
            with self.env.begin(write=True) as txn:
                for table, key, value in ops:
                    db, k = self._dbs[table], _key(table, key)
                    if value is None:
                        txn.delete(k, db=db)
                    else:
                        txn.put(k, encode(table, value), db=db)
        except lmdb.MapFullError:
            raise JournalFull() from None
        self.writes += 1

    def load(self) -> tuple[list, list, list]:
        """(announcements, [(key, SeqMemory)], mailboxes) as stored; undecodable entries are
        deleted and skipped."""
        out: dict[str, list] = {t: [] for t in _TABLES}
        bad: list = []
        with self.env.begin() as txn:
            for table in _TABLES:
                for key, data in txn.cursor(db=self._dbs[table]):
                    try:
                        value = decode(table, bytes(key), bytes(data))
                    except ProtocolError:
                        bad.append((table, bytes(key)))
                        continue
                    out[table].append((bytes(key), value) if table == "seq" else value)
        if bad:
            log.warning("dropping %d undecodable entries from %s", len(bad), DB_NAME)
            with self.env.begin(write=True) as txn:
                for table, key in bad:
                    txn.delete(key, db=self._dbs[table])
        return out["announcement"], out["seq"], out["mailbox"]

    def sync(self) -> None:
        """Flush committed changes to stable storage (blocking: call from a thread)."""
        self.env.sync(True)

    def close(self) -> None:
        try:
            self.env.sync(True)
        finally:
            self.env.close()
