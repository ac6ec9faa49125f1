"""Request/response over QUIC: one request per stream, one reply, both single codec frames.

Owns the client call (`request`) and the server side (`Dispatcher`): decoding with size
bounds, per-peer rate limits, handler dispatch and error replies. Policy on bad input:

- a malformed or oversized frame is a protocol violation: that *connection* is closed
  (`Code.PROTOCOL_VIOLATION`); other connections are untouched.
- a well-formed frame of an unknown type, or one without a handler, gets an
  `Error(UNSUPPORTED)` reply (the peer may speak a newer protocol).
- over the peer's rate (token bucket per peer id, surviving reconnects) a request gets
  `Error(RATE_LIMITED)` without being read; a peer that keeps pushing (`burst` refusals
  in a row) has its connection closed (`Code.REFUSED`).
- a handler that raises `Reject` replies `Error(REJECTED, text)`; any other exception
  replies `Error(INTERNAL)` with no details (errors never carry secrets).
- a request that does not arrive, or a reply the peer does not take, within
  `request_timeout` is abandoned (the stream reset).
- `admit(conn, type_id, length) -> refusal text or None` (optional) sees each frame's
  header before its body is read: a refused request is answered `Error(REJECTED, text)`
  without buffering its body, so a peer the application does not serve cannot make it
  hold more than a header per stream.
"""

from __future__ import annotations

import collections
import logging
from typing import Awaitable, Callable

import trio

from .codec import CORE, HEADER_SIZE, Error, ErrorCode, ProtocolError, Registry, UnknownMessage
from .quic import Code, Connection, LimitExceeded, TransportError

log = logging.getLogger(__name__)


class RemoteError(TransportError):
    """The peer answered with an `Error` message."""

    def __init__(self, code: int, message: str):
        super().__init__(f"peer replied error {code}: {message}")
        self.code = code
        self.message = message


class Reject(Exception):
    """Raise in a handler to reply `Error(REJECTED, message)`."""

    def __init__(self, message: str, code: int = ErrorCode.REJECTED):
        super().__init__(message)
        self.code = code
        self.message = message


async def request(conn: Connection, msg, *, registry: Registry = CORE, timeout: float = 30.0):
    """Send `msg` on a new stream and return the peer's reply message.

    `ProtocolError` if `msg` is invalid or too big (nothing is sent) or the reply is
    malformed (the connection is then closed); `RemoteError` for an `Error` reply;
    `trio.TooSlowError` after `timeout`; `TransportError` if the connection fails."""
    frame = registry.encode(msg)
    stream = await conn.open_stream()
    try:
        with trio.fail_after(timeout):
            await stream.send(frame, end=True)
            data = await stream.receive_all(registry.max_frame)
    except LimitExceeded:
        conn.close(Code.PROTOCOL_VIOLATION, "oversized reply")
        raise ProtocolError("oversized reply") from None
    except BaseException:
        stream.reset()
        raise
    try:
        reply = registry.decode(data)
    except ProtocolError:
        conn.close(Code.PROTOCOL_VIOLATION, "malformed reply")
        raise
    if isinstance(reply, Error):
        raise RemoteError(reply.code, reply.message)
    return reply


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: float, now: float):
        self.rate, self.burst = float(rate), float(burst)
        self.tokens, self.stamp = float(burst), now
        self.refusals = 0  # refusals since the last granted request

    def take(self, now: float, n: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            self.refusals = 0
            return True
        self.refusals += 1
        return False


Handler = Callable[[Connection, object], Awaitable[object]]


class Dispatcher:
    """Serves requests of one `registry`: `@dispatcher.handler(MsgType)` registers
    `async def handle(conn, msg) -> reply`."""

    def __init__(self, registry: Registry = CORE, *, rate: float = 100.0, burst: float = 200.0,
                 request_timeout: float = 30.0, max_tracked_peers: int = 4096,
                 admit: Callable[[Connection, int, int], str | None] | None = None):
        self.registry = registry
        self.admit = admit
        self.rate, self.burst = rate, burst
        self.request_timeout = request_timeout
        self._handlers: dict[type, Handler] = {}
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()
        self._max_tracked = max_tracked_peers

    def handler(self, cls: type):
        def wrap(fn: Handler) -> Handler:
            type_id = getattr(cls, "TYPE", None)
            if type_id is None or self.registry.types().get(type_id) is not cls:
                raise ValueError(f"{cls.__name__} is not a message of {self.registry.name}")
            self._handlers[cls] = fn
            return fn

        return wrap

    def _bucket(self, peer: str) -> TokenBucket:
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = TokenBucket(self.rate, self.burst, trio.current_time())
            while len(self._buckets) > self._max_tracked:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(peer)
        return bucket

    async def serve(self, endpoint) -> None:
        """Serve every connection the endpoint accepts, until cancelled."""
        async with trio.open_nursery() as nursery:
            async for conn in endpoint:
                nursery.start_soon(self.serve_connection, conn)

    async def serve_connection(self, conn: Connection) -> None:
        """Serve one connection's requests until it closes. Concurrency is bounded by
        the transport's `max_streams`."""
        async with trio.open_nursery() as nursery:
            async for stream in conn:
                nursery.start_soon(self._serve_stream, conn, stream)

    async def _serve_stream(self, conn: Connection, stream) -> None:
        reg = self.registry
        try:
            bucket = self._bucket(conn.peer_id)
            if not bucket.take(trio.current_time()):
                if bucket.refusals > self.burst:
                    conn.close(Code.REFUSED, "request rate exceeded")
                    return
                await self._reply(stream, Error(ErrorCode.RATE_LIMITED, "rate limited"))
                return
            data = None
            with trio.move_on_after(self.request_timeout):
                header = await stream.receive_exactly(HEADER_SIZE)
                type_id, length = reg.decode_header(header)
                refusal = self.admit(conn, type_id, length) if self.admit is not None else None
                if refusal is not None:
                    await self._reply(stream, Error(ErrorCode.REJECTED, refusal[:200]))
                    return
                data = header + await stream.receive_all(length)
            if data is None:
                stream.reset()
                return
            try:
                msg = reg.decode(data)
            except UnknownMessage as exc:
                await self._reply(stream, Error(ErrorCode.UNSUPPORTED, f"unknown message type {exc.type_id}"))
                return
            handler = self._handlers.get(type(msg))
            if handler is None:
                await self._reply(stream, Error(ErrorCode.UNSUPPORTED, f"no handler for {type(msg).__name__}"))
                return
            try:
                reply = await handler(conn, msg)
                frame = reg.encode(reply)
            except Reject as exc:
                frame = reg.encode(Error(exc.code, exc.message[:200]))
            except (ProtocolError, Exception) as exc:  # noqa: B014 - never leak details
                log.warning("handler for %s failed: %s", type(msg).__name__, type(exc).__name__)
                frame = reg.encode(Error(ErrorCode.INTERNAL, "internal error"))
            await self._send(stream, frame)
        except (LimitExceeded, ProtocolError) as exc:
            conn.close(Code.PROTOCOL_VIOLATION, "oversized message" if isinstance(exc, LimitExceeded)
                       else "malformed frame")
            log.info("closed %r: %s", conn, exc)
        except TransportError:
            stream.reset()

    async def _reply(self, stream, msg) -> None:
        await self._send(stream, self.registry.encode(msg))

    async def _send(self, stream, frame: bytes) -> None:
        with trio.move_on_after(self.request_timeout) as scope:
            await stream.send(frame, end=True)
            await stream.aclose()
        if scope.cancelled_caught:
            stream.reset()
