"""`python -m fusedopt.bench`: see cli.py (or ``--help``)."""

import sys

from fusedopt.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
