"""One bidirectional QUIC stream of a connection: buffered reads with consumption-based
credit, bounded writes, reset and close.

Owns a stream's buffers and its state on both sides. It builds on `machine` only: a
stream is made with its connection's QUIC machine (`machine.BpfsQuic`) and receive
credit (`machine.Credit`), and reaches the rest of its connection through `StreamHost`,
the interface defined here and implemented by `quic.Connection`. It imports nothing
from `quic`.

Reads take from a per-stream buffer that never holds more than the stream window
(`TransportConfig.max_stream_data`): what `receive_*` takes is recorded in the credit,
and only that is granted back to the peer. `send` waits while more than `send_buffer`
bytes (`TransportConfig.send_buffer`) are queued and not yet sent.
"""

from __future__ import annotations

from typing import Protocol

import trio

from .errors import Code, LimitExceeded, StreamClosed, StreamReset, TransportError
from .machine import BpfsQuic, Credit

__all__ = ["Stream", "StreamHost"]


class StreamHost(Protocol):
    """What a `Stream` needs from its connection, besides the QUIC machine and the
    credit it is built with. `quic.Connection` implements it.

    Attributes:
        terminated:   True once the connection's state is torn down (the QUIC machine
                      takes no more calls).
        send_waiters: the streams waiting in `send` for room; after each transmit the
                      connection calls their `on_transmit()`.
    """

    send_waiters: set[Stream]

    @property
    def terminated(self) -> bool: ...

    def check_open(self) -> None:
        """Raise the reason (`ConnectionClosed`) if the connection is closed or closing."""

    def transmit(self) -> None:
        """Send whatever the QUIC machine has to send now (data, credit, resets)."""

    def release_stream(self, stream: Stream) -> None:
        """Forget `stream` if it is `finished`; the connection credits its late data."""


class Stream:
    """One bidirectional QUIC stream. Not safe for two concurrent readers or writers.

    Attributes:
        stream_id: the QUIC stream id.
        buffered:  (property) bytes received and not yet read.
        closed:    (property) both our directions are over: FIN written or reset, and
                   the reader saw the end or a reset, or abandoned the stream.
        finished:  (property) `closed`, and the peer's side is over too (FIN or
                   RESET_STREAM received): nothing more will arrive.

    The application uses `receive_some`, `receive_exactly`, `receive_all`, `send`,
    `send_eof`, `reset`, `aclose` (and `async with`). The connection reports this
    stream's events through `on_data`, `on_reset`, `on_stop_sending`,
    `on_connection_lost` and `on_transmit`; applications never call those.
    """

    def __init__(self, host: StreamHost, stream_id: int, *, quic: BpfsQuic, credit: Credit, send_buffer: int):
        self._host = host
        self._quic = quic
        self._credit = credit
        self._send_buffer = send_buffer
        self.stream_id = stream_id
        self._buf = bytearray()  # received, not yet consumed
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
        return f"<Stream {self.stream_id} of {self._host!r}>"

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read (never more than `max_stream_data`)."""
        return len(self._buf)

    @property
    def closed(self) -> bool:
        """Both our directions are over (see the class docstring)."""
        return self._send_done and self._recv_done

    @property
    def finished(self) -> bool:
        """`closed`, and the peer's FIN or RESET_STREAM arrived: the stream can be forgotten."""
        return self._recv_done and self._send_done and (self._eof or self._peer_reset)

    # ---- events from the connection

    def on_data(self, data: bytes, end: bool) -> None:
        """STREAM data (and FIN if `end`) arrived, in order."""
        self._received += len(data)
        if end:
            self._eof = True
        if self._recv_done:  # abandoned: credit the connection, drop the bytes
            self._credit.drop(len(data))
            self._host.release_stream(self)
            return
        if data:
            self._buf += data
        self._recv_wake.set()

    def on_reset(self, error_code: int) -> None:
        """The peer reset its side (RESET_STREAM)."""
        if self._eof or self._peer_reset:
            return
        self._peer_reset = True
        # Credit everything up to the final size: what we buffered, and what the peer
        # counted against our window but we will never see.
        final = self._quic.received_offset(self.stream_id)
        if final is None:
            final = self._received
        self._credit.drop(len(self._buf) + max(0, final - self._received))
        self._buf.clear()
        if not self._recv_done:
            self._recv_error = StreamReset(error_code)
            self._recv_done = True
        self._recv_wake.set()
        self._host.release_stream(self)

    def on_stop_sending(self, error_code: int) -> None:
        """The peer asked us to stop sending (STOP_SENDING; aioquic resets our side)."""
        self._send_error = StreamReset(error_code)
        self._send_done = True
        if self._send_wake is not None:
            self._send_wake.set()

    def on_connection_lost(self, exc: BaseException) -> None:
        """The connection closed: a reader waiting for more data gets `exc`, a writer
        waiting for room wakes (and finds the connection closed)."""
        if self._recv_error is None and not self._eof:
            self._recv_error = exc
        self._recv_wake.set()
        if self._send_wake is not None:
            self._send_wake.set()

    def on_transmit(self) -> None:
        """The connection transmitted: wake the writer waiting in `send` if there is room
        now (or nothing more may be sent). Only called while it waits (`send_waiters`)."""
        if self._send_room() or self._send_done or self._send_error:
            assert self._send_wake is not None  # `send` set it before joining send_waiters
            self._send_wake.set()

    # ---- receiving

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
        self._credit.take(self.stream_id, len(data))
        due = self._quic.credit_due(self.stream_id)  # before the stream may be forgotten
        host = self._host
        if self._eof and not self._buf:
            self._recv_done = True
            host.release_stream(self)
        if due:
            host.transmit()
        return data

    async def receive_some(self, max_bytes: int = 1 << 16) -> bytes:
        """Up to `max_bytes` bytes as soon as any are available; b"" at end of stream."""
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._wait_readable()
        if not self._buf:
            self._recv_done = True
            self._host.release_stream(self)
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
        parts: list[bytes] = []
        total = 0
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
        sent = self._quic.sent_offset(self.stream_id)
        if sent is None:
            sent = self._written
        return self._written - sent < self._send_buffer

    async def send(self, data: bytes, end: bool = False) -> None:
        """Queue `data` (and FIN if `end`); waits while `send_buffer` bytes are unsent."""
        await trio.lowlevel.checkpoint_if_cancelled()
        host = self._host
        view = memoryview(data).cast("B")
        pos, total, step = 0, len(view), self._send_buffer
        while True:
            while not self._send_room():
                self._check_send()
                self._send_wake = trio.Event()
                host.send_waiters.add(self)
                try:
                    await self._send_wake.wait()
                finally:
                    host.send_waiters.discard(self)
            self._check_send()
            n = min(total - pos, step)
            last = pos + n >= total
            try:
                # aioquic annotates `data` as bytes but takes any buffer (it appends it to a bytearray)
                self._quic.send_stream_data(self.stream_id, view[pos:pos + n],  # type: ignore[arg-type]
                                            end_stream=end and last)
            except (RuntimeError, ValueError) as exc:  # reset by STOP_SENDING meanwhile
                raise self._send_error or StreamClosed(str(exc)) from None
            self._written += n
            pos += n
            if end and last:
                self._send_done = True
            host.transmit()
            if last:
                break
        if end:
            host.release_stream(self)

    async def send_eof(self) -> None:
        """Finish our side (FIN)."""
        await self.send(b"", end=True)

    def _check_send(self) -> None:
        self._host.check_open()
        if self._send_error is not None:
            raise self._send_error
        if self._send_done:
            raise StreamClosed("stream already finished or reset")

    # ---- closing

    def reset(self, error_code: int = Code.STREAM_CANCELLED) -> None:
        """Abort both directions: RESET_STREAM our side, STOP_SENDING theirs; unread
        data is dropped."""
        host = self._host
        quic = self._quic
        if host.terminated:
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
            self._credit.drop(len(self._buf))
            self._buf.clear()
            if not self._eof and not self._peer_reset:
                try:
                    quic.stop_stream(self.stream_id, error_code)
                except ValueError:
                    pass
        self._recv_wake.set()
        if self._send_wake is not None:
            self._send_wake.set()
        host.release_stream(self)
        host.transmit()

    async def aclose(self) -> None:
        """Finish our side (FIN) if still open and drop whatever is unread."""
        if not self._send_done and not self._host.terminated:
            try:
                await self.send_eof()
            except TransportError:
                pass
        if not self._recv_done:
            if self._eof:
                self._credit.drop(len(self._buf))
                self._buf.clear()
                self._recv_done = True
                self._host.release_stream(self)
            else:
                self.reset()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.reset()
        else:
            await self.aclose()
