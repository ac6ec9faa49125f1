"""Processes of the lab: running a command (output through temporary files, readable errors),
``sh`` for the lab's own ``ip``/``iptables``/``tc`` calls, whether a pid is alive, and the helper
child processes (``python -m tests.helpers.netlab SUBCOMMAND``, optionally inside a namespace)
that answer one JSON line per command (``LineProcess``, and ``json_lines`` on their side)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile

from tests.helpers.cli import PYTHON, REPO

#: argv that runs one of the lab's helpers in a child process (run it with cwd=REPO, as
#: ``LineProcess`` and ``ProxyProcess`` do): ``[*COMMAND, "echo", "--listen", ...]``.
COMMAND = [PYTHON, "-m", "tests.helpers.netlab"]


def run_cmd(cmd, *, env=None, check=True, timeout=120, input=None, cwd=None) -> subprocess.CompletedProcess:
    """subprocess.run with output through temporary files (a daemon keeping inherited pipes open
    cannot hang us), text results, and a readable error."""
    cmd = [os.fspath(c) for c in cmd]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.run(cmd, env=env, stdout=out, stderr=err,
                                  stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                                  input=input.encode() if input is not None else None, timeout=timeout,
                                  cwd=cwd or str(REPO))
        except subprocess.TimeoutExpired as e:
            out.seek(0)
            err.seek(0)
            raise AssertionError(f"command timed out after {timeout}s: {cmd}\nstdout: "
                                 f"{out.read().decode(errors='replace')}\nstderr: "
                                 f"{err.read().decode(errors='replace')}") from e
        out.seek(0)
        err.seek(0)
        cp = subprocess.CompletedProcess(cmd, proc.returncode, out.read().decode(errors="replace"),
                                         err.read().decode(errors="replace"))
    if check and cp.returncode != 0:
        raise AssertionError(f"command failed (exit {cp.returncode}): {' '.join(cmd)}\nstdout: {cp.stdout}\n"
                             f"stderr: {cp.stderr}")
    return cp


def sh(*cmd, check=True) -> subprocess.CompletedProcess:
    cp = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, timeout=30)
    if check and cp.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {cp.returncode}: {cp.stderr.strip()}")
    return cp


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, IndexError):
        return False


class LineProcess:
    """A helper child process (``python -m tests.helpers.netlab SUBCOMMAND ...``), optionally in a
    namespace: its first stdout line starts with ``ready``; then one JSON command a line on stdin,
    one JSON line back.  Closing stdin ends it."""

    def __init__(self, args, *, prefix: list[str] | None = None, ready: str = "ready"):
        cmd = [*(prefix or []), *COMMAND, *map(str, args)]
        self.name = str(args[0])
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     text=True, bufsize=1, cwd=str(REPO))
        self.ready_line = self.proc.stdout.readline()
        if not self.ready_line.startswith(ready):
            err = self.stderr()
            self.close()
            raise RuntimeError(f"{args[0]} did not start: {self.ready_line!r} {err}")

    def stderr(self) -> str:
        with contextlib.suppress(ValueError, OSError):
            self._err.seek(0)
            return self._err.read().decode(errors="replace")
        return ""

    def _send(self, **obj) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"netlab {self.name} exited: {self.stderr()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"netlab {self.name}: {reply['error']}")
        return reply

    def _command(self, **obj) -> dict:
        self._send(**obj)
        return self._reply()

    def close(self, timeout: float = 5) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self._err):
            with contextlib.suppress(Exception):
                f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def json_lines(handler) -> None:
    """Serve JSON commands from stdin until it closes: handler(dict) -> dict (an exception
    becomes {"error": ...})."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = handler(json.loads(line))
        except Exception as e:  # noqa: BLE001 - reported to the test, which raises
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)

