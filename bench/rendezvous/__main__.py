"""Entry point: ``python -m bench.rendezvous [--quick] [--runs N] [--only NAME,...] ...``."""

import sys

from bench.rendezvous.cli import main

if __name__ == "__main__":
    sys.exit(main())
