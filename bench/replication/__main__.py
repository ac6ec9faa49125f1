"""Entry point: ``python -m bench.replication [--quick] [--runs N] [--gib X] ...``."""

import sys

from bench.replication.cli import main

if __name__ == "__main__":
    sys.exit(main())
