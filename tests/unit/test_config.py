"""bpfs.toml parsing, sizes, addresses, the daily window, and the upload rate limit."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from bpfs.config import (ConfigError, in_window, load_config, parse_address, parse_size, parse_window)
from bpfs.peering.replicator import ByteLimiter


def test_sizes():
    assert parse_size("10G") == 10 << 30
    assert parse_size("500MiB") == 500 << 20
    assert parse_size("1.5K") == 1536
    assert parse_size("123") == 123
    assert parse_size(7) == 7
    for bad in ("", "ten", "10X", "-1G", "1e9"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_addresses():
    assert parse_address("192.0.2.7:7450") == ("192.0.2.7", 7450)
    assert parse_address("[2001:db8::1]:9") == ("2001:db8::1", 9)
    assert parse_address("192.0.2.7") == ("192.0.2.7", 7450)
    for bad in ("example.com:7450", "1.2.3.4:99999", "1.2.3.4:x"):
        with pytest.raises(ConfigError):
            parse_address(bad)


def test_window():
    night = parse_window("22:00-06:00")
    assert in_window(night, 23 * 60) and in_window(night, 5 * 60 + 59)
    assert not in_window(night, 6 * 60) and not in_window(night, 12 * 60)
    day = parse_window("09:30-17:00")
    assert in_window(day, 9 * 60 + 30) and not in_window(day, 17 * 60)
    assert parse_window("") is None and in_window(None, 0)
    for bad in ("9-5", "25:00-01:00", "10:61-11:00"):
        with pytest.raises(ConfigError):
            parse_window(bad)


def test_load_config(tmp_path):
    assert load_config(str(tmp_path)).replicas == 2  # no file: defaults
    (tmp_path / "bpfs.toml").write_text(
        '[replication]\nreplicas = 3\nupload_limit = "5M"\nwindow = "22:00-06:00"\npriority = ["*.key"]\n'
        '[partners]\nlisten = "127.0.0.1:9000"\ngrace_days = 7\n')
    cfg = load_config(str(tmp_path))
    assert (cfg.replicas, cfg.upload_limit, cfg.window, cfg.priority) == (3, 5 << 20, (1320, 360), ["*.key"])
    assert (cfg.listen, cfg.grace_seconds) == ("127.0.0.1:9000", 7 * 86400)
    (tmp_path / "bpfs.toml").write_text("[replication]\nreplicas = 0\n")
    with pytest.raises(ConfigError, match="replicas"):
        load_config(str(tmp_path))
    (tmp_path / "bpfs.toml").write_text("not toml [")
    with pytest.raises(ConfigError, match="bpfs.toml"):
        load_config(str(tmp_path))


def test_upload_limit_paces_bytes():
    async def main():
        limiter = ByteLimiter(1 << 20)  # 1 MiB/s
        start = trio.current_time()
        for _ in range(10):
            await limiter.take(512 << 10)
        return trio.current_time() - start

    elapsed = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # 5 MiB at 1 MiB/s with a one-second burst: about 4 seconds, never much less
    assert 3.9 <= elapsed <= 4.6


def test_no_limit_does_not_wait():
    async def main():
        limiter = ByteLimiter(0)
        start = trio.current_time()
        for _ in range(100):
            await limiter.take(1 << 20)
        return trio.current_time() - start

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == 0


def test_brokers(tmp_path, monkeypatch):
    from bpfs.config import DEFAULT_BROKER_PORT, BrokerAddress, parse_broker, parse_brokers
    from bpfs.rendezvous.wire import DEFAULT_BROKER_PORT as WIRE_DEFAULT

    assert DEFAULT_BROKER_PORT == WIRE_DEFAULT == 7451
    assert parse_broker("broker.example.org") == BrokerAddress("broker.example.org", 7451)
    assert parse_broker("quic://198.51.100.1:9000") == BrokerAddress("198.51.100.1", 9000)
    assert parse_broker("[2001:db8::1]:7") == BrokerAddress("2001:db8::1", 7)
    from bpfs.identity import Identity
    pin = Identity(bytes(32)).peer_id
    assert parse_broker(f"b.example.org:1/{pin}").peer_id == pin
    assert str(parse_broker(f"b.example.org:1/{pin}")) == f"b.example.org:1/{pin}"
    assert parse_brokers(["none"]) == [] and parse_brokers([" NONE "]) == []
    for bad in ("", "a b", "host:99999", "host:1/not-a-peer-id", "quic://"):
        with pytest.raises(ConfigError):
            parse_broker(bad)
    # the default, the file, then BPFS_BROKER
    monkeypatch.delenv("BPFS_BROKER", raising=False)
    assert [str(b) for b in load_config(str(tmp_path)).brokers] == ["broker.bpfs.net:7451"]
    (tmp_path / "bpfs.toml").write_text('[partners]\nbrokers = ["10.0.0.1", "b2.example.org:99"]\n')
    assert [str(b) for b in load_config(str(tmp_path)).brokers] == ["10.0.0.1:7451", "b2.example.org:99"]
    monkeypatch.setenv("BPFS_BROKER", "none")
    assert load_config(str(tmp_path)).brokers == []
    monkeypatch.setenv("BPFS_BROKER", "1.2.3.4:5,6.7.8.9")
    assert [str(b) for b in load_config(str(tmp_path)).brokers] == ["1.2.3.4:5", "6.7.8.9:7451"]
    monkeypatch.delenv("BPFS_BROKER")
    for bad in ('brokers = "10.0.0.1"', 'brokers = ["bad host"]'):
        (tmp_path / "bpfs.toml").write_text(f"[partners]\n{bad}\n")
        with pytest.raises(ConfigError) as e:
            load_config(str(tmp_path))
        assert "bpfs.toml" in str(e.value) and e.value.exit_code == 2


def test_max_file_size(tmp_path):
    assert load_config(str(tmp_path)).max_file_size is None  # default: no limit
    for text, value in (('"1M"', 1 << 20), ('"2G"', 2 << 30), ('""', None), ("4096", 4096)):
        (tmp_path / "bpfs.toml").write_text(f"[replication]\nmax_file_size = {text}\n")
        assert load_config(str(tmp_path)).max_file_size == value, text
    (tmp_path / "bpfs.toml").write_text('[replication]\nmax_file_size = "big"\n')
    with pytest.raises(ConfigError, match="not a size"):
        load_config(str(tmp_path))
