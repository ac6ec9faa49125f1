"""One bidirectional QUIC stream of a `quic.Connection`: buffered reads with
consumption-based credit, bounded writes, reset and close.

Reads take from a per-stream buffer that never holds more than the stream window
(`TransportConfig.max_stream_data`): what `receive_*` takes is what `machine` grants back
to the peer. `send` waits while more than `TransportConfig.send_buffer` bytes are queued
and not yet sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from .errors import Code, LimitExceeded, StreamClosed, StreamReset, TransportError

if TYPE_CHECKING:
    from .quic import Connection


class Stream:
    """One bidirectional QUIC stream. Not safe for two concurrent readers or writers."""

    def __init__(self, conn: "Connection", stream_id: int):
        self._conn = conn
        self.stream_id = stream_id
        self._buf = bytearray()  # received, not yet consumed
        self._consumed = 0  # bytes taken by the reader (credit basis)
        self._received = 0  # bytes delivered by aioquic
        self._eof = False  # FIN received (all data is in _buf)
        self._peer_reset = False  # RESET_STREAM received
        self._recv_error: BaseException | None = None
        self._recv_done = False  # reader saw EOF / reset, or abandoned the stream
        self._recv_wake = trio.Event()
        self._written = 0  # bytes handed to aioquic
        self._send_done = False  # FIN written or stream reset
        self._send_error: BaseException | None = None
        self._send_wake: trio.Event | None = None

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} of {self._conn!r}>"

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read (never more than `max_stream_data`)."""
        return len(self._buf)

    # ---- receiving

    def _on_data(self, data: bytes, end: bool) -> None:
        self._received += len(data)
        if end:
            self._eof = True
        if self._recv_done:  # abandoned: credit the connection, drop the bytes
            self._conn._consumed += len(data)
            self._conn._maybe_forget(self)
            return
        if data:
            self._buf += data
        self._recv_wake.set()

    def _on_reset(self, error_code: int) -> None:
        if self._eof or self._peer_reset:
            return
        self._peer_reset = True
        conn = self._conn
        # Credit everything up to the final size: what we buffered, and what the peer
        # counted against our window but we will never see.
        qs = conn._quic._streams.get(self.stream_id)
        final = qs.receiver.highest_offset if qs is not None else self._received
        conn._consumed += len(self._buf) + max(0, final - self._received)
        self._buf.clear()
        if not self._recv_done:
            self._recv_error = StreamReset(error_code)
            self._recv_done = True
        self._recv_wake.set()
        conn._maybe_forget(self)

    def _on_recv_error(self, exc: BaseException) -> None:
        if self._recv_error is None and not self._eof:
            self._recv_error = exc
        self._recv_wake.set()

    async def _wait_readable(self) -> None:
        while not self._buf and not self._eof:
            if self._recv_error is not None:
                raise self._recv_error
            if self._recv_done:
                raise StreamClosed("stream was reset locally")
            self._recv_wake = trio.Event()
            await self._recv_wake.wait()

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self._consumed += len(data)
        conn = self._conn
        conn._consumed += len(data)
        if self._eof and not self._buf:
            self._recv_done = True
            conn._maybe_forget(self)
        conn._credit_check(self)
        return data

    async def receive_some(self, max_bytes: int = 1 << 16) -> bytes:
        """Up to `max_bytes` bytes as soon as any are available; b"" at end of stream."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._wait_readable()
        if not self._buf:
            self._recv_done = True
            self._conn._maybe_forget(self)
            return b""
        return self._take(max_bytes)

    async def receive_exactly(self, n: int) -> bytes:
        """Exactly `n` bytes; `TransportError` if the stream ends first."""
        parts, need = [], n
        while need:
            data = await self.receive_some(need)
            if not data:
                raise TransportError(f"stream ended {need} bytes early")
            parts.append(data)
            need -= len(data)
        return b"".join(parts)

    async def receive_all(self, limit: int) -> bytes:
        """Everything up to the end of the stream; `LimitExceeded` (and the stream is
        stopped) as soon as more than `limit` bytes arrive."""
        parts, total = [], 0
        while True:
            data = await self.receive_some(1 << 20)
            if not data:
                return b"".join(parts)
            total += len(data)
            if total > limit:
                self.reset(Code.PROTOCOL_VIOLATION)
                raise LimitExceeded(f"stream carries more than {limit} bytes")
            parts.append(data)

    # ---- sending

    def _send_room(self) -> bool:
        qs = self._conn._quic._streams.get(self.stream_id)
        sent = qs.sender.highest_offset if qs is not None else self._written
        return self._written - sent < self._conn._cfg.send_buffer

    async def send(self, data: bytes, end: bool = False) -> None:
        """Queue `data` (and FIN if `end`); waits while `send_buffer` bytes are unsent."""
        await trio.lowlevel.checkpoint_if_cancelled()
        conn = self._conn
        view = memoryview(data).cast("B")
        pos, total, step = 0, len(view), conn._cfg.send_buffer
        while True:
            while not self._send_room():
                self._check_send()
                self._send_wake = trio.Event()
                conn._send_waiters.add(self)
                try:
                    await self._send_wake.wait()
                finally:
                    conn._send_waiters.discard(self)
            self._check_send()
            n = min(total - pos, step)
            last = pos + n >= total
            try:
                conn._quic.send_stream_data(self.stream_id, view[pos:pos + n], end_stream=end and last)
            except (RuntimeError, ValueError) as exc:  # reset by STOP_SENDING meanwhile
                raise self._send_error or StreamClosed(str(exc)) from None
            self._written += n
            pos += n
            if end and last:
                self._send_done = True
            conn._transmit()
            if last:
                break
        if end:
            conn._maybe_forget(self)

    async def send_eof(self) -> None:
        await self.send(b"", end=True)

    def _check_send(self) -> None:
        self._conn._check_open()
        if self._send_error is not None:
            raise self._send_error
        if self._send_done:
            raise StreamClosed("stream already finished or reset")

    def _on_send_error(self, exc: BaseException) -> None:
        self._send_error = exc
        self._send_done = True
        if self._send_wake is not None:
            self._send_wake.set()

    # ---- closing

    def reset(self, error_code: int = Code.STREAM_CANCELLED) -> None:
        """Abort both directions: RESET_STREAM our side, STOP_SENDING theirs; unread
        data is dropped."""
        conn = self._conn
        quic = conn._quic
        if conn._terminated:
            self._recv_done = self._send_done = True
            return
        if not self._send_done:
            self._send_done = True
            try:
                quic.reset_stream(self.stream_id, error_code)
            except ValueError:
                pass
        if not self._recv_done:
            self._recv_done = True
            conn._consumed += len(self._buf)
            self._buf.clear()
            if not self._eof and not self._peer_reset:
                try:
                    quic.stop_stream(self.stream_id, error_code)
                except ValueError:
                    pass
        self._recv_wake.set()
        if self._send_wake is not None:
            self._send_wake.set()
        conn._maybe_forget(self)
        conn._transmit()

    async def aclose(self) -> None:
        """Finish our side (FIN) if still open and drop whatever is unread."""
        if not self._send_done and not self._conn._terminated:
            try:
                await self.send_eof()
            except TransportError:
                pass
        if not self._recv_done:
            if self._eof:
                self._conn._consumed += len(self._buf)
                self._buf.clear()
                self._recv_done = True
                self._conn._maybe_forget(self)
            else:
                self.reset()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> "Stream":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.reset()
        else:
            await self.aclose()
