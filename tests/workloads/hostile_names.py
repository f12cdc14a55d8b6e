"""A workload whose names are hostile HTML: a leaking function with a <script> name and an
<img onerror> file name (tracemalloc and memray record both), a block pool and a request
named with a script tag, and a marker too.  The report must show them as text.

    python hostile_names.py '<script>...'   (the argument lands in the command line)
"""

import sys
import types

import kvprof
from kvprof.blocks import Pool

HOSTILE = '<script>alert("kvprof")</script>'
FILE = "<img src=x onerror=alert(2)>.py"
cache = []


def _leak():
    cache.append(bytearray(8192))


code = _leak.__code__.replace(co_name=HOSTILE, co_qualname=HOSTILE, co_filename=FILE)
leak = types.FunctionType(code, globals(), HOSTILE)

clock = [0]
pool = Pool(16, 4, name=HOSTILE, engine="kvprof-test", clock=lambda: clock[0])
pool.request_arrived(HOSTILE, 6)
pool.prefix_query(HOSTILE, 6, 0)
pool.alloc([0, 1], request=HOSTILE)
pool.request_state(HOSTILE, 6, 2)
kvprof.mark(HOSTILE)
for i in range(40):
    clock[0] += 1_000_000
    leak()
    kvprof.mark("step", i)
pool.free([1, 0], request=HOSTILE)
pool.request_finished(HOSTILE)
print("done", len(sys.argv))
