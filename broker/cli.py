"""`bpfs-broker`: run a broker from the command line (or systemd).

Owns the command line, the broker's identity file and process concerns (logging set-up,
signals, the ready line and ready file). Usage:

    bpfs-broker [--listen HOST:PORT] [--config FILE] [--state-dir DIR] [--log-format text|json]
                [--ready-file PATH] [-v]

The identity is an Ed25519 seed in STATE/identity.key (32 bytes, created 0600 on first start,
under a 0700 state directory); the broker's peer id, which stores may pin, follows from it. Once
listening, it prints `broker PEER_ID listening on HOST:PORT` on stderr (with --log-format json only
the `listening` event, `{"event": "listening", "peer": ..., "addr": ...}`, says it) and,
with `--ready-file`, writes `{"peer_id": ..., "address": "HOST:PORT", "pid": ...}` there
(atomically: tests and scripts wait for the file). SIGTERM or SIGINT: a clean shutdown
(connections closed, LMDB flushed). Exit status: 0 after a clean shutdown, 1 when it cannot
start (address or state directory in use), 2 on bad input (options, config, identity file).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys

import click
import trio

from bpfs.identity import Identity

from .config import ConfigError, load
from .logs import event, setup
from .server import BrokerError, serve
from .state import format_address

DEFAULT_STATE_DIR = "/var/lib/bpfs-broker"
DEFAULT_CONFIG = "/etc/bpfs/broker.toml"
IDENTITY_NAME = "identity.key"


def _fail(message: str, code: int) -> None:
    click.echo(f"bpfs-broker: {message}", err=True)
    sys.exit(code)


def prepare_state_dir(path: str) -> None:
    """Create the state directory 0700, or make an existing one of ours 0700."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path} is not a directory")
    if st.st_mode & 0o077 and st.st_uid == os.getuid():
        os.chmod(path, 0o700)


def load_identity(state_dir: str) -> Identity:
    """The broker's identity from STATE/identity.key, created (0600, exclusively) if missing."""
    path = os.path.join(state_dir, IDENTITY_NAME)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.write(fd, os.urandom(32))
            os.fsync(fd)
        finally:
            os.close(fd)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_mode & 0o077:
            raise ConfigError(f"{path} is readable by others; chmod 600 it")
        seed = f.read(33)
    if len(seed) != 32:
        raise ConfigError(f"{path} is not a broker identity (expected 32 bytes); move it away to make a new one")
    return Identity(seed)


def _default_config() -> str | None:
    """DEFAULT_CONFIG if it exists; an error (not silence) if it may exist but cannot be seen."""
    try:
        os.stat(DEFAULT_CONFIG)
    except FileNotFoundError:
        return None
    except PermissionError:
        raise ConfigError(f"cannot read {DEFAULT_CONFIG}: permission denied (it holds no secrets: make it and "
                          "its directory readable by the broker's user, or pass --config)") from None
    return DEFAULT_CONFIG


def _write_ready(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
        f.write("\n")
    os.replace(tmp, path)


async def _run(config, identity: Identity, state_dir: str, ready_file: str | None, log_format: str) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            broker = await nursery.start(serve, config, identity, state_dir)
            address = format_address(broker.address)
            if log_format == "text":  # in JSON, the `listening` event says it (one JSON document a line)
                click.echo(f"broker {broker.peer_id} listening on {address}", err=True)
            if ready_file:
                _write_ready(ready_file, {"peer_id": broker.peer_id, "address": address, "pid": os.getpid()})
            async for signum in signals:
                event("shutdown", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--listen", metavar="HOST:PORT", help="UDP address to serve on (default 0.0.0.0:7451, or the config's)")
@click.option("--config", "config_path", metavar="FILE", type=click.Path(dir_okay=False),
              help=f"TOML settings (see broker.config); {DEFAULT_CONFIG} if it exists")
@click.option("--state-dir", default=DEFAULT_STATE_DIR, show_default=True, type=click.Path(file_okay=False),
              help="identity, LMDB state and lock")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--ready-file", metavar="PATH", type=click.Path(dir_okay=False),
              help='write {"peer_id", "address", "pid"} as JSON there once listening')
@click.option("-v", "--verbose", is_flag=True, help="debug logs")
def main(listen, config_path, state_dir, log_format, ready_file, verbose):
    """Run a bpfs broker: rendezvous, pairing mailboxes and relay for bpfs stores."""
    setup(log_format, verbose)
    try:
        config = load(config_path if config_path is not None else _default_config(), listen=listen)
        prepare_state_dir(state_dir)
        identity = load_identity(state_dir)
    except ConfigError as exc:
        _fail(str(exc), 2)
    except OSError as exc:
        _fail(f"{exc.filename or state_dir}: {exc.strerror}", 2)
    try:
        trio.run(_run, config, identity, state_dir, ready_file, log_format)
    except BrokerError as exc:
        _fail(str(exc), 1)
    except BaseExceptionGroup as group:
        matched, _ = group.split(BrokerError)
        if matched is None:
            raise
        _fail(str(matched.exceptions[0]), 1)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
