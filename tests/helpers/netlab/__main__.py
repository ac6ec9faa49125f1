"""The lab's helper processes: ``python -m tests.helpers.netlab proxy|echo|reflect|agent|capture ...``
(run from the repository root, optionally inside a namespace)."""

from __future__ import annotations

import argparse

from tests.helpers.netlab.agents import agent_main, reflect_main
from tests.helpers.netlab.capture import capture_main
from tests.helpers.netlab.proxy import proxy_main
from tests.helpers.netlab.sockets import echo_main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.helpers.netlab", description=__doc__.split("\n")[0])
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
    c.add_argument("--block-size", type=int, default=1 << 20,
                   help="bytes a ring block (TPACKET_V3): frames up to this long are kept whole")
    c.add_argument("--blocks", type=int, default=64, help="ring blocks (the ring: blocks x block size)")
    c.add_argument("--block-timeout", type=int, default=20, help="ms before a block not full is handed over")
    args = ap.parse_args(argv)
    {"proxy": proxy_main, "echo": echo_main, "reflect": reflect_main, "agent": agent_main,
     "capture": capture_main}[args.cmd](args)


if __name__ == "__main__":
    main()
