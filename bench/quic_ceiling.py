"""Raw QUIC ceiling on this machine: one stream, 256 MiB, loopback, bpfs.net transport.

Standalone:  .venv/bin/python bench/quic_ceiling.py [--mib 256] [--datagram 1452]
             [--cc reno|cubic] [--mode process|inproc|memory] [--offload on|off]
             [--library aioquic|qh3]

- process  (default) the receiver runs in a child process, the sender here: each side
           has its own core, as two peers would.
- inproc   both ends in one trio event loop (one core for both).
- memory   two bare QuicConnections of the library exchanging datagrams in memory: no
           sockets, no trio, no bpfs code: the pure library CPU cost, for comparison.

--library picks the QUIC state machine of both ends (`TransportConfig.quic_library`; qh3,
the default, see bpfs/net/machine_qh3.py). qh3's core always runs
CUBIC: --cc applies to aioquic only.

--offload off sets `TransportConfig.udp_offload=False` on both ends: one datagram per
system call instead of UDP GSO / GRO batches (see bpfs/net/udp.py); the datagrams per
call of each side are printed either way.

Prints throughput (MB/s = 10^6 bytes/s, and MiB/s) and CPU seconds per GiB moved, per
side and in total. The payload is SHA-256-checked end to end (outside the CPU figures of
the memory mode only). On Linux it also splits each side's wall time into on-CPU,
waiting for a CPU (another process had it: the machine is busy) and blocked (idle in
the event loop): on a shared machine, CPU s/GiB is the figure to compare, and
1 / (CPU s/GiB of the busier side) the throughput an idle core per side would give.

For harnesses (bench/quic_lossy.py runs the two ends in network namespaces, through a
delaying, lossy proxy): `--serve --listen HOST:PORT [--samples]` runs the receiver alone
(it prints its port, takes one connection and one stream; --samples adds its progress,
(wall clock, bytes) every 0.1 s, to the report it sends back), `--connect HOST:PORT` sends
to such a receiver instead of starting one, `--seconds S` sends for S seconds (64 KiB
writes) instead of --mib, `--send-buffer` sets `TransportConfig.send_buffer`, and `--json`
prints the result as one JSON line. Without them nothing changes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import ssl
import struct
import subprocess
import sys
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bpfs.identity import Identity  # noqa: E402
from bpfs.net.quic import TransportConfig, open_endpoint  # noqa: E402

CHUNK = 1 << 20
_REPORT = struct.Struct(">ddd32sQQQQ")  # receiver CPU seconds, on-cpu, waiting, sha256, its udp counts


def _sched() -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of this process."""
    try:
        with open("/proc/self/schedstat") as f:
            run, wait, _ = f.read().split()
        return int(run) / 1e9, int(wait) / 1e9
    except (OSError, ValueError):
        return float("nan"), float("nan")


def _payload_chunk() -> bytes:
    return os.urandom(CHUNK)


def _config(args) -> TransportConfig:
    extra = {"send_buffer": args.send_buffer} if getattr(args, "send_buffer", None) else {}
    return TransportConfig(max_datagram_size=args.datagram, congestion_control=args.cc,
                           udp_offload=getattr(args, "offload", "on") == "on",
                           quic_library=getattr(args, "library", "aioquic"), **extra)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _udp_counts(ep) -> tuple[int, int, int, int]:
    """(send calls, datagrams sent, receive calls, datagrams received) of an endpoint's socket."""
    u = ep.udp
    return u.send_calls, u.sent, u.recv_calls, u.received


async def _receive(stream, samples: list | None = None) -> tuple[float, float, float, bytes]:
    """Read the stream to its end; with `samples`, append (wall clock, bytes so far) to it at
    the first data, every 0.1 s, and at the end."""
    h = hashlib.sha256()
    first = await stream.receive_some(CHUNK)
    cpu0, (run0, wait0) = time.process_time(), _sched()
    h.update(first)
    got = len(first)
    if samples is not None:
        samples.append((time.time(), got))
    next_sample = time.time() + 0.1
    while data := await stream.receive_some(CHUNK):
        h.update(data)
        got += len(data)
        if samples is not None and (now := time.time()) >= next_sample:
            samples.append((now, got))
            next_sample = now + 0.1
    if samples is not None:
        samples.append((time.time(), got))
    run1, wait1 = _sched()
    return time.process_time() - cpu0, run1 - run0, wait1 - wait0, h.digest()


async def _serve(args) -> None:
    """Child side of --mode process: receive one stream, report CPU time and digest."""
    host, port = _hostport(args.listen) if getattr(args, "listen", None) else ("127.0.0.1", 0)
    async with open_endpoint(Identity(os.urandom(32)), host, port, config=_config(args)) as ep:
        print(ep.local_address[1], flush=True)
        conn = await ep.accept()
        stream = await conn.accept_stream()
        samples: list | None = [] if getattr(args, "samples", False) else None
        report = _REPORT.pack(*await _receive(stream, samples), *_udp_counts(ep))
        if samples is not None:
            report += json.dumps({"samples": samples}).encode()
        await stream.send(report, end=True)
        with trio.move_on_after(5):
            await conn.wait_closed()


async def _send(conn, total: int, chunk: bytes, seconds: float | None = None) -> dict:
    """Send `total` bytes in `chunk`s, or (`seconds`) as many as fit in that time."""
    stream = await conn.open_stream()
    h = hashlib.sha256()
    t0, cpu0, (run0, wait0) = time.perf_counter(), time.process_time(), _sched()
    sent = 0
    if seconds is None:
        while sent < total:
            await stream.send(chunk, end=sent + len(chunk) >= total)
            h.update(chunk)
            sent += len(chunk)
    else:
        while time.perf_counter() - t0 < seconds:
            await stream.send(chunk)
            h.update(chunk)
            sent += len(chunk)
        await stream.send_eof()
    report = await stream.receive_all(_REPORT.size + (1 << 20))
    run1, wait1 = _sched()
    return dict(wall=time.perf_counter() - t0, cpu_send=time.process_time() - cpu0, digest=h.digest(),
                report=report, sched_send=(run1 - run0, wait1 - wait0), sent=sent)


async def _process_mode(args, total: int) -> dict:
    # Set-up, before anything is timed and before any other task runs: blocking here stalls nothing.
    child = None
    connect, seconds = getattr(args, "connect", None), getattr(args, "seconds", None)  # harness-only options
    if connect:
        address = _hostport(connect)
    else:
        child = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, os.path.abspath(__file__), "--serve", "--datagram", str(args.datagram),  # noqa: ASYNC240
             "--cc", args.cc, "--offload", getattr(args, "offload", "on"), "--library", args.library],
            stdout=subprocess.PIPE, text=True)
    try:
        if child is not None:
            address = ("127.0.0.1", int(child.stdout.readline()))
        chunk = _payload_chunk()[:64 << 10] if seconds else _payload_chunk()
        bind = "127.0.0.1" if child is not None else ("::" if ":" in address[0] else "0.0.0.0")
        async with open_endpoint(Identity(os.urandom(32)), bind, listen=False, config=_config(args)) as ep:
            conn = await ep.connect(address)
            r = await _send(conn, total, chunk, seconds)
            r["udp_send"] = _udp_counts(ep)
            await conn.aclose()
        if child is not None:
            child.wait(timeout=10)
    finally:
        if child is not None and child.poll() is None:
            child.kill()
    cpu_recv, run, wait, remote_digest, *udp_recv = _REPORT.unpack(r["report"][:_REPORT.size])
    extra = json.loads(r["report"][_REPORT.size:]) if len(r["report"]) > _REPORT.size else {}
    return dict(r, cpu_recv=cpu_recv, sched_recv=(run, wait), ok=r["digest"] == remote_digest,
                udp_recv=tuple(udp_recv), samples=extra.get("samples"))


async def _inproc_mode(args, total: int) -> dict:
    cfg = _config(args)
    async with open_endpoint(Identity(os.urandom(32)), config=cfg) as srv, \
            open_endpoint(Identity(os.urandom(32)), listen=False, config=cfg) as cli:
        async with trio.open_nursery() as nursery:
            async def serve():
                conn = await srv.accept()
                stream = await conn.accept_stream()
                await stream.send(_REPORT.pack(*await _receive(stream), *_udp_counts(srv)), end=True)

            nursery.start_soon(serve)
            conn = await cli.connect(srv.local_address)
            r = await _send(conn, total, _payload_chunk())
            r["udp_send"] = _udp_counts(cli)
    return dict(r, cpu_recv=None, ok=r["digest"] == _REPORT.unpack(r["report"])[3],
                udp_recv=_REPORT.unpack(r["report"])[4:])


def _memory_mode(args, total: int) -> dict:
    from aioquic.buffer import Buffer
    from aioquic.quic.packet import pull_quic_header

    from bpfs.net.machine import process_certificate

    kw = dict(alpn_protocols=["bench"], max_datagram_size=args.datagram, max_data=64 << 20,
              max_stream_data=64 << 20, verify_mode=ssl.CERT_NONE)
    if args.library == "qh3":
        from qh3.quic import events
        from qh3.quic.configuration import QuicConfiguration
        from qh3.quic.connection import QuicConnection

        from bpfs.net.machine_qh3 import _process_certificate_pem

        client = QuicConnection(configuration=QuicConfiguration(is_client=True, probe_datagram_size=False, **kw))
        server_cfg = QuicConfiguration(is_client=False, **kw)
        server_cfg.load_cert_chain(*_process_certificate_pem())
    else:
        from aioquic.quic import events
        from aioquic.quic.configuration import QuicConfiguration
        from aioquic.quic.connection import QuicConnection

        cert, key = process_certificate()
        client = QuicConnection(configuration=QuicConfiguration(is_client=True, congestion_control_algorithm=args.cc,
                                                                **kw))
        server_cfg = QuicConfiguration(is_client=False, congestion_control_algorithm=args.cc, **kw)
        server_cfg.certificate, server_cfg.private_key = cert, key
    server = None
    clock = [0.0]
    c_addr, s_addr = ("10.0.0.1", 1), ("10.0.0.2", 2)

    def pump():
        nonlocal server
        moved = True
        while moved:
            moved = False
            for data, _ in client.datagrams_to_send(now=clock[0]):
                if server is None:
                    odcid = pull_quic_header(Buffer(data=data), host_cid_length=8).destination_cid
                    server = QuicConnection(configuration=server_cfg, original_destination_connection_id=odcid)
                server.receive_datagram(data, c_addr, now=clock[0])
                moved = True
            if server is not None:
                for data, _ in server.datagrams_to_send(now=clock[0]):
                    client.receive_datagram(data, s_addr, now=clock[0])
                    moved = True
            clock[0] += 1e-4

    client.connect(s_addr, now=0.0)
    pump()
    chunk = _payload_chunk()
    t0, cpu0, (run0, wait0) = time.perf_counter(), time.process_time(), _sched()
    sent = got = 0
    while got < total:
        if sent < total and sent - got < 16 << 20:
            client.send_stream_data(0, chunk, end_stream=sent + len(chunk) >= total)
            sent += len(chunk)
        pump()
        while (ev := server.next_event()) is not None:
            if isinstance(ev, events.StreamDataReceived):
                got += len(ev.data)
        while client.next_event() is not None:
            pass
    run1, wait1 = _sched()
    return dict(wall=time.perf_counter() - t0, cpu_send=time.process_time() - cpu0, cpu_recv=None,
                sched_send=(run1 - run0, wait1 - wait0), ok=got == total)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="MiB to send (default 256)")
    ap.add_argument("--datagram", type=int, default=1452, help="max_datagram_size (default 1452)")
    ap.add_argument("--cc", default="reno", choices=["reno", "cubic"])
    ap.add_argument("--mode", default="process", choices=["process", "inproc", "memory"])
    ap.add_argument("--offload", default="on", choices=["on", "off"],
                    help="UDP GSO / GRO batching (TransportConfig.udp_offload; default on)")
    ap.add_argument("--library", default="qh3", choices=["qh3", "aioquic"],
                    help="QUIC state machine of both ends (TransportConfig.quic_library; default qh3)")
    ap.add_argument("--serve", action="store_true",
                    help="run the receiver only: print its port, take one connection (for --connect)")
    ap.add_argument("--listen", metavar="HOST:PORT", help="with --serve: where to listen (default 127.0.0.1:0)")
    ap.add_argument("--samples", action="store_true",
                    help="with --serve: report progress samples (wall clock, bytes) every 0.1 s")
    ap.add_argument("--connect", metavar="HOST:PORT", help="send to a running --serve there (process mode)")
    ap.add_argument("--seconds", type=float, help="send for this long (64 KiB writes) instead of --mib")
    ap.add_argument("--send-buffer", type=int, metavar="BYTES", help="TransportConfig.send_buffer (default 4 MiB)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = ap.parse_args(argv)
    if args.serve:
        trio.run(_serve, args)
        return
    if (args.connect or args.seconds) and args.mode != "process":
        ap.error("--connect and --seconds need --mode process")
    total = args.mib * CHUNK
    if args.mode == "memory":
        r = _memory_mode(args, total)
    else:
        r = trio.run(_process_mode if args.mode == "process" else _inproc_mode, args, total)
    if args.seconds:
        total = r["sent"]
    if args.json:
        print(json.dumps({
            "library": args.library, "cc": "cubic" if args.library == "qh3" else args.cc, "ok": r["ok"],
            "bytes": total, "wall": r["wall"], "cpu_send": r["cpu_send"], "cpu_recv": r.get("cpu_recv"),
            "udp_send": r.get("udp_send"), "udp_recv": r.get("udp_recv"), "samples": r.get("samples")}),
            flush=True)
        if not r["ok"]:
            sys.exit(1)
        return
    gib = total / (1 << 30)
    offload = "" if args.mode == "memory" else f" offload={args.offload}"
    cc = "cubic (qh3's core)" if args.library == "qh3" else args.cc
    print(f"mode={args.mode} library={args.library} size={args.mib} MiB datagram={args.datagram} cc={cc}{offload} "
          f"ok={r['ok']}")
    print(f"throughput: {total / r['wall'] / 1e6:.1f} MB/s ({total / r['wall'] / (1 << 20):.1f} MiB/s), "
          f"{r['wall']:.2f} s")
    if r["cpu_recv"] is None:
        label = "both sides, one process" if args.mode != "memory" else "both sides, in memory"
        print(f"cpu: {r['cpu_send'] / gib:.1f} s/GiB ({label}); "
              f"one core would give {total / r['cpu_send'] / 1e6:.1f} MB/s")
        sides = [("process", r["sched_send"])]
    else:
        busier = max(r["cpu_send"], r["cpu_recv"])
        print(f"cpu: sender {r['cpu_send'] / gib:.1f} s/GiB, receiver {r['cpu_recv'] / gib:.1f} s/GiB, "
              f"total {(r['cpu_send'] + r['cpu_recv']) / gib:.1f} s/GiB; "
              f"an idle core per side would give {total / busier / 1e6:.1f} MB/s")
        sides = [("sender", r["sched_send"]), ("receiver", r["sched_recv"])]
    for name, (run, wait) in sides:
        wall = r["wall"]
        print(f"{name}: on-cpu {run / wall:.0%}, waiting for a cpu {wait / wall:.0%}, "
              f"blocked {max(0.0, wall - run - wait) / wall:.0%} of {wall:.1f} s")
    for name, counts in (("sender", r.get("udp_send")), ("receiver", r.get("udp_recv"))):
        if counts:
            send_calls, sent, recv_calls, received = counts
            print(f"{name} socket: {sent} datagrams out in {send_calls} calls "
                  f"({sent / max(1, send_calls):.1f} a call), {received} in from {recv_calls} reads "
                  f"({received / max(1, recv_calls):.1f} a read)")
    if not r["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
