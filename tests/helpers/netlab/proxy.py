"""The UDP proxy: ``UdpProxy`` forwards datagrams between the clients of a listening socket and
one target, with a delay and a loss fraction per direction and cuts (in a thread of this
process); ``ProxyProcess`` is the same proxy in a child process (optionally in a namespace),
driven through its stdin (``proxy_main`` is that child's side)."""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import json
import random
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time

from tests.helpers.netlab.procs import COMMAND, REPO
from tests.helpers.netlab.sockets import MAX_DATAGRAM, big_buffers, format_hostport, parse_hostport

# =========================================================================== the proxy

class UdpProxy:
    """Forward UDP between clients of ``listen`` and ``target``, with delay, loss and cuts.

    Usage::

        with UdpProxy(("127.0.0.1", port), delay=0.1, loss=0.05) as proxy:
            dial(proxy.address)
            proxy.cut(); ...; proxy.restore()
            proxy.stats()
    """

    def __init__(self, target, listen=("127.0.0.1", 0), *, delay: float = 0.0, loss: float = 0.0,
                 seed: int | None = None, upstream_bind: str | None = None):
        self.target = (str(target[0]), int(target[1]))
        family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        self._tfamily = socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET
        self._upstream_bind = upstream_bind or ("::" if self._tfamily == socket.AF_INET6 else "0.0.0.0")
        self._listen = socket.socket(family, socket.SOCK_DGRAM)
        self._listen.bind((listen[0], int(listen[1])))
        self._listen.setblocking(False)
        big_buffers(self._listen)
        self.address = self._listen.getsockname()[:2]
        self.delay = float(delay)
        self.loss = float(loss)
        self._cut = False
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._queue: list = []  # heap of (due, seq, direction, sock, data, addr)
        self._seq = itertools.count()
        self._clients: dict = {}  # client address -> upstream socket
        self._by_sock: dict = {}  # upstream socket -> client address
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listen, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stop = False
        self._thread: threading.Thread | None = None
        self._counters = {f"{d}_{what}": 0 for d in ("up", "down")
                          for what in ("datagrams", "bytes", "dropped", "dropped_bytes")}
        self._counters["cut_dropped"] = 0
        self._counters["clients"] = 0

    # ---- control (thread-safe)

    def cut(self) -> None:
        """Drop everything from now on (held datagrams too) until restore()."""
        with self._lock:
            self._cut = True
        self._wake()

    def restore(self) -> None:
        with self._lock:
            self._cut = False
        self._wake()

    @property
    def is_cut(self) -> bool:
        return self._cut

    def set(self, *, delay: float | None = None, loss: float | None = None) -> None:
        with self._lock:
            if delay is not None:
                self.delay = float(delay)
            if loss is not None:
                self.loss = float(loss)
        self._wake()

    def stats(self) -> dict:
        """Counters: up_* towards the target, down_* towards the clients (forwarded datagrams and
        bytes, and dropped ones by loss or cut)."""
        with self._lock:
            out = dict(self._counters)
            out["held"] = len(self._queue)
            out["cut"] = self._cut
            out["delay"] = self.delay
            out["loss"] = self.loss
            return out

    # ---- lifetime

    def start(self) -> "UdpProxy":
        self._thread = threading.Thread(target=self.serve_forever, name=f"udp-proxy-{self.address[1]}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for s in list(self._by_sock):
            s.close()
        self._by_sock.clear()
        self._clients.clear()
        for s in (self._listen, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                s.close()
        with contextlib.suppress(Exception):
            self._sel.close()

    def __enter__(self) -> "UdpProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the loop

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _upstream_for(self, client) -> socket.socket:
        s = self._clients.get(client)
        if s is None:
            s = socket.socket(self._tfamily, socket.SOCK_DGRAM)
            s.bind((self._upstream_bind, 0))
            s.setblocking(False)
            big_buffers(s)
            self._clients[client] = s
            self._by_sock[s] = client
            self._sel.register(s, selectors.EVENT_READ, client)
            self._counters["clients"] += 1
        return s

    def _admit(self, direction: str, n: int) -> bool:
        """Count a received datagram; False if it is dropped (cut or loss)."""
        with self._lock:
            if self._cut:
                self._counters["cut_dropped"] += 1
                self._counters[f"{direction}_dropped"] += 1
                self._counters[f"{direction}_dropped_bytes"] += n
                return False
            if self.loss > 0 and self._rng.random() < self.loss:
                self._counters[f"{direction}_dropped"] += 1
                self._counters[f"{direction}_dropped_bytes"] += n
                return False
            return True

    def _emit(self, direction: str, sock, data: bytes, addr) -> None:
        with self._lock:
            if self._cut:  # held while the cable was pulled: lost
                self._counters["cut_dropped"] += 1
                self._counters[f"{direction}_dropped"] += 1
                self._counters[f"{direction}_dropped_bytes"] += len(data)
                return
            self._counters[f"{direction}_datagrams"] += 1
            self._counters[f"{direction}_bytes"] += len(data)
        try:
            if addr is None:
                sock.sendto(data, self.target)
            else:
                sock.sendto(data, addr)
        except BlockingIOError:
            pass  # the kernel buffer is full: that is loss, as on a real link
        except OSError as e:  # ECONNREFUSED from an earlier ICMP error, EPERM from a firewall...
            if e.errno not in (errno.ECONNREFUSED, errno.EPERM, errno.ENETUNREACH, errno.EHOSTUNREACH,
                               errno.EINVAL, errno.ENOBUFS):
                raise

    def _schedule(self, direction, sock, data, addr) -> None:
        if self.delay <= 0:
            self._emit(direction, sock, data, addr)
        else:
            heapq.heappush(self._queue, (time.monotonic() + self.delay, next(self._seq), direction, sock, data, addr))

    def serve_forever(self) -> None:
        while not self._stop:
            now = time.monotonic()
            while self._queue and self._queue[0][0] <= now:
                _, _, direction, sock, data, addr = heapq.heappop(self._queue)
                if sock.fileno() >= 0:
                    self._emit(direction, sock, data, addr)
            timeout = None
            if self._queue:
                timeout = max(0.0, self._queue[0][0] - time.monotonic())
            for key, _ in self._sel.select(timeout):
                sock = key.fileobj
                if key.data == "wake":
                    with contextlib.suppress(OSError):
                        while sock.recv(4096):
                            pass
                    continue
                for _ in range(256):  # a batch per wake-up
                    try:
                        data, addr = sock.recvfrom(MAX_DATAGRAM)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        continue  # ICMP errors surfacing on the socket
                    if sock is self._listen:
                        up = self._upstream_for(addr[:2])
                        if self._admit("up", len(data)):
                            self._schedule("up", up, data, None)
                    else:
                        client = self._by_sock.get(sock)
                        if client is None or addr[:2] != self.target:
                            continue  # not from the target: ignore
                        if self._admit("down", len(data)):
                            self._schedule("down", self._listen, data, client)


class ProxyProcess:
    """A UdpProxy in a child process (``prefix`` runs it elsewhere, e.g. ``["ip", "netns", "exec", NS]``)."""

    def __init__(self, target, listen=("127.0.0.1", 0), *, delay: float = 0.0, loss: float = 0.0,
                 seed: int | None = None, prefix: list[str] | None = None):
        cmd = [*(prefix or []), *COMMAND, "proxy", "--listen", format_hostport(listen),
               "--target", format_hostport(target), "--delay", str(delay), "--loss", str(loss)]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     text=True, bufsize=1, cwd=str(REPO))
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            self.close()
            self._err.seek(0)
            raise RuntimeError(f"proxy did not start: {line!r} {self._err.read().decode(errors='replace')}")
        self.address = parse_hostport(line.split(None, 1)[1])

    def _command(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"proxy exited (command {line!r})")
        return json.loads(reply)

    def cut(self) -> None:
        self._command("cut")

    def restore(self) -> None:
        self._command("restore")

    def set(self, *, delay: float | None = None, loss: float | None = None) -> None:
        if delay is not None:
            self._command(f"delay {delay}")
        if loss is not None:
            self._command(f"loss {loss}")

    def stats(self) -> dict:
        return self._command("stats")

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(Exception):
                f.close()
        self._err.close()

    def __enter__(self) -> "ProxyProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def proxy_main(args) -> None:
    proxy = UdpProxy(parse_hostport(args.target), parse_hostport(args.listen), delay=args.delay, loss=args.loss,
                     seed=args.seed)
    proxy.start()
    print(f"listening {format_hostport(proxy.address)}", flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            cmd, rest = words[0], words[1:]
            if cmd == "quit":
                print(json.dumps({"ok": True}), flush=True)
                break
            if cmd == "cut":
                proxy.cut()
            elif cmd == "restore":
                proxy.restore()
            elif cmd == "delay":
                proxy.set(delay=float(rest[0]))
            elif cmd == "loss":
                proxy.set(loss=float(rest[0]))
            elif cmd != "stats":
                print(json.dumps({"ok": False, "error": f"unknown command {cmd}"}), flush=True)
                continue
            print(json.dumps({"ok": True, **proxy.stats()}), flush=True)
    finally:
        proxy.stop()
