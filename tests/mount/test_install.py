"""`make install` (issue 13, "Defaults and setup"): bpfs and the mount(8) helper for the whole
system, so that the README's fstab step works. A virtualenv is not relocatable, so the staged
tree (DESTDIR) is checked for its layout and run through its own interpreter, and an install at a
PREFIX under the test's folder is run as installed: `bpfs --help`, and a real mount through the
installed `mount.bpfs` exactly as `mount -t bpfs` (an fstab line) runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.cli import PASSPHRASE, REPO
from tests.helpers.mounts import cleanup_mount, is_mounted

pytestmark = pytest.mark.timeout(900)


def make_install(*args: str) -> subprocess.CompletedProcess:
    cp = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "install", *args,
                         "PIP_ARGS=--progress-bar off --quiet"],
                        capture_output=True, text=True, timeout=840)
    assert cp.returncode == 0, f"make install {' '.join(args)} failed:\n{cp.stdout}\n{cp.stderr}"
    return cp


def installed_env(**extra: str) -> dict:
    """The environment of a user of the installed bpfs: no PYTHONPATH (the checkout's bpfs must
    not be what runs), no BPFS_BIN, a PATH without the project's .venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "BPFS_BIN", "BPFS_PASSPHRASE", "BPFS_STORE", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    env.update(extra)
    return env


def run(cmd, env=None, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env=env or installed_env(), cwd=cwd, stdin=subprocess.DEVNULL)


def test_make_install_with_destdir_stages_the_whole_tree(tmp_path):
    dest = tmp_path / "dest"
    make_install(f"DESTDIR={dest}", "PREFIX=/usr/local")
    lib = dest / "usr/local/lib/bpfs"
    for prog in ("bpfs", "bpfs-broker"):
        link = dest / "usr/local/bin" / prog
        assert os.readlink(link) == f"../lib/bpfs/bin/{prog}"
        assert link.resolve() == (lib / "bin" / prog).resolve() and os.access(link, os.X_OK)
        # the script runs the interpreter where the tree will live, not where it was staged
        assert (lib / "bin" / prog).read_text().splitlines()[0] == "#!/usr/local/lib/bpfs/bin/python"
    staged = run(["grep", "-rlI", "-F", str(dest), lib])
    assert staged.stdout == "", f"files still naming the staging folder:\n{staged.stdout}"
    helper = dest / "sbin/mount.bpfs"
    assert os.stat(helper).st_mode & 0o777 == 0o755
    assert 'INSTALLED_BPFS = "/usr/local/bin/bpfs"' in helper.read_text()
    # the staged tree runs (through its own interpreter), with its own copy of bpfs, not the checkout's
    cp = run([lib / "bin/python", "-c", "import bpfs, broker; print(bpfs.__file__)"], cwd=tmp_path)
    assert cp.returncode == 0 and cp.stdout.startswith(str(lib)), cp.stdout + cp.stderr
    cp = run([lib / "bin/python", "-m", "bpfs", "--help"], cwd=tmp_path)
    assert cp.returncode == 0 and "mount" in cp.stdout, cp.stderr
    # the man pages (tests/unit/test_manpages.py checks what is in them), where man looks for them
    man = dest / "usr/local/share/man"
    assert {p.name for p in (man / "man8").iterdir()} == {"mount.bpfs.8"}
    pages = {p.name for p in (man / "man1").iterdir()}
    assert {"bpfs.1", "bpfs-mount.1", "bpfs-umount.1", "bpfs-serve.1", "bpfs-broker.1"} <= pages
    assert all(p == "bpfs.1" or p.startswith("bpfs-") for p in pages), pages
    if shutil.which("man"):
        for page, section in (("bpfs", "1"), ("bpfs-mount", "1"), ("bpfs-broker", "1"), ("mount.bpfs", "8")):
            cp = run(["man", "-M", man, "-w", section, page], cwd=tmp_path)
            assert cp.returncode == 0 and cp.stdout.strip() == f"{man}/man{section}/{page}.{section}", cp.stderr
    # make uninstall (same variables) removes what make install put there, man pages too
    cp = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "uninstall", f"DESTDIR={dest}",
                         "PREFIX=/usr/local"], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    left = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if not p.is_dir())
    assert left == [], left


def test_make_install_then_mount_bpfs_mounts_as_fstab_does(tmp_path):
    prefix, sbin = tmp_path / "usr/local", tmp_path / "sbin"
    make_install(f"PREFIX={prefix}", f"SBINDIR={sbin}")
    bpfs = prefix / "bin/bpfs"
    cp = run([bpfs, "--help"], cwd=tmp_path)
    assert cp.returncode == 0 and "mount" in cp.stdout, cp.stderr
    cp = run([prefix / "bin/bpfs-broker", "--help"], cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    store, mnt, key = tmp_path / "store", tmp_path / "mnt", tmp_path / "alice.key"
    mnt.mkdir()
    key.write_text(PASSPHRASE + "\n")
    key.chmod(0o600)
    cp = run([bpfs, "init", store, "--kdf", "interactive", "--passphrase-file", key], cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    helper = sbin / "mount.bpfs"
    opts = f"noauto,x-systemd.automount,_netdev,keyfile={key}"
    # -fv checks what the mount needs, and finds the bpfs make install put there (not on PATH)
    cp = run([helper, store, mnt, "-fv", "-o", opts], cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr
    assert f"found {bpfs} (bpfs, version" in cp.stderr, cp.stderr
    try:
        cp = run([helper, store, mnt, "-o", opts], cwd=tmp_path, timeout=180)
        assert cp.returncode == 0, cp.stderr
        assert is_mounted(mnt)
        (mnt / "hello.txt").write_text("from fstab\n")
        assert (mnt / "hello.txt").read_text() == "from fstab\n"
        cp = run([bpfs, "umount", mnt], cwd=tmp_path, timeout=180)
        assert cp.returncode == 0 and not is_mounted(mnt), cp.stderr
    finally:
        cleanup_mount(mnt, store)
    assert Path(store, "key.json").exists()
