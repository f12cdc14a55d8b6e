"""Heap workloads with planted faults, for the tracemalloc and memray probes.

    heap_faults.py MODE [--steps N] [--truth FILE] [--pool N]

MODE: leak (a cache that grows every step), churn (a buffer allocated and dropped
many times a step), clean (temporary work only), pool-leak (a spawned
multiprocessing pool whose workers leak), native-leak (a C library, compiled here
with cc and loaded with ctypes, that mallocs NATIVE_LEAK_BYTES a step and never
frees them), native-clean (the same library's malloc and free in the same call).
Every step ends with kvprof.mark("step").

The native modes call malloc from a shared library of their own: memray sees a
library's malloc through the library's own calls (it patches every loaded
library's entries for malloc and free), not a malloc called through ctypes'
function pointer to libc, which it does not record.
--truth writes the planted lines and the pids that did the work.
"""

import argparse
import json
import os
import sys
import time

try:
    import kvprof
except ImportError:  # run without kvprof installed: markers are no-ops
    kvprof = None

_cache = []
LEAK_BYTES = 8192
CHURN_BYTES = 65536
CHURN_PER_STEP = 200


def mark(name, value=0):
    if kvprof is not None:
        kvprof.mark(name, value)


def leak_step():
    _cache.append(bytearray(LEAK_BYTES))  # LEAK-LINE


def churn_step():
    for _ in range(CHURN_PER_STEP):
        buf = bytearray(CHURN_BYTES)  # CHURN-LINE
        buf[0] = 1
        del buf


def clean_step():
    rows = [{"id": i, "name": str(i)} for i in range(200)]
    total = sum(len(r["name"]) for r in rows)
    del rows
    return total


NATIVE_LEAK_BYTES = 8192
NATIVE_SOURCE = r"""
#include <stdlib.h>
#include <string.h>
void *kvprof_native_leak(size_t n) { void *p = malloc(n); if (p) memset(p, 1, n); return p; }
size_t kvprof_native_clean(size_t n) { char *p = malloc(n); size_t s = 0; if (p) { memset(p, 1, n); s = p[n - 1]; free(p); } return s; }
"""


def native_library():
    """Compile the leaking library into a temporary directory and load it."""
    import ctypes
    import subprocess
    import tempfile

    d = tempfile.mkdtemp(prefix="kvprof-native-")
    src, lib = os.path.join(d, "kvprof_native.c"), os.path.join(d, "libkvprof_native.so")
    with open(src, "w") as fh:
        fh.write(NATIVE_SOURCE)
    subprocess.run([os.environ.get("CC", "cc"), "-O0", "-g", "-shared", "-fPIC", "-o", lib, src], check=True)
    so = ctypes.CDLL(lib)
    so.kvprof_native_leak.restype = ctypes.c_void_p
    so.kvprof_native_leak.argtypes = [ctypes.c_size_t]
    so.kvprof_native_clean.restype = ctypes.c_size_t
    so.kvprof_native_clean.argtypes = [ctypes.c_size_t]
    return so


def pool_task(i):
    leak_step()
    clean_step()
    time.sleep(0.01)  # let both workers take tasks
    mark("task", i)
    return os.getpid()


def line_of(tag):
    with open(__file__) as fh:
        for n, line in enumerate(fh, 1):
            if line.rstrip().endswith(f"# {tag}"):
                return n
    raise LookupError(tag)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["leak", "churn", "clean", "pool-leak", "native-leak", "native-clean"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--truth")
    ap.add_argument("--pool", type=int, default=2)
    args = ap.parse_args()
    truth = {
        "file": os.path.abspath(__file__),
        "leak_line": line_of("LEAK-LINE"),
        "churn_line": line_of("CHURN-LINE"),
        "pid": os.getpid(),
        "steps": args.steps,
        "churn_allocations": 0,
    }
    if args.mode == "pool-leak":
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.pool) as pool:
            pids = pool.map(pool_task, range(args.steps), chunksize=1)
            pool.close()
            pool.join()
        truth["worker_pids"] = sorted(set(pids))
    elif args.mode.startswith("native"):
        so = native_library()
        kept = []
        for i in range(args.steps):
            if args.mode == "native-leak":
                kept.append(so.kvprof_native_leak(NATIVE_LEAK_BYTES))  # the pointer is kept, its memory never freed
            so.kvprof_native_clean(NATIVE_LEAK_BYTES)
            clean_step()
            mark("step", i)
        truth["native_function"] = "kvprof_native_leak"
    else:
        step = {"leak": leak_step, "churn": churn_step, "clean": clean_step}[args.mode]
        for i in range(args.steps):
            step()
            clean_step()
            mark("step", i)
        if args.mode == "churn":
            truth["churn_allocations"] = args.steps * CHURN_PER_STEP
    if args.truth:
        with open(args.truth, "w") as fh:
            json.dump(truth, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
