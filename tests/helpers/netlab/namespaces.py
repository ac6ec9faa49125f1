"""Network namespaces joined by veth pairs to a bridge: ``NetLab`` makes them (and deletes them,
also after a failure), ``Host`` is one of them (running commands in it, and impairing its
link: loss, cuts, a rate limit); ``netlab_missing`` says why a lab cannot be made here."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

from tests.helpers.netlab.procs import PYTHON, alive, run_cmd, sh


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
        sh(*self.prefix, "iptables", "-w", *args)

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
        sh(*self.prefix, "tc", "qdisc", "del", "dev", self.ifname, "root", check=False)
        self._rate = rate
        if rate:
            sh(*self.prefix, "tc", "qdisc", "add", "dev", self.ifname, "root", "tbf", "rate", rate,
                "burst", "64kb", "latency", "200ms")

    def pids(self) -> list[int]:
        cp = sh("ip", "netns", "pids", self.ns, check=False)
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
        used = sh("ip", "-o", "-4", "addr", "show").stdout
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
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self._created_links.append(self.bridge)
        sh("ip", "addr", "add", f"{self.gateway}/{net.prefixlen}", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i in range(self.n):
            ns = f"bpfslab{self.tag}{i}"
            root_if, ns_if = f"bpv{self.tag}{i}"[:15], f"bpn{self.tag}{i}"[:15]
            addr = str(next(hosts_iter))
            sh("ip", "netns", "add", ns)
            self._created_ns.append(ns)
            sh("ip", "link", "add", root_if, "type", "veth", "peer", "name", ns_if)
            self._created_links.append(root_if)
            sh("ip", "link", "set", ns_if, "netns", ns)
            sh("ip", "link", "set", root_if, "master", self.bridge)
            sh("ip", "link", "set", root_if, "up")
            sh("ip", "-n", ns, "addr", "add", f"{addr}/{net.prefixlen}", "dev", ns_if)
            sh("ip", "-n", ns, "link", "set", ns_if, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
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
                cp = sh(*host.prefix, "ip", "-o", "link", "show", host.ifname)
                if "LOWER_UP" in cp.stdout or time.time() > deadline:
                    break
                time.sleep(0.05)

    def close(self) -> None:
        """Kill what still runs in the namespaces, delete them and the links. Never raises."""
        for ns in self._created_ns:
            cp = sh("ip", "netns", "pids", ns, check=False)
            pids = [int(x) for x in cp.stdout.split() if x.strip().isdigit()]
            for pid in pids:
                if pid != os.getpid():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            deadline = time.time() + 10
            for pid in pids:
                while time.time() < deadline and alive(pid):
                    time.sleep(0.05)
        for ns in reversed(self._created_ns):
            sh("ip", "netns", "del", ns, check=False)
        for link in reversed(self._created_links):
            sh("ip", "link", "del", link, check=False)
        self._created_ns.clear()
        self._created_links.clear()

    def __exit__(self, *exc) -> None:
        self.close()
