"""Option translation of mount_helper/mount.bpfs (no FUSE, no bpfs store needed).

The helper is loaded as a module for unit tests, and run as a program in fake
mode (-f -v), where it prints the bpfs command it would run and mounts nothing.
"""

import importlib.machinery
import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

from tests.helpers.cli import REPO

HELPER = REPO / "mount_helper" / "mount.bpfs"


def _load_helper():
    loader = importlib.machinery.SourceFileLoader("mount_bpfs_helper", str(HELPER))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


mh = _load_helper()

NO_BPFS = "/nonexistent/bin/bpfs"


def run_helper(*args, env_extra=None):
    env = dict(os.environ)
    env["BPFS_BIN"] = NO_BPFS  # tests that need a bpfs program pass their own
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, str(HELPER), *args],
        capture_output=True, text=True, env=env, timeout=60,
    )


def would_run(proc):
    lines = [line for line in proc.stderr.splitlines() if "would run: " in line]
    assert len(lines) == 1, proc.stderr
    return shlex.split(lines[0].split("would run: ", 1)[1])


def cmd_for(argv):
    return mh.build_command(mh.parse_args(argv), "bpfs")


# ---------------------------------------------------------------- unit tests


def test_fstab_example_line():
    opts = "noauto,x-systemd.automount,_netdev,keyfile=/etc/bpfs/alice.key"
    assert cmd_for(["/media/backup/store", "/home/alice/Backup", "-o", opts]) == [
        "bpfs", "mount", "/media/backup/store", "/home/alice/Backup",
        "-o", "keyfile=/etc/bpfs/alice.key",
    ]


@pytest.mark.parametrize("opt", [
    "defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser",
    "owner", "group", "rw", "comment=systemd.automount", "comment=x",
    "x-systemd.automount", "x-systemd.idle-timeout=600", "x-systemd.requires=foo.mount",
    "x-systemd.mount-timeout=30", "x-gvfs-show", "x-gvfs-name=Backup", "X-mount.mkdir",
    "user=alice", "exec", "suid", "dev", "async",
])
def test_bookkeeping_options_are_dropped(opt):
    assert cmd_for(["/s", "/d", "-o", opt]) == ["bpfs", "mount", "/s", "/d"]


def test_no_options_means_no_dash_o():
    assert cmd_for(["/s", "/d"]) == ["bpfs", "mount", "/s", "/d"]


def test_keyfile_first_then_others_in_order():
    argv = ["/s", "/d", "-o", "allow_other,ro,keyfile=/k/a b,debug"]
    assert cmd_for(argv)[-2:] == ["-o", "keyfile=/k/a b,ro,allow_other,debug"]


def test_ro_rw_last_one_wins():
    assert cmd_for(["/s", "/d", "-o", "ro,rw"]) == ["bpfs", "mount", "/s", "/d"]
    assert cmd_for(["/s", "/d", "-o", "rw,ro"])[-1] == "ro"


def test_last_keyfile_wins_and_duplicates_collapse():
    argv = ["/s", "/d", "-o", "keyfile=/a,allow_other", "-o", "allow_other,keyfile=/b"]
    assert cmd_for(argv)[-1] == "keyfile=/b,allow_other"


def test_unknown_options_pass_through_unless_sloppy():
    # mount(8) adds nosuid,nodev,noexec for fstab "user" mounts; bpfs gets them.
    assert cmd_for(["/s", "/d", "-o", "nosuid,nodev,noexec"])[-1] == "nosuid,nodev,noexec"
    assert cmd_for(["-s", "/s", "/d", "-o", "nosuid,allow_other"])[-1] == "allow_other"


def test_options_anywhere_and_bundled():
    inv = mh.parse_args(["-fvn", "/s", "-oro,keyfile=/k", "/d", "-t", "bpfs"])
    assert (inv.fake, inv.verbose, inv.no_mtab, inv.fstype) == (True, True, True, "bpfs")
    assert (inv.spec, inv.mountpoint) == ("/s", "/d")
    assert mh.build_command(inv, "bpfs")[-1] == "keyfile=/k,ro"


@pytest.mark.parametrize("argv", [
    [], ["/s"], ["/s", "/d", "/x"], ["/s", "/d", "-o"], ["/s", "/d", "-q"],
    ["/s", "/d", "--bogus"], ["/s", "/d", "-o", "keyfile="], ["/s", "/d", "-N", "123"],
    ["/s", "/d", "-t", "ext4"], ["", "/d"],
])
def test_bad_invocations_raise_usage_error(argv):
    with pytest.raises(mh.UsageError):
        inv = mh.parse_args(argv)
        mh.translate_options(inv.raw_options)


def test_find_bpfs_prefers_env(tmp_path):
    exe = tmp_path / "bpfs"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    assert mh.find_bpfs({"BPFS_BIN": str(exe), "PATH": ""}) == str(exe)
    assert mh.find_bpfs({"BPFS_BIN": str(tmp_path / "missing"), "PATH": ""}) is None


def test_find_bpfs_next_to_helper_then_path(tmp_path):
    helper_dir = tmp_path / "sbin"
    helper_dir.mkdir()
    helper = helper_dir / "mount.bpfs"
    helper.write_text("")
    path_dir = tmp_path / "bin"
    path_dir.mkdir()
    on_path = path_dir / "bpfs"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    env = {"PATH": str(path_dir)}
    assert mh.find_bpfs(env, str(helper)) == str(on_path)
    sibling = helper_dir / "bpfs"
    sibling.write_text("#!/bin/sh\n")
    sibling.chmod(0o755)
    assert mh.find_bpfs(env, str(helper)) == str(sibling)


# ---------------------------------------------------------------- as a program


def fake_bpfs(tmp_path, body="exit 0"):
    """A bpfs program that answers --version and otherwise runs `body`."""
    bpfs = tmp_path / "bpfs"
    bpfs.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "bpfs, version 0.1.0"; exit 0; fi\n%s\n' % body)
    bpfs.chmod(0o755)
    return bpfs


def test_fake_mode_prints_command_and_mounts_nothing(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    marker = tmp_path / "ran"
    bpfs = fake_bpfs(tmp_path, "touch %s\nexit 99" % shlex.quote(str(marker)))
    proc = run_helper(
        "/media/backup/store", str(mnt), "-f", "-v", "-o",
        "noauto,x-systemd.automount,_netdev,nofail,keyfile=/etc/bpfs/alice.key,comment=x,ro",
        env_extra={"BPFS_BIN": str(bpfs)},
    )
    assert proc.returncode == 0, proc.stderr
    assert would_run(proc) == [
        str(bpfs), "mount", "/media/backup/store", str(mnt),
        "-o", "keyfile=/etc/bpfs/alice.key,ro",
    ]
    assert "ignoring options: noauto,x-systemd.automount,_netdev,nofail,comment=x" in proc.stderr
    assert not marker.exists()
    assert list(mnt.iterdir()) == []


def test_fake_mode_checks_what_a_mount_needs(tmp_path):
    """-fv says all is well only when a real mount would find a bpfs program that runs and a
    mount point; else it fails (32) with one line saying what is missing."""
    # no bpfs anywhere: BPFS_BIN unset, nothing next to the helper, an empty PATH
    helper = tmp_path / "sbin" / "mount.bpfs"
    helper.parent.mkdir()
    helper.write_text(HELPER.read_text())
    env = {k: v for k, v in os.environ.items() if k != "BPFS_BIN"}
    env["PATH"] = str(tmp_path / "empty")
    proc = subprocess.run([sys.executable, str(helper), "/s", str(tmp_path), "-fv", "-o", "keyfile=/k"],
                          capture_output=True, text=True, env=env, timeout=60)
    if not any(os.access(p, os.X_OK) for p in ("/usr/local/bin/bpfs", "/usr/bin/bpfs", "/opt/bpfs/bin/bpfs")):
        assert proc.returncode == 32, proc.stderr
        assert proc.stderr.count("\n") == 1 and "cannot find the bpfs program" in proc.stderr \
            and "make install" in proc.stderr, proc.stderr
    # BPFS_BIN names nothing
    proc = run_helper("/s", str(tmp_path), "-fv", "-o", "keyfile=/k")
    assert proc.returncode == 32 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"cannot find the bpfs program: BPFS_BIN is {NO_BPFS}" in proc.stderr, proc.stderr
    # a bpfs that does not run
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named bpfs' >&2\nexit 1\n")
    broken.chmod(0o755)
    proc = run_helper("/s", str(tmp_path), "-fv", env_extra={"BPFS_BIN": str(broken)})
    assert proc.returncode == 32 and proc.stderr.count("\n") == 1, proc.stderr
    assert "does not run" in proc.stderr and "No module named bpfs" in proc.stderr, proc.stderr
    # no mount point
    ok = fake_bpfs(tmp_path)
    proc = run_helper("/s", str(tmp_path / "nowhere"), "-fv", env_extra={"BPFS_BIN": str(ok)})
    assert proc.returncode == 32 and "mount point" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    # all there: 0, with the version found and the command
    proc = run_helper("/s", str(tmp_path), "-fv", "-o", "keyfile=/k", env_extra={"BPFS_BIN": str(ok)})
    assert proc.returncode == 0, proc.stderr
    assert f"found {ok} (bpfs, version 0.1.0)" in proc.stderr, proc.stderr
    assert would_run(proc) == [str(ok), "mount", "/s", str(tmp_path), "-o", "keyfile=/k"]


def test_fake_mode_is_silent_without_verbose(tmp_path):
    proc = run_helper("/s", str(tmp_path), "-f", "-o", "keyfile=/k", env_extra={"BPFS_BIN": str(fake_bpfs(tmp_path))})
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    proc = run_helper("/s", str(tmp_path), "-f", "-o", "keyfile=/k")  # silent, but not when bpfs is missing
    assert proc.returncode == 32 and "cannot find the bpfs program" in proc.stderr, proc.stderr


def test_find_bpfs_prefers_the_installed_path(tmp_path, monkeypatch):
    """`make install` writes INSTALLED_BPFS into the helper it installs: it wins over PATH."""
    installed = fake_bpfs(tmp_path)
    other = tmp_path / "bin"
    other.mkdir()
    fake_bpfs(other)
    monkeypatch.setattr(mh, "INSTALLED_BPFS", str(installed))
    assert mh.find_bpfs({"PATH": str(other)}, str(tmp_path / "sbin" / "mount.bpfs")) == str(installed)


def test_usage_error_exits_1():
    proc = run_helper("/only-spec")
    assert proc.returncode == 1
    assert "usage:" in proc.stderr


def test_help_exits_0():
    proc = run_helper("--help")
    assert proc.returncode == 0
    assert "usage:" in proc.stdout


def test_mount_failure_exits_32(tmp_path):
    # bpfs that fails: the helper must report mount failure (32), not bpfs's status.
    failing = tmp_path / "bpfs"
    failing.write_text("#!/bin/sh\necho \"$@\" > \"$(dirname \"$0\")/args\"\nexit 3\n")
    failing.chmod(0o755)
    proc = run_helper(str(tmp_path / "store"), str(tmp_path), "-o", "keyfile=/k,_netdev",
                      env_extra={"BPFS_BIN": str(failing)})
    assert proc.returncode == 32, proc.stderr
    assert (tmp_path / "args").read_text().split() == [
        "mount", str(tmp_path / "store"), str(tmp_path), "-o", "keyfile=/k"]


def test_success_exits_0(tmp_path):
    ok = tmp_path / "bpfs"
    ok.write_text("#!/bin/sh\nexit 0\n")
    ok.chmod(0o755)
    proc = run_helper("/s", str(tmp_path), env_extra={"BPFS_BIN": str(ok)})
    assert proc.returncode == 0, proc.stderr


def test_missing_bpfs_or_mountpoint_exits_32(tmp_path):
    proc = run_helper("/s", str(tmp_path), env_extra={"BPFS_BIN": str(tmp_path / "nope")})
    assert proc.returncode == 32
    ok = tmp_path / "bpfs"
    ok.write_text("#!/bin/sh\nexit 0\n")
    ok.chmod(0o755)
    proc = run_helper("/s", str(tmp_path / "no-such-dir"), env_extra={"BPFS_BIN": str(ok)})
    assert proc.returncode == 32


def test_nonempty_reaches_bpfs_even_when_sloppy():
    """`-o nonempty` (mount over a folder that is not empty) is a bpfs option: fstab and
    `mount -t bpfs` pass it on, with -s too."""
    assert cmd_for(["/s", "/d", "-o", "nonempty"])[-2:] == ["-o", "nonempty"]
    assert cmd_for(["-s", "/s", "/d", "-o", "nonempty,_netdev"])[-2:] == ["-o", "nonempty"]
