"""UDP sockets and addresses: "host:port" text both ways, big socket buffers, a free UDP port
(here or in a namespace), a UDP server in a thread (``UdpServer``) and the UDP echo built on it
(``UdpEcho``; ``echo_main`` is its child process)."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading

from tests.helpers.netlab.procs import PYTHON, run_cmd

MAX_DATAGRAM = 65535


def parse_hostport(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    return host, int(port)


def format_hostport(addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def big_buffers(sock: socket.socket, size: int = 8 << 20) -> None:
    for opt, force in ((socket.SO_RCVBUF, getattr(socket, "SO_RCVBUFFORCE", None)),
                       (socket.SO_SNDBUF, getattr(socket, "SO_SNDBUFFORCE", None))):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        if force is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, force, size)


def free_udp_port(host: str = "127.0.0.1", prefix: list[str] | None = None) -> int:
    """A UDP port free now on host (in the current namespace, or via prefix in another one)."""
    if prefix:
        cp = run_cmd([*prefix, PYTHON, "-c", "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
                      f"s.bind(({host!r}, 0)); print(s.getsockname()[1])"])
        return int(cp.stdout.strip())
    with socket.socket(socket.AF_INET if ":" not in host else socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# =========================================================================== a UDP echo (for tests)

class UdpServer:
    """A UDP socket served by a thread: `handle(data, addr)` for each datagram; `with` starts it."""

    def __init__(self, host: str, port: int, *, reuse: bool = False):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        if reuse:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        big_buffers(self.sock, 4 << 20)
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()[:2]
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def handle(self, data: bytes, addr) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            except (socket.timeout, ConnectionRefusedError):  # an ICMP error from an earlier send
                continue
            except OSError:
                return
            with contextlib.suppress(OSError):
                self.handle(data, addr)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close()


class UdpEcho(UdpServer):
    """A UDP echo server in a thread (for measuring a proxy or a lab link)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        super().__init__(host, port)
        self.received = 0

    def handle(self, data: bytes, addr) -> None:
        self.received += 1
        self.sock.sendto(data, addr)


def echo_main(args) -> None:
    with UdpEcho(*parse_hostport(args.listen)) as echo:
        print(f"listening {format_hostport(echo.address)}", flush=True)
        sys.stdin.read()
