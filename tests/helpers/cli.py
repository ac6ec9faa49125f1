"""Running the bpfs CLI (``python -m bpfs ...``) as the tests do: its environment (the test
passphrase, the repository on PYTHONPATH), output through temporary files, one-line errors, and
running a command on a pseudo-terminal that answers its prompts."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
PYTHON = os.environ.get("BPFS_TEST_PYTHON") or sys.executable
PASSPHRASE = "bpfs test passphrase: correct horse battery staple"


def bpfs_env(passphrase: str | None = PASSPHRASE, **extra) -> dict:
    """Environment for a bpfs subprocess: passphrase via BPFS_PASSPHRASE."""
    env = os.environ.copy()
    env.pop("BPFS_STORE", None)
    env.pop("BPFS_PASSPHRASE", None)
    if passphrase is not None:
        env["BPFS_PASSPHRASE"] = passphrase
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + pp if pp else "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


class BpfsError(AssertionError):
    pass


def run_bpfs(*args, env: dict | None = None, check: bool = True, timeout: float = 120,
             input: str | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python -m bpfs ARGS`` and return the CompletedProcess (text mode).

    stdout/stderr are captured through temporary files rather than pipes so
    that a background daemon which (wrongly) keeps the inherited descriptors
    open cannot make this call hang.  (test_cli checks pipe behaviour
    separately.)
    """
    cmd = [PYTHON, "-m", "bpfs", *[os.fspath(a) for a in args]]
    if env is None:
        env = bpfs_env()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.run(
                cmd, env=env, stdout=out, stderr=err,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                input=input.encode() if input is not None else None,
                timeout=timeout, cwd=cwd or str(REPO),
            )
        except subprocess.TimeoutExpired as e:
            out.seek(0)
            err.seek(0)
            raise BpfsError(
                f"command timed out after {timeout}s: {cmd}\n"
                f"stdout: {out.read().decode(errors='replace')}\n"
                f"stderr: {err.read().decode(errors='replace')}") from e
        out.seek(0)
        err.seek(0)
        cp = subprocess.CompletedProcess(cmd, proc.returncode,
                                         out.read().decode(errors="replace"),
                                         err.read().decode(errors="replace"))
    if check and cp.returncode != 0:
        raise BpfsError(f"command failed (exit {cp.returncode}): {' '.join(cmd)}\n"
                        f"stdout: {cp.stdout}\nstderr: {cp.stderr}")
    return cp


def init_store(store: Path, env: dict | None = None, *extra) -> subprocess.CompletedProcess:
    return run_bpfs("init", store, "--kdf", "interactive", *extra, env=env)


def new_store(base: Path, name: str = "store") -> Path:
    store = Path(base) / name
    init_store(store)
    return store


def one_line_error(cp: subprocess.CompletedProcess) -> str:
    """Assert the command failed with exactly one (non-traceback) line on stderr."""
    assert cp.returncode != 0, f"expected failure, got exit 0; stdout={cp.stdout!r} stderr={cp.stderr!r}"
    lines = [line for line in cp.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}: {cp.stderr!r}"
    assert "Traceback" not in cp.stderr
    return lines[0]


def run_on_a_terminal(cmd: list[str], env: dict, answer: str, prompt: str = r"(?i)passphrase[^\n]*: ?$",
                      timeout: float = 120, cwd=None) -> tuple[int, str, list[str]]:
    """Run `cmd` on a pseudo-terminal (so it asks, as it would a person) and type `answer` each
    time its output ends in a line matching the regex `prompt`. Returns (exit status, everything
    it wrote, the prompts answered)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=cwd or str(REPO), env=env, stdin=follower, stdout=follower, stderr=follower,
                            start_new_session=True)
    os.close(follower)
    out, answered_to, asked = b"", 0, []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # the process closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
                tail = out[answered_to:].decode(errors="replace").replace("\r\n", "\n").rsplit("\n", 1)[-1]
                if re.search(prompt, tail):
                    asked.append(tail)
                    os.write(leader, answer.encode() + b"\n")
                    answered_to = len(out)
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
    return rc, out.decode(errors="replace").replace("\r\n", "\n"), asked
