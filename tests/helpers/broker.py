"""A real broker program for tests: `python -m broker` (or the installed `bpfs-broker`) in a process.

`BrokerProcess(tmp)` keeps its state directory (`tmp/broker-state`), log (`tmp/broker.log`, JSON
lines) and ready file in `tmp`. `start()` returns once the broker wrote its ready file, and starts
it again after a stop on the same state and the same port. Options: a config file's text, a Python
`preamble` run before the broker's `main` (how the lying brokers of test_rendezvous are made), a
`command` (the installed script), a `prefix` (`nsenter --net=...`: a broker in a namespace), the
process's `env`, and `verbose` (debug logs, on by default). bench/rendezvous reuses it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import textwrap
from pathlib import Path

from tests.helpers.cli import PYTHON, REPO
from tests.helpers.procs import kill_pid, wait_until

#: A broker config's [rates.announce] and [rates.lookup] sections with every rate raised out of the
#: way, per identity and per source: for one process on 127.0.0.1 that announces and looks up
#: thousands of stores (tests/broker/test_broker_load.py, bench/rendezvous).
RAISED_RATES = """
[rates.announce]
per_minute = 1000000
burst = 1000000
source_per_minute = 1000000
source_burst = 1000000

[rates.lookup]
per_minute = 1000000
burst = 1000000
source_per_minute = 1000000
source_burst = 1000000
"""


class BrokerProcess:
    def __init__(self, tmp: Path, *, listen: str = "127.0.0.1:0", config: str | None = None,
                 preamble: str = "", command: list[str] | None = None, prefix=(), env: dict | None = None,
                 verbose: bool = True):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.state = self.tmp / "broker-state"
        self.log = self.tmp / "broker.log"
        self.ready = self.tmp / "broker-ready.json"
        self.listen = listen
        self.config = None
        if config is not None:
            self.config = self.tmp / "broker.toml"
            self.config.write_text(config)
        self.preamble = preamble
        self.command = command
        self.prefix = list(prefix)
        self.env = env
        self.verbose = verbose
        self.proc: subprocess.Popen | None = None
        self.peer_id = ""
        self.address: tuple[str, int] = ("", 0)

    @property
    def where(self) -> str:
        """"HOST:PORT", as `--broker` takes it."""
        return f"{self.address[0]}:{self.address[1]}"

    def start(self) -> "BrokerProcess":
        self.ready.unlink(missing_ok=True)
        args = ["--listen", self.listen, "--state-dir", str(self.state), "--ready-file", str(self.ready),
                "--log-format", "json"] + (["-v"] if self.verbose else [])
        if self.config is not None:
            args += ["--config", str(self.config)]
        if self.preamble:
            code = textwrap.dedent(self.preamble) + \
                "\nimport sys\nfrom broker.cli import main\nsys.argv[0] = 'bpfs-broker'\nmain()\n"
            command = [PYTHON, "-c", code]
        else:
            command = self.command or [PYTHON, "-m", "broker"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*self.prefix, *command, *args], cwd=REPO, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                         start_new_session=True)
        assert wait_until(lambda: self.ready.exists() or self.proc.poll() is not None, timeout=30), self.log_tail()
        assert self.proc.poll() is None, f"the broker exited: {self.log_tail()}"
        doc = json.loads(self.ready.read_text())
        host, port = doc["address"].rsplit(":", 1)
        self.peer_id, self.address = doc["peer_id"], (host.strip("[]"), int(port))
        self.listen = f"{self.listen.rsplit(':', 1)[0]}:{port}"  # a restart takes the same port
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal it and wait; its exit status (None if it was not running)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:
                kill_pid(self.proc.pid)
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill_pid(self.proc.pid)
        return self.proc.wait(timeout=30)

    def kill(self) -> int | None:
        return self.stop(signal.SIGKILL)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def memory(self) -> dict[str, int]:
        """{'VmRSS': bytes, 'VmHWM': bytes} of the broker process now."""
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    def events(self, name: str | None = None, level: str | None = None) -> list[dict]:
        """The JSON log lines, optionally only one event or level."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if (name is None or doc.get("event") == name) and (level is None or doc.get("level") == level):
                out.append(doc)
        return out

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no broker log)"
