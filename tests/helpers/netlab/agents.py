"""UDP helpers for the NAT lab, each a child process in a namespace driven from the test: the
reflector (``UdpReflector``/``ReflectorProcess``: tells a sender its address as seen, and relays,
like STUN and TURN), the agent (``UdpAgent``: one UDP socket, sends, receives, punches) and
``hole_punch`` (two agents punching towards each other at once)."""

from __future__ import annotations

import errno
import socket
import threading
import time

from tests.helpers.netlab.procs import LineProcess, json_lines
from tests.helpers.netlab.sockets import MAX_DATAGRAM, UdpServer, big_buffers, format_hostport, parse_hostport


# --------------------------------------------------------------------------- the reflector

class UdpReflector(UdpServer):
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


class ReflectorProcess(LineProcess):
    """A UdpReflector in a child process (``prefix``: in a namespace). ``address``, ``stats()``."""

    def __init__(self, listen=("0.0.0.0", 0), *, prefix: list[str] | None = None):
        super().__init__(["reflect", "--listen", format_hostport(listen)], prefix=prefix, ready="listening ")
        self.address = parse_hostport(self.ready_line.split()[1])

    def stats(self) -> dict:
        return self._command(op="stats")


def reflect_main(args) -> None:
    with UdpReflector(*parse_hostport(args.listen)) as r:
        print(f"listening {format_hostport(r.address)}", flush=True)
        json_lines(lambda cmd: r.stats())


# --------------------------------------------------------------------------- the agent

class _AgentCore:
    """The agent's side (in its namespace): one UDP socket, everything received kept in an inbox."""

    def __init__(self, bind):
        self.sock = socket.socket(socket.AF_INET6 if ":" in bind[0] else socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(bind)
        big_buffers(self.sock, 4 << 20)
        self.sock.settimeout(0.1)
        self.inbox: list = []  # (time, (ip, port), data)
        self.cond = threading.Condition()
        self.refused = 0
        self.stopped = False
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self.stopped:
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
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


def agent_main(args) -> None:
    core = _AgentCore(parse_hostport(args.bind))
    print(f"ready {format_hostport(core.sock.getsockname()[:2])}", flush=True)
    try:
        json_lines(core.handle)
    finally:
        core.stopped = True
        core.sock.close()


class UdpAgent(LineProcess):
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
