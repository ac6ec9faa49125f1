"""What every benchmark run on its own (``python -m bench.replication``, ``.rendezvous``, ``.recovery``,
``.audit``) does around its measurements: log to stderr, a fresh run directory under the work
directory with everything undone at the end (also after Ctrl-C), the load averages, the JSON file,
and the exit status."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

from bench.cleanup import Cleanup


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_standalone(workdir: Path, rep: dict, measure: Callable[[Path, Cleanup], object],
                   summarize: Callable[[dict], dict], log: Callable[[str], None] = log_stderr) -> bool:
    """``measure(tmp, cleanup)`` in a new directory of ``workdir``, filling ``rep``; True if it was
    interrupted (Ctrl-C, SIGTERM), in which case ``rep`` says so and is summarized as far as it got."""
    workdir.mkdir(parents=True, exist_ok=True)
    interrupted = False
    with Cleanup(log) as cleanup:
        tmp = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
        cleanup.add_dir(tmp)
        (tmp / "bench.pid").write_text(f"{os.getpid()}\n")
        rep["loadavg_start"] = os.getloadavg()
        try:
            measure(tmp, cleanup)
        except KeyboardInterrupt:
            interrupted = True
            log("interrupted: cleaning up")
            rep.setdefault("notes", []).append("interrupted: the results are incomplete")
            if "runs" in rep:
                rep["summary"] = summarize(rep)
        rep["loadavg_end"] = os.getloadavg()
    return interrupted


def save_json(rep: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rep, indent=2, default=str) + "\n")


def exit_status(rep: dict, interrupted: bool) -> int:
    """130 after an interruption, 1 if anything failed, else 0."""
    if interrupted:
        return 130
    return 1 if rep.get("errors") else 0
