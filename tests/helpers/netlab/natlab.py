"""The NAT lab: two homes behind two home routers (cone, symmetric or firewall NAT) on a public
network with a broker, all in namespaces of their own (``NatLab``, ``nat_lab``), the helpers
that live in it (reflector, agents, captures), and sweeping the names of labs left behind by
killed test runs."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import re
import shutil
import signal
import time

from tests.helpers.netlab.agents import ReflectorProcess, UdpAgent
from tests.helpers.netlab.capture import PacketCapture
from tests.helpers.netlab.namespaces import Host, netlab_missing
from tests.helpers.netlab.procs import alive, run_cmd, sh


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
    gone = []
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        m = re.match(rf"({_NATLAB_NS}(\d+)x[0-9a-f]{{4}}-\w+)", line)
        if m and not alive(int(m.group(2))):
            sh("ip", "netns", "del", m.group(1), check=False)
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
      sent.  Verified on this kernel, see tests/net/test_netlab_nat.py.)
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
                cp = sh("ip", "-n", host.ns, "-o", "link", "show", "up")
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
            cp = sh("ip", "netns", "pids", ns, check=False)
            for pid in (int(x) for x in cp.stdout.split() if x.strip().isdigit()):
                if pid != os.getpid():
                    pids.append(pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 10
        for pid in pids:
            while time.time() < deadline and alive(pid):
                time.sleep(0.02)
        for ns in reversed(self._created_ns):
            sh("ip", "netns", "del", ns, check=False)
        self._created_ns.clear()

    def __exit__(self, *exc) -> None:
        self.close()


def nat_lab(mode_a: str = "cone", mode_b: str = "cone", *, same_lan: bool = False, stealth: bool = True) -> NatLab:
    """``with nat_lab("cone", "symmetric") as lab: ...`` (see NatLab)."""
    return NatLab(mode_a, mode_b, same_lan=same_lan, stealth=stealth)
