"""Workload: a pool in the main process and in children started by spawn, fork,
forkserver and subprocess; exits with the code given as argv[1]."""

import multiprocessing as mp
import subprocess
import sys

import kvprof
import kvprof.blocks


def child(name):
    pool = kvprof.blocks.Pool(8, 16, name=name)
    pool.alloc([1, 2], request=f"{name}-r")
    pool.free([2, 1], request=f"{name}-r")
    kvprof.mark(f"in-{name}")


if __name__ == "__main__":
    pool = kvprof.blocks.Pool(16, 16, name="main", reserved=[0])
    pool.alloc([1, 2, 3], request="r1")
    kvprof.mark("phase", 1)
    for method in ("spawn", "fork", "forkserver"):
        ctx = mp.get_context(method)
        p = ctx.Process(target=child, args=(method,))
        p.start()
        p.join()
    subprocess.run(
        [sys.executable, "-c", "import kvprof.blocks as b; p = b.Pool(4, 8, name='subprocess'); p.alloc([1])"],
        check=True,
    )
    pool.free([3, 2, 1], request="r1")
    sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
