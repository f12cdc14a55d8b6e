"""Whole-process speed of `kvprof analyze SNAPSHOT` against PyTorch's own reader.

    python benchmarks/bench_torch_snapshot.py [--torch-python PATH] [FILE ...]

Runs, side by side for each snapshot (default: fixtures/torch-snapshots), the
whole process `kvprof analyze FILE --json /dev/null` and
`TORCH_PYTHON -m torch.cuda._memory_viz stats FILE`, best of 3 each, and prints
the ratio. Goal (issue 4): kvprof at least 10x faster.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def best(cmd: list[str], n: int = 3) -> float:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    return min(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*")
    ap.add_argument("--torch-python", default=os.environ.get("KVPROF_TORCH_PYTHON") or (ROOT + "/.venv-vllm/bin/python"))
    a = ap.parse_args()
    files = a.files or sorted(glob.glob(os.path.join(ROOT, "fixtures", "torch-snapshots", "*.pickle")))
    kvprof = [sys.executable, "-m", "kvprof.commands", "analyze"]
    have_torch = shutil.which(a.torch_python) or os.path.exists(a.torch_python)
    print(f"{'snapshot':28s} {'kvprof':>8s} {'torch':>8s} {'ratio':>7s}")
    for f in files:
        k = best(kvprof + [f, "--no-report", "--json", os.devnull])
        if have_torch:
            t = best([a.torch_python, "-m", "torch.cuda._memory_viz", "stats", f])
            print(f"{os.path.basename(f):28s} {k:7.2f}s {t:7.2f}s {t / k:6.1f}x  (goal >= 10x)")
        else:
            print(f"{os.path.basename(f):28s} {k:7.2f}s {'n/a':>8s}  (no torch at {a.torch_python}: --torch-python)")


if __name__ == "__main__":
    main()
