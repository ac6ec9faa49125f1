"""CLI contract: init / mount / umount / verify, error handling and store hygiene."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import time

import pytest

from tests.helpers.cli import PASSPHRASE, PYTHON, REPO, bpfs_env, init_store, one_line_error, run_bpfs
from tests.helpers.files import store_snapshot
from tests.helpers.mounts import Mount, force_unmount, fuse_mounted, is_mounted, read_daemon_json
from tests.helpers.procs import pid_alive, pids_mentioning, wait_until


def assert_store_permissions(store):
    st = os.stat(store)
    assert stat.S_IMODE(st.st_mode) == 0o700, f"{store} has mode {oct(st.st_mode)}"
    seen_files = 0
    for root, dirs, files in os.walk(store):
        for d in dirs:
            p = os.path.join(root, d)
            m = stat.S_IMODE(os.lstat(p).st_mode)
            assert m == 0o700, f"directory {p} has mode {oct(m)}, expected 0o700"
        for f in files:
            p = os.path.join(root, f)
            st = os.lstat(p)
            assert stat.S_ISREG(st.st_mode), f"{p} is not a regular file"
            m = stat.S_IMODE(st.st_mode)
            assert m == 0o600, f"file {p} has mode {oct(m)}, expected 0o600"
            seen_files += 1
    return seen_files


# ---------------------------------------------------------------- init

def test_init_creates_private_store(tmp_path):
    store = tmp_path / "store"
    init_store(store)
    assert (store / "key.json").is_file()
    assert (store / "index").is_dir()
    assert assert_store_permissions(store) >= 1


def test_store_stays_private_after_use(store, tmp_path):
    m = Mount(store, tmp_path / "mnt")
    try:
        m.mount()
        (m.mnt / "f").write_bytes(os.urandom(3 << 20))
        os.mkdir(m.mnt / "d")
        m.umount()
    finally:
        m.cleanup()
    assert pack_count(store) >= 1, "3 MiB of data written but no STORE/packs/**/*.pack exists"
    assert_store_permissions(store)


def pack_count(store):
    return len(list((store / "packs").glob("**/*.pack")))


def test_init_json(tmp_path):
    outs = []
    for name in ("a", "b"):
        cp = run_bpfs("init", tmp_path / name, "--kdf", "interactive", "--json")
        data = json.loads(cp.stdout)
        for key in ("peer_id", "recovery_secret"):
            assert isinstance(data.get(key), str) and data[key].strip(), f"--json lacks {key}: {cp.stdout!r}"
        outs.append(data)
    assert outs[0]["peer_id"] != outs[1]["peer_id"]
    assert outs[0]["recovery_secret"] != outs[1]["recovery_secret"]


def test_init_twice_fails_and_changes_nothing(store):
    before = store_snapshot(store)
    cp = run_bpfs("init", store, "--kdf", "interactive", check=False)
    one_line_error(cp)
    cp = run_bpfs("init", store, "--kdf", "interactive", check=False,
                  env=bpfs_env(passphrase="another passphrase"))
    one_line_error(cp)
    assert store_snapshot(store) == before


def test_init_twice_keeps_original_passphrase(store, tmp_path):
    run_bpfs("init", store, "--kdf", "interactive", check=False, env=bpfs_env(passphrase="other"))
    m = Mount(store, tmp_path / "mnt")
    try:
        m.mount()
    finally:
        m.cleanup()


def test_passphrase_file_and_keyfile_option(tmp_path):
    pf = tmp_path / "pass.txt"
    pf.write_text("file passphrase\n")
    os.chmod(pf, 0o600)
    noenv = bpfs_env(passphrase=None)
    store = tmp_path / "store"
    run_bpfs("init", store, "--kdf", "interactive", "--passphrase-file", pf, env=noenv)
    m = Mount(store, tmp_path / "mnt", env=noenv)
    try:
        m.mount("-o", f"keyfile={pf}")
        (m.mnt / "x").write_text("hello")
        m.umount()
        m.mount("--passphrase-file", pf)
        assert (m.mnt / "x").read_text() == "hello"
        m.umount()
    finally:
        m.cleanup()
    # the passphrase in the file is the real one: the env passphrase is wrong
    cp = run_bpfs("mount", store, tmp_path / "mnt", check=False, env=bpfs_env(passphrase=PASSPHRASE))
    try:
        one_line_error(cp)
    finally:
        Mount(store, tmp_path / "mnt").cleanup()


def test_default_store_from_env(tmp_path):
    store = tmp_path / "envstore"
    env = bpfs_env(BPFS_STORE=store)
    run_bpfs("init", "--kdf", "interactive", env=env)
    assert (store / "key.json").is_file()
    cp = run_bpfs("verify", env=env, check=False)
    assert cp.returncode == 0, cp.stderr


# ---------------------------------------------------------------- help

@pytest.mark.parametrize("cmd", [[], ["init"], ["mount"], ["umount"], ["verify"]])
def test_help(cmd):
    cp = run_bpfs(*cmd, "--help")
    assert cp.returncode == 0
    assert "usage" in cp.stdout.lower(), cp.stdout
    if cmd:
        assert cmd[0] in cp.stdout
    else:
        for sub in ("init", "mount", "umount", "verify"):
            assert sub in cp.stdout, f"top-level --help does not list {sub}"
    if cmd in (["init"], ["verify"]):
        assert "--json" in cp.stdout


# ---------------------------------------------------------------- mount errors

def test_mount_wrong_passphrase(store, tmp_path):
    m = Mount(store, tmp_path / "mnt")
    try:
        m.mount()
        (m.mnt / "data").write_bytes(b"precious" * 1000)
        m.umount()
        before = store_snapshot(store)
        bad = Mount(store, m.mnt, env=bpfs_env(passphrase="wrong passphrase"))
        t0 = time.time()
        cp = bad.mount(check=False)
        msg = one_line_error(cp)
        assert time.time() - t0 < 60
        assert not is_mounted(m.mnt), "mountpoint mounted despite wrong passphrase"
        assert not (store / "daemon.json").exists()
        assert not pids_mentioning(str(store)), "a process for the store is still running"
        assert store_snapshot(store) == before, "wrong-passphrase mount attempt modified the store"
        assert msg
        m.mount()
        assert (m.mnt / "data").read_bytes() == b"precious" * 1000
    finally:
        m.cleanup()


def test_mount_missing_store(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    missing = tmp_path / "does-not-exist"
    cp = run_bpfs("mount", missing, mnt, check=False)
    try:
        one_line_error(cp)
        assert not is_mounted(mnt)
        assert not missing.exists(), "mount of a missing store created it"
    finally:
        Mount(missing, mnt).cleanup()


def test_mount_empty_dir_is_not_a_store(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    cp = run_bpfs("mount", empty, mnt, check=False)
    try:
        one_line_error(cp)
        assert not is_mounted(mnt)
        assert os.listdir(empty) == [], "mount of a non-store dir wrote into it"
    finally:
        Mount(empty, mnt).cleanup()


def test_mount_on_busy_mountpoint(make_mount):
    a = make_mount(name="a")
    a.mount()
    (a.mnt / "keep").write_text("A")
    b = make_mount(name="b")
    before = store_snapshot(b.store)
    cp = run_bpfs("mount", b.store, a.mnt, check=False)
    one_line_error(cp)
    assert store_snapshot(b.store) == before
    assert not (b.store / "daemon.json").exists()
    # A is untouched and still works
    assert read_daemon_json(a.store)["pid"] == a.daemon_pid()
    assert pid_alive(a.daemon_pid())
    assert (a.mnt / "keep").read_text() == "A"
    (a.mnt / "more").write_text("still writable")
    a.umount()
    assert not is_mounted(a.mnt), "stacked mount left behind at the busy mountpoint"


def test_store_already_mounted_elsewhere(make_mount, tmp_path):
    a = make_mount(name="a")
    a.mount()
    (a.mnt / "keep").write_text("A")
    pid = a.daemon_pid()
    other = tmp_path / "other"
    other.mkdir()
    cp = run_bpfs("mount", a.store, other, check=False)
    try:
        one_line_error(cp)
        assert not is_mounted(other)
        assert a.daemon_pid() == pid, "daemon.json was overwritten by the failed mount"
        assert pid_alive(pid)
        assert (a.mnt / "keep").read_text() == "A"
    finally:
        force_unmount(other)
    a.umount()


# ---------------------------------------------------------------- mount / umount lifecycle

def test_mount_is_usable_on_return(store, tmp_path):
    m = Mount(store, tmp_path / "mnt")
    try:
        m.mount()
        # no sleeping: usable right away
        (m.mnt / "now").write_bytes(b"x")
        assert os.listdir(m.mnt) == ["now"]
        info = read_daemon_json(store)
        assert pid_alive(int(info["pid"]))
        assert os.path.realpath(info["mountpoint"]) == os.path.realpath(m.mnt)
    finally:
        m.cleanup()


def test_mount_with_captured_pipes_returns(store, tmp_path):
    """`out=$(bpfs mount ...)` must not hang: the daemon must not hold the caller's stdout/stderr."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        cp = subprocess.run([PYTHON, "-m", "bpfs", "mount", str(store), str(mnt)], env=bpfs_env(),
                            capture_output=True, timeout=60, cwd=str(REPO))
        assert cp.returncode == 0, cp.stderr
        assert fuse_mounted(mnt)
    finally:
        Mount(store, mnt).cleanup()


def test_umount_returns_after_daemon_exit(mounted):
    (mounted.mnt / "f").write_bytes(os.urandom(1 << 20))
    pid = mounted.daemon_pid()
    assert pid_alive(pid)
    mounted.umount()
    assert not pid_alive(pid), "`bpfs umount` returned while the daemon was still running"
    assert not is_mounted(mounted.mnt)
    assert not (mounted.store / "daemon.json").exists(), "daemon.json left behind after umount"
    mounted.mount()
    assert len((mounted.mnt / "f").read_bytes()) == 1 << 20


def test_umount_of_unmounted_path_fails(tmp_path):
    d = tmp_path / "not-a-mount"
    d.mkdir()
    one_line_error(run_bpfs("umount", d, check=False))


def test_mount_foreground(store, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([PYTHON, "-m", "bpfs", "mount", "-f", str(store), str(mnt)],
                            env=bpfs_env(), cwd=str(REPO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: fuse_mounted(mnt) or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, f"foreground mount exited early: {proc.stderr.read()!r}"
        assert fuse_mounted(mnt)
        (mnt / "fg").write_text("foreground")
        run_bpfs("umount", mnt)
        assert proc.wait(timeout=30) == 0
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        Mount(store, mnt).cleanup()


def test_mount_read_only(store, tmp_path):
    m = Mount(store, tmp_path / "mnt")
    try:
        m.mount()
        (m.mnt / "f").write_text("content")
        m.umount()
        before = store_snapshot(store)
        m.mount("-o", "ro")
        assert (m.mnt / "f").read_text() == "content"
        for fn in (lambda: open(m.mnt / "g", "w"),
                   lambda: open(m.mnt / "f", "a"),
                   lambda: os.mkdir(m.mnt / "d"),
                   lambda: os.unlink(m.mnt / "f")):
            with pytest.raises(OSError) as ei:
                fn()
            assert ei.value.errno == errno.EROFS
        m.umount()
        after = store_snapshot(store)
        # the data (packs, keys) must be untouched; the index and the daemon's log may be rewritten
        skip = ("index", "log")
        assert {k: v for k, v in after.items() if not k.startswith(skip)} == \
               {k: v for k, v in before.items() if not k.startswith(skip)}
    finally:
        m.cleanup()


# ---------------------------------------------------------------- verify

def test_verify_healthy_store(store, tmp_path):
    m = Mount(store, tmp_path / "mnt")
    try:
        m.mount()
        (m.mnt / "a").write_bytes(os.urandom(2 << 20))
        os.mkdir(m.mnt / "d")
        (m.mnt / "d" / "b").write_text("b" * 10000)
        m.umount()
    finally:
        m.cleanup()
    cp = run_bpfs("verify", store, check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    cp = run_bpfs("verify", store, "--read-data", check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    cp = run_bpfs("verify", store, "--read-data", "--json", check=False)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    json.loads(cp.stdout)


def test_verify_refuses_mounted_store(mounted):
    cp = run_bpfs("verify", mounted.store, check=False)
    # README: exit 3 means busy (the store is in use by its mount daemon)
    assert cp.returncode == 3, f"verify on a mounted store: exit {cp.returncode}, expected 3; {cp.stderr!r}"
    assert "in use" in cp.stderr and str(mounted.mnt) in cp.stderr
    assert mounted.is_mounted()
    (mounted.mnt / "still").write_text("works")


def test_verify_wrong_passphrase(store):
    cp = run_bpfs("verify", store, check=False, env=bpfs_env(passphrase="nope"))
    one_line_error(cp)


def test_umount_busy_mount_is_consistent(mounted):
    """Unmounting while a file is open: either refuse (one line, still mounted and working)
    or succeed completely (unmounted, daemon gone).  Never a half state."""
    f = open(mounted.mnt / "held", "wb")
    f.write(b"data")
    f.flush()
    pid = mounted.daemon_pid()
    try:
        cp = run_bpfs("umount", mounted.mnt, check=False, timeout=60)
        if cp.returncode != 0:
            one_line_error(cp)
            assert fuse_mounted(mounted.mnt), "failed umount left the mount broken or gone"
            assert pid_alive(pid)
            f.write(b" more")
            f.close()
            assert (mounted.mnt / "held").read_bytes() == b"data more"
        else:
            assert not is_mounted(mounted.mnt)
            assert not pid_alive(pid)
    finally:
        try:
            f.close()
        except OSError:
            pass


def test_mount_on_missing_mountpoint(store, tmp_path):
    cp = run_bpfs("mount", store, tmp_path / "no" / "such" / "dir", check=False)
    one_line_error(cp)
    assert not (store / "daemon.json").exists()


def test_init_refuses_non_empty_dir(tmp_path):
    d = tmp_path / "full"
    d.mkdir()
    (d / "precious.txt").write_text("do not touch")
    one_line_error(run_bpfs("init", d, "--kdf", "interactive", check=False))
    assert os.listdir(d) == ["precious.txt"]
    assert (d / "precious.txt").read_text() == "do not touch"


def uncomment_settings(text: str) -> str:
    """The settings of a written bpfs.toml, each line `# key = value  # what` made live."""
    import re

    return re.sub(r"(?m)^# (\w+ = )", r"\1", text)


def test_init_writes_every_setting_with_its_default(tmp_path, monkeypatch):
    """`bpfs init` writes a commented STORE/bpfs.toml (0600) with every setting and its default:
    as written and with every setting made live, it loads as the defaults."""
    import dataclasses

    from bpfs.config import Config, load_config

    store = tmp_path / "store"
    init_store(store)
    toml = store / "bpfs.toml"
    assert stat.S_IMODE(os.stat(toml).st_mode) == 0o600
    text = toml.read_text()
    monkeypatch.delenv("BPFS_BROKER", raising=False)  # it overrides the file's brokers
    assert load_config(str(store)) == Config()
    for field in dataclasses.fields(Config):
        assert f"\n# {field.name} = " in text, f"bpfs.toml does not show {field.name}:\n{text}"
    toml.write_text(uncomment_settings(text))
    assert load_config(str(store)) == Config(), uncomment_settings(text)
