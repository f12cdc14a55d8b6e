"""Start-up time of the kvprof command, whole process, as a user's shell sees it.

    python benchmarks/bench_startup.py [--kvprof PATH] [--repeat 15]

Times `kvprof --version`, `kvprof --help`, `kvprof analyze --help` and
`kvprof analyze fixtures/demo.kvprof --no-report` (the small-file analyze that
the torch snapshot benchmark and CI gates pay on every call), interleaved so a
loaded machine slows each the same, and prints min, median and max per command
with the versions of typer, click and pydantic that ran.  With --imports, also
says whether pydantic was imported by each command (python -X importtime).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commands(demo: str) -> dict[str, list[str]]:
    return {
        "--version": ["--version"],
        "--help": ["--help"],
        "analyze --help": ["analyze", "--help"],
        "analyze SMALL --no-report": ["analyze", demo, "--no-report"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--kvprof", default=os.path.join(os.path.dirname(sys.executable), "kvprof"), help="the kvprof script to time"
    )
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--imports", action="store_true", help="also report which commands import pydantic")
    args = ap.parse_args()
    demo = os.path.join(ROOT, "fixtures", "demo.kvprof")
    cmds = commands(demo)
    python = os.path.join(os.path.dirname(args.kvprof), "python")
    versions = subprocess.run(
        [
            python,
            "-c",
            "import importlib.metadata as m\nfor d in ('typer','click','pydantic'):\n"
            "    try: print(d, m.version(d))\n    except m.PackageNotFoundError: print(d, '-')",
        ],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    print("versions:", ", ".join(v for v in versions if v))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", COLUMNS="80")
    for argv in cmds.values():  # warm the page cache and the bytecode caches once
        subprocess.run([args.kvprof, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    cpu: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(args.repeat):
        for name, argv in cmds.items():
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            rc = subprocess.run(
                [args.kvprof, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
            ).returncode
            times[name].append(time.perf_counter() - t0)
            r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
            if rc != 0:
                sys.exit(f"kvprof {' '.join(argv)} exited {rc}")
    # CPU time (user + system) is what a loaded machine disturbs least; wall time is what a user waits
    print(f"{'':<28} {'wall time':^23}  {'CPU time':^23}")
    print(
        f"{'command':<28} {'min':>7} {'median':>7} {'max':>7}  {'min':>7} {'median':>7} {'max':>7}  (seconds, {args.repeat} runs)"
    )
    for name, ts in times.items():
        c = cpu[name]
        print(
            f"kvprof {name:<21} {min(ts):7.3f} {statistics.median(ts):7.3f} {max(ts):7.3f}  "
            f"{min(c):7.3f} {statistics.median(c):7.3f} {max(c):7.3f}"
        )
    if args.imports:
        for name, argv in cmds.items():
            err = subprocess.run(
                [
                    python,
                    "-X",
                    "importtime",
                    "-c",
                    "import sys; from kvprof.commands import main; sys.exit(main(sys.argv[1:]))",
                    *argv,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            ).stderr
            mods = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
            heavy = sorted(m for m in ("pydantic", "numpy", "rich", "typer", "click", "typer._click") if m in mods)
            print(f"kvprof {name:<21} imports: {', '.join(heavy) or 'none of typer/click/rich/numpy/pydantic'}")


if __name__ == "__main__":
    main()
