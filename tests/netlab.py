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

NatLab (``nat_lab(mode_a, mode_b)``)
    Two homes behind two home routers (MASQUERADE; "cone", "symmetric" or "firewall") on a
    public bridge with a broker and a second public server, all in namespaces of their own
    (none of it in the root namespace).  With a UDP reflector (STUN-like + relay), UDP agents
    (a socket in a namespace, driven from the test; ``hole_punch``) and PacketCapture (an
    AF_PACKET ring: every UDP payload on an interface, no tcpdump).  See NatLab.

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
import mmap
import os
import random
import selectors
import shutil
import signal
import socket
import struct
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

    def run(self, argv, **kw) -> subprocess.CompletedProcess:
        """``cmd`` taking the command as one list (``run_cmd`` keywords: check, timeout, env, input)."""
        return run_cmd([*self.prefix, *argv], **kw)

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

class _UdpServer:
    """A UDP socket served by a thread: `handle(data, addr)` for each datagram; `with` starts it."""

    def __init__(self, host: str, port: int, *, reuse: bool = False):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        if reuse:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        _big_buffers(self.sock, 4 << 20)
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()[:2]
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def handle(self, data: bytes, addr) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(_MAX_DATAGRAM)
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


class UdpEcho(_UdpServer):
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


# =========================================================================== the NAT lab
#
# Two homes behind two home routers (NAT namespaces) on a public "internet" (a bridge), with a
# broker on it: for proving that peers pair through a broker, punch UDP holes, and fall back to
# a relay when punching is impossible.  Helpers for that: a reflector (STUN-like "what is my
# address" + a relay), an agent (one UDP socket in a namespace, driven from the test), and a
# packet capture (AF_PACKET, no tcpdump needed).

class _LineProcess:
    """A helper child process (``netlab.py SUBCOMMAND ...``), optionally in a namespace: its
    first stdout line starts with ``ready``; then one JSON command a line on stdin, one JSON
    line back.  Closing stdin ends it."""

    def __init__(self, args, *, prefix: list[str] | None = None, ready: str = "ready"):
        cmd = [*(prefix or []), PYTHON, str(HERE), *map(str, args)]
        self.name = str(args[0])
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     text=True, bufsize=1, cwd=str(REPO))
        self.ready_line = self.proc.stdout.readline()
        if not self.ready_line.startswith(ready):
            err = self.stderr()
            self.close()
            raise RuntimeError(f"{args[0]} did not start: {self.ready_line!r} {err}")

    def stderr(self) -> str:
        with contextlib.suppress(ValueError, OSError):
            self._err.seek(0)
            return self._err.read().decode(errors="replace")
        return ""

    def _send(self, **obj) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"netlab {self.name} exited: {self.stderr()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"netlab {self.name}: {reply['error']}")
        return reply

    def _command(self, **obj) -> dict:
        self._send(**obj)
        return self._reply()

    def close(self, timeout: float = 5) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self._err):
            with contextlib.suppress(Exception):
                f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _json_lines(handler) -> None:
    """Serve JSON commands from stdin until it closes: handler(dict) -> dict (an exception
    becomes {"error": ...})."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = handler(json.loads(line))
        except Exception as e:  # noqa: BLE001 - reported to the test, which raises
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


# --------------------------------------------------------------------------- the reflector

class UdpReflector(_UdpServer):
    """A UDP server (a thread) for NAT tests: tells each sender the address it saw, and relays.

    * ``SEND host:port PAYLOAD`` -> ``FROM ip:port PAYLOAD`` to host:port, where ip:port is the
      sender as seen here (a relay, like TURN; also how two peers can talk before a hole exists);
    * anything else -> back to its sender as ``YOU ip:port `` + the datagram (STUN-like: the
      sender's public address, then an echo).
    """

    def __init__(self, host: str = "0.0.0.0", port: int = 0):
        super().__init__(host, port, reuse=True)
        self.counters = {"received": 0, "answered": 0, "relayed": 0, "relayed_bytes": 0}
        self.peers: set[str] = set()

    def handle(self, data: bytes, addr) -> None:
        seen = format_hostport(addr).encode()
        self.counters["received"] += 1
        self.peers.add(seen.decode())
        if data.startswith(b"SEND "):
            dest, _, payload = data[5:].partition(b" ")
            self.sock.sendto(b"FROM " + seen + b" " + payload, parse_hostport(dest.decode()))
            self.counters["relayed"] += 1
            self.counters["relayed_bytes"] += len(payload)
        else:
            self.sock.sendto(b"YOU " + seen + b" " + data, addr)
            self.counters["answered"] += 1

    def stats(self) -> dict:
        return {**self.counters, "peers": sorted(self.peers)}


class ReflectorProcess(_LineProcess):
    """A UdpReflector in a child process (``prefix``: in a namespace). ``address``, ``stats()``."""

    def __init__(self, listen=("0.0.0.0", 0), *, prefix: list[str] | None = None):
        super().__init__(["reflect", "--listen", format_hostport(listen)], prefix=prefix, ready="listening ")
        self.address = parse_hostport(self.ready_line.split()[1])

    def stats(self) -> dict:
        return self._command(op="stats")


def _reflect_main(args) -> None:
    with UdpReflector(*parse_hostport(args.listen)) as r:
        print(f"listening {format_hostport(r.address)}", flush=True)
        _json_lines(lambda cmd: r.stats())


# --------------------------------------------------------------------------- the agent

class _AgentCore:
    """The agent's side (in its namespace): one UDP socket, everything received kept in an inbox."""

    def __init__(self, bind):
        self.sock = socket.socket(socket.AF_INET6 if ":" in bind[0] else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        _big_buffers(self.sock, 4 << 20)
        self.sock.settimeout(0.1)
        self.inbox: list = []  # (time, (ip, port), data)
        self.cond = threading.Condition()
        self.refused = 0
        self.stopped = False
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self.stopped:
            try:
                data, addr = self.sock.recvfrom(_MAX_DATAGRAM)
            except socket.timeout:
                continue
            except ConnectionRefusedError:  # an ICMP port unreachable for something we sent
                self.refused += 1
                continue
            except OSError:
                if self.stopped:
                    return
                continue
            with self.cond:
                self.inbox.append((time.time(), tuple(addr[:2]), data))
                self.cond.notify_all()

    def take(self, match, n: int = 1, timeout: float = 0.0) -> list:
        """Wait up to timeout for n datagrams matching match(addr, data); remove and return the
        matching ones (maybe fewer than n)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                hits = [m for m in self.inbox if match(m[1], m[2])]
                left = deadline - time.monotonic()
                if len(hits) >= n or left <= 0:
                    self.inbox = [m for m in self.inbox if not match(m[1], m[2])]
                    return hits
                self.cond.wait(left)

    def send(self, to, data: bytes) -> str | None:
        try:
            self.sock.sendto(data, (to[0], int(to[1])))
            return None
        except OSError as e:
            return errno.errorcode.get(e.errno or 0, str(e))

    def whoami(self, server, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.send(server, b"WHO")
            hits = self.take(lambda a, d: a == server and d.startswith(b"YOU "), 1,
                             min(0.25, max(0.0, deadline - time.monotonic())))
            if hits:
                return hits[0][2].split()[1].decode()
        return None

    def punch(self, peer, timeout: float, interval: float) -> dict:
        """Send ``PUNCH <heard>`` to peer every interval until we heard the peer (from exactly
        peer) and the peer says it heard us, or timeout."""
        start = time.monotonic()
        deadline = start + timeout
        heard_at = None
        peer_heard_us = False
        sent = received = 0
        other_ports: set[str] = set()
        errors: set[str] = set()
        next_send = start
        while True:
            now = time.monotonic()
            if (heard_at is not None and peer_heard_us) or now >= deadline:
                break
            if now >= next_send:
                err = self.send(peer, b"PUNCH %d" % (heard_at is not None))
                if err:
                    errors.add(err)
                sent += 1
                next_send = now + interval
            hits = self.take(lambda a, d: a[0] == peer[0] and d.startswith(b"PUNCH "), 1,
                             max(0.0, min(next_send, deadline) - time.monotonic()))
            for _, addr, data in hits:
                if addr == peer:
                    received += 1
                    if heard_at is None:
                        heard_at = time.monotonic()
                    if data.strip().endswith(b"1"):
                        peer_heard_us = True
                else:
                    other_ports.add(format_hostport(addr))
        if heard_at is not None:  # make sure the peer learns that we heard it
            for _ in range(3):
                self.send(peer, b"PUNCH 1")
        return {"ok": heard_at is not None, "peer_heard_us": peer_heard_us, "sent": sent, "received": received,
                "from_other_ports": sorted(other_ports), "errors": sorted(errors),
                "elapsed": None if heard_at is None else round(heard_at - start, 4)}

    def handle(self, cmd: dict) -> dict:
        op = cmd["op"]
        if op == "send":
            err = self.send(parse_hostport(cmd["to"]), bytes.fromhex(cmd["hex"]))
            return {"ok": err is None, "errno": err}
        if op == "recv":
            src = parse_hostport(cmd["src"]) if cmd.get("src") else None
            prefix = bytes.fromhex(cmd.get("prefix") or "")
            hits = self.take(lambda a, d: (src is None or a == src) and d.startswith(prefix), int(cmd.get("n", 1)),
                             float(cmd.get("timeout", 1.0)))
            return {"datagrams": [{"from": format_hostport(a), "hex": d.hex()} for _, a, d in hits]}
        if op == "whoami":
            return {"public": self.whoami(parse_hostport(cmd["server"]), float(cmd.get("timeout", 2.0)))}
        if op == "relay":
            data = b"SEND " + cmd["to"].encode() + b" " + bytes.fromhex(cmd["hex"])
            err = self.send(parse_hostport(cmd["server"]), data)
            return {"ok": err is None, "errno": err}
        if op == "punch":
            return self.punch(parse_hostport(cmd["peer"]), float(cmd.get("timeout", 2.0)),
                              float(cmd.get("interval", 0.05)))
        if op == "stats":
            with self.cond:
                return {"refused": self.refused, "inbox": len(self.inbox)}
        raise ValueError(f"unknown op {op!r}")


def _agent_main(args) -> None:
    core = _AgentCore(parse_hostport(args.bind))
    print(f"ready {format_hostport(core.sock.getsockname()[:2])}", flush=True)
    try:
        _json_lines(core.handle)
    finally:
        core.stopped = True
        core.sock.close()


class UdpAgent(_LineProcess):
    """One UDP socket in a namespace (``prefix``), driven from the test.

    ``address`` (its local address), ``whoami(server)`` (its address as a reflector sees it),
    ``send(to, data)``, ``recv(timeout, n, src)`` -> [(addr, bytes)], ``relay(server, to, data)``
    (through a reflector), ``punch(peer, timeout)``; ``start_punch(...)`` + ``finish()`` run
    a punch in two agents at once (see ``hole_punch``).
    """

    def __init__(self, bind=("0.0.0.0", 0), *, prefix: list[str] | None = None):
        super().__init__(["agent", "--bind", format_hostport(bind)], prefix=prefix)
        self.address = parse_hostport(self.ready_line.split()[1])
        self._pending = False

    def whoami(self, server, timeout: float = 2.0):
        """(ip, port) of this socket as the reflector at server sees it (None: no answer)."""
        public = self._command(op="whoami", server=format_hostport(server), timeout=timeout)["public"]
        return parse_hostport(public) if public else None

    def send(self, to, data: bytes) -> str | None:
        """Send one datagram; the errno name if the kernel refused it at once (else None)."""
        return self._command(op="send", to=format_hostport(to), hex=bytes(data).hex())["errno"]

    def recv(self, timeout: float = 1.0, n: int = 1, src=None, prefix: bytes = b"") -> list:
        """Wait up to timeout for n datagrams (only those from src / starting with prefix, if
        given); return all such received so far (maybe fewer, maybe more), oldest first."""
        reply = self._command(op="recv", timeout=timeout, n=n, src=format_hostport(src) if src else None,
                              prefix=bytes(prefix).hex())
        return [(parse_hostport(d["from"]), bytes.fromhex(d["hex"])) for d in reply["datagrams"]]

    def relay(self, server, to, data: bytes) -> str | None:
        """Have the reflector at server forward data to `to` (arrives as ``FROM <us> data``)."""
        return self._command(op="relay", server=format_hostport(server), to=format_hostport(to),
                             hex=bytes(data).hex())["errno"]

    def start_punch(self, peer, timeout: float = 2.0, interval: float = 0.05) -> None:
        self._send(op="punch", peer=format_hostport(peer), timeout=timeout, interval=interval)
        self._pending = True

    def finish(self) -> dict:
        """The result of start_punch: ok (heard from exactly peer), peer_heard_us, sent, received,
        from_other_ports (the peer's IP seen from other ports), errors, elapsed."""
        self._pending = False
        return self._reply()

    def punch(self, peer, timeout: float = 2.0, interval: float = 0.05) -> dict:
        self.start_punch(peer, timeout, interval)
        return self.finish()

    def stats(self) -> dict:
        return self._command(op="stats")


def hole_punch(a: UdpAgent, peer_of_a, b: UdpAgent, peer_of_b, *, timeout: float = 2.0,
               interval: float = 0.05, stagger: float = 0.0) -> tuple[dict, dict]:
    """Both agents punch at once (a towards peer_of_a, b towards peer_of_b; b starts stagger
    seconds after a); both results."""
    a.start_punch(peer_of_a, timeout, interval)
    if stagger:
        time.sleep(stagger)
    b.start_punch(peer_of_b, timeout, interval)
    return a.finish(), b.finish()


# --------------------------------------------------------------------------- packet capture

ETH_P_ALL = 0x0003
_PKTTYPE = {0: "in", 1: "in", 2: "in", 3: "other", 4: "out"}


def _udp_of_frame(frame: bytes, frags: dict):
    """(src, sport, dst, dport, payload) of an Ethernet frame carrying UDP over IPv4 (fragments
    reassembled) or IPv6 (no extension headers); else None."""
    if len(frame) < 14:
        return None
    etype, off = int.from_bytes(frame[12:14], "big"), 14
    while etype in (0x8100, 0x88A8) and len(frame) >= off + 4:
        etype, off = int.from_bytes(frame[off + 2:off + 4], "big"), off + 4
    ip = frame[off:]
    if etype == 0x0800:
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 17:
            return None
        ihl, total = (ip[0] & 15) * 4, int.from_bytes(ip[2:4], "big")
        ip = ip[:total]
        src, dst = socket.inet_ntop(socket.AF_INET, ip[12:16]), socket.inet_ntop(socket.AF_INET, ip[16:20])
        body = ip[ihl:]
        flags = int.from_bytes(ip[6:8], "big")
        more, frag_off = flags & 0x2000, (flags & 0x1FFF) * 8
        if more or frag_off:
            if len(frags) > 4096:
                frags.clear()
            key = (src, dst, ip[4:6])
            parts = frags.setdefault(key, {})
            parts[frag_off] = body
            if not more:
                parts["end"] = frag_off + len(body)
            end, pos, chunks = parts.get("end"), 0, []
            if end is None:
                return None
            while pos < end:
                chunk = parts.get(pos)
                if not chunk:
                    return None
                chunks.append(chunk)
                pos += len(chunk)
            del frags[key]
            body = b"".join(chunks)
    elif etype == 0x86DD:
        if len(ip) < 40 or ip[6] != 17:
            return None
        body = ip[40:40 + int.from_bytes(ip[4:6], "big")]
        src, dst = socket.inet_ntop(socket.AF_INET6, ip[8:24]), socket.inet_ntop(socket.AF_INET6, ip[24:40])
    else:
        return None
    if len(body) < 8:
        return None
    ulen = int.from_bytes(body[4:6], "big")
    payload = body[8:ulen] if ulen >= 8 else body[8:]
    return src, int.from_bytes(body[0:2], "big"), dst, int.from_bytes(body[2:4], "big"), payload


def _capture_main(args) -> None:
    """Capture the UDP on one interface (run it in the interface's namespace) until stdin closes.

    OUT gets every UDP payload's bytes, back to back (grep it); OUT.jsonl one line a datagram
    (t, dir in/out, src, dst, len, off: where its payload starts in OUT, stored: how many bytes
    of it are there); OUT.stats.json at the end (frames, udp, kernel drops, truncated frames).

    A TPACKET_V2 ring (as libpcap uses): the kernel copies each frame into the ring the moment
    it passes the interface.  A plain recvfrom() on an AF_PACKET socket copies only when it is
    called, and the frame's buffer may be shared with the packet's journey on: a NAT
    namespace behind a veth rewrites the headers of forwarded fragments in place, so what a
    late recvfrom() sees of a sent fragment is the NAT's version, not what left.
    """
    sol_packet, packet_version, packet_rx_ring, packet_statistics, tpacket_v2 = 263, 10, 5, 6, 1
    frame_size, block_size, block_nr = args.frame_size, 1 << 22, 8  # 32 MiB: 16384 frames of 2 KiB
    frame_nr = block_size // frame_size * block_nr
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: nothing until bind
    sock.setsockopt(sol_packet, packet_version, tpacket_v2)
    sock.setsockopt(sol_packet, packet_rx_ring, struct.pack("IIII", block_size, block_nr, frame_size, frame_nr))
    ring = mmap.mmap(sock.fileno(), block_size * block_nr, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    slots = memoryview(ring).cast("I")  # slots[k * frame_size // 4]: the status of frame k
    sock.bind((args.iface, ETH_P_ALL))
    out = open(args.out, "wb")
    idx = open(args.out + ".jsonl", "w")
    frags: dict = {}
    frames = udp = offset = truncated = 0
    head = 0
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    print("ready capturing", args.iface, flush=True)
    stopping = False
    while True:
        events = sel.select(0.05)
        for key, _ in events:
            if key.data == "stdin" and not sys.stdin.readline():
                stopping = True
                sel.unregister(sys.stdin)
        # Every frame the kernel has handed over (TP_STATUS_USER), in ring order from where we
        # are.  Not just "while the next slot is ours": under load the kernel can leave a slot
        # behind and go on filling the next ones (seen here in bursts with drops), which would stall
        # a strictly in-order reader for good.
        statuses = slots[::frame_size // 4].tolist()
        ready = sorted((i for i, st in enumerate(statuses) if st & 1), key=lambda i: (i - head) % frame_nr)
        got_any = bool(ready)
        for slot in ready:
            base = slot * frame_size
            # struct tpacket2_hdr: status, len, snaplen, mac, net, sec, nsec, ...; sockaddr_ll at 32
            tp_len, tp_snaplen, tp_mac = struct.unpack_from("IIH", ring, base + 4)
            pkttype = ring[base + 32 + 10]
            frame = ring[base + tp_mac:base + tp_mac + tp_snaplen]
            struct.pack_into("I", ring, base, 0)  # back to the kernel
            head = (slot + 1) % frame_nr
            frames += 1
            if tp_snaplen < tp_len:
                truncated += 1
            parsed = _udp_of_frame(frame, frags)
            if parsed is None:
                continue
            src, sport, dst, dport, payload = parsed
            stored = payload if not args.snaplen else payload[:args.snaplen]
            out.write(stored)
            idx.write(json.dumps({"t": round(time.time(), 6), "dir": _PKTTYPE.get(pkttype, str(pkttype)),
                                  "src": format_hostport((src, sport)), "dst": format_hostport((dst, dport)),
                                  "len": len(payload), "off": offset, "stored": len(stored)}) + "\n")
            offset += len(stored)
            udp += 1
        if not got_any:
            out.flush()
            idx.flush()
            if stopping and not events:  # stdin closed and 50 ms without a frame: done
                break
    # struct tpacket_stats {unsigned tp_packets, tp_drops}: since the socket was opened
    drops = struct.unpack("II", sock.getsockopt(sol_packet, packet_statistics, 8))[1]
    out.close()
    idx.close()
    with open(args.out + ".stats.json", "w") as f:
        json.dump({"frames": frames, "udp": udp, "bytes": offset, "kernel_drops": drops,
                   "truncated_frames": truncated}, f)
    slots.release()
    ring.close()
    sock.close()


@dataclass
class CapturedDatagram:
    t: float
    direction: str  # "in" (to this interface), "out" (sent from it), "other" (seen, for someone else)
    src: tuple
    dst: tuple
    length: int  # of the whole UDP payload
    payload: bytes  # its stored bytes (all unless snaplen cut it)


class PacketCapture:
    """Capture every UDP datagram on one interface (of a namespace: ``prefix``) to files.

    ``path`` gets the payload bytes back to back (``payload_bytes()``, ``count(needle)``);
    ``records()`` lists the datagrams (direction, addresses, payload); ``stats()`` after stop
    (kernel_drops should be 0).  A Python AF_PACKET socket in a child process: no tcpdump.
    Everything seen after start() returns is captured; stop() (or leaving the ``with``)
    takes what is still in flight, then ends it.  snaplen > 0 keeps only that many bytes of
    each payload (for bulk transfers).
    """

    def __init__(self, path, iface: str, *, prefix: list[str] | None = None, snaplen: int = 0):
        self.path = Path(path)
        self.index_path = Path(f"{self.path}.jsonl")
        self.stats_path = Path(f"{self.path}.stats.json")
        self.iface = iface
        self.prefix = prefix
        self.snaplen = snaplen
        self._proc: _LineProcess | None = None

    def start(self) -> "PacketCapture":
        self._proc = _LineProcess(["capture", "--iface", self.iface, "--out", self.path, "--snaplen", self.snaplen],
                                  prefix=self.prefix)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.close(timeout=10)
            self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.proc.poll() is None

    def __enter__(self) -> "PacketCapture":
        return self.start() if self._proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def payload_bytes(self) -> bytes:
        return self.path.read_bytes() if self.path.exists() else b""

    def count(self, needle: bytes) -> int:
        return self.payload_bytes().count(needle)

    def records(self) -> list[CapturedDatagram]:
        """The datagrams captured so far (while running: up to the last idle moment)."""
        data = self.payload_bytes()
        out = []
        if not self.index_path.exists():
            return out
        for line in self.index_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                break  # a line still being written
            out.append(CapturedDatagram(r["t"], r["dir"], parse_hostport(r["src"]), parse_hostport(r["dst"]),
                                        r["len"], data[r["off"]:r["off"] + r["stored"]]))
        return out

    def wait_for(self, needle: bytes, timeout: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if needle in self.payload_bytes():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def stats(self) -> dict:
        return json.loads(self.stats_path.read_text()) if self.stats_path.exists() else {}


# --------------------------------------------------------------------------- the topology

NAT_MODES = ("cone", "symmetric", "firewall")
_NATLAB_NS = "bpnat"  # namespace names: bpnat<pid>x<4 hex>-<role>


def natlab_missing() -> str | None:
    """Why a NatLab cannot be made here (None if it can)."""
    why = netlab_missing()
    if why:
        return why
    if shutil.which("iptables-restore") is None:
        return "`iptables-restore` is not installed (apt-get install iptables)"
    return None


def sweep_stale_nat_labs() -> list[str]:
    """Delete the namespace names of NatLabs whose test process is gone (SIGKILLed runs).
    Kills nothing: a namespace that still has processes lives on, unnamed, until they end."""
    import re
    gone = []
    for line in _sh("ip", "netns", "list", check=False).stdout.splitlines():
        m = re.match(rf"({_NATLAB_NS}(\d+)x[0-9a-f]{{4}}-\w+)", line)
        if m and not _alive(int(m.group(2))):
            _sh("ip", "netns", "del", m.group(1), check=False)
            gone.append(m.group(1))
    return gone


class NatLab:
    """Two homes behind two home routers on a public network with a broker.

    ``with NatLab(mode_a="cone", mode_b="symmetric") as lab:`` (or ``nat_lab(...)``)::

        internet (lab.internet, 198.51.100.254 on bridge nl-br)
          +-- broker (lab.broker_ns, lab.broker_ip 198.51.100.1, interface nl-eth)
          +-- nat_a (lab.nat_a: WAN nl-wan lab.nat_public_ip_a 198.51.100.11, LAN nl-lan 10.0.1.1)
          |     +-- home_a (lab.home_a, lab.home_ip_a 10.0.1.2, nl-eth, default route via nat_a)
          +-- nat_b (lab.nat_b: WAN 198.51.100.12, LAN 10.0.2.1)
                +-- home_b (lab.home_b, 10.0.2.2)

    (``same_lan=True``: both homes are 192.168.1.2 behind 192.168.1.1, as real homes often are.)
    Every namespace is a ``Host`` (``run``, ``cmd``, ``popen``, ``bpfs``, ``set_loss``, ``cut``,
    ``restore``, ``set_rate``; on a NAT these act on its WAN, forwarded traffic included: a cut
    NAT is a home whose internet is down).  The internet namespace is a plain public host too
    (a second public server beside the broker).  Nothing lives in the root namespace: every
    veth is created inside the lab's namespaces, so deleting them (on exit, also after a
    failure, after killing what runs in them) removes everything, iptables rules included.

    Each home router: ip_forward, ``MASQUERADE`` on its WAN, and a stateful firewall like a
    real one: from the WAN only ESTABLISHED/RELATED (and pings to the router) come in, the
    rest is dropped silently (no ICMP).  Modes:

    * ``cone``: plain MASQUERADE.  Linux keeps the source port when it is free, so the mapping
      is endpoint-independent (one public ip:port per home socket, whoever it talks to);
      conntrack filtering is address+port dependent (a reply must come from where the home
      sent to).  Two cones punch holes: each side sends to the other's public ip:port; the
      first datagrams are dropped by the other router, but open the sender's own mapping, so
      the other side's datagrams get through, whoever starts first.  (The silent drop matters:
      with ``stealth=False`` the router lets an unsolicited datagram reach its own stack, which
      confirms a conntrack entry for it (and answers ICMP port unreachable); its home's own
      datagram to that peer then clashes with the entry, MASQUERADE gives it another source
      port, and the punch fails whenever one side's datagrams arrive before the other side
      sent.  Verified on this kernel, see tests/test_netlab_nat.py.)
    * ``symmetric``: ``MASQUERADE --random-fully``: every new destination gets a random public
      port (endpoint-dependent mapping), so the address a reflector saw is useless to a peer:
      hole punching fails (with a cone or a symmetric peer: the cone side's router only lets in
      the exact ip:port its home sent to); only relaying works.  (``--random`` randomises per
      destination as well on this kernel; --random-fully draws each port at random.)
    * ``firewall``: cone, plus the router passes UDP only to and from the broker (a corporate
      firewall): no peer and no other server is reachable, only the broker.

    Helpers: ``lab.reflector(host)`` (STUN-like + relay server), ``lab.agent(host)`` (a UDP
    socket in a namespace), ``lab.capture(path)`` (UDP payloads seen on the broker's
    interface, or any host's), ``hole_punch(...)``.  All stopped on exit.
    """

    PUBLIC_NET = ipaddress.ip_network("198.51.100.0/24")  # TEST-NET-2
    BROKER_IP = "198.51.100.1"
    NAT_IPS = ("198.51.100.11", "198.51.100.12")
    INTERNET_IP = "198.51.100.254"
    ROLES = ("inet", "broker", "nata", "natb", "homea", "homeb")

    def __init__(self, mode_a: str = "cone", mode_b: str = "cone", *, same_lan: bool = False,
                 stealth: bool = True):
        for mode in (mode_a, mode_b):
            if mode not in NAT_MODES:
                raise ValueError(f"NAT mode {mode!r}: one of {NAT_MODES}")
        self.mode_a, self.mode_b = mode_a, mode_b
        self.same_lan = same_lan
        self.stealth = stealth
        self.tag = f"{os.getpid()}x{random.randrange(1 << 16):04x}"
        self.ns_names = {role: f"{_NATLAB_NS}{self.tag}-{role}" for role in self.ROLES}
        self.broker_ip, self.internet_ip = self.BROKER_IP, self.INTERNET_IP
        self.nat_public_ip_a, self.nat_public_ip_b = self.NAT_IPS
        lans = ("192.168.1", "192.168.1") if same_lan else ("10.0.1", "10.0.2")
        self.lan_a, self.lan_b = (ipaddress.ip_network(f"{p}.0/24") for p in lans)
        self.home_ip_a, self.home_ip_b = f"{lans[0]}.2", f"{lans[1]}.2"
        self.router_lan_ip_a, self.router_lan_ip_b = f"{lans[0]}.1", f"{lans[1]}.1"
        n = self.ns_names
        self.internet = Host(self, 0, n["inet"], "nl-br", "", self.internet_ip)
        self.broker_ns = Host(self, 1, n["broker"], "nl-eth", "nl-p-broker", self.broker_ip)
        self.nat_a = Host(self, 2, n["nata"], "nl-wan", "nl-p-nata", self.nat_public_ip_a)
        self.nat_b = Host(self, 3, n["natb"], "nl-wan", "nl-p-natb", self.nat_public_ip_b)
        self.home_a = Host(self, 4, n["homea"], "nl-eth", "nl-lan", self.home_ip_a)
        self.home_b = Host(self, 5, n["homeb"], "nl-eth", "nl-lan", self.home_ip_b)
        self.broker = self.broker_ns
        self._helpers: list = []
        self._created_ns: list[str] = []

    @property
    def hosts(self) -> list[Host]:
        return [self.internet, self.broker_ns, self.nat_a, self.nat_b, self.home_a, self.home_b]

    # ---- set-up

    def __enter__(self) -> "NatLab":
        why = natlab_missing()
        if why:
            raise RuntimeError(why)
        sweep_stale_nat_labs()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _filter_rules(self, host: Host, nat_mode: str | None = None) -> str:
        ifc = host.ifname
        rules = ["*filter", ":BPFSLAB - [0:0]", f"-A INPUT -i {ifc} -j BPFSLAB", f"-A OUTPUT -o {ifc} -j BPFSLAB"]
        if nat_mode is not None:
            rules += [f"-A FORWARD -i {ifc} -j BPFSLAB", f"-A FORWARD -o {ifc} -j BPFSLAB",
                      # the router itself: nothing unsolicited from the WAN, and silently
                      f"-A INPUT -i {ifc} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                      f"-A INPUT -i {ifc} -p icmp --icmp-type echo-request -j ACCEPT"]
            if self.stealth:
                rules.append(f"-A INPUT -i {ifc} -j DROP")
            if nat_mode == "firewall":
                rules += [f"-A FORWARD -o {ifc} -p udp ! -d {self.broker_ip} -j DROP",
                          f"-A FORWARD -i {ifc} -p udp ! -s {self.broker_ip} -j DROP"]
            rules += [f"-A FORWARD -i {ifc} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
                      f"-A FORWARD -i {ifc} -j DROP"]
        rules.append("COMMIT")
        if nat_mode is not None:
            masq = "-j MASQUERADE --random-fully" if nat_mode == "symmetric" else "-j MASQUERADE"
            rules += ["*nat", f"-A POSTROUTING -o {ifc} {masq}", "COMMIT"]
        return "\n".join(rules) + "\n"

    def _create(self) -> None:
        n = self.ns_names
        plen = self.PUBLIC_NET.prefixlen
        script = ["set -e"]
        for role in self.ROLES:
            self._created_ns.append(n[role])
            script.append(f"ip netns add {n[role]}")
        for role in self.ROLES:
            script.append(f"ip -n {n[role]} link set lo up")
        inet = n["inet"]
        script += [f"ip -n {inet} link add nl-br type bridge forward_delay 0 stp_state 0",
                   f"ip -n {inet} addr add {self.internet_ip}/{plen} dev nl-br",
                   f"ip -n {inet} link set nl-br up"]
        # every veth is made directly in its namespaces: nothing ever appears in the root one
        for host in (self.broker_ns, self.nat_a, self.nat_b):
            script += [f"ip link add {host.ifname} netns {host.ns} type veth peer name {host.root_if} netns {inet}",
                       f"ip -n {inet} link set {host.root_if} master nl-br",
                       f"ip -n {inet} link set {host.root_if} up",
                       f"ip -n {host.ns} addr add {host.addr}/{plen} dev {host.ifname}",
                       f"ip -n {host.ns} link set {host.ifname} up"]
        for nat, home, router_ip, lan in ((self.nat_a, self.home_a, self.router_lan_ip_a, self.lan_a),
                                          (self.nat_b, self.home_b, self.router_lan_ip_b, self.lan_b)):
            script += [f"ip link add nl-lan netns {nat.ns} type veth peer name {home.ifname} netns {home.ns}",
                       f"ip -n {nat.ns} addr add {router_ip}/{lan.prefixlen} dev nl-lan",
                       f"ip -n {nat.ns} link set nl-lan up",
                       f"ip -n {nat.ns} route add default via {self.internet_ip}",
                       f"ip -n {home.ns} addr add {home.addr}/{lan.prefixlen} dev {home.ifname}",
                       f"ip -n {home.ns} link set {home.ifname} up",
                       f"ip -n {home.ns} route add default via {router_ip}",
                       f"nsenter --net=/run/netns/{nat.ns} sysctl -qw net.ipv4.ip_forward=1"]
        for host in self.hosts:
            mode = {self.nat_a.ns: self.mode_a, self.nat_b.ns: self.mode_b}.get(host.ns)
            text = self._filter_rules(host, mode)
            script.append(f"nsenter --net=/run/netns/{host.ns} iptables-restore <<'EOF'\n{text}EOF")
        run_cmd(["sh", "-c", "\n".join(script)], timeout=60)
        # the links come up asynchronously: wait for every veth (and the bridge) to carry
        deadline = time.time() + 10
        for host in self.hosts:
            while True:
                cp = _sh("ip", "-n", host.ns, "-o", "link", "show", "up")
                links = [ln for ln in cp.stdout.splitlines() if ": lo:" not in ln]
                if links and all("LOWER_UP" in ln for ln in links) or time.time() > deadline:
                    break
                time.sleep(0.02)

    # ---- helpers living in the lab

    def _track(self, helper):
        self._helpers.append(helper)
        return helper

    def reflector(self, host: Host | None = None, port: int = 3478) -> ReflectorProcess:
        """A UdpReflector (in the broker, unless host says otherwise) on all of host's addresses."""
        return self._track(ReflectorProcess(("0.0.0.0", port), prefix=(host or self.broker_ns).prefix))

    def agent(self, host: Host, port: int = 0) -> UdpAgent:
        """A UdpAgent: one UDP socket bound to 0.0.0.0:port in host."""
        return self._track(UdpAgent(("0.0.0.0", port), prefix=host.prefix))

    def capture(self, path, host: Host | None = None, iface: str | None = None, *, snaplen: int = 0) -> PacketCapture:
        """Capture the UDP on host's interface (default: the broker's); use as ``with``, or
        start()/stop().  The files are there after it ends (and while it runs, up to the last
        idle 50 ms)."""
        host = host or self.broker_ns
        return self._track(PacketCapture(path, iface or host.ifname, prefix=host.prefix, snaplen=snaplen))

    # ---- tear-down

    def close(self) -> None:
        """Stop the helpers, kill what still runs in the namespaces, delete them. Never raises."""
        for helper in reversed(self._helpers):
            with contextlib.suppress(Exception):
                helper.stop() if isinstance(helper, PacketCapture) else helper.close(timeout=2)
        self._helpers.clear()
        pids = []
        for ns in self._created_ns:
            cp = _sh("ip", "netns", "pids", ns, check=False)
            for pid in (int(x) for x in cp.stdout.split() if x.strip().isdigit()):
                if pid != os.getpid():
                    pids.append(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10
        for pid in pids:
            while time.time() < deadline and _alive(pid):
                time.sleep(0.02)
        for ns in reversed(self._created_ns):
            _sh("ip", "netns", "del", ns, check=False)
        self._created_ns.clear()

    def __exit__(self, *exc) -> None:
        self.close()


def nat_lab(mode_a: str = "cone", mode_b: str = "cone", *, same_lan: bool = False, stealth: bool = True) -> NatLab:
    """``with nat_lab("cone", "symmetric") as lab: ...`` (see NatLab)."""
    return NatLab(mode_a, mode_b, same_lan=same_lan, stealth=stealth)


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
    r = sub.add_parser("reflect", help="a UDP reflector (your address, relay) until stdin closes")
    r.add_argument("--listen", default="0.0.0.0:3478")
    g = sub.add_parser("agent", help="one UDP socket driven by JSON commands on stdin")
    g.add_argument("--bind", default="0.0.0.0:0")
    c = sub.add_parser("capture", help="capture UDP payloads on an interface until stdin closes")
    c.add_argument("--iface", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--snaplen", type=int, default=0, help="bytes kept of each payload (0: all)")
    c.add_argument("--frame-size", type=int, default=2048, help="ring slot: longer frames are cut (MTU 1500)")
    args = ap.parse_args(argv)
    {"proxy": _proxy_main, "echo": echo_main, "reflect": _reflect_main, "agent": _agent_main,
     "capture": _capture_main}[args.cmd](args)


if __name__ == "__main__":
    main()
