"""`python -m bpfs` runs the command line."""

from .cli import main

main()
