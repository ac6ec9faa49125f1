"""The redo log: index changes made since the last durable LMDB commit, kept for a crash.

LMDB commits are the checkpoints: each one fsyncs, so it costs a disk flush. Between
checkpoints, `close()` must still survive a killed daemon, which only needs the changes
to be in the kernel, not on the platter. So every change to the index is also recorded
here (table, key, sealed value or deletion), and `save()` appends the records since the
last save as one batch with a plain write(): the kernel has it once write() returns.
After a checkpoint the log is emptied. At start-up, batches found in the log are
replayed in order on top of the last checkpoint; a torn or corrupt batch (power loss in
the middle of a write) ends the replay, which leaves the state as of an earlier batch.

Replaying is idempotent: the log holds every change since the checkpoint, in order, so
replaying it onto that checkpoint, or onto a later one, gives the same final state.
Values are logged exactly as stored (sealed), so the log reveals nothing the index does
not.
"""

from __future__ import annotations

import os
import struct
import zlib

_MAGIC = b"BPRL"
_HEADER = struct.Struct("<4sII")  # magic, batch length, crc32 of the batch
_RECORD = struct.Struct("<BBHI")  # table number, op, key length, value length
PUT, DELETE = 1, 2


class RedoLog:
    """The redo log file at `path` for the index tables `tables`: records changes (`put`, `delete`),
    `save`s them as one batch, is emptied at a checkpoint, and yields the saved records to replay."""

    def __init__(self, path: str, tables: tuple[str, ...]):
        self.path = path
        self._tables = tables
        self._table_no = {name: i for i, name in enumerate(tables)}
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._pending: list[bytes] = []

    # ----- recording -------------------------------------------------------------------------
    def put(self, table: str, key: bytes, value: bytes) -> None:
        self._pending.append(_RECORD.pack(self._table_no[table], PUT, len(key), len(value)) + key + value)

    def delete(self, table: str, key: bytes) -> None:
        self._pending.append(_RECORD.pack(self._table_no[table], DELETE, len(key), 0) + key)

    def mark(self) -> int:
        return len(self._pending)

    def rollback(self, mark: int) -> None:
        """Forget records after `mark` (their nested transaction was aborted)."""
        del self._pending[mark:]

    @property
    def unsaved(self) -> bool:
        return bool(self._pending)

    def save(self) -> None:
        """Append the records since the last save as one checksummed batch (no fsync)."""
        if not self._pending:
            return
        batch = b"".join(self._pending)
        frame = _HEADER.pack(_MAGIC, len(batch), zlib.crc32(batch)) + batch
        view = memoryview(frame)
        while view:
            view = view[os.write(self._fd, view):]
        self._pending.clear()

    def checkpointed(self) -> None:
        """The index just committed durably: the log's content is no longer needed."""
        self._pending.clear()
        os.ftruncate(self._fd, 0)

    # ----- replay ------------------------------------------------------------------------------
    def saved_records(self):
        """Yield (table, op, key, value) of every intact saved batch, in order."""
        with open(self.path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + _HEADER.size <= len(data):
            magic, length, crc = _HEADER.unpack_from(data, pos)
            batch = data[pos + _HEADER.size:pos + _HEADER.size + length]
            if magic != _MAGIC or len(batch) != length or zlib.crc32(batch) != crc:
                return  # torn tail: stop at the last complete batch
            records, at = [], 0
            while at < len(batch):
                table_no, op, klen, vlen = _RECORD.unpack_from(batch, at)
                at += _RECORD.size
                key, value = batch[at:at + klen], batch[at + klen:at + klen + vlen]
                at += klen + vlen
                records.append((self._tables[table_no], op, key, value))
            yield from records
            pos += _HEADER.size + length

    def pending_records(self):
        for raw in self._pending:
            table_no, op, klen, vlen = _RECORD.unpack_from(raw)
            key = raw[_RECORD.size:_RECORD.size + klen]
            yield self._tables[table_no], op, key, raw[_RECORD.size + klen:]

    def is_empty(self) -> bool:
        return os.fstat(self._fd).st_size == 0 and not self._pending

    def close(self) -> None:
        os.close(self._fd)
