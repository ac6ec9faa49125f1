"""Chunking speed: pyfastcdc with a seed (bpfs before the secret gear table) against bpfs's own
extension with a secret table (`bpfs.chunker`), one thread and two threads (the GIL released).

    python bench/chunking.py [MiB per buffer, default 256]

Prints MB/s (10^6 bytes per second), best of three runs each.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from bpfs.chunker import AVG_SIZE, MAX_SIZE, MIN_SIZE, Chunker


def best_rate(cut, data, threads: int = 1, runs: int = 3) -> float:
    best = 0.0
    for _ in range(runs):
        workers = [threading.Thread(target=cut, args=(data,)) for _ in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, threads * len(data) / (time.perf_counter() - start) / 1e6)
    return best


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    data = os.urandom(size << 20)
    new = Chunker(os.urandom(32))
    cutters = {"bpfs secret table": new.cut}
    try:
        from pyfastcdc import FastCDC

        old = FastCDC(AVG_SIZE, min_size=MIN_SIZE, max_size=MAX_SIZE, seed=int.from_bytes(os.urandom(8), "little") >> 1)
        cutters["pyfastcdc seed"] = lambda d: [c.length for c in old.cut_buf(d)]
    except ImportError:
        pass
    for name, cut in cutters.items():
        print(f"{name:<18} 1 thread {best_rate(cut, data):8.0f} MB/s   2 threads {best_rate(cut, data, 2):8.0f} MB/s")


if __name__ == "__main__":
    main()
