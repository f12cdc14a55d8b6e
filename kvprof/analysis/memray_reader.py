"""memray captures (``--probe memray``, or a bare capture given to `kvprof analyze`): totals,
peak, leaks, temporaries and churn by stack, and the growth across the process's markers.

Read in a child process (analyze_memray_file): memray's reader is C++ and a corrupt or
hostile capture can crash it, and it logs problems straight to fd 2.

From memray the live bytes by stack at each marker are replayed from its capture (every
allocation and free in order, up to the buffer the probe allocates at each marker),
native frames included with ``--memray-native``, and judged by the leak-suspect rule of
kvprof.analysis.heap_suspects.  Apart from suspects, memray's allocations still alive at
exit are grouped by stack.  Temporary allocation: freed before any other allocation was
made in between (memray's and heaptrack's definition), counted by stack.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from kvprof.analysis.heap_suspects import (
    K_CONSECUTIVE,
    MIN_GROWTH_BYTES,
    MIN_R2,
    STEADY_MARKERS,
    TOP,
    WARMUP_FRACTION,
    Frame,
    LeakSuspect,
    StackBytes,
    least_squares,
    longest_growth_run,
    site_of,
)
from kvprof.owncode import is_own_code

if TYPE_CHECKING:
    from memray import AllocationRecord, FileReader, Metadata

    StackElement = tuple[str, str, int]  # memray's (function, file, line)
    Trace = tuple[StackElement, ...]  # a memray stack, innermost first
    SummaryRecords = tuple[list[AllocationRecord], list[AllocationRecord], list[AllocationRecord]]


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
    leak_suspects: list[LeakSuspect] = field(
        default_factory=list
    )  # growth across markers (LeakSuspect, pid/role filled by analyze_heap)
    growth: dict[str, Any] | None = None  # {"markers", "marker", "steady_snapshots"} when markers were replayed
    growth_note: str | None = None  # why there is no growth analysis (no markers, a capture too large, ...)


def _memray_frames(trace: Iterable[StackElement]) -> list[Frame]:
    # memray gives (function, file, line), innermost first
    return [Frame(str(fl), int(ln or 0), str(fn)) for fn, fl, ln in trace]


FREE_ALLOCATORS = {1, 5, 15}  # PYMALLOC_FREE, FREE, MUNMAP (memray.AllocatorType)
# Above this many records (allocations and frees) reading them one by one in Python
# takes minutes: churn then comes from memray's own per-location statistics (C++),
# by innermost frame, without frees per site.
EXACT_CHURN_RECORDS = int(os.environ.get("KVPROF_MEMRAY_EXACT_RECORDS") or 2_000_000)


def _is_own(trace: Iterable[StackElement]) -> bool:
    """memray stacks (function, file, line) that pass through kvprof's recording code or tracemalloc."""
    return any(is_own_code(str(fl)) or str(fl).endswith("/tracemalloc.py") for _, fl, _ in trace)


def _trace(record: AllocationRecord, hybrid: bool) -> Trace:
    """A memray record's stack, innermost first (with native frames when recorded)."""
    try:
        return tuple(record.hybrid_stack_trace() if hybrid else record.stack_trace())
    except Exception:  # frees carry no stack
        return ()


def _group(records: Iterable[AllocationRecord], limit: int = TOP, hybrid: bool = False) -> list[StackBytes]:
    """Records grouped by Python stack, largest first; kvprof's own stacks left out."""
    by: dict[Trace, list[int]] = {}
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
        out.append(StackBytes(frames, site_of(frames), int(b), int(n)))
    return out


class _CapturedStderr:
    """memray's reader logs problems (a capture cut short) from C++ straight to fd 2:
    keep them out of the terminal and hand them to the analysis as one note."""

    _saved: int | None

    def __enter__(self) -> _CapturedStderr:
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

    def __exit__(self, *exc: object) -> Literal[False]:
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
        self._tmp.seek(0)
        self.lines = [ln for ln in self._tmp.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        self._tmp.close()
        return False


def _require_memray(path: str) -> ModuleType:
    """The memray module; without it, the one line saying that reading this capture needs it."""
    try:
        import memray
    except ImportError:
        from kvprof.errors import BundleError

        raise BundleError(
            f"{path} is a memray capture; reading it needs memray (pip install 'kvprof[memray]')"
        ) from None
    return memray


def analyze_memray_file(path: str, marks: dict[str, Any] | None = None) -> MemrayProcess:
    """One memray capture: totals, peak, leaks, temporaries and churn by stack, and with the
    process's markers (``{"names", "t", "start_ns", "bounds", "k"}``) the growth across them.

    Read in a child process: memray's reader is C++ and a corrupt or hostile capture
    can crash it; that must end in one line about the file, not take kvprof down."""
    import json
    import subprocess

    from kvprof.errors import BundleError

    _require_memray(path)  # here, not in the child: one line before a process starts
    code = "import sys; from kvprof.analysis.memray_reader import _read_worker; _read_worker(sys.argv[1])"
    env = dict(os.environ)
    env.pop("KVPROF_BUNDLE", None)  # never record the reader
    parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-c", code, path],
        capture_output=True,
        env=env,
        input=json.dumps(marks).encode() if marks else b"",
    )
    if proc.returncode < 0:
        raise BundleError(f"memray's reader crashed (signal {-proc.returncode}) on {path}: the capture is corrupt")
    try:
        out = json.loads(proc.stdout.decode() or "null")
    except ValueError:
        out = None
    if not isinstance(out, dict):
        raise BundleError(
            f"could not read memray capture {path}: {proc.stderr.decode(errors='replace').strip()[-300:]}"
        )
    if "error" in out:
        raise BundleError(out["error"])
    return _memray_from_json(out)


MIN_RATE_SECONDS = 0.01  # a capture shorter than this (or without an end time) gives no per-second rates


def _per_s(n: float | None, duration: float) -> float | None:
    return None if n is None or duration < MIN_RATE_SECONDS else n / duration


def _large_capture(path: str, reader: FileReader, meta: Metadata, hybrid: bool, duration: float) -> MemrayProcess:  # noqa: C901
    from memray._memray import compute_statistics

    try:
        st = compute_statistics(path, num_largest=TOP * 3)
        records = _summary_records(reader)
    except Exception as exc:
        from kvprof.errors import BundleError

        raise BundleError(f"memray capture {path} is truncated or corrupt: {exc}") from None
    counts = dict(st.top_locations_by_count)
    churn: list[ChurnSite] = []
    for loc, size in st.top_locations_by_size:
        if _is_own((loc,)) or len(churn) >= TOP:
            continue
        frames = _memray_frames([loc])
        n = counts.get(loc)  # None: not among memray's most frequent locations
        churn.append(
            ChurnSite(
                frames, site_of(frames), None if n is None else int(n), int(size), None, _per_s(n, duration), None, None
            )
        )
    return _memray_process(
        path,
        meta,
        hybrid,
        duration,
        records,
        total_allocations=int(st.total_num_allocations),
        total_allocated_bytes=int(st.total_memory_allocated),
        frees=None,
        churn=churn,
        churn_note=(
            f"{meta.total_allocations:,} records: churn by innermost frame from memray's own statistics, "
            f"without frees per site (exact up to {EXACT_CHURN_RECORDS:,} records)"
        ),
        growth_note=(
            f"{meta.total_allocations:,} records: growth across markers is replayed record by record only up to "
            f"{EXACT_CHURN_RECORDS:,} (KVPROF_MEMRAY_EXACT_RECORDS)"
        ),
    )


def _summary_records(reader: FileReader) -> SummaryRecords:
    """memray's temporary, leaked and high-water-mark records, threads merged."""
    return (
        list(reader.get_temporary_allocation_records(merge_threads=True, threshold=1)),
        list(reader.get_leaked_allocation_records(merge_threads=True)),
        list(reader.get_high_watermark_allocation_records(merge_threads=True)),
    )


def _memray_process(
    path: str,
    meta: Metadata,
    hybrid: bool,
    duration: float,
    records: SummaryRecords,
    *,
    total_allocations: int,
    total_allocated_bytes: int,
    frees: int | None,
    churn: list[ChurnSite],
    **more: Any,
) -> MemrayProcess:
    """A capture's MemrayProcess from its metadata and its summary records (temporary, leaked,
    peak); the totals and churn come from however the capture was read (record by record, or
    memray's statistics for a large one), ``more`` the fields only one way fills."""
    temporary, leaked, peak = records
    return MemrayProcess(
        file=path,
        pid=int(meta.pid),
        native=hybrid,
        python_allocator=str(meta.python_allocator),
        trace_python_allocators=bool(meta.trace_python_allocators),
        duration_s=duration,
        total_allocations=total_allocations,
        total_allocated_bytes=total_allocated_bytes,
        frees=frees,
        peak_bytes=int(meta.peak_memory),
        leaked_bytes=int(sum(r.size for r in leaked)),
        leaked_allocations=int(sum(r.n_allocations for r in leaked)),
        temporary_allocations=int(sum(r.n_allocations for r in temporary)),
        temporary_bytes=int(sum(r.size for r in temporary)),
        allocations_per_second=_per_s(total_allocations, duration),
        peak_stacks=_group(peak, hybrid=hybrid),
        leaked_stacks=_group(leaked, hybrid=hybrid),
        temporary_stacks=_group(temporary, hybrid=hybrid),
        churn=churn,
        **more,
    )


def _memray_from_json(d: dict[str, Any]) -> MemrayProcess:
    def frames(lst: list[dict[str, Any]]) -> list[Frame]:
        return [Frame(**f) for f in lst]

    def stacks(lst: list[dict[str, Any]]) -> list[StackBytes]:
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


def _read_capture(path: str, marks: dict[str, Any] | None = None) -> MemrayProcess:
    with _CapturedStderr() as err:
        result = _replay_capture(path, marks)
    if err.lines:
        result.reader_errors = len(err.lines)
        result.note = (
            f"memray's reader reported {len(err.lines)} problem(s) in this capture, which may have been cut short "
            f"(its process killed before memray closed it); figures cover what it holds. First: {err.lines[0]}"
        )
    return result


class _LiveBySite:
    """Live bytes and allocations per memray stack id while the records are replayed in order,
    and a sparse snapshot (the stacks that changed since the last one) at each marker buffer."""

    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}
        self.count: dict[int, int] = {}
        self.dirty: set[int] = set()
        # (marker ordinal modulo MARK_SPAN, {stack id: (bytes, count)})
        self.snaps: list[tuple[int, dict[int, tuple[int, int]]]] = []
        self.marker_sids: set[int] = set()
        self.not_marker: set[int] = set()

    def add(self, sid: int, size: int) -> None:
        self.bytes[sid] = self.bytes.get(sid, 0) + size
        self.count[sid] = self.count.get(sid, 0) + 1
        self.dirty.add(sid)

    def sub(self, sid: int, size: int) -> None:
        if sid in self.marker_sids:
            return
        self.bytes[sid] = self.bytes.get(sid, 0) - size
        self.count[sid] = self.count.get(sid, 0) - 1
        self.dirty.add(sid)

    def is_marker(self, record: AllocationRecord, size: int) -> bool:
        """The buffer kvprof's memray probe allocates at each marker (kvprof/probes/heap.py)."""
        from kvprof.probes.heap import MARK_BASE, MARK_SPAN

        if not MARK_BASE < size <= MARK_BASE + MARK_SPAN:
            return False
        sid = record.stack_id
        if sid in self.marker_sids:
            return True
        if sid in self.not_marker:
            return False
        frames: Sequence[StackElement]
        try:
            frames = record.stack_trace()
        except Exception:  # noqa: BLE001 - no stack
            frames = ()
        mine = any(
            fn == "_memray_mark" and str(fl).replace(os.sep, "/").endswith("kvprof/probes/heap.py")
            for fn, fl, _ in frames
        )
        (self.marker_sids if mine else self.not_marker).add(sid)
        return mine

    def snapshot(self, size: int) -> None:
        from kvprof.probes.heap import MARK_BASE, MARK_SPAN

        mod = (size - MARK_BASE - 1) % MARK_SPAN
        if self.snaps and self.snaps[-1][0] == mod and not self.dirty:
            return  # the same buffer seen twice (a Python allocator and malloc both traced)
        self.snaps.append((mod, {sid: (self.bytes[sid], self.count[sid]) for sid in self.dirty}))
        self.dirty.clear()


def _marker_ordinals(mods: list[int], n_marks: int) -> list[int] | None:
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


def _memray_growth(
    live: _LiveBySite, marks: dict[str, Any], reps: dict[int, AllocationRecord], hybrid: bool
) -> tuple[list[LeakSuspect], dict[str, Any] | None, str | None]:
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
    counts: dict[str, int] = {}
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
        series = series[int(np.ceil(WARMUP_FRACTION * len(series))) :]
    growth: dict[str, Any] = {"markers": len(live.snaps), "marker": marker, "steady_snapshots": len(series)}
    if len(series) < k + 1:
        return [], growth, f"{len(series)} steady-state marker snapshots; leak suspects need at least {k + 1}"
    # the marker's ordinal among this process's calls of it (1-based), as for tracemalloc
    ordinal_of: dict[int, int] = {}
    seen = 0
    for i, n in enumerate(names):
        if n == marker:
            seen += 1
            ordinal_of[i] = seen
    x = np.array([ordinal_of[ordinals[j]] for j in series], dtype=float)
    # pass 1: each stack's value at the first and the last steady snapshot
    state: dict[int, tuple[int, int]] = {}
    first: dict[int, tuple[int, int]] | None = None
    want = {series[0]: "first", series[-1]: "last"}
    for j, (_, delta) in enumerate(live.snaps):
        state.update(delta)
        if want.get(j) == "first":
            first = dict(state)
        if j == series[-1]:
            break
    last = state
    assert first is not None  # set at the series' first index, which the loop reaches
    # group the stacks that grew by their trace (a Python stack may have several memray stack ids)
    groups: dict[Trace, list[int]] = {}
    for sid, (b, _n) in last.items():
        b0 = first.get(sid, (0, 0))[0]
        if b <= b0 or sid in live.marker_sids:
            continue
        rec = reps.get(sid)
        trace = _trace(rec, hybrid) if rec is not None else ()
        if _is_own(trace):
            continue
        groups.setdefault(trace, []).append(sid)
    grown = {
        t: sids
        for t, sids in groups.items()
        if sum(last[s][0] - first.get(s, (0, 0))[0] for s in sids) >= MIN_GROWTH_BYTES
    }
    if not grown:
        return [], growth, None
    # pass 2: those groups' live bytes and allocations at every steady snapshot
    keys = list(grown)
    row_of = {sid: r for r, t in enumerate(keys) for sid in grown[t]}
    y = np.zeros((len(keys), len(series)))
    cnt = np.zeros((len(keys), len(series)), dtype=np.int64)
    cur_b = np.zeros(len(keys))
    cur_n = np.zeros(len(keys), dtype=np.int64)
    per_sid: dict[int, tuple[int, int]] = {}
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
    run = longest_growth_run(d)
    slope, r2 = least_squares(x, y)
    total = y[:, -1] - y[:, 0]
    cand = np.flatnonzero((run >= k) & (slope > 0) & (total >= MIN_GROWTH_BYTES) & (r2 >= MIN_R2))
    t0 = int(marks.get("start_ns") or (times[0] if times else 0))
    start_s = (times[ordinals[series[0]]] - t0) / 1e9
    end_s = (times[ordinals[series[-1]]] - t0) / 1e9
    span_s = (end_s - start_s) or None
    suspects: list[LeakSuspect] = []
    for r in cand[np.argsort(slope[cand])[::-1]]:
        frames = _memray_frames(keys[r])
        suspects.append(
            LeakSuspect(
                pid=0,
                role="",
                source="memray",
                site=site_of(frames),
                stack=frames,
                live_bytes=int(y[r, -1]),
                live_blocks=int(cnt[r, -1]),
                growth_bytes_per_step=float(slope[r]),
                growth_bytes_per_second=float(total[r] / span_s) if span_s else 0.0,
                consecutive_growth=int(run[r]),
                r2=float(r2[r]),
                window={
                    "marker": marker,
                    "from": float(x[0]),
                    "to": float(x[-1]),
                    "snapshots": int(len(series)),
                    "start_s": float(start_s),
                    "end_s": float(end_s),
                },
                evidence=(
                    f"live bytes (memray, {'native and Python' if hybrid else 'Python'} stacks) grew in {int(run[r])} consecutive "
                    f"{marker} intervals (k={k}), {int(y[r, 0]):,} → {int(y[r, -1]):,} B over {len(series)} markers, "
                    f"{slope[r]:,.0f} B per step (least squares, r²={r2[r]:.2f})"
                ),
            )
        )
    return suspects, growth, None


def _replay_capture(path: str, marks: dict[str, Any] | None = None) -> MemrayProcess:
    """The child's reading of a capture: every record in order when there are few enough
    (churn by stack, frees attributed through their address, live bytes at each marker),
    memray's own statistics otherwise."""
    from kvprof.errors import BundleError

    memray = _require_memray(path)
    try:
        reader = memray.FileReader(path)
        meta = reader.metadata
    except Exception as exc:
        raise BundleError(f"unreadable memray capture {path}: {exc}") from None
    if int(getattr(meta, "file_format", 0) or 0) != 0:  # memray run --aggregate: no allocation records
        raise BundleError(
            f"{path} is an aggregated memray capture (memray run --aggregate): kvprof needs every allocation "
            "(record without --aggregate; `memray summary` reads this one)"
        )
    hybrid = bool(meta.has_native_traces)
    # memray's start and end times; a forked worker that leaves through os._exit ends its
    # capture without an end time (end == start): no rate then, rather than billions per second
    duration = max((meta.end_time - meta.start_time).total_seconds(), 0.0)
    if meta.total_allocations > EXACT_CHURN_RECORDS:
        return _large_capture(path, reader, meta, hybrid, duration)
    try:
        # churn by site: every allocation and free, frees attributed through their address
        allocs: dict[int, list[Any]] = {}  # stack_id -> [count, bytes, frees, representative record]
        live: dict[int, tuple[int, int]] = {}  # address -> (stack_id, size)
        by_site = (
            _LiveBySite() if marks and marks.get("names") else None
        )  # live bytes by stack at each marker, for growth
        total = total_bytes = frees = 0
        for r in reader.get_allocation_records():
            a = r.allocator
            if a in FREE_ALLOCATORS:
                frees += 1
                freed = live.pop(r.address, None)
                if freed is not None:
                    allocs[freed[0]][2] += 1
                    if by_site is not None:
                        by_site.sub(freed[0], freed[1])
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
        records = _summary_records(reader)
    except Exception as exc:
        raise BundleError(f"memray capture {path} is truncated or corrupt: {exc}") from None
    temp_by_site: dict[Trace, int] = {}
    for r in records[0]:  # the temporary allocations
        key = _trace(r, hybrid)
        temp_by_site[key] = temp_by_site.get(key, 0) + r.n_allocations
    # the same Python stack can have several memray stack ids (threads, native parts): merge
    by_trace: dict[Trace, list[int]] = {}
    own = [0, 0]
    for n, b, nf, rec in allocs.values():
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
    churn: list[ChurnSite] = []
    for trace, (n, b, nf) in sorted(by_trace.items(), key=lambda kv: -kv[1][1])[:TOP]:
        frames = _memray_frames(trace)
        churn.append(
            ChurnSite(
                frames, site_of(frames), n, b, nf, _per_s(n, duration), _per_s(nf, duration), temp_by_site.get(trace, 0)
            )
        )
    suspects: list[LeakSuspect]
    growth: dict[str, Any] | None
    growth_note: str | None
    suspects, growth, growth_note = ([], None, None)
    if marks is not None and by_site is None:
        growth_note = "no kvprof.mark calls in this process: no growth across markers"
    if by_site is not None and marks is not None:  # by_site is made only with marks
        suspects, growth, growth_note = _memray_growth(by_site, marks, {sid: e[3] for sid, e in allocs.items()}, hybrid)
    return _memray_process(
        path,
        meta,
        hybrid,
        duration,
        records,
        total_allocations=total,
        total_allocated_bytes=total_bytes,
        frees=frees,
        churn=churn,
        kvprof_allocations=own[0],
        kvprof_allocated_bytes=own[1],
        leak_suspects=suspects,
        growth=growth,
        growth_note=growth_note,
    )
