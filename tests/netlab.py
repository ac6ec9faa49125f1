"""Network test lab: a UDP delay/loss/cut proxy and throw-away network namespaces.

Importable by tests (``from netlab import NetLab, UdpProxy, ProxyProcess``) and runnable as a
script (``python tests/netlab.py proxy ...``) so that a proxy can run inside a namespace
(``ip netns exec NS python tests/netlab.py proxy ...``).  Nothing here knows about bpfs beyond
how to start its CLI.

UdpProxy
    Forwards datagrams between the clients of a listening socket and one target, both ways.
    Each client address gets its own upstream socket, so the target sees one peer per client
    (as QUIC needs).  Every datagram can be held for ``delay`` seconds (per direction: a
    100 ms delay adds 200 ms to a round trip), dropped with probability ``loss`` (per
    direction), and everything is dropped, including what is still held, while ``cut()``.
    ``restore()`` ends a cut.  Counters in ``stats()``.  Runs in a thread of this process.

ProxyProcess
    The same proxy in a child process (optionally inside a namespace), driven through its
    stdin: one command a line (``cut``, ``restore``, ``delay S``, ``loss P``, ``stats``,
    ``quit``), each answered with one JSON line.  Use it where the proxy must not share the
    test process's GIL, or must live in a namespace.

NetLab
    A context manager making a bridge in the root namespace and N network namespaces, each
    joined to the bridge by a veth pair, with addresses in one /24 (the bridge is .1, host i
    is .(i+2)).  The root namespace (where the tests, and the FUSE mounts, live) reaches every
    host; the hosts reach each other.  Everything is deleted on exit, also after a failure.

    Mounts: ``ip netns exec`` also gives the command a private *mount* namespace (to remount
    /sys), so a FUSE mount made under it is invisible to the test and to later commands.
    ``Host.cmd(...)`` therefore uses ``nsenter --net=/run/netns/NS``, which changes only the
    network namespace: a ``bpfs mount`` started that way is visible to the test as usual.

    Impairments live inside the host's namespace, on its veth: ``host.set_loss(p)`` (iptables
    ``statistic`` rules, both directions), ``host.cut()`` / ``host.restore()`` (iptables DROP of
    everything on the veth, both directions; a host's own sends are refused with EPERM, which
    QUIC treats as loss), ``host.set_rate("10mbit")`` (tc tbf).  tc netem is missing from the
    test kernel: delay comes from a proxy.

Addresses: the lab's /24 is taken from 10.231.0.0/16 and exists only inside the namespaces this
lab creates (plus the bridge): no packet leaves the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import heapq
import ipaddress
import itertools
import json
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve()
PYTHON = os.environ.get("BPFS_TEST_PYTHON") or sys.executable

_MAX_DATAGRAM = 65535


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
        _big_buffers(self._listen)
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
            _big_buffers(s)
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
                        data, addr = sock.recvfrom(_MAX_DATAGRAM)
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


def _big_buffers(sock: socket.socket, size: int = 8 << 20) -> None:
    for opt, force in ((socket.SO_RCVBUF, getattr(socket, "SO_RCVBUFFORCE", None)),
                       (socket.SO_SNDBUF, getattr(socket, "SO_SNDBUFFORCE", None))):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        if force is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, force, size)


class ProxyProcess:
    """A UdpProxy in a child process (``prefix`` runs it elsewhere, e.g. ``["ip", "netns", "exec", NS]``)."""

    def __init__(self, target, listen=("127.0.0.1", 0), *, delay: float = 0.0, loss: float = 0.0,
                 seed: int | None = None, prefix: list[str] | None = None):
        cmd = [*(prefix or []), PYTHON, str(HERE), "proxy", "--listen", format_hostport(listen),
               "--target", format_hostport(target), "--delay", str(delay), "--loss", str(loss)]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     text=True, bufsize=1)
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


def _proxy_main(args) -> None:
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


# =========================================================================== running commands

def run_cmd(cmd, *, env=None, check=True, timeout=120, input=None, cwd=None) -> subprocess.CompletedProcess:
    """subprocess.run with output through temporary files (a daemon keeping inherited pipes open
    cannot hang us), text results, and a readable error."""
    cmd = [os.fspath(c) for c in cmd]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.run(cmd, env=env, stdout=out, stderr=err,
                                  stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                  input=input.encode() if input is not None else None, timeout=timeout,
                                  cwd=cwd or str(REPO))
        except subprocess.TimeoutExpired as e:
            out.seek(0)
            err.seek(0)
            raise AssertionError(f"command timed out after {timeout}s: {cmd}\nstdout: "
                                 f"{out.read().decode(errors='replace')}\nstderr: "
                                 f"{err.read().decode(errors='replace')}") from e
        out.seek(0)
        err.seek(0)
        cp = subprocess.CompletedProcess(cmd, proc.returncode, out.read().decode(errors="replace"),
                                         err.read().decode(errors="replace"))
    if check and cp.returncode != 0:
        raise AssertionError(f"command failed (exit {cp.returncode}): {' '.join(cmd)}\nstdout: {cp.stdout}\n"
                             f"stderr: {cp.stderr}")
    return cp


def _sh(*cmd, check=True) -> subprocess.CompletedProcess:
    cp = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, timeout=30)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {cp.returncode}: {cp.stderr.strip()}")
    return cp


def netlab_missing() -> str | None:
    """Why a NetLab cannot be made here (None if it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables", "nsenter", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 iptables util-linux)"
    return None


# =========================================================================== namespaces

@dataclass
class Host:
    """One network namespace of a NetLab."""

    lab: "NetLab"
    index: int
    ns: str  # namespace name (/run/netns/NS)
    ifname: str  # its veth end inside the namespace
    root_if: str  # the other end, a port of the lab's bridge
    addr: str  # its address
    _loss: float = 0.0
    _cut: bool = False
    _rate: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def prefix(self) -> list[str]:
        """Run a command in this host's network namespace, keeping the root mount namespace (so a
        FUSE mount made by the command is visible to the test)."""
        return ["nsenter", f"--net=/run/netns/{self.ns}"]

    def cmd(self, *cmd, **kw) -> subprocess.CompletedProcess:
        return run_cmd([*self.prefix, *cmd], **kw)

    def popen(self, cmd, **kw) -> subprocess.Popen:
        return subprocess.Popen([*self.prefix, *map(os.fspath, cmd)], **kw)

    def bpfs(self, *args, env=None, check=True, timeout=120, input=None) -> subprocess.CompletedProcess:
        """``python -m bpfs ARGS`` inside this namespace."""
        return run_cmd([*self.prefix, PYTHON, "-m", "bpfs", *args], env=env, check=check, timeout=timeout,
                       input=input)

    def _ipt(self, *args) -> None:
        _sh(*self.prefix, "iptables", "-w", *args)

    def _apply_filters(self) -> None:
        """Rebuild this host's BPFSLAB chain from its loss / cut settings."""
        self._ipt("-F", "BPFSLAB")
        if self._cut:
            self._ipt("-A", "BPFSLAB", "-j", "DROP")
        elif self._loss > 0:
            self._ipt("-A", "BPFSLAB", "-m", "statistic", "--mode", "random", "--probability",
                      f"{self._loss:.6f}", "-j", "DROP")

    def set_loss(self, fraction: float) -> None:
        """Drop this fraction of datagrams in each direction on the host's link."""
        self._loss = float(fraction)
        self._apply_filters()

    def cut(self) -> None:
        """Pull the cable: nothing in or out until restore()."""
        self._cut = True
        self._apply_filters()

    def restore(self) -> None:
        self._cut = False
        self._apply_filters()

    def set_rate(self, rate: str | None) -> None:
        """Limit the host's outgoing rate (tc tbf, e.g. "20mbit"); None removes the limit."""
        _sh(*self.prefix, "tc", "qdisc", "del", "dev", self.ifname, "root", check=False)
        self._rate = rate
        if rate:
            _sh(*self.prefix, "tc", "qdisc", "add", "dev", self.ifname, "root", "tbf", "rate", rate,
                "burst", "64kb", "latency", "200ms")

    def pids(self) -> list[int]:
        cp = _sh("ip", "netns", "pids", self.ns, check=False)
        return [int(x) for x in cp.stdout.split() if x.strip().isdigit()]


class NetLab:
    """``with NetLab(3) as lab:`` -> lab.hosts[0..2], a bridge, addresses; all removed on exit.

    ``lab.gateway`` is the bridge's address (the root namespace as the hosts see it).
    """

    SUPERNET = ipaddress.ip_network("10.231.0.0/16")

    def __init__(self, n: int = 2, *, tag: str | None = None):
        if not 1 <= n <= 8:
            raise ValueError("1..8 hosts")
        self.n = n
        self.tag = tag or f"{os.getpid() % 100000:05d}{random.randrange(100):02d}"
        self.bridge = f"bpb{self.tag}"[:15]
        self.hosts: list[Host] = []
        self.gateway: str | None = None
        self.network: ipaddress.IPv4Network | None = None
        self._created_links: list[str] = []
        self._created_ns: list[str] = []

    def _pick_network(self) -> ipaddress.IPv4Network:
        used = _sh("ip", "-o", "-4", "addr", "show").stdout
        subnets = list(self.SUPERNET.subnets(new_prefix=24))
        start = (os.getpid() * 7 + random.randrange(256)) % len(subnets)
        for i in range(len(subnets)):
            net = subnets[(start + i) % len(subnets)]
            if f" {net.network_address + 1}/" not in used and f" {net.network_address + 2}/" not in used:
                return net
        raise RuntimeError("no free /24 in 10.231.0.0/16 for the lab")

    def __enter__(self) -> "NetLab":
        why = netlab_missing()
        if why:
            raise RuntimeError(why)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        self.network = net = self._pick_network()
        hosts_iter = net.hosts()
        self.gateway = str(next(hosts_iter))
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        self._created_links.append(self.bridge)
        _sh("ip", "addr", "add", f"{self.gateway}/{net.prefixlen}", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for i in range(self.n):
            ns = f"bpfslab{self.tag}{i}"
            root_if, ns_if = f"bpv{self.tag}{i}"[:15], f"bpn{self.tag}{i}"[:15]
            addr = str(next(hosts_iter))
            _sh("ip", "netns", "add", ns)
            self._created_ns.append(ns)
            _sh("ip", "link", "add", root_if, "type", "veth", "peer", "name", ns_if)
            self._created_links.append(root_if)
            _sh("ip", "link", "set", ns_if, "netns", ns)
            _sh("ip", "link", "set", root_if, "master", self.bridge)
            _sh("ip", "link", "set", root_if, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/{net.prefixlen}", "dev", ns_if)
            _sh("ip", "-n", ns, "link", "set", ns_if, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            host = Host(self, i, ns, ns_if, root_if, addr)
            # every impairment goes through one chain per direction on the veth
            host._ipt("-N", "BPFSLAB")
            host._ipt("-A", "INPUT", "-i", ns_if, "-j", "BPFSLAB")
            host._ipt("-A", "OUTPUT", "-o", ns_if, "-j", "BPFSLAB")
            self.hosts.append(host)
        # the veth ends come up asynchronously; wait until every host reaches the bridge
        for host in self.hosts:
            deadline = time.time() + 10
            while True:
                cp = _sh(*host.prefix, "ip", "-o", "link", "show", host.ifname)
                if "LOWER_UP" in cp.stdout or time.time() > deadline:
                    break
                time.sleep(0.05)

    def close(self) -> None:
        """Kill what still runs in the namespaces, delete them and the links. Never raises."""
        for ns in self._created_ns:
            cp = _sh("ip", "netns", "pids", ns, check=False)
            pids = [int(x) for x in cp.stdout.split() if x.strip().isdigit()]
            for pid in pids:
                if pid != os.getpid():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            deadline = time.time() + 10
            for pid in pids:
                while time.time() < deadline and _alive(pid):
                    time.sleep(0.05)
        for ns in reversed(self._created_ns):
            _sh("ip", "netns", "del", ns, check=False)
        for link in reversed(self._created_links):
            _sh("ip", "link", "del", link, check=False)
        self._created_ns.clear()
        self._created_links.clear()

    def __exit__(self, *exc) -> None:
        self.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, IndexError):
        return False


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

class UdpEcho:
    """A UDP echo server in a thread (for measuring a proxy or a lab link)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        _big_buffers(self.sock, 4 << 20)
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()[:2]
        self._stop = False
        self.received = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(_MAX_DATAGRAM)
            except socket.timeout:
                continue
            except OSError:
                return
            self.received += 1
            with contextlib.suppress(OSError):
                self.sock.sendto(data, addr)

    def __enter__(self) -> "UdpEcho":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close()


def echo_main(args) -> None:
    with UdpEcho(*parse_hostport(args.listen)) as echo:
        print(f"listening {format_hostport(echo.address)}", flush=True)
        sys.stdin.read()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="netlab.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("proxy", help="a UDP delay/loss/cut proxy driven through stdin")
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--target", required=True)
    p.add_argument("--delay", type=float, default=0.0, help="seconds each datagram is held, per direction")
    p.add_argument("--loss", type=float, default=0.0, help="fraction dropped, per direction")
    p.add_argument("--seed", type=int, default=None)
    e = sub.add_parser("echo", help="a UDP echo server (until stdin closes)")
    e.add_argument("--listen", default="127.0.0.1:0")
    args = ap.parse_args(argv)
    if args.cmd == "proxy":
        _proxy_main(args)
    else:
        echo_main(args)


if __name__ == "__main__":
    main()
