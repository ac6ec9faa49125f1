"""The two deduplication figures, for bpfs and for restic (the reference).

- dedup_copy: the same tree (``datagen.make_tree``) is copied in twice, as
  ``copy1/`` and then ``copy2/``; figure = store growth caused by the second copy,
  (size after copy2 - size after copy1) / size after copy1, in %. Target < 2 %.
- dedup_insert: a random file is stored, then the same content with one byte
  inserted at its start is stored as a second file (nothing is deleted, so a
  freeing of space cannot hide the cost); figure = new bytes stored / file size, in %.
  Target < 3 %.

bpfs sizes are the sum of file sizes under STORE after ``bpfs umount``; restic
sizes are the sum of file sizes in the repository after ``restic backup``.

The copy figure is measured once (it hardly varies). The insert figure is
repeated ``--runs`` times, each time in a new store, and its median reported:
both tools key their chunker per store, so where the chunk boundaries fall,
and so the size of the one chunk that changes, varies from store to store.
"""

from __future__ import annotations

import shutil
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from bench import datagen, proc, targets
from bench.cleanup import Cleanup
from bench.config import BLOCK, PASSPHRASE

TARGET_PERCENT = {"dedup_copy": 2.0, "dedup_insert": 3.0}


def _write_file(path: Path, data: np.ndarray, prefix: bytes = b"") -> None:
    view = memoryview(data)
    with open(path, "wb", buffering=0) as f:
        if prefix:
            f.write(prefix)
        for off in range(0, len(view), BLOCK):
            f.write(view[off:off + BLOCK])


# -- bpfs ---------------------------------------------------------------------------------

def _bpfs_sizes(base: Path, cleanup: Cleanup, steps: list[Callable[[Path], None]],
                problems: list[str], breakdown: list[dict]) -> tuple[list[int], list[float]]:
    """Store size of a new bpfs store when empty and after each step (each in its own mount).

    Odd things the instance noticed (daemon alive after umount, ...) go into ``problems``;
    the size of each top-level entry of STORE at each point goes into ``breakdown``.
    """
    inst = targets.Bpfs(base, cleanup)
    step = "init"
    try:
        inst.create()
        inst.mount()
        inst.umount()
        sizes, seconds = [inst.store_bytes()], []
        breakdown.append(inst.store_breakdown())
        for i, fn in enumerate(steps, 1):
            step = f"mount before step {i}"
            inst.mount()
            step = f"step {i}"
            t0 = time.perf_counter()
            fn(inst.root)
            seconds.append(time.perf_counter() - t0)
            step = f"umount after step {i}"
            inst.umount()
            sizes.append(inst.store_bytes())
            breakdown.append(inst.store_breakdown())
        return sizes, seconds
    except Exception as e:
        log = inst.log_tail()
        raise RuntimeError(f"{base.name}, {step}: {type(e).__name__}: {e}"
                           + (f"\ndaemon log:\n{log}" if log else "")) from e
    finally:
        for p in inst.problems:
            if p not in problems:
                problems.append(p)
        inst.destroy()


def _cp(src: Path, dst: Path) -> None:
    proc.run(["cp", "-R", str(src), str(dst)], timeout=3600)


def bpfs_copy(tmp: Path, tree: Path, cleanup: Cleanup) -> dict:
    problems: list[str] = []
    breakdown: list[dict] = []
    sizes, seconds = _bpfs_sizes(tmp / "bpfs-dedup-copy", cleanup,
                                 [lambda root: _cp(tree, root / "copy1"),
                                  lambda root: _cp(tree, root / "copy2")], problems, breakdown)
    s0, s1, s2 = sizes
    return {"percent": (s2 - s1) / s1 * 100, "empty": s0, "after_copy1": s1, "after_copy2": s2,
            "copy_seconds": seconds, "store_breakdown": breakdown, "problems": problems}


def bpfs_insert(tmp: Path, data: np.ndarray, cleanup: Cleanup, run: int = 1) -> dict:
    problems: list[str] = []
    breakdown: list[dict] = []
    sizes, seconds = _bpfs_sizes(tmp / f"bpfs-dedup-insert-run{run}", cleanup,
                                 [lambda root: _write_file(root / "orig.bin", data),
                                  lambda root: _write_file(root / "shifted.bin", data, b"\n")],
                                 problems, breakdown)
    s0, s1, s2 = sizes
    return {"percent": (s2 - s1) / len(data) * 100, "empty": s0, "after_orig": s1,
            "after_shifted": s2, "write_seconds": seconds, "store_breakdown": breakdown,
            "problems": problems}


# -- restic -------------------------------------------------------------------------------

class Restic:
    """A restic repository in ``base``, with its cache kept there too."""

    def __init__(self, base: Path):
        self.base = base
        self.repo = base / "repo"
        self.env = {"RESTIC_PASSWORD": PASSPHRASE, "RESTIC_REPOSITORY": str(self.repo),
                    "RESTIC_CACHE_DIR": str(base / "cache")}
        base.mkdir(parents=True)
        proc.run(["restic", "init", "--quiet"], env=self.env, timeout=300)

    def backup(self, path: Path) -> float:
        t0 = time.perf_counter()
        proc.run(["restic", "backup", "--quiet", str(path)], env=self.env, timeout=3600)
        return time.perf_counter() - t0

    def size(self) -> int:
        return proc.tree_bytes(self.repo)

    def destroy(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def restic_copy(tmp: Path, tree: Path) -> dict:
    """Back up the tree, then a hard-linked second copy of it at another path."""
    r = Restic(tmp / "restic-dedup-copy")
    try:
        s0 = r.size()
        t1 = r.backup(tree)
        s1 = r.size()
        copy2 = tmp / "restic-dedup-copy" / "copy2"
        proc.run(["cp", "-al", str(tree), str(copy2)], timeout=600)
        t2 = r.backup(copy2)
        s2 = r.size()
        return {"percent": (s2 - s1) / s1 * 100, "empty": s0, "after_copy1": s1, "after_copy2": s2,
                "backup_seconds": [t1, t2]}
    finally:
        r.destroy()


def restic_insert(tmp: Path, data: np.ndarray, run: int = 1) -> dict:
    """Back up a directory with the file, add the shifted file, back up again."""
    r = Restic(tmp / f"restic-dedup-insert-run{run}")
    src = r.base / "src"
    try:
        src.mkdir()
        _write_file(src / "orig.bin", data)
        s0 = r.size()
        t1 = r.backup(src)
        s1 = r.size()
        _write_file(src / "shifted.bin", data, b"\n")
        t2 = r.backup(src)
        s2 = r.size()
        return {"percent": (s2 - s1) / len(data) * 100, "empty": s0, "after_orig": s1,
                "after_shifted": s2, "backup_seconds": [t1, t2]}
    finally:
        r.destroy()


def run_dedup(which: set[str], tools: list[str], tmp: Path, tree_bytes: int, insert_bytes: int,
              cleanup: Cleanup, log: Callable[[str], None], out: dict | None = None,
              runs: int = 1) -> dict:
    """{figure: {tool: result or {'error': ...}}} for figure in ``which``, tool in bpfs/restic.

    ``out`` is filled as figures finish, so a Ctrl-C keeps what was done.
    """
    out = out if out is not None else {}
    if "dedup_copy" in which:
        tree = tmp / "dedup-tree"
        log(f"dedup: generating a {tree_bytes >> 20} MiB tree")
        meta = datagen.make_tree(tree, tree_bytes)
        out["dedup_copy"] = {"tree": meta}
        for tool in tools:
            log(f"dedup: {tool}, copying the tree in twice")
            copy = partial(bpfs_copy, tmp, tree, cleanup) if tool == "bpfs" else partial(restic_copy, tmp, tree)
            out["dedup_copy"][tool] = _guard(copy, tool, log)
        shutil.rmtree(tree, ignore_errors=True)
    if "dedup_insert" in which:
        data = datagen.random_block(insert_bytes, seed=5)
        out["dedup_insert"] = {"file_bytes": insert_bytes}
        for run in range(1, runs + 1):
            for tool in tools:
                log(f"dedup: {tool}, inserting one byte at the start of a {insert_bytes >> 20} MiB file"
                    f" (run {run}/{runs})")
                insert = (partial(bpfs_insert, tmp, data, cleanup, run) if tool == "bpfs"
                          else partial(restic_insert, tmp, data, run))
                res = _guard(insert, tool, log)
                _merge_run(out["dedup_insert"].setdefault(tool, {"runs": []}), res)
    return out


def _merge_run(acc: dict, res: dict) -> None:
    """Add one run's result to ``acc``: 'runs', the median/min/max 'percent', 'errors' of failed runs."""
    if "error" in res:
        acc.setdefault("errors", []).append(res["error"])
        return
    acc["runs"].append(res)
    pcts = sorted(r["percent"] for r in acc["runs"])
    acc.update(percent=statistics.median(pcts), min=pcts[0], max=pcts[-1])
    acc["problems"] = sorted({p for r in acc["runs"] for p in r.get("problems", [])})


def _guard(fn: Callable[[], dict], tool: str, log: Callable[[str], None]) -> dict:
    try:
        res = fn()
        log(f"  {tool}: {res['percent']:.2f} %")
        return res
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - record and go on with the other tool
        log(f"  {tool}: FAILED: {type(e).__name__}: {e}".splitlines()[0])
        return {"error": f"{type(e).__name__}: {e}"}

