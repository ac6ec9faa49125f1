"""The benchmark's many-file tree (bench/): its layout, the tarball and md5 manifest made of it,
the --only names that select its steps, and the seconds it is reported in. Pure: no mount, no numpy."""

from __future__ import annotations

import hashlib
import math
import os
import statistics
import tarfile
from collections import Counter

from bench import config, datagen, stats


def test_layout_is_deterministic_and_shaped_like_a_source_tree():
    dirs, files = datagen.source_tree_layout(3000, 4096, 0.5)
    assert (dirs, files) == datagen.source_tree_layout(3000, 4096, 0.5)
    assert len(files) == 3000
    paths = [p for p, _, _ in files]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    assert dirs == sorted(dirs) and not set(dirs) & set(paths)
    known = set(dirs)
    assert all(os.path.dirname(p) in known for p in paths)
    assert all(os.path.dirname(d) in known for d in dirs if "/" in d)  # every parent is in the list
    assert max(d.count("/") for d in dirs) >= 3  # nested, not flat
    per_dir = Counter(os.path.dirname(p) for p in paths)
    assert 8 <= len(files) / len(dirs) <= 16  # about 12 files per folder
    assert max(per_dir.values()) < 60
    sizes = [s for _, s, _ in files]
    assert min(sizes) >= 1
    assert abs(statistics.median(sizes) / 4096 - 1) < 0.05
    logs = [math.log(s) for s in sizes]
    assert abs(statistics.stdev(logs) - 0.5) < 0.05  # log-normal with that shape
    assert len({seed for _, _, seed in files}) == len(files)  # every file its own content


def test_full_size_matches_the_issue():
    """36,000 files with a 4 KiB median and shape 0.5: about 167 MB (and as big a .tar.gz, since
    the content is incompressible)."""
    full = config.FULL
    _, files = datagen.source_tree_layout(full.tree_files, full.tree_median, full.tree_sigma)
    assert len(files) == 36_000
    assert 160e6 < sum(s for _, s, _ in files) < 175e6


def test_tarball_and_manifest_agree(tmp_path):
    tgz, manifest, meta = datagen.source_tree(tmp_path / "cache", 60, 4096, 0.5)
    lines = manifest.read_text().splitlines()
    assert len(lines) == meta["files"] == 60
    want = dict(reversed(line.split("  ", 1)) for line in lines)
    seen, dirs, total = {}, 0, 0
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            assert member.name == datagen.TREE_TOP or member.name.startswith(datagen.TREE_TOP + "/")
            if member.isdir():
                dirs += 1
                continue
            data = tar.extractfile(member).read()
            seen[member.name] = hashlib.md5(data).hexdigest()
            total += len(data)
    assert seen == want
    assert dirs == meta["dirs"] and total == meta["bytes"]
    assert meta["tgz_bytes"] == tgz.stat().st_size > 0.9 * total  # random content: gzip cannot shrink it
    # The second call reuses the cached files; the same sizes give the same bytes.
    before = tgz.read_bytes()
    assert datagen.source_tree(tmp_path / "cache", 60, 4096, 0.5) == (tgz, manifest, meta)
    again = datagen.source_tree(tmp_path / "other", 60, 4096, 0.5)
    assert again[0].read_bytes() == before and again[1].read_text() == manifest.read_text()


def test_only_names():
    assert config.expand(["tree"]) == (list(config.TREE), [])
    assert config.expand(["tree-rm", "seq_read", " tree_md5 "]) == (["seq_read", "tree_md5", "tree_rm"], [])
    assert config.expand(["tree", "tree_ls", "nope", ""]) == (list(config.TREE), ["nope"])
    assert set(config.TREE) <= set(config.TIMED) and set(config.TREE) <= set(config.ALL)


def test_tree_steps_are_reported_in_seconds():
    assert stats.rate({"seconds": 2.5}, "s") == 2.5
    assert stats.ratio(stats.summarize([6.0, 4.0, 5.0]), stats.summarize([2.0, 2.5, 3.0])) == 2.0
