"""`python -m broker`: the same as the `bpfs-broker` command (see `broker.cli`)."""

from .cli import main

main(prog_name="bpfs-broker")
