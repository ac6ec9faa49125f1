"""Network test lab: a UDP delay/loss/cut proxy and throw-away network namespaces.

Importable by tests (``from tests.helpers.netlab import NetLab, UdpProxy, ProxyProcess``) and
runnable (``python -m tests.helpers.netlab proxy ...``, from the repository root) so that a proxy
can run inside a namespace (``ip netns exec NS python -m tests.helpers.netlab proxy ...``).
Nothing here knows about bpfs beyond how to start its CLI.

One module a job:

- ``procs``       running commands, the lab's own ``ip``/``iptables`` calls, helper child
                  processes answering JSON lines (``LineProcess``)
- ``sockets``     "host:port" text, socket buffers, free ports, a threaded UDP server, the echo
- ``proxy``       ``UdpProxy`` and ``ProxyProcess``
- ``namespaces``  ``NetLab`` and ``Host``: namespaces, veth pairs, the bridge, impairments
- ``agents``      the reflector, the agent and ``hole_punch`` (for the NAT lab)
- ``capture``     ``PacketCapture``
- ``natlab``      ``NatLab``: homes behind NAT routers on a public network with a broker
- ``__main__``    the helpers' child processes (``proxy``, ``echo``, ``reflect``, ``agent``, ``capture``)

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

from tests.helpers.netlab.agents import ReflectorProcess, UdpAgent, UdpReflector, hole_punch
from tests.helpers.netlab.capture import CapturedDatagram, PacketCapture
from tests.helpers.netlab.namespaces import Host, NetLab, netlab_missing
from tests.helpers.netlab.natlab import NAT_MODES, NatLab, nat_lab, natlab_missing, sweep_stale_nat_labs
from tests.helpers.netlab.procs import COMMAND, PYTHON, REPO, LineProcess, alive, run_cmd, sh
from tests.helpers.netlab.proxy import ProxyProcess, UdpProxy
from tests.helpers.netlab.sockets import UdpEcho, UdpServer, format_hostport, free_udp_port, parse_hostport

__all__ = [
    "COMMAND", "NAT_MODES", "PYTHON", "REPO", "CapturedDatagram", "Host", "LineProcess", "NatLab", "NetLab",
    "PacketCapture", "ProxyProcess", "ReflectorProcess", "UdpAgent", "UdpEcho", "UdpProxy", "UdpReflector",
    "UdpServer", "alive", "format_hostport", "free_udp_port", "hole_punch", "nat_lab", "natlab_missing",
    "netlab_missing", "parse_hostport", "run_cmd", "sh", "sweep_stale_nat_labs",
]
