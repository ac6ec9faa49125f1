"""Offline check of a store: the index's structure, and with --read-data every chunk.

Checks that every name points at an inode, link counts match names, every inode is
reachable, every extent points at a chunk inside its bounds, reference counts match,
every chunk lies inside an existing pack, and (with read_data) that every chunk
authenticates and hashes to its id. Damage is reported by the paths it affects. Also notes
(harmless) local-file markers of inodes that no longer exist, and chunks in local packs that
replicated files use (they move to replicated packs at the next snapshot; see `lanes`).
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field

from .data import read_chunk
from .errors import IntegrityError
from .index import ROOT_INO, Index
from .packs import PackFiles
from .store import StoreLock


@dataclass
class Report:
    """What a check found: problems (damage: the store is not OK), the paths they affect, harmless
    notes, and counts of what was checked."""

    problems: list[str] = field(default_factory=list)
    damaged_paths: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"ok": self.ok, "problems": self.problems, "damaged_paths": sorted(self.damaged_paths),
                "notes": self.notes, "counts": self.counts}

    def lines(self) -> list[str]:
        out = [f"problem: {p}" for p in self.problems]
        out += [f"damaged: {p}" for p in sorted(self.damaged_paths)]
        out += [f"note: {n}" for n in self.notes]
        summary = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        out.append(("OK: " if self.ok else "DAMAGED: ") + summary)
        return out


class _Checker:
    def __init__(self, store_dir: str, keys, read_data: bool):
        self.store_dir = store_dir
        self.index = Index(os.path.join(store_dir, "index"), keys)
        self.packs = PackFiles(store_dir)
        self.keys = keys
        self.read_data = read_data
        self.report = Report()
        self.parent_of: dict[int, tuple[int, bytes]] = {}

    def problem(self, text: str, ino: int | None = None) -> None:
        self.report.problems.append(text)
        if ino is not None:
            self.report.damaged_paths.add(self.path(ino))

    def path(self, ino: int) -> str:
        parts, seen = [], set()
        while ino != ROOT_INO and ino in self.parent_of and ino not in seen:
            seen.add(ino)
            ino, name = self.parent_of[ino]
            parts.append(name)
        if ino != ROOT_INO:
            parts.append(f"<inode {ino}>".encode())
        return "/" + "/".join(os.fsdecode(p) for p in reversed(parts))

    def run(self) -> Report:
        index = self.index
        attrs = {}
        try:
            for a in index.all_inodes():
                attrs[a.ino] = a
        except IntegrityError:
            self.problem("an inode record does not authenticate (index damaged)")
        links: dict[int, int] = defaultdict(int)
        subdirs: dict[int, int] = defaultdict(int)
        for parent in [ino for ino, a in attrs.items() if stat.S_ISDIR(a.mode)]:
            try:
                for _, name, child in index.list_entries(parent):
                    self.parent_of[child] = (parent, name)
                    links[child] += 1
                    if child not in attrs:
                        self.problem(f"entry {name!r} in directory inode {parent} points at missing inode {child}")
                    elif stat.S_ISDIR(attrs[child].mode):
                        subdirs[parent] += 1
            except IntegrityError:
                self.problem(f"entries of directory inode {parent} do not authenticate", parent)
        orphans = set(index.orphans())
        for ino, a in attrs.items():
            expected = 2 + subdirs[ino] if stat.S_ISDIR(a.mode) else links[ino]
            if ino != ROOT_INO and links[ino] == 0 and ino not in orphans:
                self.problem(f"inode {ino} has no name and is not an orphan")
            elif a.nlink != expected and ino not in orphans:
                self.problem(f"{self.path(ino)}: link count {a.nlink}, expected {expected}", ino)
        chunks = {}
        try:
            chunks = dict(index.all_chunks())
        except IntegrityError:
            self.problem("a chunk record does not authenticate (index damaged)")
        refs: dict[bytes, int] = defaultdict(int)
        users: dict[bytes, set[int]] = defaultdict(set)
        n_extents = 0
        try:
            for ino, e in index.all_extents():
                n_extents += 1
                refs[e.chunk_id] += 1
                users[e.chunk_id].add(ino)
                a = attrs.get(ino)
                rec = chunks.get(e.chunk_id)
                if a is None:
                    self.problem(f"extent of missing inode {ino}")
                elif e.end > a.size:
                    self.problem(f"{self.path(ino)}: extent past the end of the file", ino)
                if rec is None:
                    self.problem(f"{self.path(ino)}: refers to a missing chunk", ino)
                elif e.chunk_offset + e.length > rec.length:
                    self.problem(f"{self.path(ino)}: extent outside its chunk", ino)
        except IntegrityError:
            self.problem("an extent record does not authenticate (index damaged)")
        pack_sizes: dict[int, int | None] = {}
        for pack_id, _record in index.all_packs():
            try:
                pack_sizes[pack_id] = os.path.getsize(self.packs.path(pack_id))
            except OSError:
                pack_sizes[pack_id] = None
        checked_bytes = 0
        retired = dict(index.all_retired())
        for cid in retired:
            if cid not in chunks:
                self.problem(f"retired chunk {cid[:6].hex()} has no chunk record")
        for cid, rec in chunks.items():
            if refs.get(cid, 0) != rec.refs:
                self.problem(f"chunk {cid[:6].hex()}: reference count {rec.refs}, expected {refs.get(cid, 0)}")
            elif rec.refs == 0 and cid not in retired:
                self.problem(f"chunk {cid[:6].hex()} has no reference and is not kept for a snapshot")
            elif rec.refs > 0 and cid in retired:
                self.problem(f"chunk {cid[:6].hex()} is in use but recorded as kept for snapshots only")
            size = pack_sizes.get(rec.pack)
            damage = None
            if rec.pack not in pack_sizes:
                damage = f"chunk {cid[:6].hex()} is in pack {rec.pack:012x}, which the index does not know"
            elif size is None:
                damage = f"pack {rec.pack:012x} is missing"
            elif rec.offset + rec.sealed_length > size:
                damage = f"pack {rec.pack:012x} is truncated"
            elif self.read_data:
                try:
                    plain = read_chunk(self.packs, self.keys, cid, rec)
                    if self.keys.chunk_id(plain) != cid:
                        damage = f"chunk {cid[:6].hex()} does not match its id"
                    checked_bytes += len(plain)
                except IntegrityError as e:
                    damage = f"chunk {cid[:6].hex()} in pack {rec.pack:012x}: {e}"
            if damage:
                self.problem(damage)
                for ino in users.get(cid, ()):
                    self.report.damaged_paths.add(self.path(ino))
        stray = self.packs.ids_on_disk() - set(pack_sizes)
        if stray:
            self.report.notes.append(f"{len(stray)} pack file(s) not in the index (left by a crash; harmless)")
        self.report.counts = {"inodes": len(attrs), "extents": n_extents, "chunks": len(chunks),
                              "packs": len(pack_sizes)}
        if self.read_data:
            self.report.counts["bytes authenticated"] = checked_bytes
        self._check_lanes(attrs, chunks, users)
        return self.report

    def _check_lanes(self, attrs, chunks, users) -> None:
        ignored = set(self.index.ignored_inodes())
        if ignored - set(attrs):
            self.report.notes.append(f"{len(ignored - set(attrs))} local-file marker(s) of missing inodes (harmless)")
        local = {pack_id for pack_id, rec in self.index.all_packs() if rec.local}
        if local:
            shared = sum(1 for cid, rec in chunks.items() if rec.pack in local and users.get(cid, set()) - ignored)
            if shared:
                self.report.notes.append(f"{shared} chunk(s) in local packs are used by replicated files "
                                         "(they move to replicated packs at the next snapshot)")
        if ignored:
            self.report.counts["local files"] = len(ignored & set(attrs))

    def close(self):
        self.index.close()
        self.packs.close()


def verify_store(store_dir: str, keys, read_data: bool) -> Report:
    lock = StoreLock(store_dir)  # a mounted store is changing under us: refuse
    try:
        checker = _Checker(store_dir, keys, read_data)
        try:
            return checker.run()
        finally:
            checker.close()
    finally:
        lock.release()
