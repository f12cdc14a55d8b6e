"""Python and native heap (``--probe tracemalloc``, ``--probe memray``): streams → typed results.

Definitions (docs/metrics.md, "Python and native heap"):

* Leak suspect: a site (a stack, innermost frame first) whose live bytes grow in at
  least ``k`` consecutive intervals between steady-state marker snapshots, ranked by the least-squares
  growth per step.  tracemalloc's snapshots are taken at the markers; from memray the live
  bytes by stack at each marker are replayed from its capture (every allocation and free in
  order, up to the buffer the probe allocates at each marker), native frames included with
  ``--memray-native``.  Apart from suspects, memray's allocations still alive at exit are
  grouped by stack.
* Temporary allocation: freed before any other allocation was made in between
  (memray's and heaptrack's definition), counted by stack.
* Peak: the high-water mark of live bytes, with the stacks alive at that moment.

Steady state: the snapshots of the process's most frequent marker, after its
``steady_state`` marker when it has one, otherwise after the first
``WARMUP_FRACTION`` of them.  Growth per step is per marker call: snapshots
thinned with ``--tracemalloc-every`` are placed at the ordinal of their marker.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import linecache
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from kvprof.owncode import is_own_code

K_CONSECUTIVE = 5  # consecutive growing marker intervals that make a suspect
WARMUP_FRACTION = 0.2
MIN_GROWTH_BYTES = 4096  # total growth over the steady window below which a site is noise
MIN_R2 = 0.6
STEADY_MARKERS = ("steady_state", "steady", "warmup_done")
TOP = 10


@dataclass
class Frame:
    file: str
    line: int
    function: str


@dataclass
class LeakSuspect:
    pid: int
    role: str
    source: str  # "tracemalloc" or "memray"
    site: str  # "file:line in function" of the innermost frame
    stack: list[Frame]
    live_bytes: int  # at the last steady-state snapshot
    live_blocks: int
    growth_bytes_per_step: float | None  # None when the window had no markers (per second then)
    growth_bytes_per_second: float
    consecutive_growth: int  # longest run of growing intervals
    r2: float
    window: dict  # {"marker", "from", "to", "snapshots", "start_s", "end_s"}
    evidence: str


@dataclass
class StackBytes:
    stack: list[Frame]
    site: str
    bytes: int
    count: int


@dataclass
class ChurnSite:
    stack: list[Frame]
    site: str
    allocations: int | None  # None: not counted (large captures, outside memray's top locations)
    allocated_bytes: int
    frees: int | None  # None: not counted (large captures)
    allocations_per_second: float | None
    frees_per_second: float | None
    temporary: int | None  # of its allocations, how many were temporary


@dataclass
class TracemallocProcess:
    snapshots: int
    depth: int | None
    marker: str | None  # the marker series used for steady state
    steady_snapshots: int
    live_bytes_end: int
    peak_bytes: int  # tracemalloc's traced peak (its own bookkeeping excluded, kvprof's included)
    peak_at_s: float | None
    live_at_peak_snapshot: list[StackBytes]  # sites at the snapshot with the most live bytes
    series: list[list]  # [t_s, live_bytes] downsampled for drawing
    snapshot_seconds: float
    overhead_bytes: int  # tracemalloc's own memory at the end
    note: str | None = None


@dataclass
class MemrayProcess:
    file: str
    pid: int
    native: bool
    python_allocator: str
    trace_python_allocators: bool
    duration_s: float
    total_allocations: int
    total_allocated_bytes: int
    frees: int | None
    peak_bytes: int
    leaked_bytes: int
    leaked_allocations: int
    temporary_allocations: int
    temporary_bytes: int
    allocations_per_second: float | None
    peak_stacks: list[StackBytes]
    leaked_stacks: list[StackBytes]
    temporary_stacks: list[StackBytes]
    churn: list[ChurnSite]
    kvprof_allocations: int = 0  # made by kvprof's recording code (in the totals, not in the lists)
    kvprof_allocated_bytes: int = 0
    reader_errors: int = 0
    note: str | None = None
    churn_note: str | None = None  # how churn was computed when not record by record
    leak_suspects: list = field(default_factory=list)  # growth across markers (LeakSuspect, pid/role filled by analyze_heap)
    growth: dict | None = None  # {"markers", "marker", "steady_snapshots"} when markers were replayed
    growth_note: str | None = None  # why there is no growth analysis (no markers, a capture too large, ...)


@dataclass
class HeapProcess:
    pid: int
    role: str
    tracemalloc: TracemallocProcess | None
    memray: MemrayProcess | None
    leak_suspects: list[LeakSuspect]


@dataclass
class HeapAnalysis:
    window: str
    k: int
    processes: list[HeapProcess]
    leak_suspects: list[LeakSuspect]  # all processes, ranked by growth
    peak_bytes: int | None
    peak_pid: int | None
    leaked_bytes_at_exit: int | None
    temporary_allocations: int | None
    total_allocations: int | None
    allocations_per_second: float | None
    live_bytes_at_exit: int | None
    notes: list[str] = field(default_factory=list)


# -- frames ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=512)
def _functions_of(filename: str) -> tuple:
    """(start, end, qualified name) of every def/class in a source file, outermost first."""
    lines = linecache.getlines(filename)
    if not lines:
        return ()
    try:
        tree = ast.parse("".join(lines))
    except (SyntaxError, ValueError):
        return ()
    out = []

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                out.append((child.lineno, getattr(child, "end_lineno", child.lineno) or child.lineno, name))
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return tuple(out)


def function_at(filename: str, line: int) -> str:
    """The innermost function (or class body) holding a line; '<module>', or '?' without the source."""
    spans = _functions_of(filename)
    if not spans and not linecache.getlines(filename):
        return "?"
    best = "<module>"
    width = None
    for start, end, name in spans:
        if start <= line <= end and (width is None or end - start <= width):
            best, width = name, end - start
    return best


def _frames(raw) -> list[Frame]:
    return [Frame(f, int(ln), function_at(f, int(ln))) for f, ln in raw]


def _site(frames: list[Frame]) -> str:
    if not frames:
        return "<no Python frames>"
    f = frames[0]
    return f"{f.file}:{f.line} in {f.function}"


def _memray_frames(trace) -> list[Frame]:
    # memray gives (function, file, line), innermost first
    return [Frame(str(fl), int(ln or 0), str(fn)) for fn, fl, ln in trace]


# -- tracemalloc ----------------------------------------------------------------------------
def _dense(snaps: np.ndarray, sites: np.ndarray):
    """Live bytes and blocks per (site, snapshot), forward-filled from the delta rows."""
    order = np.argsort(snaps["seq"], kind="stable")
    snaps = snaps[order]
    stacks = np.unique(sites["stack"]) if len(sites) else np.zeros(0, np.int32)
    col = {int(s): i for i, s in enumerate(snaps["seq"])}
    row = {int(s): i for i, s in enumerate(stacks)}
    size = np.zeros((len(stacks), len(snaps)), dtype=np.int64)
    count = np.zeros_like(size)
    if len(sites):
        r = np.fromiter((row[int(s)] for s in sites["stack"]), np.int64, len(sites))
        c = np.fromiter((col.get(int(s), -1) for s in sites["seq"]), np.int64, len(sites))
        ok = c >= 0
        # a delta sets the value from its snapshot on, until the next delta of that site
        setv = np.full_like(size, -1)
        setc = np.full_like(size, -1)
        setv[r[ok], c[ok]] = sites["size"][ok]
        setc[r[ok], c[ok]] = sites["count"][ok]
        for j in range(len(snaps)):
            if j:
                size[:, j] = size[:, j - 1]
                count[:, j] = count[:, j - 1]
            m = setv[:, j] >= 0
            size[m, j] = setv[m, j]
            count[m, j] = setc[m, j]
    return snaps, stacks, size, count


def _longest_growth_run(d: np.ndarray) -> np.ndarray:
    """Per row: the longest run of consecutive positive differences."""
    best = np.zeros(d.shape[0], dtype=np.int64)
    cur = np.zeros(d.shape[0], dtype=np.int64)
    for j in range(d.shape[1]):
        cur = np.where(d[:, j] > 0, cur + 1, 0)
        best = np.maximum(best, cur)
    return best


def _fit(x: np.ndarray, y: np.ndarray):
    """Least-squares slope and r² of each row of y against x."""
    xm = x - x.mean()
    sxx = float((xm * xm).sum())
    if sxx == 0:
        return np.zeros(y.shape[0]), np.zeros(y.shape[0])
    ym = y - y.mean(axis=1, keepdims=True)
    slope = (ym * xm).sum(axis=1) / sxx
    ss_tot = (ym * ym).sum(axis=1)
    resid = ym - slope[:, None] * xm
    ss_res = (resid * resid).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(ss_tot > 0, 1 - ss_res / ss_tot, 0.0)
    return slope, r2


def _tracemalloc_process(proc, marks, bounds, k: int):
    snaps, sites = proc.heap_snapshots()
    if not len(snaps):
        return None, []
    snaps, stacks, size, count = _dense(snaps, sites)
    start = int(proc.info.get("start_ns") or snaps["t"][0])
    sel = np.ones(len(snaps), dtype=bool)
    if bounds is not None:
        sel = (snaps["t"] >= bounds[0]) & (snaps["t"] <= bounds[1])
    note = (proc.info.get("probes") or {}).get("tracemalloc") or {}
    ts = (snaps["t"] - start) / 1e9
    live = snaps["live"]
    in_win = np.flatnonzero(sel)
    peak_i = int(in_win[np.argmax(live[in_win])]) if len(in_win) else None
    at_peak = []
    if peak_i is not None:
        top = np.argsort(size[:, peak_i])[::-1][:TOP]
        for r in top:
            if size[r, peak_i] <= 0:
                break
            frames = _frames(proc.stacks.get(int(stacks[r]), []))
            at_peak.append(StackBytes(frames, _site(frames), int(size[r, peak_i]), int(count[r, peak_i])))
    # steady-state marker series
    mine = marks.pid == proc.pid
    is_mark = (snaps["reason"] == 1) & sel & (snaps["mark"] >= 0)
    marker = None
    series = np.zeros(0, dtype=np.int64)
    if is_mark.any():
        names = [proc.string(int(m)) for m in snaps["mark"][is_mark]]
        counts: dict = {}
        for n in names:
            counts[n] = counts.get(n, 0) + 1
        marker = max(counts, key=lambda n: (counts[n], n not in STEADY_MARKERS))
        series = np.flatnonzero(is_mark)[[n == marker for n in names]]
    per_step = len(series) >= 2
    if not per_step:  # no markers: timer and exit snapshots, growth per second
        series = np.flatnonzero(sel & (snaps["reason"] != 0))
    # the marker's ordinal (its count among this process's calls of it) places thinned snapshots
    if per_step and marker in marks.names:
        mt = marks.t[mine & (marks.name == marks.names.index(marker))]
        x_all = np.searchsorted(mt, snaps["t"], side="right").astype(float)
    else:
        x_all = ts.astype(float)
    # warm-up: after a steady-state marker if there is one, else skip the first part
    steady_t = None
    for name in STEADY_MARKERS:
        if name in marks.names:
            tt = marks.t[mine & (marks.name == marks.names.index(name))]
            if len(tt):
                steady_t = int(tt[0])
                break
    if steady_t is not None and (snaps["t"][series] >= steady_t).sum() >= 2:
        series = series[snaps["t"][series] >= steady_t]
    elif len(series) > 2:
        series = series[int(np.ceil(WARMUP_FRACTION * len(series))):]
    suspects: list[LeakSuspect] = []
    role = str(proc.info.get("role"))
    if len(series) >= k + 1:
        y = size[:, series].astype(float)
        x = x_all[series]
        d = np.diff(y, axis=1)
        run = _longest_growth_run(d)
        slope, r2 = _fit(x, y)
        growth = y[:, -1] - y[:, 0]
        cand = np.flatnonzero((run >= k) & (slope > 0) & (growth >= MIN_GROWTH_BYTES) & (r2 >= MIN_R2))
        span_s = float(ts[series[-1]] - ts[series[0]]) or None
        for r in cand[np.argsort(slope[cand])[::-1]]:
            frames = _frames(proc.stacks.get(int(stacks[r]), []))
            per_s = float(growth[r] / span_s) if span_s else 0.0
            unit = "step" if per_step else "second"
            first = marker if per_step else "timer"
            suspects.append(LeakSuspect(
                pid=proc.pid, role=role, source="tracemalloc", site=_site(frames), stack=frames,
                live_bytes=int(size[r, series[-1]]), live_blocks=int(count[r, series[-1]]),
                growth_bytes_per_step=float(slope[r]) if per_step else None, growth_bytes_per_second=per_s,
                consecutive_growth=int(run[r]), r2=float(r2[r]),
                window={"marker": marker if per_step else None, "from": float(x[0]), "to": float(x[-1]),
                        "snapshots": int(len(series)), "start_s": float(ts[series[0]]), "end_s": float(ts[series[-1]])},
                evidence=(f"live bytes grew in {int(run[r])} consecutive {first} intervals (k={k}), "
                          f"{int(y[r, 0]):,} → {int(y[r, -1]):,} B over {len(series)} snapshots, "
                          f"{slope[r]:,.0f} B per {unit} (least squares, r²={r2[r]:.2f})"),
            ))
    if len(ts) > 400:
        pick = np.unique(np.linspace(0, len(ts) - 1, 400).astype(int))
        pick = np.union1d(pick, [int(np.argmax(live))])
    else:
        pick = np.arange(len(ts))
    tm = TracemallocProcess(
        snapshots=int(sel.sum()), depth=note.get("depth"), marker=marker if per_step else None,
        steady_snapshots=int(len(series)), live_bytes_end=int(live[in_win[-1]]) if len(in_win) else 0,
        # the traced peak less kvprof's own live memory at that snapshot (traced - live)
        peak_bytes=int(np.maximum(snaps["peak"][sel] - (snaps["traced"][sel] - snaps["live"][sel]), snaps["live"][sel]).max()) if sel.any() else 0,
        peak_at_s=float(ts[peak_i]) if peak_i is not None else None, live_at_peak_snapshot=at_peak,
        series=[[float(ts[i]), int(live[i])] for i in pick], snapshot_seconds=float(snaps["cost"].sum() / 1e9),
        overhead_bytes=int(snaps["overhead"][-1]),
        note=None if len(series) >= k + 1 else f"{len(series)} steady-state snapshots; leak suspects need at least {k + 1}",
    )
    return tm, suspects


# -- memray ---------------------------------------------------------------------------------
FREE_ALLOCATORS = {1, 5, 15}
# Above this many records (allocations and frees) reading them one by one in Python
# takes minutes: churn then comes from memray's own per-location statistics (C++),
# by innermost frame, without frees per site.
EXACT_CHURN_RECORDS = int(os.environ.get("KVPROF_MEMRAY_EXACT_RECORDS") or 2_000_000)  # PYMALLOC_FREE, FREE, MUNMAP (memray.AllocatorType)


def _is_own(trace) -> bool:
    """memray stacks (function, file, line) that pass through kvprof's recording code or tracemalloc."""
    return any(is_own_code(str(fl)) or str(fl).endswith("/tracemalloc.py") for _, fl, _ in trace)


def _trace(record, hybrid: bool) -> tuple:
    """A memray record's stack, innermost first (with native frames when recorded)."""
    try:
        return tuple(record.hybrid_stack_trace() if hybrid else record.stack_trace())
    except Exception:  # frees carry no stack
        return ()


def _group(records, limit=TOP, hybrid=False) -> list[StackBytes]:
    """Records grouped by Python stack, largest first; kvprof's own stacks left out."""
    by: dict = {}
    for r in records:
        key = _trace(r, hybrid)
        if _is_own(key):
            continue
        e = by.get(key)
        if e is None:
            by[key] = [r.size, r.n_allocations]
        else:
            e[0] += r.size
            e[1] += r.n_allocations
    out = []
    for key, (b, n) in sorted(by.items(), key=lambda kv: -kv[1][0])[:limit]:
        frames = _memray_frames(key)
        out.append(StackBytes(frames, _site(frames), int(b), int(n)))
    return out


class _CapturedStderr:
    """memray's reader logs problems (a capture cut short) from C++ straight to fd 2:
    keep them out of the terminal and hand them to the analysis as one note."""

    def __enter__(self):
        import tempfile

        self.lines: list[str] = []
        self._tmp = tempfile.TemporaryFile()
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            os.dup2(self._tmp.fileno(), 2)
        except (OSError, ValueError):
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        self._tmp.seek(0)
        self.lines = [ln for ln in self._tmp.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        self._tmp.close()
        return False


def analyze_memray_file(path: str, marks: dict | None = None) -> MemrayProcess:
    """One memray capture: totals, peak, leaks, temporaries and churn by stack, and with the
    process's markers (``{"names", "t", "start_ns", "bounds", "k"}``) the growth across them.

    Read in a child process: memray's reader is C++ and a corrupt or hostile capture
    can crash it; that must end in one line about the file, not take kvprof down."""
    import json
    import subprocess

    from kvprof.errors import BundleError

    try:
        import memray  # noqa: F401
    except ImportError:
        raise BundleError(f"{path} is a memray capture; reading it needs memray (pip install 'kvprof[memray]')") from None
    code = "import sys; from kvprof.analysis.heap import _read_worker; _read_worker(sys.argv[1])"
    env = dict(os.environ)
    env.pop("KVPROF_BUNDLE", None)  # never record the reader
    parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", code, path], capture_output=True, env=env,
                          input=json.dumps(marks).encode() if marks else b"")
    if proc.returncode < 0:
        raise BundleError(f"memray's reader crashed (signal {-proc.returncode}) on {path}: the capture is corrupt")
    try:
        out = json.loads(proc.stdout.decode() or "null")
    except ValueError:
        out = None
    if not isinstance(out, dict):
        raise BundleError(f"could not read memray capture {path}: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    if "error" in out:
        raise BundleError(out["error"])
    return _memray_from_json(out)


MIN_RATE_SECONDS = 0.01  # a capture shorter than this (or without an end time) gives no per-second rates


def _per_s(n, duration: float):
    return None if n is None or duration < MIN_RATE_SECONDS else n / duration


def _large_capture(path, reader, meta, hybrid, duration) -> MemrayProcess:  # noqa: C901
    from memray._memray import compute_statistics

    try:
        st = compute_statistics(path, num_largest=TOP * 3)
        temporary = list(reader.get_temporary_allocation_records(merge_threads=True, threshold=1))
        leaked = list(reader.get_leaked_allocation_records(merge_threads=True))
        peak = list(reader.get_high_watermark_allocation_records(merge_threads=True))
    except Exception as exc:
        from kvprof.errors import BundleError

        raise BundleError(f"memray capture {path} is truncated or corrupt: {exc}") from None
    counts = dict(st.top_locations_by_count)
    churn = []
    for loc, size in st.top_locations_by_size:
        if _is_own((loc,)) or len(churn) >= TOP:
            continue
        frames = _memray_frames([loc])
        n = counts.get(loc)  # None: not among memray's most frequent locations
        churn.append(ChurnSite(frames, _site(frames), None if n is None else int(n), int(size), None,
                               _per_s(n, duration), None, None))
    m = MemrayProcess(
        file=path, pid=int(meta.pid), native=hybrid, python_allocator=str(meta.python_allocator),
        trace_python_allocators=bool(meta.trace_python_allocators), duration_s=duration,
        total_allocations=int(st.total_num_allocations), total_allocated_bytes=int(st.total_memory_allocated), frees=None,
        peak_bytes=int(meta.peak_memory), leaked_bytes=int(sum(r.size for r in leaked)),
        leaked_allocations=int(sum(r.n_allocations for r in leaked)),
        temporary_allocations=int(sum(r.n_allocations for r in temporary)), temporary_bytes=int(sum(r.size for r in temporary)),
        allocations_per_second=_per_s(int(st.total_num_allocations), duration),
        peak_stacks=_group(peak, hybrid=hybrid), leaked_stacks=_group(leaked, hybrid=hybrid), temporary_stacks=_group(temporary, hybrid=hybrid),
        churn=churn,
    )
    m.churn_note = (f"{meta.total_allocations:,} records: churn by innermost frame from memray's own statistics, "
                    f"without frees per site (exact up to {EXACT_CHURN_RECORDS:,} records)")
    m.growth_note = (f"{meta.total_allocations:,} records: growth across markers is replayed record by record only up to "
                     f"{EXACT_CHURN_RECORDS:,} (KVPROF_MEMRAY_EXACT_RECORDS)")
    return m


def _memray_from_json(d: dict) -> MemrayProcess:
    def frames(lst):
        return [Frame(**f) for f in lst]

    def stacks(lst):
        return [StackBytes(frames(x["stack"]), x["site"], x["bytes"], x["count"]) for x in lst]

    d = dict(d)
    for key in ("peak_stacks", "leaked_stacks", "temporary_stacks"):
        d[key] = stacks(d[key])
    d["churn"] = [ChurnSite(**{**c, "stack": frames(c["stack"])}) for c in d["churn"]]
    d["leak_suspects"] = [LeakSuspect(**{**x, "stack": frames(x["stack"])}) for x in d.get("leak_suspects") or []]
    return MemrayProcess(**d)


def _read_worker(path: str) -> None:
    """The child side of analyze_memray_file: the process's markers as JSON on stdin (or
    nothing), one JSON object on stdout."""
    import json

    from kvprof.errors import BundleError

    try:
        raw = sys.stdin.read() if not sys.stdin.isatty() else ""
        marks = json.loads(raw) if raw.strip() else None
    except (ValueError, OSError):
        marks = None
    try:
        result = _read_capture(path, marks)
        out = dataclasses.asdict(result)
    except BundleError as exc:
        out = {"error": str(exc)}
    sys.stdout.write(json.dumps(out))


def _read_capture(path: str, marks: dict | None = None) -> MemrayProcess:
    with _CapturedStderr() as err:
        result = _analyze_memray_file(path, marks)
    if err.lines:
        result.reader_errors = len(err.lines)
        result.note = (f"memray's reader reported {len(err.lines)} problem(s) in this capture, which may have been cut short "
                       f"(its process killed before memray closed it); figures cover what it holds. First: {err.lines[0]}")
    return result


class _LiveBySite:
    """Live bytes and allocations per memray stack id while the records are replayed in order,
    and a sparse snapshot (the stacks that changed since the last one) at each marker buffer."""

    def __init__(self):
        self.bytes: dict = {}
        self.count: dict = {}
        self.dirty: set = set()
        self.snaps: list = []  # (marker ordinal modulo MARK_SPAN, {stack id: (bytes, count)})
        self.marker_sids: set = set()
        self.not_marker: set = set()

    def add(self, sid, size) -> None:
        self.bytes[sid] = self.bytes.get(sid, 0) + size
        self.count[sid] = self.count.get(sid, 0) + 1
        self.dirty.add(sid)

    def sub(self, sid, size) -> None:
        if sid in self.marker_sids:
            return
        self.bytes[sid] = self.bytes.get(sid, 0) - size
        self.count[sid] = self.count.get(sid, 0) - 1
        self.dirty.add(sid)

    def is_marker(self, record, size: int) -> bool:
        """The buffer kvprof's memray probe allocates at each marker (kvprof/probes/heap.py)."""
        from kvprof.probes.heap import MARK_BASE, MARK_SPAN

        if not MARK_BASE < size <= MARK_BASE + MARK_SPAN:
            return False
        sid = record.stack_id
        if sid in self.marker_sids:
            return True
        if sid in self.not_marker:
            return False
        try:
            frames = record.stack_trace()
        except Exception:  # noqa: BLE001 - no stack
            frames = ()
        mine = any(fn == "_memray_mark" and str(fl).replace(os.sep, "/").endswith("kvprof/probes/heap.py") for fn, fl, _ in frames)
        (self.marker_sids if mine else self.not_marker).add(sid)
        return mine

    def snapshot(self, size: int) -> None:
        from kvprof.probes.heap import MARK_BASE, MARK_SPAN

        mod = (size - MARK_BASE - 1) % MARK_SPAN
        if self.snaps and self.snaps[-1][0] == mod and not self.dirty:
            return  # the same buffer seen twice (a Python allocator and malloc both traced)
        self.snaps.append((mod, {sid: (self.bytes[sid], self.count[sid]) for sid in self.dirty}))
        self.dirty.clear()


def _marker_ordinals(mods: list, n_marks: int):
    """The process's marker ordinal of each marker buffer, from the ordinals modulo MARK_SPAN
    (consecutive buffers are consecutive markers, but the tracker may have started after the
    first markers): the latest placement that does not run past the markers recorded."""
    from kvprof.probes.heap import MARK_SPAN

    if not mods:
        return []
    rel = [0]
    for a, b in zip(mods, mods[1:]):
        rel.append(rel[-1] + ((b - a) % MARK_SPAN or MARK_SPAN))
    first = mods[0]
    if first + rel[-1] > n_marks - 1:
        return None
    first += MARK_SPAN * ((n_marks - 1 - rel[-1] - first) // MARK_SPAN)
    return [first + r for r in rel]


def _memray_growth(live: _LiveBySite, marks: dict, reps: dict, hybrid: bool):
    """Leak suspects from the live bytes by stack at each marker: the rule applied to
    tracemalloc's snapshots (k consecutive growing intervals between steady-state markers,
    least-squares growth per step, r², minimum growth).  Returns (suspects, growth, note)."""
    names, times = list(marks.get("names") or []), list(marks.get("t") or [])
    k = int(marks.get("k") or K_CONSECUTIVE)
    if not names:
        return [], None, "no kvprof.mark calls in this process: no growth across markers"
    if not live.snaps:
        return [], None, "no marker buffers in the capture (markers made while memray was not tracking)"
    ordinals = _marker_ordinals([m for m, _ in live.snaps], len(names))
    if ordinals is None:
        return [], None, "the capture's marker buffers do not match the process's markers"
    bounds = marks.get("bounds")
    cols = [j for j, o in enumerate(ordinals) if bounds is None or bounds[0] <= times[o] <= bounds[1]]
    counts: dict = {}
    for j in cols:
        counts[names[ordinals[j]]] = counts.get(names[ordinals[j]], 0) + 1
    if not counts:
        return [], None, "no marker inside the window"
    marker = max(counts, key=lambda n: (counts[n], n not in STEADY_MARKERS))
    series = [j for j in cols if names[ordinals[j]] == marker]
    steady = next((i for i, n in enumerate(names) if n in STEADY_MARKERS), None)
    if steady is not None and sum(1 for j in series if ordinals[j] > steady) >= 2:
        series = [j for j in series if ordinals[j] > steady]
    elif len(series) > 2:
        series = series[int(np.ceil(WARMUP_FRACTION * len(series))):]
    growth = {"markers": len(live.snaps), "marker": marker, "steady_snapshots": len(series)}
    if len(series) < k + 1:
        return [], growth, f"{len(series)} steady-state marker snapshots; leak suspects need at least {k + 1}"
    # the marker's ordinal among this process's calls of it (1-based), as for tracemalloc
    ordinal_of, seen = {}, 0
    for i, n in enumerate(names):
        if n == marker:
            seen += 1
            ordinal_of[i] = seen
    x = np.array([ordinal_of[ordinals[j]] for j in series], dtype=float)
    # pass 1: each stack's value at the first and the last steady snapshot
    state: dict = {}
    first = None
    want = {series[0]: "first", series[-1]: "last"}
    for j, (_, delta) in enumerate(live.snaps):
        state.update(delta)
        if want.get(j) == "first":
            first = dict(state)
        if j == series[-1]:
            break
    last = state
    # group the stacks that grew by their trace (a Python stack may have several memray stack ids)
    groups: dict = {}
    for sid, (b, _n) in last.items():
        b0 = first.get(sid, (0, 0))[0]
        if b <= b0 or sid in live.marker_sids:
            continue
        rec = reps.get(sid)
        trace = _trace(rec, hybrid) if rec is not None else ()
        if _is_own(trace):
            continue
        groups.setdefault(trace, []).append(sid)
    grown = {t: sids for t, sids in groups.items() if sum(last[s][0] - first.get(s, (0, 0))[0] for s in sids) >= MIN_GROWTH_BYTES}
    if not grown:
        return [], growth, None
    # pass 2: those groups' live bytes and allocations at every steady snapshot
    keys = list(grown)
    row_of = {sid: r for r, t in enumerate(keys) for sid in grown[t]}
    y = np.zeros((len(keys), len(series)))
    cnt = np.zeros((len(keys), len(series)), dtype=np.int64)
    cur_b = np.zeros(len(keys))
    cur_n = np.zeros(len(keys), dtype=np.int64)
    per_sid: dict = {}
    col = {j: c for c, j in enumerate(series)}
    for j, (_, delta) in enumerate(live.snaps):
        for sid, (b, n) in delta.items():
            r = row_of.get(sid)
            if r is None:
                continue
            ob, on = per_sid.get(sid, (0, 0))
            per_sid[sid] = (b, n)
            cur_b[r] += b - ob
            cur_n[r] += n - on
        c = col.get(j)
        if c is not None:
            y[:, c] = cur_b
            cnt[:, c] = cur_n
        if j == series[-1]:
            break
    d = np.diff(y, axis=1)
    run = _longest_growth_run(d)
    slope, r2 = _fit(x, y)
    total = y[:, -1] - y[:, 0]
    cand = np.flatnonzero((run >= k) & (slope > 0) & (total >= MIN_GROWTH_BYTES) & (r2 >= MIN_R2))
    t0 = int(marks.get("start_ns") or (times[0] if times else 0))
    start_s = (times[ordinals[series[0]]] - t0) / 1e9
    end_s = (times[ordinals[series[-1]]] - t0) / 1e9
    span_s = (end_s - start_s) or None
    suspects = []
    for r in cand[np.argsort(slope[cand])[::-1]]:
        frames = _memray_frames(keys[r])
        suspects.append(LeakSuspect(
            pid=0, role="", source="memray", site=_site(frames), stack=frames,
            live_bytes=int(y[r, -1]), live_blocks=int(cnt[r, -1]),
            growth_bytes_per_step=float(slope[r]), growth_bytes_per_second=float(total[r] / span_s) if span_s else 0.0,
            consecutive_growth=int(run[r]), r2=float(r2[r]),
            window={"marker": marker, "from": float(x[0]), "to": float(x[-1]), "snapshots": int(len(series)),
                    "start_s": float(start_s), "end_s": float(end_s)},
            evidence=(f"live bytes (memray, {'native and Python' if hybrid else 'Python'} stacks) grew in {int(run[r])} consecutive "
                      f"{marker} intervals (k={k}), {int(y[r, 0]):,} → {int(y[r, -1]):,} B over {len(series)} markers, "
                      f"{slope[r]:,.0f} B per step (least squares, r²={r2[r]:.2f})"),
        ))
    return suspects, growth, None


def _analyze_memray_file(path: str, marks: dict | None = None) -> MemrayProcess:
    from kvprof.errors import BundleError

    try:
        import memray
    except ImportError:
        raise BundleError(f"{path} is a memray capture; reading it needs memray (pip install 'kvprof[memray]')") from None
    try:
        reader = memray.FileReader(path)
        meta = reader.metadata
    except Exception as exc:
        raise BundleError(f"unreadable memray capture {path}: {exc}") from None
    if int(getattr(meta, "file_format", 0) or 0) != 0:  # memray run --aggregate: no allocation records
        raise BundleError(f"{path} is an aggregated memray capture (memray run --aggregate): kvprof needs every allocation "
                          "(record without --aggregate; `memray summary` reads this one)")
    hybrid = bool(meta.has_native_traces)
    # memray's start and end times; a forked worker that leaves through os._exit ends its
    # capture without an end time (end == start): no rate then, rather than billions per second
    duration = max((meta.end_time - meta.start_time).total_seconds(), 0.0)
    if meta.total_allocations > EXACT_CHURN_RECORDS:
        return _large_capture(path, reader, meta, hybrid, duration)
    try:
        # churn by site: every allocation and free, frees attributed through their address
        allocs: dict = {}  # stack_id -> [count, bytes, frees, representative record]
        live: dict = {}  # address -> (stack_id, size)
        by_site = _LiveBySite() if marks and marks.get("names") else None  # live bytes by stack at each marker, for growth
        total = total_bytes = frees = 0
        for r in reader.get_allocation_records():
            a = r.allocator
            if a in FREE_ALLOCATORS:
                frees += 1
                e = live.pop(r.address, None)
                if e is not None:
                    allocs[e[0]][2] += 1
                    if by_site is not None:
                        by_site.sub(e[0], e[1])
                continue
            total += 1
            size = r.size
            total_bytes += size
            sid = r.stack_id
            e = allocs.get(sid)
            if e is None:
                allocs[sid] = [1, size, 0, r]
            else:
                e[0] += 1
                e[1] += size
            live[r.address] = (sid, size)
            if by_site is not None:
                if by_site.is_marker(r, size):
                    by_site.snapshot(size)
                else:
                    by_site.add(sid, size)
        temporary = list(reader.get_temporary_allocation_records(merge_threads=True, threshold=1))
        leaked = list(reader.get_leaked_allocation_records(merge_threads=True))
        peak = list(reader.get_high_watermark_allocation_records(merge_threads=True))
    except Exception as exc:
        raise BundleError(f"memray capture {path} is truncated or corrupt: {exc}") from None
    temp_by_site: dict = {}
    for r in temporary:
        key = _trace(r, hybrid)
        temp_by_site[key] = temp_by_site.get(key, 0) + r.n_allocations
    # the same Python stack can have several memray stack ids (threads, native parts): merge
    by_trace: dict = {}
    own = [0, 0]
    for sid, (n, b, nf, rec) in allocs.items():
        trace = _trace(rec, hybrid)
        if _is_own(trace):
            own[0] += n
            own[1] += b
            continue
        e = by_trace.get(trace)
        if e is None:
            by_trace[trace] = [n, b, nf]
        else:
            e[0] += n
            e[1] += b
            e[2] += nf
    churn = []
    for trace, (n, b, nf) in sorted(by_trace.items(), key=lambda kv: -kv[1][1])[:TOP]:
        frames = _memray_frames(trace)
        churn.append(ChurnSite(frames, _site(frames), n, b, nf, _per_s(n, duration), _per_s(nf, duration), temp_by_site.get(trace, 0)))
    suspects, growth, growth_note = ([], None, None)
    if marks is not None and by_site is None:
        growth_note = "no kvprof.mark calls in this process: no growth across markers"
    if by_site is not None:
        suspects, growth, growth_note = _memray_growth(by_site, marks, {sid: e[3] for sid, e in allocs.items()}, hybrid)
    return MemrayProcess(
        leak_suspects=suspects, growth=growth, growth_note=growth_note,
        file=path, pid=int(meta.pid), native=hybrid, python_allocator=str(meta.python_allocator),
        trace_python_allocators=bool(meta.trace_python_allocators), duration_s=duration,
        total_allocations=total, total_allocated_bytes=total_bytes, frees=frees, peak_bytes=int(meta.peak_memory),
        leaked_bytes=int(sum(r.size for r in leaked)), leaked_allocations=int(sum(r.n_allocations for r in leaked)),
        temporary_allocations=int(sum(r.n_allocations for r in temporary)), temporary_bytes=int(sum(r.size for r in temporary)),
        allocations_per_second=_per_s(total, duration), kvprof_allocations=own[0], kvprof_allocated_bytes=own[1],
        peak_stacks=_group(peak, hybrid=hybrid), leaked_stacks=_group(leaked, hybrid=hybrid), temporary_stacks=_group(temporary, hybrid=hybrid),
        churn=churn,
    )


# -- the section ---------------------------------------------------------------------------
def _marks_of(proc, marks, bounds, k: int) -> dict | None:
    """One process's markers, in order, for the memray reader (names, times, window)."""
    mine = np.flatnonzero(marks.pid == proc.pid)
    if not len(mine):
        return {"names": [], "t": [], "start_ns": 0, "k": int(k), "bounds": None}
    return {"names": [marks.names[int(i)] for i in marks.name[mine]], "t": [int(t) for t in marks.t[mine]],
            "start_ns": int(proc.info.get("start_ns") or marks.t[mine][0]), "k": int(k),
            "bounds": None if bounds is None else [int(bounds[0]), int(bounds[1])]}


def analyze_heap(bundle, bounds=None, window_label: str = "whole run", k: int = K_CONSECUTIVE) -> HeapAnalysis | None:
    marks = bundle.marks()
    procs: list[HeapProcess] = []
    notes: list[str] = []
    # memray captures are read in child processes: start them all, then collect
    from concurrent.futures import ThreadPoolExecutor

    from kvprof.errors import BundleError

    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    pending = {}
    for proc in bundle.processes:
        probes = proc.info.get("probes") or {}
        capture = proc.memray_file() if "memray" in probes else None
        if capture:
            pending[proc.pid] = pool.submit(analyze_memray_file, capture, _marks_of(proc, marks, bounds, k))
    for proc in bundle.processes:
        probes = proc.info.get("probes") or {}
        if "tracemalloc" not in probes and "memray" not in probes:
            continue
        tm, suspects = _tracemalloc_process(proc, marks, bounds, k) if "tracemalloc" in probes else (None, [])
        mr = None
        if proc.pid in pending:
            try:
                mr = pending[proc.pid].result()
            except BundleError as exc:  # one process's capture cut short or corrupt: say so, keep the rest
                notes.append(f"process {proc.pid}: {exc}")
        elif "memray" in probes:
            why = probes["memray"].get("reason") or probes["memray"].get("status")
            notes.append(f"process {proc.pid}: no memray capture ({why})")
        if mr is not None and mr.leak_suspects:  # growth across markers, from memray's capture
            for sus in mr.leak_suspects:
                sus.pid, sus.role = proc.pid, str(proc.info.get("role"))
            suspects = suspects + mr.leak_suspects
        if tm is None and mr is None:
            continue
        procs.append(HeapProcess(proc.pid, str(proc.info.get("role")), tm, mr, suspects))
    pool.shutdown()
    if not procs:
        return None
    if pending and bounds is not None:
        notes.append("memray figures other than growth across markers cover each process's whole run: --window does not cut them")
    suspects = sorted((s for p in procs for s in p.leak_suspects),
                      key=lambda s: -(s.growth_bytes_per_step if s.growth_bytes_per_step is not None else s.growth_bytes_per_second))
    peaks = [(p.memray.peak_bytes if p.memray else p.tracemalloc.peak_bytes, p.pid) for p in procs]
    peak, peak_pid = max(peaks)
    mrs = [p.memray for p in procs if p.memray]
    tms = [p.tracemalloc for p in procs if p.tracemalloc]
    span = None
    if mrs:
        span = max(m.duration_s for m in mrs) if any(m.allocations_per_second is not None for m in mrs) else None
    return HeapAnalysis(
        window=window_label, k=k, processes=procs, leak_suspects=suspects[:50], peak_bytes=peak, peak_pid=peak_pid,
        leaked_bytes_at_exit=sum(m.leaked_bytes for m in mrs) if mrs else None,
        temporary_allocations=sum(m.temporary_allocations for m in mrs) if mrs else None,
        total_allocations=sum(m.total_allocations for m in mrs) if mrs else None,
        allocations_per_second=(sum(m.total_allocations for m in mrs) / span) if mrs and span else None,
        live_bytes_at_exit=sum(t.live_bytes_end for t in tms) if tms else None,
        notes=notes,
    )


def section_result(a: HeapAnalysis, window: str | None = None):
    from kvprof.analysis import Finding, SectionResult, metric_entry

    def put(name, value, src):
        return name, metric_entry(name, value, src, window)

    src = "memray" if any(p.memray for p in a.processes) else "tracemalloc"
    per_step = [s.growth_bytes_per_step for s in a.leak_suspects if s.growth_bytes_per_step is not None]
    has_tm = any(p.tracemalloc for p in a.processes)
    # memray's growth across markers counts as a leak search only where markers were replayed
    has_growth = has_tm or any(p.memray and p.memray.growth is not None for p in a.processes)
    growth_src = "tracemalloc" if has_tm else "memray"
    metrics = dict([
        put("heap.peak_bytes", a.peak_bytes, src),
        put("heap.leak_suspects", len(a.leak_suspects) if has_growth else None, growth_src),
        # 0 for a clean run; None when the suspects grow per second (a run without markers),
        # not 0, so that a "lower is better" budget cannot pass a leak it cannot measure per step
        put("heap.leak_suspect_bytes_per_step", float(sum(per_step)) if per_step else (0.0 if has_growth and not a.leak_suspects else None), growth_src),
        put("heap.live_bytes_at_exit", a.live_bytes_at_exit, "tracemalloc"),
        put("heap.leaked_bytes_at_exit", a.leaked_bytes_at_exit, "memray"),
        put("heap.temporary_allocations", a.temporary_allocations, "memray"),
        put("heap.allocations", a.total_allocations, "memray"),
        put("heap.allocations_per_second", a.allocations_per_second, "memray"),
    ])
    findings = []
    mib = lambda n: f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n / 1024:,.1f} KiB"  # noqa: E731
    for s in a.leak_suspects[:3]:
        rate = (f"{mib(s.growth_bytes_per_step)} per {s.window['marker']}" if s.growth_bytes_per_step is not None
                else f"{mib(s.growth_bytes_per_second)} per second")
        findings.append(Finding(
            "warning", f"possible leak in process {s.pid} ({s.role}): {s.site} grows {rate}",
            f"{s.evidence}; {mib(s.live_bytes)} live at the end of the window ({s.window['start_s']:.2f}–{s.window['end_s']:.2f} s).",
            {"pid": s.pid, "site": s.site, "growth_bytes_per_step": s.growth_bytes_per_step, "live_bytes": s.live_bytes}, s.source))
    for p in a.processes:
        m = p.memray
        if m and m.growth_note and (m.growth is not None or "records" in m.growth_note):
            findings.append(Finding("info", f"process {p.pid}: no memray growth analysis", m.growth_note, {"pid": p.pid}, "memray"))
        if m and m.note:
            findings.append(Finding("warning", f"process {p.pid}: memray capture incomplete", m.note, {"pid": p.pid, "file": m.file}, "memray"))
        if m and m.leaked_bytes and m.leaked_stacks:
            top = m.leaked_stacks[0]
            findings.append(Finding(
                "info", f"process {p.pid} ({p.role}) left {mib(m.leaked_bytes)} allocated at exit ({m.leaked_allocations:,} allocations)",
                f"Largest: {top.site}, {mib(top.bytes)} in {top.count:,} allocation(s). memray's leak view counts memory never freed before the tracker stopped"
                + ("; with pymalloc, small objects show up as arenas (record with PYTHONMALLOC=malloc or --memray-python-allocators to see them one by one)" if m.python_allocator == "pymalloc" and not m.trace_python_allocators else ""),
                {"pid": p.pid, "leaked_bytes": m.leaked_bytes, "top_site": top.site}, "memray"))
        if m and m.churn:
            c = max(m.churn, key=lambda c: c.allocated_bytes)
            findings.append(Finding(
                "info", f"process {p.pid}: busiest allocation site {c.site}",
                (f"{c.allocations:,} allocations ({mib(c.allocated_bytes)}) in {m.duration_s:.2f} s"
                 + (f", {c.allocations_per_second:,.0f}/s; " if c.allocations_per_second is not None else "; ")
                 if c.allocations is not None else f"{mib(c.allocated_bytes)} allocated in {m.duration_s:.2f} s; ")
                + (f"{c.temporary:,} of them temporary (freed before the next allocation)." if c.temporary is not None
                 else f"{m.temporary_allocations:,} temporary allocations in the process."),
                {"pid": p.pid, "site": c.site, "allocations": c.allocations}, "memray"))
    for n in a.notes:
        findings.append(Finding("info", "heap: " + n.split(":", 1)[0], n, {}, "heap"))
    section = dataclasses.asdict(a)
    return SectionResult(name="heap", metrics=metrics, section=section, findings=findings)


def section(bundle, bounds=None):
    """SECTION_ANALYZERS entry: None unless --probe tracemalloc or memray recorded something."""
    label = "whole run" if bounds is None else getattr(bounds, "label", "between markers")
    a = analyze_heap(bundle, bounds, label)
    if a is None:
        return None
    return section_result(a, None if bounds is None else label)


def analyze_capture(path: str):
    """A bare memray capture file (`kvprof analyze x.bin`) as a heap section."""
    m = analyze_memray_file(path)
    pid = m.pid
    a = HeapAnalysis(window="whole capture", k=K_CONSECUTIVE, processes=[HeapProcess(pid, "capture", None, m, [])], leak_suspects=[],
                     peak_bytes=m.peak_bytes, peak_pid=pid, leaked_bytes_at_exit=m.leaked_bytes,
                     temporary_allocations=m.temporary_allocations, total_allocations=m.total_allocations,
                     allocations_per_second=m.allocations_per_second, live_bytes_at_exit=None)
    return section_result(a)
