"""Deterministic test data: random blocks, a CPython-like source tarball, a many-file source tree
(gzip'd tar and md5 manifest), a mixed tree of random files.

Everything is derived from fixed seeds, so two runs (and two machines) use the
same bytes. The source tarball and the many-file tree are cached in the work directory's
``cache/`` because generating them takes a while (the full tree about a minute); the rest is
generated on demand.

numpy is imported only by the functions that use it, so the pure layout functions can be
imported (and unit-tested) without the ``bench`` extra.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import random
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from bench.config import MiB

if TYPE_CHECKING:
    import numpy as np

#: Bump when the generated content changes, so stale cached tarballs are not reused.
SRC_VERSION = 2
#: The same for the many-file tree (``source_tree``).
TREE_VERSION = 1
MTIME = 1_700_000_000


def random_block(n: int, seed: int) -> np.ndarray:
    """``n`` incompressible bytes (a uint8 array, usable as a buffer), the same for the same seed."""
    import numpy as np

    words = np.random.default_rng(seed).integers(0, 2**63, size=(n + 7) // 8, dtype=np.uint64)
    return words.view(np.uint8)[:n]


# -- CPython-like source tree ------------------------------------------------------------

_WORDS = ("self", "return", "None", "def", "class", "import", "from", "if", "else", "for", "in",
          "while", "try", "except", "raise", "value", "result", "args", "kwargs", "name", "path",
          "buffer", "size", "offset", "len", "data", "node", "item", "key", "obj", "type", "list",
          "dict", "str", "int", "bytes", "encoding", "error", "module", "state", "context",
          "PyObject", "Py_ssize_t", "NULL", "static", "const", "char", "void", "struct", "goto",
          "the", "of", "a", "is", "to", "and", "this", "function", "returns", "argument",
          "parameter", "see", "also", "version", "changed", "added", "deprecated", "note")

_TOP = (("Lib", 0.46, ".py"), ("Doc", 0.14, ".rst"), ("Modules", 0.12, ".c"),
        ("Objects", 0.05, ".c"), ("Python", 0.05, ".c"), ("Include", 0.05, ".h"),
        ("Tools", 0.06, ".py"), ("Misc", 0.03, ".txt"), ("Parser", 0.02, ".c"), ("PC", 0.02, ".c"))


def _line_pool(rng: random.Random, style: str, count: int = 4000) -> list[str]:
    lines = []
    for _ in range(count):
        words = " ".join(rng.choices(_WORDS, k=rng.randint(1, 10)))
        indent = " " * (4 * rng.randint(0, 3))
        if style == ".py":
            line = rng.choice((f"{indent}{words}", f"{indent}{words}({words.split()[0]})",
                               f"{indent}# {words}", ""))
        elif style in (".c", ".h"):
            line = rng.choice((f"{indent}{words};", f"{indent}if ({words}) {{", f"{indent}}}",
                               f"/* {words} */", ""))
        else:
            line = rng.choice((words.capitalize() + ".", f"   {words}", f".. {words}::", ""))
        lines.append(line)
    return lines


_EXTS = (".py", ".rst", ".c", ".h", ".txt")


def _source_dirs(rng: random.Random, nfiles: int) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The directories of a source tree for ``nfiles`` files (about 12 per directory), nested up to
    six levels under the top-level ones of ``_TOP``: ({dir path: file extension used below it},
    {top: its dirs, itself first})."""
    dirs: dict[str, str] = {}
    by_top: dict[str, list[str]] = {}
    for top, share, ext in _TOP:
        dirs[top] = ext
        by_top[top] = [top]
        for i in range(max(1, int(nfiles * share / 12))):  # about 12 files per directory
            parent = rng.choice(by_top[top][: 1 + len(by_top[top]) // 2])  # keep it fairly shallow
            if parent.count("/") >= 5:
                parent = top
            d = f"{parent}/{rng.choice(_WORDS)}_{i}"
            dirs[d] = ext
            by_top[top].append(d)
    return dirs, by_top


def _source_entries(nfiles: int, nbytes: int, seed: int = 3110):
    """Yield (path, content or None for a directory) in sorted path order."""
    rng = random.Random(seed)
    pools = {ext: _line_pool(rng, ext) for ext in _EXTS}  # fixed order: same bytes every time
    dirs, by_top = _source_dirs(rng, nfiles)
    tops = [t for t, _, _ in _TOP]
    weights = [s for _, s, _ in _TOP]
    sizes = [rng.lognormvariate(8.6, 1.1) for _ in range(nfiles)]
    scale = nbytes / sum(sizes)
    files: dict[str, bytes] = {}
    for i, size in enumerate(sizes):
        top = rng.choices(tops, weights)[0]
        d = rng.choice(by_top[top])
        ext = dirs[d]
        if ext == ".c" and rng.random() < 0.3:
            ext = ".h"
        want = max(40, int(size * scale))
        pool = pools[ext]
        text = "\n".join(rng.choices(pool, k=want // 30 + 2))
        while len(text) < want:
            text += "\n" + "\n".join(rng.choices(pool, k=want // 30 + 2))
        files[f"{d}/{rng.choice(_WORDS)}_{i}{ext}"] = (text[: want - 1] + "\n").encode()
    entries = [(d, None) for d in dirs] + list(files.items())
    entries.sort(key=lambda e: e[0])
    return entries


def source_tarball(cache_dir: Path, nfiles: int, nbytes: int) -> tuple[Path, dict]:
    """The cached tarball of a generated source tree, and {'files', 'dirs', 'bytes'} about it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"src-v{SRC_VERSION}-{nfiles}-{nbytes}.tar"
    meta_path = path.with_suffix(".meta")
    if path.exists() and meta_path.exists():
        files, dirs, size = (int(x) for x in meta_path.read_text().split())
        return path, {"files": files, "dirs": dirs, "bytes": size}
    entries = _source_entries(nfiles, nbytes)
    tmp = path.with_suffix(".tmp")
    files = dirs = size = 0
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in entries:
            info = tarfile.TarInfo(f"cpython/{name}")
            info.mtime = MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
                dirs += 1
            else:
                info.mode = 0o644
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
                files += 1
                size += len(content)
    os.replace(tmp, path)
    meta_path.write_text(f"{files} {dirs} {size}\n")
    return path, {"files": files, "dirs": dirs, "bytes": size}


# -- many-file source tree (tree_extract, tree_md5, tree_ls, tree_rm) --------------------------

#: The folder the many-file tree is in, inside its tarball (so in each target after extraction).
TREE_TOP = "srctree"
_TREE_SEED = 3600


def source_tree_layout(nfiles: int, median: float, sigma: float,
                       seed: int = _TREE_SEED) -> tuple[list[str], list[tuple[str, int, int]]]:
    """The many-file tree without its content: its directories, and its files as (path, size,
    seed of its content), each list in sorted path order (paths relative to ``TREE_TOP``).

    The directories are those of the source tarball (``_source_dirs``: about 12 files each,
    nested up to six levels); file sizes are log-normal with median ``median`` bytes and shape
    ``sigma`` (the standard deviation of the natural log of the size), at least one byte.
    """
    rng = random.Random(seed)
    dirs, by_top = _source_dirs(rng, nfiles)
    tops = [t for t, _, _ in _TOP]
    weights = [s for _, s, _ in _TOP]
    mu = math.log(median)
    files = []
    for i in range(nfiles):
        size = max(1, round(rng.lognormvariate(mu, sigma)))
        d = rng.choice(by_top[rng.choices(tops, weights)[0]])
        ext = dirs[d]
        if ext == ".c" and rng.random() < 0.3:
            ext = ".h"
        files.append((f"{d}/{rng.choice(_WORDS)}_{i}{ext}", size, rng.getrandbits(64)))
    files.sort()
    return sorted(dirs), files


def source_tree(cache_dir: Path, nfiles: int, median: float, sigma: float,
                log=None) -> tuple[Path, Path, dict]:
    """The cached gzip'd tarball of a generated many-file source tree (``source_tree_layout``;
    everything in one folder, ``TREE_TOP``), the md5sum manifest of its files (paths relative to
    the folder it is extracted in, for ``md5sum -c``), and {'files', 'dirs', 'bytes', 'tgz_bytes',
    'median', 'sigma'} about it ('bytes': the files' total size; 'median': their median size).

    Each file's content is random bytes from its own seed: gzip cannot shrink it (the tarball is
    about as big as the files), and no two files share a chunk bpfs could deduplicate. Generated
    once per set of sizes, then reused from ``cache_dir``.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    stem = cache_dir / f"tree-v{TREE_VERSION}-{nfiles}-{median:g}-{sigma:g}"
    tgz, manifest, meta_path = (stem.with_name(stem.name + ext) for ext in (".tar.gz", ".md5", ".json"))
    if tgz.exists() and manifest.exists() and meta_path.exists():
        try:
            return tgz, manifest, json.loads(meta_path.read_text())
        except ValueError:
            pass  # a torn meta file: make it all again
    if log:
        log(f"generating the {nfiles}-file tree (once; cached in {cache_dir})")
    dirs, files = source_tree_layout(nfiles, median, sigma)
    entries: list[tuple[str, int | None, int]] = [(d, None, 0) for d in dirs]
    entries += files
    entries.sort(key=lambda e: e[0])
    tmp_tgz, tmp_md5 = tgz.with_name(tgz.name + ".tmp"), manifest.with_name(manifest.name + ".tmp")
    total = 0
    with open(tmp_tgz, "wb") as raw, open(tmp_md5, "w") as md5s, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=MTIME) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, size, seed in [(TREE_TOP, None, 0)] + [(f"{TREE_TOP}/{n}", s, d) for n, s, d in entries]:
            info = tarfile.TarInfo(name)
            info.mtime = MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if size is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
                continue
            content = random.Random(seed).randbytes(size)
            info.mode = 0o644
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
            md5s.write(f"{hashlib.md5(content).hexdigest()}  {name}\n")
            total += len(content)
    sizes = sorted(s for _, s, _ in files)
    meta = {"files": len(files), "dirs": len(dirs) + 1, "bytes": total, "tgz_bytes": tmp_tgz.stat().st_size,
            "median": sizes[len(sizes) // 2] if sizes else 0, "sigma": sigma}
    os.replace(tmp_tgz, tgz)
    os.replace(tmp_md5, manifest)
    meta_path.write_text(json.dumps(meta) + "\n")
    return tgz, manifest, meta


# -- mixed tree of random files (dedup) ----------------------------------------------------

def tree_layout(total: int) -> list[tuple[str, int]]:
    """(relative path, size) of a tree of about ``total`` bytes: a few big files, many small ones.

    A quarter is one big file, a quarter four files, a quarter sixteen files, and the
    last quarter small files of 4 KiB to 256 KiB in nested directories.
    """
    rng = random.Random(1024)
    layout = [("big/one.bin", total // 4)]
    layout += [(f"big/four_{i}.bin", total // 16) for i in range(4)]
    layout += [(f"mid/sixteen_{i:02d}.bin", total // 64) for i in range(16)]
    left, i = total - total // 4 * 1 - total // 16 * 4 - total // 64 * 16, 0
    while left > 0:
        size = min(left, int(rng.uniform(4096, 256 * 1024)))
        layout.append((f"small/d{i % 37:02d}/e{i % 5}/f{i:05d}.dat", size))
        left -= size
        i += 1
    return layout


def make_tree(dest: Path, total: int, seed: int = 77) -> dict:
    """Write the ``tree_layout(total)`` files with random content under ``dest``."""
    import numpy as np

    layout = tree_layout(total)
    rng = np.random.default_rng(seed)
    for rel, size in layout:
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 64 * MiB)
                f.write(rng.bytes(n))
                left -= n
    return {"files": len(layout), "bytes": sum(s for _, s in layout)}
