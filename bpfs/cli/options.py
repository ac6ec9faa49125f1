"""What the `bpfs` commands share: the store argument, --json, --passphrase-file, printing a
result, and reaching a store's daemon or running the partner service in this process.

Declared once here (as s3ql's `parse_args.py` does) so that every command spells and documents
them alike: a store is given as the first argument or with `--store`, and defaults to
$BPFS_STORE, then to ~/.local/share/bpfs/store.
"""

from __future__ import annotations

import functools
import json
import os

import click

from .. import keyfile
from ..errors import BpfsError
from ..passphrase import read_passphrase
from ..store import default_store_path, is_locked, key_path, read_daemon_info, require_store

STORE_HELP = "store folder (default: $BPFS_STORE, else ~/.local/share/bpfs/store)"


def resolve_store(positional: str | None, option: str | None = None, *, existing: bool = True) -> str:
    """The store folder from the first argument or --store (not both, unless they agree), else
    the default; with `existing`, it must hold a store."""
    if positional and option and os.path.abspath(positional) != os.path.abspath(option):
        raise click.UsageError(f"two stores given: {positional} and --store {option}")
    path = os.path.abspath(positional or option or default_store_path())
    return require_store(path) if existing else path


def store_option(f):
    """`--store STORE` (as `store_opt`), for commands whose positional arguments are more than the store."""
    return click.option("--store", "store_opt", default=None, metavar="STORE", help=STORE_HELP)(f)


def store_argument(existing: bool = True):
    """`[STORE]` or `--store STORE`: the command gets `store`, an absolute path (with `existing`,
    one that holds a store)."""

    def decorate(f):
        @functools.wraps(f)
        def command(*args, store=None, store_opt=None, **kwargs):
            return f(*args, store=resolve_store(store, store_opt, existing=existing), **kwargs)

        return click.argument("store", required=False)(store_option(command))

    return decorate


def json_option(what: str = "print the result as JSON"):
    return click.option("--json", "as_json", is_flag=True, help=what)


def passphrase_option(when: str = ""):
    return click.option("--passphrase-file", type=click.Path(dir_okay=False),
                        help="read the passphrase from this file" + (f" ({when})" if when else ""))


def emit(as_json: bool, doc, text: str) -> None:
    """Print `doc` as JSON or `text` for a person."""
    click.echo(json.dumps(doc) if as_json else text)


def unlock(store: str, passphrase_file: str | None):
    """The store's keys, unlocked with the passphrase (from the file, $BPFS_PASSPHRASE or a prompt)."""
    return keyfile.unlock(key_path(store), read_passphrase(passphrase_file))


def daemon_socket(store: str) -> str | None:
    """The control socket of the store's running daemon, if one runs."""
    if not is_locked(store):
        return None
    info = read_daemon_info(store) or {}
    path = info.get("control")
    if not path:
        raise BpfsError(f"store {store} is in use by a process that cannot be asked (bpfs recover or verify?)",
                        exit_code=3)
    return path


def in_process(store: str, passphrase_file: str | None, fn, brokers=None):
    """Run `await fn(service)` with a partner service of this process on the unlocked store (when
    no daemon runs)."""
    from ..runtime import run_with_partners

    return run_with_partners(store, unlock(store, passphrase_file), fn, brokers=brokers)
