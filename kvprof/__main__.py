"""``python -m kvprof ...``: the kvprof command (as ``kvprof ...``)."""

import sys

from kvprof.commands import main

if __name__ == "__main__":
    sys.exit(main())
