"""`kvprof whatif` speed and memory beside `kvprof analyze`, whole processes, one run.

Records the 20,000-request demo (`kvprof demo --requests 20000 --num-blocks 4096`: 2.2 M
records, 983 k block events) unless --bundle names one, then times each command as a
child process (wall time, peak RSS from wait4) and prints the ratios to `analyze`:

    kvprof analyze BUNDLE
    kvprof whatif BUNDLE --block-size 32 --policy free-queue                  (one configuration)
    kvprof whatif BUNDLE --block-size 8,16,32,64 --policy free-queue,first-fit --jobs 1 / --jobs 2
                                                                                (8 configurations)
    kvprof report BUNDLE, and with --no-whatif                                 (the report's replays)

and, first, the kernels' one-time compile (a fresh numba cache directory) against a
cached load, on the small demo fixture.  Then, in this process: the extraction, one
replay, the unlimited replays the report runs, the schedule's bytes.

    python benchmarks/bench_whatif.py [--bundle PATH] [--repeat 3]

Goals (the project's issue): one configuration <= 3x analyze; bounded memory (not ~1 KB a
block event); the report (analysis + its unlimited replays) <= 2x analyze.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KVPROF = [sys.executable, "-m", "kvprof.commands"]


def child(cmd: list, env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MB, CPU seconds: user + system) of one child process.  On a
    shared machine the CPU time is the steadier figure (the wall time counts the waits)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}): {err.strip()[-500:]}")
    return time.perf_counter() - t0, ru.ru_maxrss / 1024, ru.ru_utime + ru.ru_stime


def best(cmd: list, repeat: int, env: dict | None = None) -> tuple[float, float, float]:
    runs = [child(cmd, env) for _ in range(repeat)]
    return min(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs)


def in_process(bundle: str) -> None:
    from kvprof.analysis import whatif as W
    from kvprof.trace.reader import Bundle

    stream = Bundle(bundle).block_stream()
    info = W.pick_pool(stream, None)
    W.extract(stream, info.index)  # loads the kernels
    t0 = time.perf_counter()
    sched = W.extract(stream, info.index)
    t_extract = time.perf_counter() - t0
    n_events = int((stream.pool == info.index).sum())
    rec = W.Config(sched.block_size, sched.num_blocks)
    W.replay(sched, rec)
    t0 = time.perf_counter()
    W.replay(sched, rec)
    t_one = time.perf_counter() - t0
    unlimited = [rec] + [W.Config(b, W.UNLIMITED) for b in W.DEFAULT_SIZES]
    times = {}
    for jobs in (1, 2):
        t0, c0 = time.perf_counter(), time.process_time()
        W.replay_many(sched, unlimited, jobs=jobs)
        times[jobs] = (time.perf_counter() - t0, time.process_time() - c0)
    print(
        f"in process: {n_events:,} events of the pool -> {sched.operations:,} schedule operations, "
        f"{sched.nbytes / 1e6:.1f} MB ({sched.nbytes / max(len(sched.code), 1):.1f} bytes an operation)"
    )
    print(
        f"  extraction {t_extract:.2f} s ({n_events / t_extract / 1e6:.1f} M events/s); one replay (the recorded "
        f"configuration) {t_one:.3f} s ({sched.operations / t_one / 1e6:.1f} M operations/s)"
    )
    print(
        f"  the report's replays (recorded + unlimited at {', '.join(map(str, W.DEFAULT_SIZES))}): "
        f"{times[1][0]:.2f} s one after another ({times[1][1]:.2f} CPU s), {times[2][0]:.2f} s on 2 threads ({times[2][1]:.2f} CPU s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", help="a bundle to use (default: record the 20k-request demo)")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    try:
        bundle = args.bundle
        if not bundle:
            bundle = os.path.join(tmp, "demo.kvprof")
            t0 = time.perf_counter()
            subprocess.run(
                KVPROF
                + [
                    "record",
                    "-q",
                    "-o",
                    bundle,
                    "--",
                    *KVPROF,
                    "demo",
                    "--requests",
                    str(args.requests),
                    "--num-blocks",
                    "4096",
                ],
                check=True,
            )
            print(f"recorded the {args.requests}-request demo in {time.perf_counter() - t0:.1f} s")
        # the kernels' compile, once per install, against a cached load
        small = os.path.join(ROOT, "fixtures", "demo.kvprof")
        env = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(tmp, "numba-cache"))
        cold = child(KVPROF + ["whatif", small, "--block-size", "16", "-j", "1"], env)
        warm = best(KVPROF + ["whatif", small, "--block-size", "16", "-j", "1"], args.repeat, env)
        plain = best(KVPROF + ["analyze", small], args.repeat)
        print(
            f"compile once (empty numba cache): whatif on the 120-request fixture {cold[0]:.1f} s; cached {warm[0]:.2f} s "
            f"(analyze of the same: {plain[0]:.2f} s)"
        )
        child(KVPROF + ["whatif", bundle, "--block-size", "32", "-j", "1"])  # the cache of this checkout, warm
        html = os.path.join(tmp, "r.html")
        rows = [
            ("analyze", KVPROF + ["analyze", bundle]),
            (
                "whatif, 1 configuration (B=32 free-queue)",
                KVPROF + ["whatif", bundle, "--block-size", "32", "--policy", "free-queue", "-j", "1"],
            ),
            (
                "whatif, 8 configurations, --jobs 1",
                KVPROF
                + ["whatif", bundle, "--block-size", "8,16,32,64", "--policy", "free-queue,first-fit", "-j", "1"],
            ),
            (
                "whatif, 8 configurations, --jobs 2",
                KVPROF
                + ["whatif", bundle, "--block-size", "8,16,32,64", "--policy", "free-queue,first-fit", "-j", "2"],
            ),
            ("report --no-whatif", KVPROF + ["report", bundle, "-o", html, "--no-whatif"]),
            ("report (with its unlimited replays)", KVPROF + ["report", bundle, "-o", html]),
        ]
        results = {}
        for name, cmd in rows:
            results[name] = best(cmd, args.repeat)
        base_t, base_m, base_c = results["analyze"]
        print(f"\nwhole processes on {bundle} (best of {args.repeat}; peak RSS; CPU = user + system):")
        print(
            f"  {'':44s} {'seconds':>8s} {'x analyze':>10s} {'CPU s':>7s} {'x analyze':>10s} {'peak MB':>8s} {'x analyze':>10s}"
        )
        for name, (t, m, c) in results.items():
            print(f"  {name:44s} {t:8.2f} {t / base_t:9.2f}x {c:7.2f} {c / base_c:9.2f}x {m:8.0f} {m / base_m:9.2f}x")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(
            f"  (load average {load:.1f} on {os.cpu_count()} cores at the end: other work on the machine stretches the wall times)"
        )
        t1, t2 = results["whatif, 8 configurations, --jobs 1"][0], results["whatif, 8 configurations, --jobs 2"][0]
        print(f"  8 configurations: --jobs 2 is {t1 / t2:.2f}x --jobs 1")
        r1, r0 = results["report (with its unlimited replays)"], results["report --no-whatif"]
        print(f"  the report's what-if costs {r1[0] - r0[0]:.2f} s ({r1[2] - r0[2]:.2f} CPU s; its chart included)")
        print()
        sys.path.insert(0, ROOT)
        in_process(bundle)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
