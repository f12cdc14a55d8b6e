"""Whole-process speed and peak memory of `kvprof analyze SNAPSHOT`, side by side with a bare
`pickle.load` of the same file and PyTorch's own reader.

    python benchmarks/bench_torch_snapshot.py [--torch-python PATH] [--entries N] [--share-frames] [--runs K] [FILE ...]

For each snapshot (default: the fixtures in fixtures/torch-snapshots, then two built on the
fly from assignment2-systems.pickle: its trace repeated to 36k entries, 3.2 MB, and to
``--entries``, 619k entries, 52 MB) it runs three fresh processes, ``--runs`` rounds
interleaved so that a busy machine slows them alike:

* ``kvprof analyze FILE --no-report --json /dev/null``;
* ``python -c "import pickle; pickle.load(open(FILE, 'rb'))"`` (the floor: any reader must at
  least unpickle the file; plain pickle.load is unsafe, it is only a yardstick here);
* ``TORCH_PYTHON -m torch.cuda._memory_viz stats FILE`` (PyTorch's own reader).

Each command runs once first, untimed, with PYTHONDONTWRITEBYTECODE unset, so that its
bytecode caches exist as they do for an installed program.  It prints the best wall and CPU times (CPU: the whole process tree, from wait4), the peak
memory and the ratios.  kvprof reads the pickle in a child process, so peak memory is that
of the whole tree: the largest of the sampled sum of the tree's proportional set sizes (PSS,
shared pages counted once) and the largest single process's peak RSS (wait4).

Goals (the torch snapshot speed issue): on the 619k-entry snapshot kvprof <= 1.5x the time
of pickle.load and <= 2x its peak memory; the small fixtures >= 10x faster than _memory_viz.

The big inputs are built here, never committed.  The fixture's trace is repeated with
consistent addresses and times: the allocations it leaves live and its frees of allocations
made before it began are kept only in the last copy (the original trace, at its original
times), so every earlier copy frees exactly what it allocates and the trace still ends at
the snapshot's own state; copies are shifted back in time by the trace's span plus 1 ms.
Entries are new dicts; each copy has its own frame lists holding the fixture's frame dicts,
as PyTorch writes one list per captured traceback and shares frame dicts
(``--share-frames``: the copies reuse the fixture's lists, a smaller file that unpickles
faster).  The file is written with pickle protocol 4, as torch writes it.
"""

from __future__ import annotations

import argparse
import glob
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # measure programs with their .pyc files
FIXTURE = os.path.join(ROOT, "fixtures", "torch-snapshots", "assignment2-systems.pickle")


def _read_fixture(path: str) -> dict:
    from kvprof.trace.torch_snapshot import _NoGlobals  # the fixture is trusted, but never load a pickle with globals

    with open(path, "rb") as fh:
        return _NoGlobals(fh).load()


def build_repeated(out: str, entries: int, source: str = FIXTURE, share_frames: bool = False) -> int:
    """Write `source` with its device 0 trace repeated to about `entries` entries; returns the
    count.  Each copy has its own frame lists (PyTorch writes one list per captured traceback,
    whose frame dicts are shared), or, with `share_frames`, reuses the fixture's lists."""
    snap = _read_fixture(source)
    trace = snap["device_traces"][0]
    live: dict = {}
    pre: set = set()
    for i, e in enumerate(trace):  # allocations left live at the end, frees of allocations made before the trace
        a = e["action"]
        if a == "alloc":
            live[e["addr"]] = i
        elif a in ("free_requested", "free_completed"):
            if e["addr"] in live:
                if a == "free_completed":
                    del live[e["addr"]]
            else:
                pre.add(i)
    unbalanced = set(live.values()) | pre
    balanced = [e for i, e in enumerate(trace) if i not in unbalanced]
    times = [e["time_us"] for e in trace]
    shift = max(times) - min(times) + 1000
    copies = max(0, round((entries - len(trace)) / len(balanced)))
    out_trace = []
    for k in range(copies, 0, -1):
        dt = k * shift
        lists: dict = {}  # one new list per list of the fixture, shared as the fixture shares it

        def frames(fr):
            if share_frames:
                return fr
            got = lists.get(id(fr))  # noqa: B023 (called within this iteration only)
            if got is None:
                got = lists[id(fr)] = list(fr)  # noqa: B023
            return got

        out_trace.extend(dict(e, time_us=e["time_us"] - dt, frames=frames(e["frames"])) for e in balanced)
    out_trace.extend(trace)
    snap["device_traces"] = [out_trace]
    with open(out, "wb") as fh:
        pickle.dump(snap, fh, protocol=4)
    return len(out_trace)


# -- measuring a whole process tree ----------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out += [int(x) for x in fh.read().split()]
    except OSError:
        pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_once(cmd: list[str], sample: bool = False) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the whole tree, peak MiB) of one run of `cmd`.  Peak: the
    largest single process's peak RSS (wait4), and with `sample` the peak of the tree's
    summed PSS too, polled every 10 ms (polling costs CPU: sampled runs are not timed)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    tree_peak = 0
    while sample:
        got = os.wait4(p.pid, os.WNOHANG)
        if got[0]:
            break
        pids, todo = [], [p.pid]
        while todo:
            x = todo.pop()
            pids.append(x)
            todo += _children(x)
        tree_peak = max(tree_peak, sum(_pss_kb(x) for x in pids))
        time.sleep(0.01)
    else:
        got = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    _pid, status, ru = got
    code = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}): {err[-2000:]}")
    return dt, ru.ru_utime + ru.ru_stime, max(tree_peak, ru.ru_maxrss) / 1024


def measure(cmds: list, n: int) -> list:
    """Per command (None: skipped): best wall time, best CPU time and peak memory over `n`
    interleaved runs (each round runs every command once, so a busy machine slows them
    alike), plus one sampled run for memory."""
    runs: list = [[] for _ in cmds]
    for cmd in cmds:  # a first run writes the bytecode caches, as any installed program has them
        if cmd:
            run_once(cmd)
    for _ in range(n):
        for k, cmd in enumerate(cmds):
            if cmd:
                runs[k].append(run_once(cmd))
    out = []
    for k, cmd in enumerate(cmds):
        if not cmd:
            out.append(None)
            continue
        mem = max([run_once(cmd, sample=True)[2]] + [r[2] for r in runs[k]])
        out.append((min(r[0] for r in runs[k]), min(r[1] for r in runs[k]), mem))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*")
    ap.add_argument(
        "--torch-python",
        default=os.environ.get("KVPROF_TORCH_PYTHON") or os.path.join(ROOT, ".venv-vllm", "bin", "python"),
    )
    ap.add_argument(
        "--entries", type=int, default=619_000, help="trace entries of the big snapshot built on the fly (0: none)"
    )
    ap.add_argument(
        "--share-frames",
        action="store_true",
        help="the built snapshots reuse the fixture's frame lists (smaller, faster to unpickle)",
    )
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--build", metavar="PATH", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build:
        sys.path.insert(0, ROOT)
        print(build_repeated(a.build, int(a.files[0]), share_frames=a.share_frames))
        return
    tmp = tempfile.mkdtemp(prefix="kvprof-bench-torch-")
    try:
        files = a.files or sorted(glob.glob(os.path.join(ROOT, "fixtures", "torch-snapshots", "*.pickle")))
        if not a.files:
            for n in (36_000, a.entries):
                if n:
                    f = os.path.join(tmp, f"repeated-{n // 1000}k{'-shared' if a.share_frames else ''}.pickle")
                    # in a process of its own: a child forked from this one would start with its memory
                    # (Linux counts it in the child's peak RSS until exec)
                    got = int(
                        subprocess.run(
                            [sys.executable, __file__, "--build", f, str(n)]
                            + (["--share-frames"] if a.share_frames else []),
                            check=True,
                            capture_output=True,
                            text=True,
                            cwd=ROOT,
                        ).stdout
                    )
                    print(f"built {os.path.basename(f)}: {got:,} trace entries, {os.path.getsize(f) / 2**20:.1f} MiB")
                    files.append(f)
        have_torch = shutil.which(a.torch_python) or os.path.exists(a.torch_python)
        kvprof = [sys.executable, "-m", "kvprof.commands", "analyze"]
        print(
            f"{'snapshot':26s} {'MiB':>5s} | {'kvprof analyze':>21s} | {'pickle.load':>21s} | {'_memory_viz stats':>21s} | "
            f"{'kvprof/load':>17s} | {'viz/kvprof':>10s}"
        )
        print(
            f"{'':26s} {'':5s} | {'wall   cpu   peak':>21s} | {'wall   cpu   peak':>21s} | {'wall   cpu   peak':>21s} | "
            f"{'wall  cpu  mem':>17s} | {'wall   cpu':>10s}"
        )
        for f in files:
            k, p, t = measure(
                [
                    kvprof + [f, "--no-report", "--json", os.devnull],
                    [sys.executable, "-c", "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))", f],
                    [a.torch_python, "-m", "torch.cuda._memory_viz", "stats", f] if have_torch else None,
                ],
                a.runs,
            )
            cell = lambda r: f"{r[0]:5.2f}s {r[1]:5.2f}s {r[2]:4.0f}M" if r else f"{'n/a':>21s}"  # noqa: E731
            viz = f"{t[0] / k[0]:5.1f}x {t[1] / k[1]:5.1f}x" if t else f"{'n/a':>10s}"
            print(
                f"{os.path.basename(f):26s} {os.path.getsize(f) / 2**20:5.1f} | {cell(k)} | {cell(p)} | {cell(t)} | "
                f"{k[0] / p[0]:4.2f}x {k[1] / p[1]:4.2f}x {k[2] / p[2]:4.2f}x | {viz}",
                flush=True,
            )
        print("goals: 619k entries: time/load <= 1.5x, mem/load <= 2x; small fixtures: viz/kvprof >= 10x")
        if not have_torch:
            print(f"(no torch at {a.torch_python}: --torch-python PATH)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
