"""``python -m asyncpool.cli``: the same as the `asyncpool` command."""

import sys

from asyncpool.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
