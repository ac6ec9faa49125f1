"""The network test lab itself (tests/helpers/netlab/): the UDP proxy's delay, loss and cuts, the
namespaces, their impairments and their cleanup. The partner tests rely on these."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from tests.helpers.cli import bpfs_env, init_store
from tests.helpers.mounts import Mount, fuse_mounted, is_mounted
from tests.helpers.netlab import (COMMAND, PYTHON, REPO, NetLab, ProxyProcess, UdpEcho, UdpProxy, netlab_missing,
                                  parse_hostport, sh)

pytestmark = pytest.mark.timeout(120)

needs_lab = pytest.mark.skipif(netlab_missing() is not None, reason=str(netlab_missing()))


def round_trips(address, n: int, *, gap: float = 0.0, timeout: float = 1.0, size: int = 200):
    """Send n numbered datagrams to an echo at `address`; return (rtts of those answered, answered ids)."""
    fam = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    rtts, got = [], set()
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        sent_at = {}
        for i in range(n):
            sent_at[i] = time.monotonic()
            s.sendto(i.to_bytes(4, "big") + b"x" * (size - 4), address)
            if gap:
                time.sleep(gap)
            _drain(s, sent_at, rtts, got)
        s.settimeout(0.02)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(got) < n:
            _drain(s, sent_at, rtts, got)
    return rtts, got


def _drain(s, sent_at, rtts, got):
    while True:
        try:
            data = s.recv(65535)
        except (socket.timeout, BlockingIOError):
            return
        except ConnectionRefusedError:
            continue
        i = int.from_bytes(data[:4], "big")
        if i not in got:
            got.add(i)
            rtts.append(time.monotonic() - sent_at[i])


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


# =========================================================================== the proxy, in-process

def test_proxy_forwards_without_delay():
    with UdpEcho() as echo, UdpProxy(echo.address) as proxy:
        rtts, got = round_trips(proxy.address, 50)
        assert len(got) == 50
        assert median(rtts) < 0.05
        st = proxy.stats()
        assert st["up_datagrams"] == 50 and st["down_datagrams"] == 50
        assert st["up_bytes"] == 50 * 200
        assert st["clients"] == 1


@pytest.mark.parametrize("delay", [0.05, 0.1])
def test_proxy_delay_per_direction(delay):
    """A datagram is held `delay` seconds in each direction: a round trip takes 2 * delay."""
    with UdpEcho() as echo, UdpProxy(echo.address, delay=delay) as proxy:
        rtts, got = round_trips(proxy.address, 40, gap=0.01)
        assert len(got) == 40
        assert 2 * delay * 0.95 <= min(rtts), rtts
        assert median(rtts) <= 2 * delay + 0.06, rtts
        # the delay does not serialise: 40 datagrams sent 10 ms apart take about 0.4 s + RTT, not 40 RTTs
        proxy.set(delay=0)
        rtts, got = round_trips(proxy.address, 20)
        assert len(got) == 20 and median(rtts) < 0.05


def test_proxy_loss_fraction():
    with UdpEcho() as echo, UdpProxy(echo.address, loss=0.2, seed=1234) as proxy:
        n = 2000
        rtts, got = round_trips(proxy.address, n, gap=0.0003, timeout=1.0)
        st = proxy.stats()
        up_loss = st["up_dropped"] / n
        assert 0.16 <= up_loss <= 0.24, st
        assert st["up_datagrams"] == n - st["up_dropped"]
        assert echo.received == st["up_datagrams"]
        # both directions lose: about 0.8 * 0.8 of the round trips succeed
        assert 0.56 <= len(got) / n <= 0.72, (len(got), st)
        proxy.set(loss=0.0)
        _, got = round_trips(proxy.address, 100)
        assert len(got) == 100


def test_proxy_cut_and_restore():
    with UdpEcho() as echo, UdpProxy(echo.address) as proxy:
        assert len(round_trips(proxy.address, 10)[1]) == 10
        proxy.cut()
        assert proxy.is_cut
        assert round_trips(proxy.address, 20, timeout=0.5)[1] == set()
        assert echo.received == 10  # nothing reached the target while cut
        proxy.restore()
        assert len(round_trips(proxy.address, 10)[1]) == 10
        st = proxy.stats()
        assert st["cut_dropped"] == 20 and not st["cut"]


def test_proxy_cut_drops_what_is_in_flight():
    """Datagrams held by the delay when the cable is pulled are lost, not delivered later."""
    with UdpEcho() as echo, UdpProxy(echo.address, delay=0.3) as proxy:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1.0)
            for i in range(5):
                s.sendto(b"in flight %d" % i, proxy.address)
            time.sleep(0.05)
            proxy.cut()
            time.sleep(0.5)
            proxy.restore()
            with pytest.raises(socket.timeout):
                s.recv(100)
        assert echo.received == 0
        assert len(round_trips(proxy.address, 5)[1]) == 5


def test_proxy_keeps_clients_apart():
    """Each client has its own upstream socket: replies go back to the right one."""
    with UdpEcho() as echo, UdpProxy(echo.address) as proxy:
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
        try:
            for i, s in enumerate(socks):
                s.settimeout(1.0)
                s.sendto(b"client %d" % i, proxy.address)
            for i, s in enumerate(socks):
                assert s.recv(100) == b"client %d" % i
        finally:
            for s in socks:
                s.close()
        assert proxy.stats()["clients"] == 3


def test_proxy_process_and_commands():
    with UdpEcho() as echo, ProxyProcess(echo.address, delay=0.05) as proxy:
        rtts, got = round_trips(proxy.address, 20, gap=0.005)
        assert len(got) == 20 and min(rtts) >= 0.095
        proxy.cut()
        assert round_trips(proxy.address, 5, timeout=0.3)[1] == set()
        proxy.restore()
        proxy.set(delay=0.0, loss=0.0)
        rtts, got = round_trips(proxy.address, 20)
        assert len(got) == 20 and median(rtts) < 0.05
        st = proxy.stats()
        assert st["cut_dropped"] == 5 and st["up_datagrams"] == 40
    assert proxy.proc.poll() is not None


# =========================================================================== namespaces

def _names(kind: str) -> str:
    return sh("ip", *(["netns", "list"] if kind == "ns" else ["-o", "link", "show"])).stdout


@needs_lab
def test_netlab_hosts_reach_each_other_and_the_root():
    with NetLab(2) as lab:
        a, b = lab.hosts
        assert a.addr != b.addr and lab.gateway
        # an echo in host a, reached from the root namespace and from host b
        echo = a.popen([*COMMAND, "echo", "--listen", f"{a.addr}:0"], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            addr = parse_hostport(echo.stdout.readline().split()[1])
            assert addr[0] == a.addr
            assert len(round_trips(addr, 10)[1]) == 10
            probe = ("import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2); "
                     f"s.sendto(b'hi', ({addr[0]!r}, {addr[1]})); print(s.recv(10).decode())")
            assert b.cmd(PYTHON, "-c", probe).stdout.strip() == "hi"
            # the host's own loopback works, and is not the root's
            assert "UP" in a.cmd("ip", "-o", "link", "show", "lo").stdout
        finally:
            echo.stdin.close()
            echo.wait(timeout=10)
        namespaces = [h.ns for h in lab.hosts]
        assert all(ns in _names("ns") for ns in namespaces)
    # all gone afterwards
    ns_now, links_now = _names("ns"), _names("links")
    assert not any(ns in ns_now for ns in namespaces)
    assert lab.bridge not in links_now and a.root_if not in links_now


@needs_lab
def test_netlab_loss_and_cut():
    with NetLab(1) as lab:
        (h,) = lab.hosts
        echo = h.popen([*COMMAND, "echo", "--listen", f"{h.addr}:0"], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            addr = parse_hostport(echo.stdout.readline().split()[1])
            assert len(round_trips(addr, 50)[1]) == 50
            h.set_loss(0.3)  # each direction: 0.7 * 0.7 = 49% of round trips succeed
            n = 1000
            ok = len(round_trips(addr, n, gap=0.0003, timeout=1.0)[1]) / n
            assert 0.40 <= ok <= 0.58, ok
            h.cut()
            assert round_trips(addr, 20, timeout=0.5)[1] == set()
            h.restore()  # back to the 30% loss
            ok = len(round_trips(addr, 400, gap=0.0003, timeout=1.0)[1]) / 400
            assert 0.36 <= ok <= 0.62, ok
            h.set_loss(0.0)
            assert len(round_trips(addr, 50)[1]) == 50
        finally:
            echo.stdin.close()
            echo.wait(timeout=10)


@needs_lab
def test_netlab_cleans_up_after_a_failure_and_kills_leftovers():
    with pytest.raises(RuntimeError, match="boom"):
        with NetLab(2) as lab:
            sleeper = lab.hosts[1].popen(["sleep", "600"])
            raise RuntimeError("boom")
    assert sleeper.wait(timeout=10) is not None
    assert not any(h.ns in _names("ns") for h in lab.hosts)
    assert lab.bridge not in _names("links")


@needs_lab
def test_proxy_inside_a_namespace_delays_traffic_to_it():
    with NetLab(1) as lab:
        (h,) = lab.hosts
        echo = h.popen([*COMMAND, "echo", "--listen", "127.0.0.1:0"], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True, cwd=REPO)
        try:
            target = parse_hostport(echo.stdout.readline().split()[1])
            # the echo listens on the namespace's loopback: only the proxy there can reach it
            with ProxyProcess(target, (h.addr, 0), delay=0.1, prefix=h.prefix) as proxy:
                assert proxy.address[0] == h.addr
                rtts, got = round_trips(proxy.address, 20, gap=0.01)
                assert len(got) == 20
                assert 0.19 <= min(rtts) and median(rtts) <= 0.3, rtts
        finally:
            echo.stdin.close()
            echo.wait(timeout=10)


@needs_lab
def test_fuse_mount_made_in_a_lab_host_is_visible_to_the_test(tmp_path):
    """Host.prefix changes only the network namespace (nsenter --net), not the mount namespace
    that `ip netns exec` would make: a bpfs mount started there is usable from the test."""
    store = tmp_path / "store"
    init_store(store)
    m = Mount(store, tmp_path / "mnt")
    m.mnt.mkdir()
    try:
        with NetLab(1) as lab:
            (h,) = lab.hosts
            h.bpfs("mount", store, m.mnt, "--listen", f"{h.addr}:0", env=bpfs_env())
            assert fuse_mounted(m.mnt)
            (m.mnt / "hello").write_text("from the root namespace")
            assert (m.mnt / "hello").read_text() == "from the root namespace"
            m.umount()
            assert not is_mounted(m.mnt)
    finally:
        m.cleanup()
