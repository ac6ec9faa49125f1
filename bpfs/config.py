"""A store's settings: `STORE/bpfs.toml`, optional, every key with a default.

The settings, their sections, kinds and meanings are listed once, in `SETTINGS`; the defaults
are `Config`'s. `default_config_text()` renders both as the commented `bpfs.toml` that `bpfs
init` writes (`python -c 'import bpfs.config as c; print(c.default_config_text())'` shows it).
Sections: [replication] (what leaves the machine, when, how fast), [history] (which snapshots
are kept, here and at partners), [trust] (audits, reputation, repair) and [partners] (where the
daemon listens, the grace period, the brokers).

Sizes are bytes or a number with K, M, G, T (binary: 1G = 1 GiB), optionally followed by
"iB" or "B". Durations are seconds or a number with s, min (or m), h, d. Owns parsing and
validating these; an invalid file is a clear one-line error.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from dataclasses import dataclass, field

from .errors import BpfsError

DEFAULT_PORT = 7450
DEFAULT_BROKER_PORT = 7451  # the same as bpfs.rendezvous.wire's
DEFAULT_BROKERS = ("broker.bpfs.net",)
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"
DEFAULT_PRIORITY = (
    "id_rsa*", "id_ed25519*", "id_ecdsa*", "id_dsa*", "*.key", "*.pem", "*.p12", "*.pfx", "*.kdbx", "*.kdb",
    "wallet.dat", "*.wallet", ".ssh/", ".gnupg/", "*.gpg", "*.asc",
)
CONFIG_NAME = "bpfs.toml"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {None: 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


class ConfigError(BpfsError):
    """An invalid setting (in bpfs.toml, BPFS_BROKER or an option): one line for the user, exit code 2."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=2)


def parse_size(text) -> int:
    """"10G" -> 10 GiB; plain integers are bytes. ConfigError if it is not a size."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"not a size: {text!r} (examples: 500M, 10G, 1T)")
    scale = 1024 ** "kmgtp".index(m.group(2).lower()) * 1024 if m.group(2) else 1
    return int(float(m.group(1)) * scale)


def parse_duration(text) -> float:
    """"3d" -> 259200.0 seconds; plain numbers are seconds. ConfigError if it is not a duration."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text >= 0:
        return float(text)
    m = _DURATION.match(str(text))
    if not m:
        raise ConfigError(f"not a duration: {text!r} (examples: 90, 30min, 12h, 3d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower() if m.group(2) else None]


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """"HOST:PORT", "[v6]:PORT" or "HOST" -> (ip, port). Only IP literals (no DNS lookups here)."""
    text = text.strip()
    port: int | str  # the text's, until converted
    host, port = text, default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        host = str(ipaddress.ip_address(host))
        port = int(port)
    except ValueError:
        raise ConfigError(f"not an address: {text!r} (expected IP:PORT, e.g. 192.0.2.7:{DEFAULT_PORT})") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"port out of range in {text!r}")
    return host, port


def format_address(addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_window(text: str) -> tuple[int, int] | None:
    """"22:00-06:00" -> (start minute, end minute) of the day; "" -> None (always)."""
    if not text or not text.strip():
        return None
    m = _WINDOW.match(text)
    if not m:
        raise ConfigError(f"not a time window: {text!r} (expected HH:MM-HH:MM)")
    h1, m1, h2, m2 = (int(x) for x in m.groups())
    if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59:
        raise ConfigError(f"not a time window: {text!r}")
    return h1 * 60 + m1, h2 * 60 + m2


def in_window(window: tuple[int, int] | None, minute_of_day: int) -> bool:
    if window is None:
        return True
    start, end = window
    if start == end:
        return True
    if start < end:
        return start <= minute_of_day < end
    return minute_of_day >= start or minute_of_day < end  # crosses midnight


_BROKER = re.compile(r"^(?:quic://)?(\[[0-9a-fA-F:.]+\]|[^/:\[\]\s]+)(?::(\d{1,5}))?(?:/([0-9A-Za-z-]+))?/?$")


@dataclass(frozen=True)
class BrokerAddress:
    """A configured broker (`parse_broker`): host and port, and the peer id its identity is pinned to
    if one was given."""

    host: str  # a name or an IP literal
    port: int = DEFAULT_BROKER_PORT
    peer_id: str | None = None  # the broker's identity, pinned if given

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" + (f"/{self.peer_id}" if self.peer_id else "")


def parse_broker(text: str) -> BrokerAddress:
    """"broker.example.org", "quic://198.51.100.1:7451", "[2001:db8::1]:7451/PEER-ID"."""
    from .identity import parse_peer_id

    m = _BROKER.match(str(text).strip())
    if not m:
        raise ConfigError(f"not a broker address: {text!r} (expected HOST[:PORT], e.g. broker.example.org:"
                          f"{DEFAULT_BROKER_PORT})")
    host, port, pin = m.group(1).strip("[]"), int(m.group(2) or DEFAULT_BROKER_PORT), m.group(3)
    if not 1 <= port <= 65535:
        raise ConfigError(f"port out of range in broker address {text!r}")
    if pin is not None:
        try:
            parse_peer_id(pin)
        except Exception:
            raise ConfigError(f"not a peer id in broker address {text!r}") from None
    return BrokerAddress(host, port, pin)


def parse_brokers(values) -> list[BrokerAddress]:
    """Broker addresses, in order; "none" (alone) means no broker."""
    values = [str(v).strip() for v in values if v and str(v).strip()]
    if len(values) == 1 and values[0].lower() == "none":
        return []
    return [parse_broker(v) for v in values]


def brokers_from_env(default: list[BrokerAddress]) -> list[BrokerAddress]:
    env = os.environ.get("BPFS_BROKER")
    return default if env is None else parse_brokers(env.split(","))


@dataclass
class Config:
    """A store's settings (`load_config`), each defaulting as the module docstring shows; sizes in
    bytes, durations in seconds."""

    replicas: int = 2
    upload_limit: int = 0
    window: tuple[int, int] | None = None
    snapshot_interval: float = 300.0
    batch_bytes: int = 1 << 20
    batch_delay: float = 1800.0
    priority: list[str] = field(default_factory=lambda: list(DEFAULT_PRIORITY))
    max_file_size: int | None = None
    listen: str | None = DEFAULT_LISTEN
    grace_days: float = 30.0
    brokers: list[BrokerAddress] = field(default_factory=lambda: [parse_broker(b) for b in DEFAULT_BROKERS])
    # [history]: retention of snapshots (see history)
    keep_within: float = 86400.0
    keep_daily: int = 30
    keep_weekly: int = 8
    keep_monthly: int = 12
    keep_last: int = 2
    # [trust]: audits, reputation and repair (see peering.auditor and peering.reputation)
    audit_interval: float = 3600.0
    detect_loss: float = 0.01
    detect_probability: float = 0.99
    detect_within: float = 86400.0
    coverage_days: float = 30.0
    audit_budget: float = 0.01
    repair_after: float = 3 * 86400.0
    suspect_after: float = 12 * 3600.0
    fail_score: float = 0.9
    fail_fraction: float = 0.1

    @property
    def grace_seconds(self) -> float:
        return self.grace_days * 86400.0


def load_config(store_dir: str) -> Config:
    path = os.path.join(store_dir, CONFIG_NAME)
    cfg = Config()
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        cfg.brokers = brokers_from_env(cfg.brokers)
        return cfg
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    rep, partners, trust = doc.get("replication", {}), doc.get("partners", {}), doc.get("trust", {})
    history = doc.get("history", {})
    try:
        if "replicas" in rep:
            cfg.replicas = int(rep["replicas"])
            if not 1 <= cfg.replicas <= 16:
                raise ConfigError(f"{path}: replicas must be within 1..16")
        if "upload_limit" in rep:
            cfg.upload_limit = parse_size(rep["upload_limit"])
        if "window" in rep:
            cfg.window = parse_window(str(rep["window"]))
        if "snapshot_interval" in rep:
            cfg.snapshot_interval = max(5.0, float(rep["snapshot_interval"]))
        if "batch_bytes" in rep:
            cfg.batch_bytes = parse_size(rep["batch_bytes"])
        if "batch_delay" in rep:
            cfg.batch_delay = parse_duration(rep["batch_delay"])
        if "priority" in rep:
            if not isinstance(rep["priority"], list) or not all(isinstance(p, str) for p in rep["priority"]):
                raise ConfigError(f"{path}: priority must be a list of patterns")
            cfg.priority = list(rep["priority"])
        if "max_file_size" in rep:
            value = rep["max_file_size"]
            cfg.max_file_size = None if str(value).strip().lower() in ("", "none") else parse_size(value)
        if "listen" in partners:
            value = str(partners["listen"])
            cfg.listen = None if value.lower() == "none" else format_address(parse_address(value))
        if "grace_days" in partners:
            cfg.grace_days = float(partners["grace_days"])
            if cfg.grace_days < 0:
                raise ConfigError(f"{path}: grace_days must be >= 0")
        if "brokers" in partners:
            if not isinstance(partners["brokers"], list):
                raise ConfigError(f"{path}: brokers must be a list of addresses (or [] for none)")
            try:
                cfg.brokers = parse_brokers(partners["brokers"])
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
        _load_trust(cfg, trust, path)
        _load_history(cfg, history, path)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None
    cfg.brokers = brokers_from_env(cfg.brokers)
    return cfg


_HISTORY_COUNTS = ("keep_daily", "keep_weekly", "keep_monthly", "keep_last")


def _load_history(cfg: Config, history: dict, path: str) -> None:
    unknown = set(history) - set(_HISTORY_COUNTS) - {"keep_within"}
    if unknown:
        raise ConfigError(f"{path}: unknown setting in [history]: {', '.join(sorted(unknown))}")
    if "keep_within" in history:
        try:
            cfg.keep_within = parse_duration(history["keep_within"])
        except ConfigError as e:
            raise ConfigError(f"{path}: [history] keep_within: {e}") from None
    for name in _HISTORY_COUNTS:
        if name in history:
            value = history[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{path}: [history] {name} must be a whole number >= 0")
            setattr(cfg, name, value)
    if cfg.keep_last < 1:
        raise ConfigError(f"{path}: [history] keep_last must be at least 1 (the newest snapshot is always kept)")


_TRUST_DURATIONS = ("audit_interval", "detect_within", "repair_after", "suspect_after")
_TRUST_FRACTIONS = ("detect_loss", "detect_probability", "audit_budget", "fail_score", "fail_fraction")


def _load_trust(cfg: Config, trust: dict, path: str) -> None:
    unknown = set(trust) - set(_TRUST_DURATIONS) - set(_TRUST_FRACTIONS) - {"coverage_days"}
    if unknown:
        raise ConfigError(f"{path}: unknown setting in [trust]: {', '.join(sorted(unknown))}")
    for name in _TRUST_DURATIONS:
        if name in trust:
            try:
                value = parse_duration(trust[name])
            except ConfigError as e:
                raise ConfigError(f"{path}: [trust] {name}: {e}") from None
            if value <= 0:
                raise ConfigError(f"{path}: [trust] {name} must be more than 0")
            setattr(cfg, name, value)
    for name in _TRUST_FRACTIONS:
        if name in trust:
            value = float(trust[name])
            if not 0 < value < 1 or (name == "fail_score" and value == 0):
                raise ConfigError(f"{path}: [trust] {name} must be between 0 and 1 (exclusive)")
            setattr(cfg, name, value)
    if "coverage_days" in trust:
        cfg.coverage_days = float(trust["coverage_days"])
        if cfg.coverage_days <= 0:
            raise ConfigError(f"{path}: [trust] coverage_days must be more than 0")


# Every setting of bpfs.toml: (section, name (a field of Config), how its value is written, what it
# means). `bpfs init` writes the file from this list and Config's defaults (`default_config_text`),
# so the file it writes shows every setting with its true default.
SETTINGS: tuple[tuple[str, str, str, str], ...] = (
    ("replication", "replicas", "number", "partners that hold each pack (the first N active ones)"),
    ("replication", "upload_limit", "size", 'bytes per second to all partners together ("5M"); "0" = no limit'),
    ("replication", "window", "window", 'daily upload window in local time ("22:00-06:00"); "" = always'),
    ("replication", "snapshot_interval", "number", "seconds between signed index snapshots while data changes"),
    ("replication", "batch_bytes", "size", "small changes wait until this much new data is pending (or a "
                                           "priority file changed) ..."),
    ("replication", "batch_delay", "duration", "... or until the newest snapshot is this old"),
    ("replication", "priority", "list", "gitignore patterns replicated first (keys, wallets, certificates, "
                                        "password databases)"),
    ("replication", "max_file_size", "limit", 'files larger than this stay local, like .backupignore\'d ones '
                                              '("1G"); "" = no limit'),
    ("history", "keep_within", "duration", "every snapshot of this long before the newest one"),
    ("history", "keep_daily", "number", "the newest of each of the last N days with snapshots (UTC)"),
    ("history", "keep_weekly", "number", "... of the last N ISO weeks"),
    ("history", "keep_monthly", "number", "... of the last N months"),
    ("history", "keep_last", "number", "the newest N, whatever their age (at least 1)"),
    ("trust", "audit_interval", "duration", "between scheduled audits of each partner (jittered by +-10 %)"),
    ("trust", "detect_loss", "number", "a partner that silently lost this fraction of our packs ..."),
    ("trust", "detect_probability", "number", "... is caught with at least this probability ..."),
    ("trust", "detect_within", "duration", "... within this time (when the audit budget allows)"),
    ("trust", "coverage_days", "number", "every pack at every partner is audited at least this often (days)"),
    ("trust", "audit_budget", "number", "audit traffic at most this fraction of what a partner holds, per 30 days"),
    ("trust", "repair_after", "duration", "unreachable this long: its share moves to other partners"),
    ("trust", "suspect_after", "duration", 'unreachable this long: "suspect"'),
    ("trust", "fail_score", "number", 'an audit score below this: "failed"'),
    ("trust", "fail_fraction", "number", 'more than this fraction of our packs there failing (and >= 2): "failed"'),
    ("partners", "listen", "address", 'UDP address the daemon serves partners on; "none" = do not listen. '
                                      "A store answers there only once it has a partner or expects a pairing"),
    ("partners", "grace_days", "number", "days data a partner asked us to delete is kept"),
    ("partners", "brokers", "brokers", 'rendezvous brokers, tried in order ("HOST[:PORT][/PEER_ID]"); [] = none; '
                                       "BPFS_BROKER and --broker override it"),
)


def _setting_text(kind: str, value) -> str:
    """A default as bpfs.toml spells it (what load_config reads back as that value)."""
    if kind == "size":
        for power, unit in ((4, "T"), (3, "G"), (2, "M"), (1, "K")):
            if value and value % 1024 ** power == 0:
                return f'"{value // 1024 ** power}{unit}"'
        return f'"{value}"'
    if kind == "duration":
        for seconds, unit in ((86400, "d"), (3600, "h"), (60, "min")):
            if value and value % seconds == 0:
                return f'"{int(value // seconds)}{unit}"'
        return _setting_text("number", value)
    if kind == "limit":
        return '""' if value is None else _setting_text("size", value)
    if kind == "window":
        return '""' if value is None else '"{:02d}:{:02d}-{:02d}:{:02d}"'.format(*divmod(value[0], 60),
                                                                                 *divmod(value[1], 60))
    if kind == "list":
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    if kind == "address":
        return json.dumps(value or "none")
    if kind == "brokers":
        return "[" + ", ".join(json.dumps(str(b)) for b in value) + "]"
    return str(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)


def default_config_text() -> str:
    """STORE/bpfs.toml as `bpfs init` writes it: every setting with its default, commented out."""
    defaults = Config()
    lines = ["# The settings of this bpfs store, each shown with its default and commented out: remove the",
             "# '# ' before one and change its value to set it. Sizes are bytes or a number with K, M, G, T",
             "# (binary: 1G = 1 GiB); durations are seconds or a number with s, min, h, d."]
    section = None
    for name_of_section, name, kind, what in SETTINGS:
        if name_of_section != section:
            section = name_of_section
            lines += ["", f"[{section}]"]
        setting = f"# {name} = {_setting_text(kind, getattr(defaults, name))}"
        lines += [f"{setting:<40} # {what}"] if len(setting) < 40 else [f"# {what}:", setting]
    return "\n".join(lines) + "\n"
