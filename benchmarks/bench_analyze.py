"""Analyzer throughput and memory: block events per second from bundle to metrics.

Builds a large bundle by tiling a real demo recording (shifted in time, with
fresh request ids) and times `analyze_bundle` on one core, in this process.
Peak memory is measured with tracemalloc (numpy reports its buffers to it).

    python benchmarks/bench_analyze.py [--events 5000000]

Goal (issue 2): >= 20 million block events per second, < 64 bytes per event.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

from kvprof.trace import format as fmt


def build(path: str, target_events: int) -> int:
    seed_dir = tempfile.mkdtemp()
    seed = os.path.join(seed_dir, "seed.kvprof")
    subprocess.run([sys.executable, "-m", "kvprof.commands", "record", "-q", "-o", seed, "-m", "kvprof.demo"], check=True)
    (proc,) = os.listdir(os.path.join(seed, "procs"))
    src = os.path.join(seed, "procs", proc)
    ev = np.fromfile(os.path.join(src, "blocks.bin"), dtype=fmt.BLOCK_EVENT_DTYPE)
    ids = np.fromfile(os.path.join(src, "block_ids.bin"), dtype=fmt.BLOCK_ID_DTYPE)
    meta = [json.loads(x) for x in open(os.path.join(src, "meta.jsonl"))]
    nstr = max(m["id"] for m in meta if m["type"] == "string") + 1
    reps = max(1, target_events // len(ids))
    shutil.copytree(seed, path)
    dst = os.path.join(path, "procs", proc)
    span = int(ev["t"][-1] - ev["t"][0]) + 1
    with open(os.path.join(dst, "blocks.bin"), "wb") as fe, open(os.path.join(dst, "block_ids.bin"), "wb") as fi, open(os.path.join(dst, "meta.jsonl"), "a") as fm:
        for k in range(reps):
            e = ev.copy()
            e["t"] += k * span
            if k:
                e["req"] = np.where(e["req"] >= 0, e["req"] + k * nstr, -1)
                for m in meta:
                    if m["type"] == "string":
                        fm.write(json.dumps({"type": "string", "id": m["id"] + k * nstr, "s": f"{m['s']}#{k}"}) + "\n")
            fe.write(e.tobytes())
            fi.write(ids.tobytes())
    shutil.rmtree(seed_dir)
    return reps * len(ids)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=5_000_000)
    args = ap.parse_args()
    from kvprof.analysis import analyze_bundle
    from kvprof.trace.reader import Bundle

    tmp = tempfile.mkdtemp()
    try:
        path = os.path.join(tmp, "big.kvprof")
        n = build(path, args.events)
        tracemalloc.start()
        t0 = time.perf_counter()
        result = analyze_bundle(Bundle(path))
        dt = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # the same again without tracemalloc's bookkeeping, for the rate
        t0 = time.perf_counter()
        analyze_bundle(Bundle(path))
        dt = min(dt, time.perf_counter() - t0)
        n = result.metrics["blocks.events"]["value"]  # block state changes (the null block's RESERVE excluded)
        rate = n / dt
        print(f"block events analysed: {n:,}")
        print(f"time: {dt:.2f} s  ->  {rate / 1e6:.1f} M events/s  (goal 20 M/s: ratio {rate / 20e6:.2f})")
        print(f"peak traced memory: {peak / 2**20:.0f} MiB  ->  {peak / n:.1f} bytes/event  (goal < 64: ratio {peak / n / 64:.2f})")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
