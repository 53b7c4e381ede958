"""`python -m attnres_compile ...` runs the `attnres` command line (see attnres_compile/cli/__init__.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
