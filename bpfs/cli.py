"""The `bpfs` command line: parses arguments, reports results, and maps errors to exit codes.

Commands about one store take it positionally (init, mount, verify); others take --store.
Both default to $BPFS_STORE, then to ~/.local/share/bpfs/store. Errors are one line on
stderr and a non-zero exit code.
"""

from __future__ import annotations

import json
import os
import sys

import click

from . import __version__, keyfile
from .errors import BpfsError, first_error
from .passphrase import read_passphrase
from .config import DEFAULT_LISTEN, format_address, load_config, parse_address, parse_brokers
from .store import create_store, default_store_path, key_path, require_store

STORE_HELP = "store folder (default: $BPFS_STORE, else ~/.local/share/bpfs/store)"


def _store_arg(value: str | None) -> str:
    return os.path.abspath(value or default_store_path())


def _emit(as_json: bool, doc: dict, text: str) -> None:
    click.echo(json.dumps(doc) if as_json else text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bpfs")
def cli():
    """bpfs: an encrypted, deduplicating backup filesystem that replicates to partners."""


@cli.command()
@click.argument("store", required=False)
@click.option("--passphrase-file", type=click.Path(dir_okay=False), help="read the passphrase from this file")
@click.option("--kdf", type=click.Choice(sorted(keyfile.KDF_PROFILES)), default="moderate", show_default=True,
              help="Argon2id cost of unlocking (interactive is faster and weaker)")
@click.option("--json", "as_json", is_flag=True, help="print {peer_id, recovery_secret} as JSON")
def init(store, passphrase_file, kdf, as_json):
    """Create a new store in STORE (an empty or missing folder)."""
    store = _store_arg(store)
    if os.path.exists(key_path(store)):
        raise BpfsError(f"{store} already holds a bpfs store", exit_code=2)
    passphrase = read_passphrase(passphrase_file, confirm=True)
    keys = create_store(store, passphrase, kdf)
    doc = {"peer_id": keys.identity.peer_id, "recovery_secret": keys.recovery_secret, "store": store}
    _emit(as_json, doc,
          f"Created store {store}\n"
          f"Peer id:         {doc['peer_id']}\n"
          f"Recovery secret: {doc['recovery_secret']}\n"
          "Write the recovery secret down and keep it away from this drive: with it and one partner\n"
          "you can rebuild everything. It is shown only now.")


def _parse_options(values: tuple[str, ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if item:
                key, eq, val = item.partition("=")
                out[key] = val if eq else None
    return out


MOUNT_OPTIONS = {"listen", "broker", "allow_other", "allow_root", "ro", "rw", "debug", "keyfile", "default_permissions", "noatime",
                 "relatime", "nosuid", "nodev", "noexec", "suid", "dev", "exec", "snapdir", "fsname", "subtype"}
NAMING_OPTIONS = ("fsname", "subtype")  # what mount tables show (source, type fuse.SUBTYPE): the daemon's defaults


@cli.command()
@click.argument("args", nargs=-1, metavar="[STORE] MOUNTPOINT")
@click.option("-f", "--foreground", is_flag=True, help="stay in the foreground (logs to stderr)")
@click.option("-o", "options", multiple=True, metavar="OPTIONS",
              help="comma-separated: keyfile=PATH, listen=HOST:PORT, broker=HOST[:PORT], allow_other, ro, debug, "
                   "snapdir=visible (list .snapshots in the root folder; by default it is reached by name only), "
                   "fsname=NAME, subtype=TYPE (what mount tables show; default: the store, bpfs)")
@click.option("--passphrase-file", type=click.Path(dir_okay=False), help="read the passphrase from this file")
@click.option("--listen", default=None, metavar="HOST:PORT",
              help=f"UDP address to serve partners on (default from bpfs.toml, else {DEFAULT_LISTEN}; 'none': do not listen)")
@click.option("--broker", "brokers", multiple=True, metavar="HOST[:PORT]",
              help="rendezvous broker(s), tried in order (default from bpfs.toml; 'none': no broker)")
def mount(args, foreground, options, passphrase_file, listen, brokers):
    """Mount STORE at MOUNTPOINT; returns once the mount is usable."""
    from .daemon import mount as do_mount

    if len(args) == 1:
        store, mountpoint = _store_arg(None), args[0]
    elif len(args) == 2:
        store, mountpoint = _store_arg(args[0]), args[1]
    else:
        raise click.UsageError("expected [STORE] MOUNTPOINT")
    opts = _parse_options(options)
    listen = listen or opts.pop("listen", None)
    _use_brokers(brokers or ([opts.pop("broker")] if opts.get("broker") else []))
    opts.pop("broker", None)
    unknown = sorted(set(opts) - MOUNT_OPTIONS)
    if unknown:
        raise BpfsError(f"unknown mount option: {unknown[0]}", exit_code=2)
    snapdir = opts.pop("snapdir", "hidden")
    if snapdir not in ("hidden", "visible"):
        raise BpfsError(f"snapdir must be hidden or visible, not {snapdir}", exit_code=2)
    naming = set()
    for k in NAMING_OPTIONS:
        if k in opts:
            value = opts.pop(k)
            if not value:
                raise BpfsError(f"{k}= needs a value", exit_code=2)
            naming.add(f"{k}={value}")
    store = require_store(store)
    keyfile_path = opts.pop("keyfile", None) or passphrase_file
    keys = keyfile.unlock(key_path(store), read_passphrase(keyfile_path))
    debug = "debug" in opts
    fuse_opts = {k for k in opts if k in ("allow_other", "allow_root", "ro", "nosuid", "nodev", "noexec")}
    fuse_opts |= naming
    if snapdir == "visible":
        from .daemon import SNAPDIR_VISIBLE

        fuse_opts.add(SNAPDIR_VISIBLE)
    listen_at, explicit = _listen_address(store, listen)
    sys.exit(do_mount(store, mountpoint, keys, fuse_opts, foreground, debug, listen_at, explicit))


@cli.command()
@click.argument("mountpoint")
@click.option("--timeout", type=float, default=None, help="give up waiting for the daemon after this many seconds")
def umount(mountpoint, timeout):
    """Flush and unmount MOUNTPOINT; returns after the daemon has exited cleanly."""
    from .daemon import umount as do_umount

    sys.exit(do_umount(mountpoint, timeout))


@cli.command()
@click.argument("store", required=False)
@click.option("--read-data", is_flag=True, help="also read and authenticate every stored chunk")
@click.option("--passphrase-file", type=click.Path(dir_okay=False), help="read the passphrase from this file")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def verify(store, read_data, passphrase_file, as_json):
    """Check the index of STORE (and with --read-data every chunk); exit 1 if anything is damaged."""
    from .verify import verify_store

    store = require_store(_store_arg(store))
    keys = keyfile.unlock(key_path(store), read_passphrase(passphrase_file))
    report = verify_store(store, keys, read_data)
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        for line in report.lines():
            click.echo(line)
    sys.exit(0 if report.ok else 1)


def _use_brokers(brokers) -> None:
    """--broker: checked here, then handed to the daemon (and its config loading) as BPFS_BROKER."""
    if brokers:
        parse_brokers(brokers)
        os.environ["BPFS_BROKER"] = ",".join(b.strip() for b in brokers)


def _listen_address(store: str, listen: str | None) -> tuple[str | None, bool]:
    """(address or None for not listening, whether the user chose it explicitly)."""
    if listen is None:
        listen = os.environ.get("BPFS_LISTEN")
    if listen is None:
        return load_config(store).listen, False
    if listen.lower() == "none":
        return None, True
    return format_address(parse_address(listen)), True


@cli.command()
@click.argument("store", required=False)
@click.option("--listen", default=None, metavar="HOST:PORT",
              help=f"UDP address to serve partners on (default from bpfs.toml, else {DEFAULT_LISTEN})")
@click.option("-f", "--foreground", is_flag=True, help="stay in the foreground (logs to stderr)")
@click.option("--passphrase-file", type=click.Path(dir_okay=False), help="read the passphrase from this file")
@click.option("--debug", is_flag=True, help="log debug messages")
@click.option("--broker", "brokers", multiple=True, metavar="HOST[:PORT]",
              help="rendezvous broker(s), tried in order (default from bpfs.toml; 'none': no broker)")
def serve(store, listen, foreground, passphrase_file, debug, brokers):
    """Serve partners and replicate STORE without mounting it (a storage box)."""
    from .daemon import serve as do_serve

    _use_brokers(brokers)
    store = require_store(_store_arg(store))
    keys = keyfile.unlock(key_path(store), read_passphrase(passphrase_file))
    listen_at, explicit = _listen_address(store, listen)
    if listen_at is None:
        raise BpfsError("bpfs serve needs an address to listen on", exit_code=2)
    sys.exit(do_serve(store, keys, listen_at, explicit, foreground, debug))


@cli.command()
@click.argument("store", required=False)
@click.option("--timeout", type=float, default=None, help="give up waiting after this many seconds")
def stop(store, timeout):
    """Stop the daemon of STORE (unmounts a mount); returns once it has exited."""
    from .daemon import stop as do_stop

    sys.exit(do_stop(_store_arg(store), timeout))


@cli.command("id")
@click.argument("store", required=False)
@click.option("--store", "store_opt", default=None, help=STORE_HELP)
@click.option("--json", "as_json", is_flag=True, help="print {peer_id, addresses[, broker, observed]} as JSON")
def show_id(store, store_opt, as_json):
    """Print this store's peer id (and, with a daemon running, the addresses it listens on)."""
    from .store import is_locked, read_daemon_info

    store = require_store(_store_arg(store or store_opt))
    doc = keyfile.read_public(key_path(store))
    info = (read_daemon_info(store) or {}) if is_locked(store) else {}
    addresses = info.get("addresses") or []
    out = {"peer_id": doc["peer_id"], "addresses": addresses}
    if info.get("control"):  # the running daemon knows its broker and how the broker sees it
        from .peering import control

        try:
            live = control.call(info["control"], "id")
            out.update(broker=live.get("broker"), observed=live.get("observed"))
        except BpfsError:
            pass
    text = doc["peer_id"] + "".join(f"\n  listening on {a}" for a in addresses)
    if out.get("broker"):
        text += f"\n  broker {out['broker']}" + (f" sees us at {out['observed']}" if out.get("observed") else "")
    _emit(as_json, out, text)


@cli.command()
@click.argument("store", required=False)
@click.option("--store", "store_opt", default=None, help=STORE_HELP)
@click.option("--passphrase-file", type=click.Path(dir_okay=False),
              help="read the passphrase from this file (needed only without a running daemon)")
@click.option("--json", "as_json", is_flag=True,
              help="print [{name, generation, created, files, bytes, partners}] as JSON")
def snapshots(store, store_opt, passphrase_file, as_json):
    """List the retained snapshots, oldest first: name (in .snapshots/), time, files, bytes and
    the partners holding each."""
    from .peering.commands import _daemon

    store = require_store(_store_arg(store or store_opt))
    try:
        sock = _daemon(store)
    except BpfsError:  # a daemon that cannot be asked (a read-only mount): the index is readable
        sock = None
    if sock:
        from .peering import control
        from .history import unique_names

        rows = control.call(sock, "snapshots")
        names = unique_names((r["generation"], r["name"]) for r in rows)
        rows = [dict(r, name=names[r["generation"]]) for r in sorted(rows, key=lambda r: r["generation"])]
    else:
        rows = _offline_snapshots(store, keyfile.unlock(key_path(store), read_passphrase(passphrase_file)))
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo("no snapshots yet: one is made by `bpfs sync`, and automatically every few minutes while "
                   "data changes (with partners)")
        return
    import time

    from .config import format_size

    for r in rows:
        held = ", ".join(r["partners"]) if r["partners"] else "no partner yet"
        click.echo(f"{r['name']}  generation {r['generation']}  "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(r['created']))}  "
                   f"{r['files']} files  {format_size(r['bytes'])}  held by: {held}")


def _offline_snapshots(store: str, keys) -> list[dict]:
    """The rows of `bpfs snapshots`, read from the index (read-only) and the partner ledger."""
    from . import snapshot
    from .index import Index
    from .peering import protocol
    from .peering.ledger import Ledger
    from .history import snapshot_names

    index = Index(os.path.join(store, "index"), keys, readonly=True)
    try:
        manifests = [snapshot.open_manifest(keys, blob) for _, blob in snapshot.retained_roots(index)]
    finally:
        index.close()
    held: dict[str, set[int]] = {}
    if os.path.isdir(os.path.join(store, "partners")):
        ledger = Ledger(store)
        try:
            held = {p.peer_id: ledger.sent(p.peer_id, protocol.ROOT) for p in ledger.partners() if p.active}
        finally:
            ledger.close()
    names = snapshot_names((m.generation, m.created_ns) for m in manifests)
    return [{"name": names[m.generation], "generation": m.generation, "created": m.created_ns / 1e9,
             "files": m.files, "bytes": m.file_bytes,
             "partners": sorted(peer for peer, gens in held.items() if m.generation in gens)}
            for m in sorted(manifests, key=lambda m: m.generation)]


from .peering.commands import register as _register_peering  # noqa: E402

_register_peering(cli, _store_arg, _emit)


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="bpfs", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("bpfs: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except BpfsError as e:
        click.echo(f"bpfs: {e}", err=True)
        sys.exit(e.exit_code)
    except BaseExceptionGroup as eg:  # from inside a trio nursery: report the error it carries
        err = first_error(eg)
        if isinstance(err, (BpfsError, OSError)) and not isinstance(err, BaseExceptionGroup):
            click.echo(f"bpfs: {err}", err=True)
            sys.exit(getattr(err, "exit_code", 1))
        raise
    except KeyboardInterrupt:
        click.echo("bpfs: interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        click.echo(f"bpfs: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""), err=True)
        sys.exit(1)
