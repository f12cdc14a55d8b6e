"""Recording overhead of the `blocks` probe through the public kvprof.blocks API.

Runs the built-in demo (a pure-Python paged-KV scheduler that reports every
block state change) as whole processes, side by side in one run:

    bare:         python -m kvprof.demo
    kvprof:       kvprof record -- python -m kvprof.demo
    tracemalloc:  python -X tracemalloc -m kvprof.demo        (for context)
    memray:       memray run -q -o X -m kvprof.demo            (for context, when installed)
    gc, pyspy:    kvprof record --probe gc / --probe pyspy (each probe alone) and all three together

and prints each one's best-of-N wall time and its ratio to the bare run. The
vLLM BlockPool loop has its own benchmark (bench_vllm_blockpool.py).

    python benchmarks/bench_record.py [--requests 1500] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time


def best(cmd, repeat, env=None) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    demo = ["-m", "kvprof.demo", "--requests", str(a.requests)]
    py = sys.executable
    try:
        rows = [("bare", best([py, *demo], a.repeat))]
        rows.append(
            (
                "kvprof record (blocks)",
                best(
                    [
                        py,
                        "-m",
                        "kvprof.commands",
                        "record",
                        "-q",
                        "--force",
                        "-o",
                        os.path.join(tmp, "r.kvprof"),
                        "--",
                        py,
                        *demo,
                    ],
                    a.repeat,
                ),
            )
        )
        record = [py, "-m", "kvprof.commands", "record", "-q", "--force", "-o", os.path.join(tmp, "p.kvprof")]
        rows.append(("kvprof record --probe gc", best([*record, "--probe", "gc", "--", py, *demo], a.repeat)))
        rows.append(("kvprof record --probe pyspy", best([*record, "--probe", "pyspy", "--", py, *demo], a.repeat)))
        rows.append(
            ("kvprof --probe blocks,gc,pyspy", best([*record, "--probe", "blocks,gc,pyspy", "--", py, *demo], a.repeat))
        )
        rows.append(("python -X tracemalloc", best([py, "-X", "tracemalloc", *demo], a.repeat)))
        memray = shutil.which("memray") or (
            os.path.join(os.path.dirname(py), "memray")
            if os.path.exists(os.path.join(os.path.dirname(py), "memray"))
            else None
        )
        if memray:
            rows.append(
                ("memray run", best([memray, "run", "-q", "-f", "-o", os.path.join(tmp, "m.bin"), *demo], a.repeat))
            )
        base = rows[0][1]
        print(f"demo with {a.requests} requests, best of {a.repeat}, whole processes")
        for name, t in rows:
            print(f"  {name:28s} {t:7.2f} s   ratio {t / base:5.2f}x")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
