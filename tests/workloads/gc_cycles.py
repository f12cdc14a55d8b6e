"""Make cyclic garbage and report what gc.get_stats() counted over the same span.

    python gc_cycles.py OUT.json [ROUNDS [MIN_SECONDS]]

It runs at least ROUNDS rounds and, when MIN_SECONDS is given, keeps going until that
much time has passed (a sampling test needs time, whatever the machine's speed).

The span is cut by markers "gc-begin" / "gc-end"; automatic collections are held
off while the markers and the stats are taken, so both sides see one span.
"""

import gc
import json
import sys
import time

import kvprof

rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 200
min_seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0


class Node:
    def __init__(self):
        self.other = None
        self.payload = [0] * 20


def stats():
    return [dict(s) for s in gc.get_stats()]


gc.disable()
kvprof.mark("gc-begin")
before = stats()
gc.enable()
t0 = time.perf_counter()
i = 0
while i < rounds or time.perf_counter() - t0 < min_seconds:
    for _ in range(500):
        a, b = Node(), Node()
        a.other, b.other = b, a  # a reference cycle: only the collector frees it
    if i % 50 == 0:
        gc.collect()  # some full collections too
    kvprof.mark("round", i)
    i += 1
gc.disable()
after = stats()
kvprof.mark("gc-end")
gc.enable()
delta = [{k: a[k] - b[k] for k in ("collections", "collected", "uncollectable")} for a, b in zip(after, before)]
with open(sys.argv[1], "w") as f:
    json.dump(delta, f)
