"""The recording writer against format 1's, side by side: events per second in the
recorded process, whole cost (the calling thread and the writer thread, to the last
byte on disk), and bytes on disk.

    python benchmarks/bench_writer.py [--events 1000000]

The event mix is the demo's: four in five are per-step request states (no block ids),
the rest allocations and frees of 1 to 3 blocks.  Each writer runs in a process of its
own; its process CPU time counts both threads.  Format 1 kept events in memory for up to
half a second (lost to SIGKILL or os._exit); format 2 has each one in a shared mapping
before the call returns (docs/trace-format.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {here!r})
which, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
import kvprof.runtime as rt
if which == "legacy":
    import legacy_writer as W
else:
    from kvprof.trace import writer as W
w = W.ProcessWriter(out, "main", ["blocks"])
strings = w._strings
rid = w.intern("r17")
ids = [[5], [6, 7], [8, 9, 10]]
t0 = time.perf_counter()
c0 = time.process_time()
if which == "legacy":
    app = w.blocks.append
    for i in range(n):
        if i % 5:
            app((i, 12, 0, rid, i, 4, ()))
        else:
            app((i, 1, 0, rid, 0, 0, ids[i % 3]))
        if len(w.blocks) > 65536:
            w.flush()
else:
    from kvprof.trace.stage import PACK_N
    packs = [s.pack for s in PACK_N]
    for i in range(n):
        # the inlined path of kvprof.blocks.Pool._emit
        b = () if i % 5 else ids[i % 3]
        k = 12 if i % 5 else 1
        data = packs[len(b)](i, k, 0, rid, i if k == 12 else 0, 4 if k == 12 else 0, len(b), *b, 1)
        try:
            w.write(data)
        except ValueError:
            w._rotate_and_write(data)
t1 = time.perf_counter()
w.close()
t2 = time.perf_counter()
c2 = time.process_time()
size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs if not f.endswith(".json"))
print(json.dumps({{"call_ns": (t1 - t0) / n * 1e9, "wall_ns": (t2 - t0) / n * 1e9, "cpu_ns": (c2 - c0) / n * 1e9, "bytes": size / n}}))
"""


def run(which: str, n: int) -> dict:
    out = tempfile.mkdtemp(prefix=f"kvprof-bw-{which}-")
    r = subprocess.run(
        [sys.executable, "-c", CHILD.format(here=HERE), which, str(n), out], capture_output=True, text=True, check=True
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    res = {}
    for which in ("legacy", "mmap"):
        runs = [run(which, args.events) for _ in range(args.repeat)]
        res[which] = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
    old, new = res["legacy"], res["mmap"]
    print(f"{args.events:,} events, median of {args.repeat} runs, each writer in a process of its own")
    print(f"{'':<34}{'format 1 (deque)':>18}{'format 2 (mmap)':>18}{'ratio':>8}")
    for key, label in (
        ("call_ns", "in the calling thread, ns/event"),
        ("wall_ns", "until all on disk, ns/event"),
        ("cpu_ns", "CPU of both threads, ns/event"),
        ("bytes", "bytes on disk per event"),
    ):
        print(f"{label:<34}{old[key]:>18.1f}{new[key]:>18.1f}{new[key] / old[key]:>7.2f}x")


if __name__ == "__main__":
    main()
