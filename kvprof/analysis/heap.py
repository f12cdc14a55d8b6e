"""Python and native heap (``--probe tracemalloc``, ``--probe memray``): the heap section.

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

Three modules: ``heap_suspects`` (the tracemalloc analysis and the leak-suspect rule),
``memray_reader`` (a memray capture, read in a child process) and this one (both per
process, assembled into the heap section, its metrics and findings).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvprof.analysis.heap_suspects import K_CONSECUTIVE, LeakSuspect, TracemallocProcess, analyze_tracemalloc
from kvprof.analysis.memray_reader import MemrayProcess, analyze_memray_file

if TYPE_CHECKING:
    from concurrent.futures import Future

    from kvprof.analysis.results import Finding, SectionResult, Window
    from kvprof.trace.reader import Bundle, Marks, ProcessData


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


# -- the section ---------------------------------------------------------------------------
def _marks_of(proc: ProcessData, marks: Marks, bounds: tuple[int, int] | None, k: int) -> dict[str, Any] | None:
    """One process's markers, in order, for the memray reader (names, times, window)."""
    mine = np.flatnonzero(marks.pid == proc.pid)
    if not len(mine):
        return {"names": [], "t": [], "start_ns": 0, "k": int(k), "bounds": None}
    return {
        "names": [marks.names[int(i)] for i in marks.name[mine]],
        "t": [int(t) for t in marks.t[mine]],
        "start_ns": int(proc.info.get("start_ns") or marks.t[mine][0]),
        "k": int(k),
        "bounds": None if bounds is None else [int(bounds[0]), int(bounds[1])],
    }


def analyze_heap(
    bundle: Bundle, bounds: tuple[int, int] | None = None, window_label: str = "whole run", k: int = K_CONSECUTIVE
) -> HeapAnalysis | None:
    marks = bundle.marks()
    procs: list[HeapProcess] = []
    notes: list[str] = []
    # memray captures are read in child processes: start them all, then collect
    from concurrent.futures import ThreadPoolExecutor

    from kvprof.errors import BundleError

    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    pending: dict[int, Future[MemrayProcess]] = {}
    for proc in bundle.processes:
        probes = proc.info.get("probes") or {}
        capture = proc.memray_file() if "memray" in probes else None
        if capture:
            pending[proc.pid] = pool.submit(analyze_memray_file, capture, _marks_of(proc, marks, bounds, k))
    for proc in bundle.processes:
        probes = proc.info.get("probes") or {}
        if "tracemalloc" not in probes and "memray" not in probes:
            continue
        tm, suspects = analyze_tracemalloc(proc, marks, bounds, k) if "tracemalloc" in probes else (None, [])
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
        notes.append(
            "memray figures other than growth across markers cover each process's whole run: --window does not cut them"
        )
    suspects = sorted(
        (s for p in procs for s in p.leak_suspects),
        key=lambda s: -(s.growth_bytes_per_step if s.growth_bytes_per_step is not None else s.growth_bytes_per_second),
    )
    peaks = [
        (p.memray.peak_bytes if p.memray else p.tracemalloc.peak_bytes if p.tracemalloc else 0, p.pid) for p in procs
    ]
    peak, peak_pid = max(peaks)
    mrs = [p.memray for p in procs if p.memray]
    tms = [p.tracemalloc for p in procs if p.tracemalloc]
    span = None
    if mrs:
        span = max(m.duration_s for m in mrs) if any(m.allocations_per_second is not None for m in mrs) else None
    return HeapAnalysis(
        window=window_label,
        k=k,
        processes=procs,
        leak_suspects=suspects[:50],
        peak_bytes=peak,
        peak_pid=peak_pid,
        leaked_bytes_at_exit=sum(m.leaked_bytes for m in mrs) if mrs else None,
        temporary_allocations=sum(m.temporary_allocations for m in mrs) if mrs else None,
        total_allocations=sum(m.total_allocations for m in mrs) if mrs else None,
        allocations_per_second=(sum(m.total_allocations for m in mrs) / span) if mrs and span else None,
        live_bytes_at_exit=sum(t.live_bytes_end for t in tms) if tms else None,
        notes=notes,
    )


def section_result(a: HeapAnalysis, window: str | None = None) -> SectionResult:
    from kvprof.analysis import Finding, SectionResult, metric_entry

    def put(name: str, value: Any, src: str) -> tuple[str, dict[str, Any]]:
        return name, metric_entry(name, value, src, window)

    src = "memray" if any(p.memray for p in a.processes) else "tracemalloc"
    per_step = [s.growth_bytes_per_step for s in a.leak_suspects if s.growth_bytes_per_step is not None]
    has_tm = any(p.tracemalloc for p in a.processes)
    # memray's growth across markers counts as a leak search only where markers were replayed
    has_growth = has_tm or any(p.memray and p.memray.growth is not None for p in a.processes)
    growth_src = "tracemalloc" if has_tm else "memray"
    metrics = dict(
        [
            put("heap.peak_bytes", a.peak_bytes, src),
            put("heap.leak_suspects", len(a.leak_suspects) if has_growth else None, growth_src),
            # 0 for a clean run; None when the suspects grow per second (a run without markers),
            # not 0, so that a "lower is better" budget cannot pass a leak it cannot measure per step
            put(
                "heap.leak_suspect_bytes_per_step",
                float(sum(per_step)) if per_step else (0.0 if has_growth and not a.leak_suspects else None),
                growth_src,
            ),
            put("heap.live_bytes_at_exit", a.live_bytes_at_exit, "tracemalloc"),
            put("heap.leaked_bytes_at_exit", a.leaked_bytes_at_exit, "memray"),
            put("heap.temporary_allocations", a.temporary_allocations, "memray"),
            put("heap.allocations", a.total_allocations, "memray"),
            put("heap.allocations_per_second", a.allocations_per_second, "memray"),
        ]
    )
    findings: list[Finding] = []
    mib: Callable[[float], str] = lambda n: f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n / 1024:,.1f} KiB"  # noqa: E731
    for s in a.leak_suspects[:3]:
        rate = (
            f"{mib(s.growth_bytes_per_step)} per {s.window['marker']}"
            if s.growth_bytes_per_step is not None
            else f"{mib(s.growth_bytes_per_second)} per second"
        )
        findings.append(
            Finding(
                "warning",
                f"possible leak in process {s.pid} ({s.role}): {s.site} grows {rate}",
                f"{s.evidence}; {mib(s.live_bytes)} live at the end of the window ({s.window['start_s']:.2f}–{s.window['end_s']:.2f} s).",
                {
                    "pid": s.pid,
                    "site": s.site,
                    "growth_bytes_per_step": s.growth_bytes_per_step,
                    "live_bytes": s.live_bytes,
                },
                s.source,
            )
        )
    for p in a.processes:
        m = p.memray
        if m and m.growth_note and (m.growth is not None or "records" in m.growth_note):
            findings.append(
                Finding("info", f"process {p.pid}: no memray growth analysis", m.growth_note, {"pid": p.pid}, "memray")
            )
        if m and m.note:
            findings.append(
                Finding(
                    "warning",
                    f"process {p.pid}: memray capture incomplete",
                    m.note,
                    {"pid": p.pid, "file": m.file},
                    "memray",
                )
            )
        if m and m.leaked_bytes and m.leaked_stacks:
            top = m.leaked_stacks[0]
            findings.append(
                Finding(
                    "info",
                    f"process {p.pid} ({p.role}) left {mib(m.leaked_bytes)} allocated at exit ({m.leaked_allocations:,} allocations)",
                    f"Largest: {top.site}, {mib(top.bytes)} in {top.count:,} allocation(s). memray's leak view counts memory never freed before the tracker stopped"
                    + (
                        "; with pymalloc, small objects show up as arenas (record with PYTHONMALLOC=malloc or --memray-python-allocators to see them one by one)"
                        if m.python_allocator == "pymalloc" and not m.trace_python_allocators
                        else ""
                    ),
                    {"pid": p.pid, "leaked_bytes": m.leaked_bytes, "top_site": top.site},
                    "memray",
                )
            )
        if m and m.churn:
            c = max(m.churn, key=lambda c: c.allocated_bytes)
            findings.append(
                Finding(
                    "info",
                    f"process {p.pid}: busiest allocation site {c.site}",
                    (
                        f"{c.allocations:,} allocations ({mib(c.allocated_bytes)}) in {m.duration_s:.2f} s"
                        + (f", {c.allocations_per_second:,.0f}/s; " if c.allocations_per_second is not None else "; ")
                        if c.allocations is not None
                        else f"{mib(c.allocated_bytes)} allocated in {m.duration_s:.2f} s; "
                    )
                    + (
                        f"{c.temporary:,} of them temporary (freed before the next allocation)."
                        if c.temporary is not None
                        else f"{m.temporary_allocations:,} temporary allocations in the process."
                    ),
                    {"pid": p.pid, "site": c.site, "allocations": c.allocations},
                    "memray",
                )
            )
    for n in a.notes:
        findings.append(Finding("info", "heap: " + n.split(":", 1)[0], n, {}, "heap"))
    section = dataclasses.asdict(a)
    return SectionResult(name="heap", metrics=metrics, section=section, findings=findings)


def section(bundle: Bundle, bounds: Window | None = None) -> SectionResult | None:
    """SECTION_ANALYZERS entry: None unless --probe tracemalloc or memray recorded something."""
    label = "whole run" if bounds is None else getattr(bounds, "label", "between markers")
    a = analyze_heap(bundle, bounds, label)
    if a is None:
        return None
    return section_result(a, None if bounds is None else label)


def analyze_capture(path: str) -> SectionResult:
    """A bare memray capture file (`kvprof analyze x.bin`) as a heap section."""
    m = analyze_memray_file(path)
    pid = m.pid
    a = HeapAnalysis(
        window="whole capture",
        k=K_CONSECUTIVE,
        processes=[HeapProcess(pid, "capture", None, m, [])],
        leak_suspects=[],
        peak_bytes=m.peak_bytes,
        peak_pid=pid,
        leaked_bytes_at_exit=m.leaked_bytes,
        temporary_allocations=m.temporary_allocations,
        total_allocations=m.total_allocations,
        allocations_per_second=m.allocations_per_second,
        live_bytes_at_exit=None,
    )
    return section_result(a)
