"""Security hardening: what a thief of the drive or another process of the user can get.

Real CLI, real daemons. Each test fails on the code before its fix: the key file's Argon2id
cost is bounded, a new passphrase has a minimum length, and a running daemon keeps neither the
passphrase in its environment nor the right to dump core.
"""

from __future__ import annotations

import json
import os

from tests.helpers.cli import bpfs_env, init_store, one_line_error, run_bpfs
from tests.helpers.mounts import Mount


def test_absurd_argon2_costs_in_the_key_file_are_refused(tmp_path):
    """An edited key file cannot make unlocking use all memory (or be cheap to guess)."""
    store = tmp_path / "s"
    init_store(store)
    key = store / "key.json"
    doc = json.loads(key.read_text())
    for ops, mem in ((doc["kdf"]["opslimit"], 1 << 40), (1 << 30, doc["kdf"]["memlimit"]), (1, 8192)):
        edited = dict(doc, kdf=dict(doc["kdf"], opslimit=ops, memlimit=mem))
        key.write_text(json.dumps(edited))
        cp = run_bpfs("verify", store, check=False, timeout=60)
        assert cp.returncode == 2, (ops, mem, cp.stderr)
        assert "Argon2id cost" in one_line_error(cp) and "Traceback" not in cp.stderr
    key.write_text(json.dumps(doc))
    assert run_bpfs("verify", store, check=False).returncode == 0


def test_a_new_passphrase_needs_eight_characters(tmp_path):
    cp = run_bpfs("init", tmp_path / "a", "--kdf", "interactive", check=False, env=bpfs_env(passphrase="abc"))
    assert cp.returncode == 2 and "at least 8" in one_line_error(cp), cp.stderr
    assert not (tmp_path / "a" / "key.json").exists()
    cp = run_bpfs("init", tmp_path / "b", "--kdf", "interactive", check=False, env=bpfs_env(passphrase="abcdefgh"))
    assert cp.returncode == 0 and "weak" in cp.stderr, cp.stderr  # allowed, with a warning
    cp = run_bpfs("init", tmp_path / "c", "--kdf", "interactive", check=False,
                  env=bpfs_env(passphrase="abc", BPFS_ALLOW_WEAK_PASSPHRASE="1"))
    assert cp.returncode == 0, cp.stderr


def test_the_daemon_keeps_no_passphrase_in_its_environment_and_dumps_no_core(tmp_path):
    store = tmp_path / "s"
    init_store(store)
    m = Mount(store, tmp_path / "mnt", env=bpfs_env())
    m.mount("--listen", "none")
    try:
        pid = m.daemon_pid()
        environ = open(f"/proc/{pid}/environ", "rb").read()
        assert b"BPFS_PASSPHRASE" not in environ and bpfs_env()["BPFS_PASSPHRASE"].encode() not in environ
        limits = open(f"/proc/{pid}/limits").read()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core
        status = open(f"/proc/{pid}/status").read()
        assert os.stat(f"/proc/{pid}").st_uid == 0 or "Dumpable" not in status  # not dumpable: /proc is root's
        (m.mnt / "f").write_bytes(b"still works")
        assert (m.mnt / "f").read_bytes() == b"still works"
    finally:
        m.umount()
