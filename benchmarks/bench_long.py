"""Long recordings, side by side in one run: every figure is a whole process, timed with
its own peak RSS (os.wait4), so start-up and imports count as a user sees them.

    python benchmarks/bench_long.py [--requests 20000 60000] [--workdir DIR] [--repeat 3]

Builds the demo bundles (`kvprof record -- kvprof demo --requests N --num-blocks 4096`,
kept in --workdir between runs), then prints, with the goals of the long-recordings issue:

* analyze of the 20k bundle against a bare read of its columns (every chunk decompressed
  and split into numpy columns by a 10-line script: the floor any analysis pays);
* peak RSS of analyze at 20k and at 60k requests (bounded memory: the ratio);
* report and one whatif configuration against analyze;
* bundle bytes per request; record against the bare demo.

The median of --repeat runs is shown for times, the largest peak RSS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
KVPROF = [sys.executable, "-m", "kvprof.commands"]

BARE_READ = r"""
import os, sys
import numpy as np
from kvprof.trace import codec, stage
n = 0
for d in os.listdir(os.path.join(sys.argv[1], "procs")):
    path = os.path.join(sys.argv[1], "procs", d, stage.CHUNKS)
    with open(path, "rb") as fh:
        while True:
            head = fh.read(stage.HEADER_SIZE)
            if not head:
                break
            h = stage.ChunkHeader(head)
            recs = codec.decode_chunk(h, fh.read(h.comp_len))
            if h.payload == stage.PAYLOAD_RECORDS:
                for rows, ids in codec.split_records(recs).values():
                    n += len(rows)
print(n)
"""


def run(cmd: list[str], **kw) -> tuple[float, int]:
    """(seconds, peak RSS in MB) of one whole process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    _, status, usage = os.wait4(proc.pid, 0)
    secs = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return secs, usage.ru_maxrss // 1024


def measure(cmd: list[str], repeat: int) -> tuple[float, int]:
    runs = [run(cmd) for _ in range(repeat)]
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def bundle(workdir: str, requests: int) -> str:
    path = os.path.join(workdir, f"demo-{requests}.kvprof")
    if not os.path.isdir(path):
        subprocess.run(
            [
                *KVPROF,
                "record",
                "-q",
                "--force",
                "-o",
                path,
                "--",
                *KVPROF,
                "demo",
                "--requests",
                str(requests),
                "--num-blocks",
                "4096",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return path


def size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, nargs=2, default=[20000, 60000])
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "kvprof-bench-long"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rebuild", action="store_true", help="record the bundles again")
    args = ap.parse_args()
    if args.rebuild:
        shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir, exist_ok=True)
    small, large = args.requests
    b1, b2 = bundle(args.workdir, small), bundle(args.workdir, large)
    html = os.path.join(args.workdir, "report.html")
    rows = []

    def row(what, value, goal, ok):
        rows.append((what, value, goal, "met" if ok else "NOT MET"))

    bare = measure([sys.executable, "-c", BARE_READ, b1], args.repeat)
    ana = measure(
        [*KVPROF, "analyze", b1, "--no-report", "--json", os.path.join(args.workdir, "out.json")], args.repeat
    )
    ana2 = measure(
        [*KVPROF, "analyze", b2, "--no-report", "--json", os.path.join(args.workdir, "out.json")], args.repeat
    )
    rep = measure([*KVPROF, "report", b1, "-o", html], args.repeat)
    wif = measure(
        [
            *KVPROF,
            "whatif",
            b1,
            "--block-size",
            "32",
            "--policy",
            "free-queue",
            "--json",
            os.path.join(args.workdir, "out.json"),
        ],
        args.repeat,
    )
    demo = [*KVPROF, "demo", "--requests", str(small), "--num-blocks", "4096"]
    bare_demo = measure(demo, args.repeat)
    rec_dir = os.path.join(args.workdir, "rec.kvprof")
    rec = measure([*KVPROF, "record", "-q", "--force", "-o", rec_dir, "--", *demo], args.repeat)

    print(f"{small:,}-request bundle: {size(b1) / 1e6:.1f} MB; {large:,}: {size(b2) / 1e6:.1f} MB")
    print(
        f"bare read of the columns {bare[0]:.2f} s {bare[1]} MB; analyze {ana[0]:.2f} s {ana[1]} MB; analyze {large:,} {ana2[0]:.2f} s {ana2[1]} MB"
    )
    print(f"report {rep[0]:.2f} s {rep[1]} MB; whatif one configuration {wif[0]:.2f} s {wif[1]} MB")
    print(f"bare demo {bare_demo[0]:.2f} s; recorded {rec[0]:.2f} s\n")
    row(
        f"analyze {small:,} / bare read of its columns (time)",
        f"{ana[0] / bare[0]:.2f}x",
        "<= 3x",
        ana[0] <= 3 * bare[0],
    )
    row(f"analyze {small:,} peak RSS", f"{ana[1]} MB", "<= 300 MB", ana[1] <= 300)
    row(f"analyze peak RSS {large:,} / {small:,}", f"{ana2[1] / ana[1]:.2f}x", "<= 1.25x", ana2[1] <= 1.25 * ana[1])
    row("report / analyze (time)", f"{rep[0] / ana[0]:.2f}x", "<= 2x", rep[0] <= 2 * ana[0])
    row("whatif, one configuration / analyze (time)", f"{wif[0] / ana[0]:.2f}x", "<= 3x", wif[0] <= 3 * ana[0])
    row("report, whatif peak RSS", f"{rep[1]} MB, {wif[1]} MB", "bounded (<= 300 MB)", max(rep[1], wif[1]) <= 300)
    row("bundle bytes per request", f"{size(b1) / small:,.0f} B", "<= 1 KB", size(b1) <= 1000 * small)
    row("record / bare demo (time)", f"{rec[0] / bare_demo[0]:.2f}x", "<= 1.5x", rec[0] <= 1.5 * bare_demo[0])
    w = max(len(r[0]) for r in rows)
    for what, value, goal, verdict in rows:
        print(f"{what:<{w}}  {value:>16}  {goal:<20} {verdict}")


if __name__ == "__main__":
    main()
