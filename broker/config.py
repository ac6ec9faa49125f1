"""The broker's settings: `BrokerConfig`, every bound with a default, loadable from a TOML file.

Owns parsing and validating the file; an unknown key or a bad value is a `ConfigError` whose
text is one line (the CLI prints it and exits 2). Sizes are bytes or a number with K, M, G, T
(binary: 1G = 1 GiB), optionally followed by "iB" or "B". Durations are seconds.

    listen = "0.0.0.0:7451"          # UDP address (IP literal) the broker serves on

    # announcements (see bpfs.rendezvous.wire)
    max_ttl = 3600                   # seconds an announcement is kept at most (<= protocol MAX_TTL)
    max_records = 20000              # announcements held, all keys together
    max_keys_per_source = 64         # distinct store keys announced from one IP (IPv6: one /64)
    max_verifiers = 262144           # partner verifiers held, all announcements together
    seq_memory_ttl = 86400           # seconds a key's highest seq is remembered after its record
                                     # is gone (>= max_ttl), so an old record cannot be replayed
    max_seq_memory = 200000          # such remembered seqs (the oldest are dropped beyond it)

    # mailboxes (pairing by code)
    code_ttl = 600                   # seconds a mailbox lives from MailboxOpen
    max_mailboxes = 10000            # open mailboxes, all sources together
    max_mailboxes_per_source = 8     # open mailboxes opened from one IP (IPv6: one /64)
    max_mailbox_bytes = "64M"        # message bytes held in all mailboxes together

    # relay
    relay_rate = "4M"                # bytes per second one identity may send through the relay
    relay_burst = "1M"               # bytes of that rate that may be saved up (>= 2K)
    relay_daily_bytes = "8G"         # bytes one identity may send through the relay per UTC day
    relay_idle = 120                 # seconds without a frame before a relay session ends
    relay_lifetime = 86400           # seconds a relay session lasts at most
    max_relay_sessions = 1000        # sessions, all identities together
    max_relay_sessions_per_identity = 8
    max_relay_accounts = 65536       # identities whose relay usage is tracked (LRU beyond it)

    # connections and requests
    max_connections = 4096           # QUIC connections, all together
    max_connections_per_source = 16  # authenticated connections from one IP (IPv6: one /64)
    max_pending = 256                # connections still in the handshake
    max_pending_per_source = 8       # of those, from one IP
    idle_timeout = 60                # seconds without a packet before a connection is dropped (>= 45:
                                     # stores ping every 15 s, bpfs.rendezvous.brokers.KEEPALIVE)
    request_rate = 50                # requests per second per identity, any kind (transport-level)
    request_burst = 100
    max_buckets = 65536              # rate-limit buckets held (least recently used dropped beyond it)
    push_timeout = 5                 # seconds a Punch / RelayOffer / RelayClosed push may take
    max_pushes = 256                 # pushes in flight (more are dropped, and logged at debug)
    sweep_interval = 10              # seconds between expiry sweeps
    stats_interval = 300             # seconds between relay throughput log lines (0 = never)
    map_size = "256M"                # the LMDB map (state on disk); when full, changes are refused

    # per-kind request rates (kinds: announce, lookup, relay_open, mailbox_open, mailbox_join,
    # mailbox_io = put/get/close), per identity and per source IP (IPv6: one /64):
    [rates.mailbox_join]             # joining a code: each join is one guess at a code's words
    per_minute = 0.1                 # per identity: 4 at once, then one every 10 minutes
    burst = 4
    source_per_minute = 0.1          # per source IP (identities are free: this is the bound
    source_burst = 4                 # that counts): 148 joins a day, each a 2^-24 guess
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field

from bpfs.rendezvous.brokers import KEEPALIVE
from bpfs.rendezvous.wire import DEFAULT_BROKER_PORT, MAX_TTL

DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_BROKER_PORT}"
RATE_KINDS = ("announce", "lookup", "relay_open", "mailbox_open", "mailbox_join", "mailbox_io")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


class ConfigError(Exception):
    """A bad setting; the text is one line naming the key and what is expected."""


@dataclass(frozen=True)
class Rate:
    """Token buckets of one request kind: per identity and per source IP (requests per minute)."""

    per_minute: float
    burst: float
    source_per_minute: float
    source_burst: float


DEFAULT_RATES = {
    "announce": Rate(30, 10, 300, 100),
    "lookup": Rate(120, 60, 600, 200),
    "relay_open": Rate(30, 10, 120, 40),
    "mailbox_open": Rate(10, 5, 30, 10),
    "mailbox_join": Rate(0.1, 4, 0.1, 4),  # against guessing codes: see the module docstring
    "mailbox_io": Rate(600, 100, 2400, 400),
}


@dataclass(frozen=True)
class BrokerConfig:
    """The broker's settings (see the module docstring for each), validated when made."""

    listen: str = DEFAULT_LISTEN
    # announcements
    max_ttl: int = MAX_TTL
    max_records: int = 20000
    max_keys_per_source: int = 64
    max_verifiers: int = 262144
    seq_memory_ttl: int = 86400
    max_seq_memory: int = 200000
    # mailboxes
    code_ttl: int = 600
    max_mailboxes: int = 10000
    max_mailboxes_per_source: int = 8
    max_mailbox_bytes: int = 64 << 20
    # relay
    relay_rate: int = 4 << 20
    relay_burst: int = 1 << 20
    relay_daily_bytes: int = 8 << 30
    relay_idle: float = 120.0
    relay_lifetime: float = 86400.0
    max_relay_sessions: int = 1000
    max_relay_sessions_per_identity: int = 8
    max_relay_accounts: int = 65536
    # connections and requests
    max_connections: int = 4096
    max_connections_per_source: int = 16
    max_pending: int = 256
    max_pending_per_source: int = 8
    idle_timeout: float = 60.0
    request_rate: float = 50.0
    request_burst: float = 100.0
    max_buckets: int = 65536
    push_timeout: float = 5.0
    max_pushes: int = 256
    sweep_interval: float = 10.0
    stats_interval: float = 300.0
    map_size: int = 256 << 20
    rates: dict = field(default_factory=lambda: dict(DEFAULT_RATES))

    def __post_init__(self):
        _validate(self)

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_address(self.listen)

    def replace(self, **changes) -> "BrokerConfig":
        return dataclasses.replace(self, **changes)


_SIZES = {"max_mailbox_bytes", "relay_rate", "relay_burst", "relay_daily_bytes", "map_size"}
_FLOATS = {"relay_idle", "relay_lifetime", "idle_timeout", "request_rate", "request_burst", "push_timeout",
           "sweep_interval", "stats_interval"}
_AT_LEAST = {  # key: minimum value (everything else numeric must be >= 1)
    "relay_burst": 2048, "map_size": 1 << 20, "stats_interval": 0, "max_ttl": 10, "code_ttl": 10,
    # QUIC takes the lower of both sides' idle timeouts: a store's pings (every KEEPALIVE seconds at
    # most) must come well within it, or every store's broker connection idles out between two pings
    "idle_timeout": 3 * KEEPALIVE,
}


def parse_size(key: str, value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"{key}: must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            scale = 1024 ** ("kmgt".index(m.group(2).lower()) + 1) if m.group(2) else 1
            return int(float(m.group(1)) * scale)
    raise ConfigError(f"{key}: not a size: {value!r} (examples: 4M, 8G, 65536)")


def parse_address(text: str) -> tuple[str, int]:
    """"IP:PORT" or "[v6]:PORT" -> (ip, port); IP literals only (no DNS)."""
    if not isinstance(text, str):
        raise ConfigError(f"listen: expected a string such as {DEFAULT_LISTEN!r}")
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        if not sep or not port.isdigit():
            raise ValueError
        host, number = str(ipaddress.ip_address(host)), int(port)
        if not 0 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"listen: not an address: {text!r} (expected IP:PORT, e.g. {DEFAULT_LISTEN})") from None
    return host, number


def _number(key: str, value, kind):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _validate(cfg: BrokerConfig) -> None:
    parse_address(cfg.listen)
    for f in dataclasses.fields(cfg):
        if f.name in ("listen", "rates"):
            continue
        value = getattr(cfg, f.name)
        _number(f.name, value, float if f.name in _FLOATS else int)
        low = _AT_LEAST.get(f.name, 1)
        if value < low:
            raise ConfigError(f"{f.name}: must be >= {low}, got {value!r}")
    if cfg.max_ttl > MAX_TTL:
        raise ConfigError(f"max_ttl: must be <= {MAX_TTL} (the protocol's bound), got {cfg.max_ttl}")
    if cfg.seq_memory_ttl < cfg.max_ttl:
        raise ConfigError(f"seq_memory_ttl: must be >= max_ttl ({cfg.max_ttl}), got {cfg.seq_memory_ttl}")
    if cfg.code_ttl > 86400:
        raise ConfigError(f"code_ttl: must be <= 86400, got {cfg.code_ttl}")
    if cfg.max_mailboxes > 200_000:
        raise ConfigError(f"max_mailboxes: must be <= 200000 (nameplates stay short), got {cfg.max_mailboxes}")
    if cfg.max_pending_per_source > cfg.max_pending:
        raise ConfigError("max_pending_per_source: must be <= max_pending")
    if not isinstance(cfg.rates, dict) or set(cfg.rates) != set(RATE_KINDS):
        raise ConfigError(f"rates: needs exactly the kinds {', '.join(RATE_KINDS)}")
    for kind, rate in cfg.rates.items():
        for name in ("per_minute", "burst", "source_per_minute", "source_burst"):
            value = getattr(rate, name)
            _number(f"rates.{kind}.{name}", value, float)
            if value <= 0 or (name.endswith("burst") and value < 1):
                raise ConfigError(f"rates.{kind}.{name}: must be {'>= 1' if name.endswith('burst') else '> 0'}")


def from_dict(doc: dict) -> BrokerConfig:
    """A config from a parsed TOML document; `ConfigError` on unknown keys or bad values."""
    known = {f.name for f in dataclasses.fields(BrokerConfig)}
    values: dict = {}
    for key, value in doc.items():
        if key not in known:
            raise ConfigError(f"unknown key {key!r} (see the broker.config docstring for the keys)")
        if key == "rates":
            values["rates"] = _rates(value)
        elif key == "listen":
            values[key] = value
        elif key in _SIZES:
            values[key] = parse_size(key, value)
        else:
            values[key] = _number(key, value, float if key in _FLOATS else int)
    return BrokerConfig(**values)


def _rates(doc) -> dict:
    if not isinstance(doc, dict):
        raise ConfigError("rates: expected tables such as [rates.lookup]")
    rates = dict(DEFAULT_RATES)
    for kind, table in doc.items():
        if kind not in RATE_KINDS:
            raise ConfigError(f"rates: unknown kind {kind!r} (kinds: {', '.join(RATE_KINDS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"rates.{kind}: expected a table with per_minute, burst, source_per_minute, source_burst")
        names = {f.name for f in dataclasses.fields(Rate)}
        for name, value in table.items():
            if name not in names:
                raise ConfigError(f"rates.{kind}: unknown key {name!r} (keys: {', '.join(sorted(names))})")
            _number(f"rates.{kind}.{name}", value, float)
        rates[kind] = dataclasses.replace(rates[kind], **{k: float(v) for k, v in table.items()})
    return rates


def load(path: str | None, **overrides) -> BrokerConfig:
    """The config in TOML file `path` (defaults if None), then `overrides` (e.g. listen=...)."""
    doc: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    doc.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return from_dict(doc)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
