"""Commands that run or stop a store's daemon: `bpfs mount`, `umount`, `serve` and `stop`
(the daemon itself is `bpfs.daemon`)."""

from __future__ import annotations

import os
import sys

import click

from ..config import DEFAULT_LISTEN, format_address, load_config, parse_address, parse_brokers
from ..errors import BpfsError
from ..keyfile import KDF_PROFILES
from ..store import key_path
from .app import cli
from .options import passphrase_option, resolve_store, store_argument, store_option, unlock


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
                 "relatime", "nosuid", "nodev", "noexec", "suid", "dev", "exec", "snapdir", "fsname", "subtype",
                 "nonempty"}
NAMING_OPTIONS = ("fsname", "subtype")  # what mount tables show (source, type fuse.SUBTYPE): the daemon's defaults


@cli.command()
@click.argument("args", nargs=-1, metavar="[STORE] MOUNTPOINT")
@store_option
@click.option("-f", "--foreground", is_flag=True, help="stay in the foreground (logs to stderr)")
@click.option("-o", "options", multiple=True, metavar="OPTIONS",
              help="comma-separated: keyfile=PATH, listen=HOST:PORT, broker=HOST[:PORT], allow_other, ro, debug, "
                   "nonempty (mount over a folder that is not empty, hiding what is in it), "
                   "snapdir=visible (list .snapshots in the root folder; by default it is reached by name only), "
                   "fsname=NAME, subtype=TYPE (what mount tables show; default: the store, bpfs)")
@passphrase_option()
@click.option("--listen", default=None, metavar="HOST:PORT",
              help=f"UDP address to serve partners on (default from bpfs.toml, else {DEFAULT_LISTEN}; 'none': do not listen)")
@click.option("--broker", "brokers", multiple=True, metavar="HOST[:PORT]",
              help="rendezvous broker(s), tried in order (default from bpfs.toml; 'none': no broker)")
@click.option("--init", "create", is_flag=True,
              help="create the store first if STORE holds none, as `bpfs init` does (the new passphrase is "
                   "asked once and confirmed, and used for the mount too)")
@click.option("--kdf", type=click.Choice(sorted(KDF_PROFILES)), default=None,
              help="with --init: the Argon2id cost of unlocking the new store, as `bpfs init --kdf` "
                   "[default: moderate]")
def mount(args, store_opt, foreground, options, passphrase_file, listen, brokers, create, kdf):
    """Mount STORE at MOUNTPOINT; returns once the mount is usable."""
    from ..daemon import mount as do_mount

    if len(args) == 1:
        store, mountpoint = None, args[0]
    elif len(args) == 2:
        store, mountpoint = args
    else:
        raise click.UsageError("expected [STORE] MOUNTPOINT")
    if kdf is not None and not create:
        raise BpfsError("--kdf chooses the cost of a new store: it needs --init", exit_code=2)
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
    new_store = create and not os.path.exists(key_path(resolve_store(store, store_opt, existing=False)))
    store = resolve_store(store, store_opt, existing=not new_store)
    from ..daemon import check_fuse_spin, check_mountpoint

    check_mountpoint(mountpoint, nonempty="nonempty" in opts)  # before the passphrase is asked for
    check_fuse_spin()
    opts.pop("nonempty", None)
    if new_store:
        from .store import create_new_store

        keys = create_new_store(store, opts.pop("keyfile", None) or passphrase_file, kdf or "moderate")
    else:
        keys = unlock(store, opts.pop("keyfile", None) or passphrase_file)
    debug = "debug" in opts
    fuse_opts = {k for k in opts if k in ("allow_other", "allow_root", "ro", "nosuid", "nodev", "noexec")}
    fuse_opts |= naming
    if snapdir == "visible":
        from ..daemon import SNAPDIR_VISIBLE

        fuse_opts.add(SNAPDIR_VISIBLE)
    listen_at, explicit = _listen_address(store, listen)
    sys.exit(do_mount(store, mountpoint, keys, fuse_opts, foreground, debug, listen_at, explicit))


@cli.command()
@click.argument("mountpoint")
@click.option("--timeout", type=float, default=None, help="give up waiting for the daemon after this many seconds")
def umount(mountpoint, timeout):
    """Flush and unmount MOUNTPOINT; returns after the daemon has exited cleanly."""
    from ..daemon import umount as do_umount

    sys.exit(do_umount(mountpoint, timeout))


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
@store_argument()
@click.option("--listen", default=None, metavar="HOST:PORT",
              help=f"UDP address to serve partners on (default from bpfs.toml, else {DEFAULT_LISTEN})")
@click.option("-f", "--foreground", is_flag=True, help="stay in the foreground (logs to stderr)")
@passphrase_option()
@click.option("--debug", is_flag=True, help="log debug messages")
@click.option("--broker", "brokers", multiple=True, metavar="HOST[:PORT]",
              help="rendezvous broker(s), tried in order (default from bpfs.toml; 'none': no broker)")
def serve(store, listen, foreground, passphrase_file, debug, brokers):
    """Serve partners and replicate STORE without mounting it (a storage box)."""
    from ..daemon import serve as do_serve

    _use_brokers(brokers)
    keys = unlock(store, passphrase_file)
    listen_at, explicit = _listen_address(store, listen)
    if listen_at is None:
        raise BpfsError("bpfs serve needs an address to listen on", exit_code=2)
    sys.exit(do_serve(store, keys, listen_at, explicit, foreground, debug))


@cli.command()
@store_argument()
@click.option("--timeout", type=float, default=None, help="give up waiting after this many seconds")
def stop(store, timeout):
    """Stop the daemon of STORE (unmounts a mount); returns once it has exited."""
    from ..daemon import stop as do_stop

    sys.exit(do_stop(store, timeout))
