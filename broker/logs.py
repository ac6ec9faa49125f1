"""The broker's structured logs: one line per event, as text or JSON lines.

Owns `event(name, level, **fields)` and the two formatters. A JSON line looks like
`{"ts": "2025-01-01T12:00:00.123Z", "level": "info", "event": "announce", "peer": "..."}`;
the text form is `TIME LEVEL event key=value ...`. Messages from other loggers (the transport)
become `{"event": "log", "logger": ..., "msg": ...}`. Callers never pass a token, side,
verifier, key or mailbox body: only peer ids, addresses, counts and reasons.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys

log = logging.getLogger("broker")  # the event stream of every broker module (`event`), not this module's own log
_QUOTE = frozenset(' ="\n')


def event(name: str, level: int = logging.INFO, **fields) -> None:
    if log.isEnabledFor(level):
        log.log(level, name, extra={"broker_event": name, "broker_fields": fields})


def _timestamp(record: logging.LogRecord) -> str:
    t = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _fields(record: logging.LogRecord) -> tuple[str, dict]:
    name = getattr(record, "broker_event", None)
    if name is not None:
        return name, dict(record.broker_fields)  # type: ignore[attr-defined]  # set with broker_event (extra=)
    fields = {"logger": record.name, "msg": record.getMessage()}
    if record.exc_info:
        fields["exc"] = logging.Formatter().formatException(record.exc_info).splitlines()[-1]
    return "log", fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event, then the event's fields (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        name, fields = _fields(record)
        doc = {"ts": _timestamp(record), "level": record.levelname.lower(), "event": name}
        doc.update({k: v for k, v in fields.items() if k not in doc})
        return json.dumps(doc, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """`TIME LEVEL event key=value ...`, a value in JSON quotes when it is empty or holds a space, `=`,
    a quote or a newline."""

    def format(self, record: logging.LogRecord) -> str:
        name, fields = _fields(record)
        parts = [_timestamp(record), record.levelname, name]
        for k, v in fields.items():
            v = str(v)
            parts.append(f"{k}={json.dumps(v) if (not v or any(c in v for c in _QUOTE)) else v}")
        return " ".join(parts)


def setup(fmt: str = "text", verbose: bool = False, stream=None) -> None:
    """Log to `stream` (stderr) in `fmt` ("text" or "json"); debug with `verbose`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("quic").setLevel(logging.DEBUG if verbose else logging.WARNING)  # aioquic and qh3, per connection
