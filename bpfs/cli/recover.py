"""`bpfs recover`: rebuild a store from its partners after the drive is lost (the work is
`peering.recovery`; this is its command line)."""

from __future__ import annotations

import click

from .app import cli
from .options import emit, json_option, passphrase_option, resolve_store, store_option


@cli.command()
@click.argument("store", required=False)
@click.option("--from", "froms", multiple=True, metavar="HOST:PORT",
              help="a partner's address (repeat for several); partners are also found through the broker and "
                   "the recovered snapshot's partner list")
@click.option("--expect", metavar="PEER_ID", help="the peer id of the one --from partner (checked on connecting)")
@click.option("--at", "at", metavar="SNAPSHOT",
              help="recover this snapshot: a generation, or a name as .snapshots/ shows it "
                   "(2026-12-07T08-05-23Z, or ...Z-gGENERATION); default: the newest")
@click.option("--list", "list_only", is_flag=True,
              help="show the snapshots each partner can serve, and write nothing (a recovery drill)")
@click.option("--broker", "brokers", multiple=True, metavar="HOST[:PORT]",
              help="broker(s) to find partners through, tried in order (default: $BPFS_BROKER, else the "
                   "public one)")
@click.option("--kdf", default="moderate", show_default=True,
              type=click.Choice(["interactive", "moderate", "sensitive"]), help="for the new store's key file")
@json_option()
@passphrase_option("the new store's passphrase")
@store_option
def recover(store, froms, expect, at, list_only, brokers, kdf, as_json, passphrase_file, store_opt):
    """Rebuild STORE from its partners (recovery secret from $BPFS_RECOVERY or a prompt).

    Partners are reached at the --from addresses, through the broker (recovery beacons: no address
    needed) and, once a snapshot is open, through its partner list. The newest snapshot any of them
    holds is recovered (or the one --at names), with its history, fetching packs from all of them at
    once. Interrupted, it continues where it stopped when run again."""
    from ..daemon import tune_runtime
    from ..peering.recovery import Console, list_snapshots, listing_lines, recover as do_recover, unrestored_error

    console = Console(quiet=as_json)
    if list_only:
        res = list_snapshots(froms, expect, brokers, console=console)
        emit(as_json, res, "\n".join(listing_lines(res)))
        return
    if not (store or store_opt):
        raise click.UsageError("missing the STORE to recover into (or --list)")
    store = resolve_store(store, store_opt, existing=False)
    tune_runtime()  # it moves every pack: the daemon's malloc and GIL settings
    res = do_recover(store, froms, expect, kdf, passphrase_file, at=at, brokers=brokers, console=console)
    emit(as_json, res, res["summary"] + f"\nMount it with: bpfs mount {store} MOUNTPOINT")
    err = unrestored_error(res)
    if err is not None:
        if not as_json:
            n = len(res["unrestored"])
            click.echo(f"could not restore {n} file{'s' if n != 1 else ''}:", err=True)
            for path in res["unrestored"]:
                click.echo(f"  {path}", err=True)
        raise err
