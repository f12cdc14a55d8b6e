"""Overhead of the vLLM block probe on a tight loop over vLLM's real BlockPool.

Run with the Python of a vLLM environment (`make bench-vllm`):

    .venv-vllm/bin/python benchmarks/bench_vllm_blockpool.py [--iters 20000]

Side by side in one process: the bare loop, the loop with kvprof's hooks
recording into a bundle, under tracemalloc, and under memray's Tracker (when
installed). Prints best-of-N times and ratios to the bare loop.
Goal (issue 2): kvprof at most 1.3x the bare loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def loop(pool, iters: int) -> None:
    for _ in range(iters):
        blocks = pool.get_new_blocks(8)
        pool.touch(blocks[:4])  # a second request sharing the first four blocks
        pool.free_blocks(reversed(blocks[:4]))
        pool.free_blocks(reversed(blocks))


def best(fn, repeat=5) -> float:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20000)
    a = ap.parse_args()
    from vllm.v1.core.block_pool import BlockPool

    def fresh():
        return BlockPool(num_gpu_blocks=1024, enable_caching=True, hash_block_size=16)

    rows = []
    bare = best(lambda: loop(fresh(), a.iters))
    rows.append(("bare", bare))

    import tracemalloc

    tracemalloc.start()
    rows.append(("tracemalloc", best(lambda: loop(fresh(), a.iters))))
    tracemalloc.stop()
    try:
        import memray

        tmp = tempfile.mkdtemp()

        def under_memray():
            path = os.path.join(tmp, f"m{time.perf_counter_ns()}.bin")
            with memray.Tracker(path):
                loop(fresh(), a.iters)

        rows.append(("memray Tracker", best(under_memray, 3)))
    except ImportError:
        pass

    from kvprof import runtime

    bundle = tempfile.mkdtemp(suffix=".kvprof")
    os.makedirs(os.path.join(bundle, "procs"))
    runtime.start(bundle, ["blocks"])  # patches the already-imported vLLM classes
    w = runtime.writer

    def recorded():
        loop(fresh(), a.iters)
        w.flush()  # the deferred id resolution and the write count too

    rows.append(("kvprof blocks probe", best(recorded)))
    runtime.writer.close()
    calls = runtime.writer.counts["blocks"]
    print(f"vLLM BlockPool loop: {a.iters:,} iterations x 4 calls, best of 5 (kvprof recorded {calls:,} calls)")
    for name, t in rows:
        print(f"  {name:22s} {t * 1e3:8.1f} ms   ratio {t / bare:5.2f}x")


if __name__ == "__main__":
    main()
