"""Damaged stores, full disks and plaintext leaks."""

from __future__ import annotations

import base64
import errno
import json
import os
import stat
import random
from pathlib import Path

import pytest

from tests.helpers.cli import PASSPHRASE, init_store, run_bpfs
from tests.helpers.files import pack_files, sha256_bytes, sha256_file
from tests.helpers.mounts import Mount

KiB, MiB = 1 << 10, 1 << 20


def write_random_files(mnt: Path, rng: random.Random, n: int, prefix: str,
                       lo: int = 300 * KiB, hi: int = 1500 * KiB) -> dict[str, bytes]:
    files = {}
    for i in range(n):
        data = rng.randbytes(rng.randrange(lo, hi))
        name = f"{prefix}{i:03d}"
        (mnt / name).write_bytes(data)
        files[name] = data
    return files


def classify_reads(mnt: Path, files: dict[str, bytes], piece: int = 64 * KiB) -> dict[str, str]:
    """name -> "ok" | "eio".  Any returned byte that differs, or any other error, fails the test.

    A read that meets a damaged chunk part way may legally return the good bytes before it
    (a short read: the kernel copies the pages it has, and the next read gets EIO), so each
    piece is read to its end or its error."""
    result = {}
    for name, data in files.items():
        fd = os.open(mnt / name, os.O_RDONLY)
        eio = False
        try:
            assert os.fstat(fd).st_size == len(data), f"{name}: size changed"
            for off in range(0, len(data), piece):
                pos, end = off, min(off + piece, len(data))
                while pos < end:
                    try:
                        got = os.pread(fd, end - pos, pos)
                    except OSError as e:
                        assert e.errno == errno.EIO, f"{name}@{pos}: expected EIO, got {errno.errorcode.get(e.errno)}"
                        eio = True
                        break
                    assert got, f"{name}@{pos}: end of file {len(data) - pos} bytes early"
                    assert got == data[pos:pos + len(got)], f"{name}@{pos}: read returned WRONG BYTES from a damaged store"
                    pos += len(got)
        finally:
            os.close(fd)
        result[name] = "eio" if eio else "ok"
    return result


def combined(cp) -> str:
    return cp.stdout + cp.stderr


# ====================================================================== corrupted / missing packs

def test_corrupted_pack_byte(mounted):
    rng = random.Random(101)
    files = write_random_files(mounted.mnt, rng, 12, "f")
    mounted.umount()
    packs = pack_files(mounted.store)
    assert packs, "no STORE/packs/**/*.pack after writing 12 MiB"
    victim = max(packs, key=lambda p: p.stat().st_size)
    size = victim.stat().st_size
    with open(victim, "r+b") as f:
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x55]))

    mounted.mount()
    res = classify_reads(mounted.mnt, files)
    damaged = sorted(n for n, r in res.items() if r == "eio")
    assert len(damaged) == 1, f"one corrupted byte should break exactly one file, got EIO on {damaged}"
    # the error is stable (not cached wrong data on a second read)
    assert classify_reads(mounted.mnt, {damaged[0]: files[damaged[0]]})[damaged[0]] == "eio"
    # untouched files are fine and the mount is still writable
    (mounted.mnt / "after").write_bytes(b"still works")
    assert (mounted.mnt / "after").read_bytes() == b"still works"
    mounted.umount()

    cp = mounted.verify("--read-data")
    assert cp.returncode == 1, f"verify --read-data on a corrupted pack: exit {cp.returncode}\n{combined(cp)}"
    out = combined(cp)
    assert victim.name in out or victim.stem in out or damaged[0] in out, \
        f"verify output does not name the damaged pack ({victim.name}) or file ({damaged[0]}):\n{out}"


def _write_in_sessions(m: Mount, rng: random.Random, sessions: int = 3) -> dict[str, bytes]:
    files = {}
    for s in range(sessions):
        files.update(write_random_files(m.mnt, rng, 6, f"s{s}-"))
        m.umount()
        m.mount()
    m.umount()
    return files


def test_deleted_pack(mounted):
    rng = random.Random(102)
    files = _write_in_sessions(mounted, rng)
    packs = pack_files(mounted.store)
    assert packs
    victim = packs[len(packs) // 2]
    victim.unlink()

    mounted.mount()
    res = classify_reads(mounted.mnt, files)
    damaged = sorted(n for n, r in res.items() if r == "eio")
    assert damaged, "a pack file was deleted but every file still reads fine"
    if len(packs) > 1:
        assert len(damaged) < len(files), "a single missing pack made every file unreadable"
    mounted.umount()

    cp = mounted.verify("--read-data")
    assert cp.returncode == 1, f"verify --read-data with a missing pack: exit {cp.returncode}\n{combined(cp)}"
    out = combined(cp)
    assert victim.name in out or victim.stem in out or any(d in out for d in damaged), \
        f"verify output names neither the missing pack ({victim.name}) nor a damaged file:\n{out}"


def test_verify_without_read_data_notices_missing_pack(mounted):
    """A vanished pack file is detectable without reading data: plain verify must exit 1 too."""
    write_random_files(mounted.mnt, random.Random(103), 4, "f")
    mounted.umount()
    assert mounted.verify().returncode == 0
    packs = pack_files(mounted.store)
    assert packs
    packs[0].unlink()
    cp = mounted.verify()
    assert cp.returncode == 1, f"verify with a missing pack: exit {cp.returncode}\n{combined(cp)}"


# ====================================================================== ENOSPC

@pytest.mark.timeout(600)
def test_disk_full(small_tmpfs, tmp_path):
    fs = small_tmpfs("64m")
    ballast = fs / "ballast"
    ballast.write_bytes(os.urandom(8 * MiB))
    store = fs / "store"
    init_store(store)
    m = Mount(store, tmp_path / "mnt")
    try:
        m.mount()
        rng = random.Random(104)
        closed: dict[str, str] = {}
        error = None
        for i in range(100):                 # up to 400 MiB into a 64 MiB disk
            data = rng.randbytes(4 * MiB)
            name = f"f{i:03d}"
            try:
                fd = os.open(m.mnt / name, os.O_WRONLY | os.O_CREAT, 0o644)
            except OSError as e:
                error, stage = e, "open()"
                break
            try:
                for off in range(0, len(data), MiB):
                    os.write(fd, data[off:off + MiB])
            except OSError as e:
                error, stage = e, "write()"
            try:
                os.close(fd)
            except OSError as e:
                if error is None:
                    error, stage = e, "close()"
            if error:
                break
            closed[name] = sha256_bytes(data)
        assert error is not None, "wrote 400 MiB into a store on a 64 MiB disk without any error"
        assert error.errno == errno.ENOSPC, \
            f"disk full reported as {errno.errorcode.get(error.errno)} by {stage} of file {i} : {error}"
        assert closed, "ENOSPC before a single 4 MiB file fit on a 64 MiB disk"

        def check():
            for name, sha in closed.items():
                assert sha256_file(m.mnt / name) == sha, f"{name} (closed before the disk filled) is damaged"

        check()
        m.umount()
        m.mount()
        check()
        # free space outside the store: bpfs must be able to write again
        ballast.unlink()
        small = os.urandom(2 * MiB)
        (m.mnt / "after-full").write_bytes(small)
        m.umount()
        cp = m.verify("--read-data")
        assert cp.returncode == 0, f"verify after ENOSPC: exit {cp.returncode}\n{combined(cp)}"
        m.mount()
        check()
        assert (m.mnt / "after-full").read_bytes() == small
        m.umount()
    finally:
        m.cleanup()


# ====================================================================== no plaintext in the store

def _encodings(marker: bytes) -> list[bytes]:
    forms = [marker, marker.hex().encode(), marker.hex().upper().encode()]
    for enc, block in ((base64.b64encode, 3), (base64.urlsafe_b64encode, 3), (base64.b32encode, 5)):
        for k in range(block):          # every alignment of the marker in the encoded stream
            part = marker[k:]
            part = part[:len(part) - len(part) % block]
            forms.append(enc(part).rstrip(b"="))
    forms.append(marker.decode("latin-1").encode("utf-16-le"))
    return forms


def _leaks(store: Path, markers: dict[str, bytes]) -> list[str]:
    found = []
    for dirpath, _, filenames in os.walk(store):
        for name in filenames:
            p = os.path.join(dirpath, name)
            for what, marker in markers.items():
                if os.fsencode(name).find(marker) >= 0:
                    found.append(f"{what} in the file name {p}")
            if not stat.S_ISREG(os.lstat(p).st_mode):
                continue  # the daemon's control socket: names checked, nothing to read
            blob = Path(p).read_bytes()
            for what, marker in markers.items():
                for form in _encodings(marker):
                    if blob.find(form) >= 0:
                        found.append(f"{what} ({form[:20]!r}...) inside {os.path.relpath(p, store)}")
                        break
    return found


def test_no_plaintext_in_store(tmp_path):
    store = tmp_path / "store"
    info = json.loads(run_bpfs("init", store, "--kdf", "interactive", "--json").stdout)
    markers = {
        "file content": b"MRKcontent-q7Zk2LpW",
        "embedded content": b"MRKembedded-Hx81bQ0r",
        "file name": b"MRKfilename-3vN0aa2e",
        "dir name": b"MRKdirname-Yt6sPq11",
        "symlink target": b"MRKlinktarget-W2mmQ8",
        "xattr name": b"MRKxattrname-e4RRt0",
        "xattr value": b"MRKxattrvalue-Pz0k77",
        "passphrase": PASSPHRASE.encode(),
        "recovery secret": info["recovery_secret"].encode(),
    }
    m = Mount(store, tmp_path / "mnt")
    try:
        m.mount()
        mnt = m.mnt
        (mnt / "plain.txt").write_bytes(markers["file content"] * 50)
        (mnt / "small.txt").write_bytes(markers["file content"])
        rnd = bytearray(random.Random(5).randbytes(256 * KiB))
        rnd[100_000:100_000 + len(markers["embedded content"])] = markers["embedded content"]
        (mnt / "embedded.bin").write_bytes(bytes(rnd))
        (mnt / markers["file name"].decode()).write_text("named")
        d = mnt / markers["dir name"].decode()
        d.mkdir()
        (d / "inside").write_text("x")
        os.symlink(markers["symlink target"].decode(), mnt / "link")
        os.setxattr(mnt / "plain.txt", "user." + markers["xattr name"].decode(), markers["xattr value"])
        fd = os.open(mnt / "plain.txt", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        os.sync()
        leaks_mounted = _leaks(store, markers)
        m.umount()
        leaks = _leaks(store, markers)
    finally:
        m.cleanup()
    assert not leaks_mounted, "plaintext in the store while mounted:\n" + "\n".join(leaks_mounted)
    assert not leaks, "plaintext in the store:\n" + "\n".join(leaks)


def test_a_pack_sealed_on_a_full_disk_keeps_its_exact_size(small_tmpfs, tmp_path):
    """Sealing pads a replicated pack (see `packs`); with no room left for the padding, the seal
    still succeeds (at unmount a failure would cost the clean stop) and the pack keeps its size."""
    from bpfs.index import LANE_NORMAL, Index
    from bpfs.keyfile import KeyRing
    from bpfs.packs import PackFiles, padded_pack_size

    fs = small_tmpfs("4m")
    index = Index(str(tmp_path / "index"), KeyRing(os.urandom(20)))
    packs = PackFiles(str(fs))
    try:
        def one_pack(nbytes: int) -> int:
            pid, offset = packs.reserve(index, nbytes, LANE_NORMAL)
            try:
                packs.write(pid, offset, os.urandom(nbytes))
            finally:
                packs.finish(pid)
            packs.seal_open(index)
            packs.sync()
            return os.path.getsize(packs.path(pid))

        assert one_pack(100_000) == padded_pack_size(100_000) > 100_000  # room: padded
        pid, offset = packs.reserve(index, 100_000, LANE_NORMAL)
        packs.write(pid, offset, os.urandom(100_000))
        packs.finish(pid)
        fd = os.open(fs / "ballast", os.O_WRONLY | os.O_CREAT, 0o600)  # another program takes every free byte
        try:
            with pytest.raises(OSError) as full:
                while True:
                    os.write(fd, bytes(4 << 10))
            assert full.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        packs.seal_open(index)
        packs.sync()
        assert os.path.getsize(packs.path(pid)) == 100_000
    finally:
        packs.close()
        index.close()
