"""The `bpfs` command group, and `main`: running a command and turning errors into one line and
an exit code."""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import BpfsError, first_error


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bpfs")
def cli():
    """bpfs: an encrypted, deduplicating backup filesystem that replicates to partners."""


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
