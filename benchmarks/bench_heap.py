"""Overhead of the heap probes, side by side with the tools they wrap, in one run.

The workload is tests/workloads/heap_faults.py in `leak` mode (an allocation-heavy
step loop: a growing cache plus temporary dicts and strings, one kvprof.mark per
step), run as whole processes:

    bare:                      python heap_faults.py leak
    python -X tracemalloc=16:  tracemalloc on, no snapshots (the floor for the probe)
    kvprof --probe tracemalloc snapshots at every marker (default), at every 10th, markers off
    memray run:                memray's own command line
    kvprof --probe memray:     memray's tracker in every process through kvprof

Prints each one's best-of-N wall time and its ratio to the bare run.

    python benchmarks/bench_heap.py [--steps 300] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

from bench_record import best  # best-of-N wall time of a command (this script's directory is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOAD = os.path.join(os.path.dirname(HERE), "tests", "workloads", "heap_faults.py")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    py = sys.executable
    work = [WORKLOAD, "leak", "--steps", str(a.steps)]
    rec = [py, "-m", "kvprof.commands", "record", "-q", "--force", "-o", os.path.join(tmp, "r.kvprof")]
    have_memray = subprocess.run([py, "-c", "import memray"], capture_output=True).returncode == 0
    try:
        rows = [("bare", best([py, *work], a.repeat))]
        rows.append(("python -X tracemalloc=16", best([py, "-X", "tracemalloc=16", *work], a.repeat)))
        rows.append(
            ("kvprof --probe tracemalloc (every marker)", best([*rec, "-p", "tracemalloc", "--", py, *work], a.repeat))
        )
        rows.append(
            (
                "kvprof --probe tracemalloc --tracemalloc-every 10",
                best([*rec, "-p", "tracemalloc", "--tracemalloc-every", "10", "--", py, *work], a.repeat),
            )
        )
        if have_memray:
            rows.append(
                (
                    "memray run",
                    best([py, "-m", "memray", "run", "-q", "-f", "-o", os.path.join(tmp, "m.bin"), *work], a.repeat),
                )
            )
            rows.append(("kvprof --probe memray", best([*rec, "-p", "memray", "--", py, *work], a.repeat)))
        else:
            print("memray not installed: its rows are skipped")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows[0][1]
    print(f"heap probes, {a.steps} steps of tests/workloads/heap_faults.py leak, best of {a.repeat} (whole process)")
    for name, t in rows:
        print(f"  {name:52s} {t:7.3f} s  {t / base:5.2f}x")


if __name__ == "__main__":
    main()
