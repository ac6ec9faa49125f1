"""What `bpfs recover` shows while it works (`peering.recovery.Console` and `Meter`), without a
recovery: one line updated in place on a terminal, cut to its width; plain lines at most every few
seconds, never the same twice, off a terminal. (tests/partners/test_recovery.py runs a real
recovery on a pseudo-terminal.)"""

from __future__ import annotations

import io

from bpfs.peering import recovery
from bpfs.peering.recovery import Console, Meter


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_on_a_terminal_one_line_updates_in_place_and_never_wraps(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(recovery.time, "monotonic", clock)
    monkeypatch.setenv("COLUMNS", "50")
    out = Terminal()
    console = Console(out)
    meter = Meter(console, "fetching data", 400 << 20, 2)
    for _ in range(40):
        clock.now += 0.3
        meter.add(5 << 20)
    text = out.getvalue()
    assert "\n" not in text, repr(text)
    updates = [u.replace("\x1b[K", "") for u in text.split("\r") if u.replace("\x1b[K", "")]
    assert len(updates) >= 15, updates  # every 0.5 s at most
    assert all(len(u) <= 49 for u in updates), updates  # within the 50 columns, the last one free
    assert len(set(updates)) == len(updates), updates  # never the same line again
    monkeypatch.setenv("COLUMNS", "200")
    clock.now += 1
    meter.add(5 << 20)
    last = out.getvalue().rsplit("\r", 1)[1].replace("\x1b[K", "")
    assert "MB/s" in last and "left" in last and "(51 %)" in last, last  # rate and estimate
    console.say("done")
    assert out.getvalue().endswith("\r\x1b[Kdone\n")  # the progress line is erased first


def test_off_a_terminal_lines_at_most_every_few_seconds_never_repeated(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(recovery.time, "monotonic", clock)
    out = io.StringIO()
    console = Console(out)
    meter = Meter(console, "fetching data", 100 << 20, 1)
    for _ in range(100):  # 30 s
        clock.now += 0.3
        meter.add(1 << 20)
    lines = out.getvalue().splitlines()
    assert 5 <= len(lines) <= 30 / Console.PLAIN_INTERVAL + 1, lines
    console.progress(lines[-1], force=True)  # a phase's last line, the same as the one shown: not again
    console.progress("rebuilding the index...", force=True)
    assert out.getvalue().splitlines()[len(lines):] == ["rebuilding the index..."]
