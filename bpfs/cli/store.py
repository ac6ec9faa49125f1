"""Commands about the store itself: `bpfs init`, `verify`, `id` and `snapshots`."""

from __future__ import annotations

import os
import sys
import time

import click

from .. import keyfile
from ..config import CONFIG_NAME, default_config_text, format_size
from ..errors import BpfsError
from ..fsutil import write_private_file
from ..passphrase import read_passphrase
from ..store import create_store, is_locked, key_path, read_daemon_info
from .app import cli
from .options import daemon_socket, emit, json_option, passphrase_option, store_argument, unlock


@cli.command()
@store_argument(existing=False)
@passphrase_option()
@click.option("--kdf", type=click.Choice(sorted(keyfile.KDF_PROFILES)), default="moderate", show_default=True,
              help="Argon2id cost of unlocking (interactive is faster and weaker)")
@json_option("print {peer_id, recovery_secret} as JSON")
def init(store, passphrase_file, kdf, as_json):
    """Create a new store in STORE (an empty or missing folder)."""
    create_new_store(store, passphrase_file, kdf, as_json)


def create_new_store(store: str, passphrase_file: str | None, kdf: str, as_json: bool = False) -> keyfile.KeyRing:
    """`bpfs init` (and `bpfs mount --init`): ask for a new passphrase once and confirm it, create
    the store, print its peer id and recovery secret; return its keys."""
    if os.path.exists(key_path(store)):
        raise BpfsError(f"{store} already holds a bpfs store", exit_code=2)
    passphrase = read_passphrase(passphrase_file, confirm=True)
    keys = create_store(store, passphrase, kdf)
    write_private_file(os.path.join(store, CONFIG_NAME), default_config_text().encode())
    doc = {"peer_id": keys.identity.peer_id, "recovery_secret": keys.recovery_secret, "store": store}
    emit(as_json, doc,
         f"Created store {store}\n"
         f"Peer id:         {doc['peer_id']}\n"
         f"Recovery secret: {doc['recovery_secret']}\n"
         "Write the recovery secret down and keep it away from this drive: with it and one partner\n"
         "you can rebuild everything. It is shown only now.")
    return keys


@cli.command()
@store_argument()
@click.option("--read-data", is_flag=True, help="also read and authenticate every stored chunk")
@passphrase_option()
@json_option("print the report as JSON")
def verify(store, read_data, passphrase_file, as_json):
    """Check the index of STORE (and with --read-data every chunk); exit 1 if anything is damaged."""
    from ..verify import verify_store

    report = verify_store(store, unlock(store, passphrase_file), read_data)
    emit(as_json, report.as_dict(), "\n".join(report.lines()))
    sys.exit(0 if report.ok else 1)


@cli.command("id")
@store_argument()
@json_option("print {peer_id, addresses[, broker, observed]} as JSON")
def show_id(store, as_json):
    """Print this store's peer id (and, with a daemon running, the addresses it listens on)."""
    doc = keyfile.read_public(key_path(store))
    info = (read_daemon_info(store) or {}) if is_locked(store) else {}
    addresses = info.get("addresses") or []
    out = {"peer_id": doc["peer_id"], "addresses": addresses}
    if info.get("control"):  # the running daemon knows its broker and how the broker sees it
        from ..peering import control

        try:
            live = control.call(info["control"], "id")
            out.update(broker=live.get("broker"), observed=live.get("observed"))
        except BpfsError:
            pass
    text = doc["peer_id"] + "".join(f"\n  listening on {a}" for a in addresses)
    if out.get("broker"):
        text += f"\n  broker {out['broker']}" + (f" sees us at {out['observed']}" if out.get("observed") else "")
    emit(as_json, out, text)


@cli.command()
@store_argument()
@passphrase_option("needed only without a running daemon")
@json_option("print [{name, generation, created, files, bytes, partners}] as JSON")
def snapshots(store, passphrase_file, as_json):
    """List the retained snapshots, oldest first: name (in .snapshots/), time, files, bytes and
    the partners holding each."""
    from ..history import unique_names
    from ..peering import control
    from ..peering.offline import offline_snapshots

    try:
        sock = daemon_socket(store)
    except BpfsError:  # a daemon that cannot be asked (a read-only mount): the index is readable
        sock = None
    if sock:
        rows = control.call(sock, "snapshots")
        names = unique_names((r["generation"], r["name"]) for r in rows)
        rows = [dict(r, name=names[r["generation"]]) for r in sorted(rows, key=lambda r: r["generation"])]
    else:
        rows = offline_snapshots(store, unlock(store, passphrase_file))
    if as_json:
        emit(True, rows, "")
        return
    if not rows:
        click.echo("no snapshots yet: one is made by `bpfs sync`, and automatically every few minutes while "
                   "data changes (with partners)")
        return
    for r in rows:
        held = ", ".join(r["partners"]) if r["partners"] else "no partner yet"
        click.echo(f"{r['name']}  generation {r['generation']}  "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(r['created']))}  "
                   f"{r['files']} files  {format_size(r['bytes'])}  held by: {held}")
