"""The control socket: how the CLI asks the running daemon of a store to act for it.

The daemon listens on a Unix socket (STORE/control.sock, or under /run/bpfs when that path is too
long for a socket; its path is in STORE/daemon.json). Only the daemon's own user (or root) may
connect: the folder is 0700, the socket 0600, and the peer's uid is checked (SO_PEERCRED).

One request per connection, one JSON line each way (at most MAX_LINE bytes):
    {"op": "pair", "args": {...}}   ->   {"ok": true, "result": ...}
                                         {"ok": false, "error": "one line", "exit_code": 1}
Operations are what the daemon hands `serve`: a mapping of names to callables
(`PartnerService.operations()`); nothing else can be called.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable, Mapping

import trio

from ..errors import BpfsError
from ..fsutil import make_private_dir, run_dir

log = logging.getLogger(__name__)

MAX_LINE = 64 << 10
_MAX_SOCKET_PATH = 100


def socket_path(store_dir: str) -> str:
    path = os.path.join(store_dir, "control.sock")
    if len(path.encode()) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.blake2b(store_dir.encode(), digest_size=12).hexdigest()
    return run_dir(f"{digest}.sock")


class ControlError(BpfsError):
    """A control request that failed (the daemon unreachable or refusing it, a malformed request):
    one line and an exit code, for the CLI."""


async def serve(operations: Mapping[str, Callable], path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer the CLI on the Unix socket at `path`: `operations` maps each operation's name to
    what runs it (keyword arguments from the request; a result or an awaitable of one)."""
    make_private_dir(os.path.dirname(path))
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started(path)
    try:
        async with trio.open_nursery() as nursery:
            while True:
                stream = await listener.accept()
                nursery.start_soon(_handle, operations, stream)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def _peer_uid(stream) -> int:
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


async def _read_line(stream) -> bytes:
    buf = bytearray()
    while b"\n" not in buf:
        data = await stream.receive_some(MAX_LINE)
        if not data:
            break
        buf += data
        if len(buf) > MAX_LINE:
            raise ControlError("request too long")
    return bytes(buf.split(b"\n", 1)[0])


async def _handle(operations: Mapping[str, Callable], stream) -> None:
    async with stream:
        try:
            uid = _peer_uid(stream)
            if uid not in (0, os.geteuid()):
                raise ControlError("not allowed: another user's daemon")
            with trio.fail_after(10):
                line = await _read_line(stream)
            req = json.loads(line)
            op, args = req.get("op"), req.get("args") or {}
            if op not in operations or not isinstance(args, dict):
                raise ControlError(f"unknown operation {op!r}", exit_code=2)
            result = operations[op](**args)
            if hasattr(result, "__await__"):
                result = await result
            reply = {"ok": True, "result": result}
        except BpfsError as e:
            reply = {"ok": False, "error": str(e), "exit_code": e.exit_code}
        except (ValueError, TypeError, trio.TooSlowError) as e:
            reply = {"ok": False, "error": f"bad control request: {e}", "exit_code": 2}
        except Exception as e:
            log.exception("control operation failed")
            reply = {"ok": False, "error": f"the daemon failed: {type(e).__name__}", "exit_code": 1}
        try:
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def call(path: str, op: str, **args):
    """Ask the daemon (blocking; for the CLI). Raises BpfsError with the daemon's message."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(10)
        try:
            sock.connect(path)
        except OSError as e:
            raise ControlError(f"cannot reach the store's daemon at {path}: {e.strerror or e}") from None
        sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
        sock.settimeout(None)  # an operation (sync) may take as long as the user allows
        buf = bytearray()
        while b"\n" not in buf:
            data = sock.recv(1 << 20)
            if not data:
                raise ControlError("the daemon closed the control connection without answering")
            buf += data
    finally:
        sock.close()
    reply = json.loads(bytes(buf).split(b"\n", 1)[0])
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "the daemon refused"), exit_code=int(reply.get("exit_code", 1)))
    return reply["result"]
