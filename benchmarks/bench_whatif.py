"""`kvprof whatif` replay speed: a million block events through one configuration, and
several configurations one after another against the same across all cores.

Builds the bundle as bench_analyze.py does (a demo recording tiled in time, fresh request
ids), then, in this process:

    python benchmarks/bench_whatif.py [--events 1000000] [--configs 8]

Goal (issue 7): one configuration of a million block events replays in seconds, and
configurations run in parallel across cores (the ratio printed last: serial / parallel).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_analyze import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--configs", type=int, default=8)
    args = ap.parse_args()
    from kvprof.analysis import whatif as W
    from kvprof.trace.reader import Bundle

    tmp = tempfile.mkdtemp()
    try:
        path = os.path.join(tmp, "big.kvprof")
        n = build(path, args.events)
        stream = Bundle(path).block_stream()
        info = W.pick_pool(stream, None)
        t0 = time.perf_counter()
        sched = W.extract(stream, info.index)
        t_extract = time.perf_counter() - t0
        rec = W.Config(sched.block_size, sched.num_blocks)
        t0 = time.perf_counter()
        W.replay(sched, rec)
        t_one = time.perf_counter() - t0
        sizes = [8, 16, 32, 64, 128, 256, 4, 2]
        configs = [W.Config(sizes[i % len(sizes)], max(sched.num_blocks * sched.block_size // sizes[i % len(sizes)], 2)) for i in range(args.configs)]
        t0 = time.perf_counter()
        W.replay_many(sched, configs, jobs=1)
        t_serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        W.replay_many(sched, configs, jobs=os.cpu_count())
        t_par = time.perf_counter() - t0
        print(f"block events: {n:,} in {len(sched.ops):,} schedule operations ({sched.requests:,} requests)")
        print(f"extract (once per bundle): {t_extract:.2f} s")
        print(f"one configuration (the recorded one): {t_one:.2f} s = {n / t_one / 1e6:.2f} M block events/s")
        print(f"{args.configs} configurations: serial {t_serial:.2f} s, parallel on {os.cpu_count()} cores {t_par:.2f} s: "
              f"speed-up {t_serial / t_par:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
