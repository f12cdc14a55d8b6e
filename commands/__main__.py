import sys

from kvprof.commands import main

sys.exit(main())
