"""Garbage-collector pauses (``--probe gc``): a bundle's gc streams → typed results.

Per process and in total: collections and pause time by generation, the
longest pauses with the marker they followed, the share of the process's
wall time spent collecting, and advice backed by those numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from kvprof.analysis.results import SectionResult, Window
    from kvprof.trace.reader import Bundle, ProcessData

GENERATIONS = (0, 1, 2)


@dataclass
class GenStats:
    generation: int
    collections: int
    pause_s: float
    max_pause_s: float
    p99_pause_s: float | None
    collected: int
    uncollectable: int


@dataclass
class Pause:
    pid: int
    generation: int
    start_s: float  # from the process's start
    duration_s: float
    collected: int
    after_marker: str | None  # the last marker before it, "name" or "name=value"


@dataclass
class GcProcess:
    pid: int
    role: str
    wall_s: float | None
    collections: int
    pause_s: float
    max_pause_s: float
    time_share: float | None  # pause / wall time
    by_generation: list[GenStats]
    thresholds: list[Any] | None
    frozen: int | None


@dataclass
class GcAnalysis:
    window: str
    collections: int
    pause_s: float
    max_pause_s: float
    time_share: float | None  # of the busiest process
    uncollectable: int
    by_generation: list[GenStats]
    processes: list[GcProcess]
    longest: list[Pause]
    advice: list[dict[str, Any]] = field(default_factory=list)


def _gen_stats(ev: np.ndarray) -> list[GenStats]:
    out = []
    for g in GENERATIONS:
        sel = ev[ev["generation"] == g]
        d = sel["duration"] / 1e9
        out.append(
            GenStats(
                g,
                int(len(sel)),
                float(d.sum()),
                float(d.max()) if len(d) else 0.0,
                float(np.percentile(d, 99)) if len(d) else None,
                int(sel["collected"].sum()),
                int(sel["uncollectable"].sum()),
            )
        )
    return out


MAX_PAUSE_NS = 3600 * 10**9  # a collection longer than an hour is a damaged record


def _ints(v: Any) -> list[int] | None:
    """A list of plain integers from a process record, or None (a damaged note)."""
    if isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return v
    return None


def _end_ns(info: dict[str, Any]) -> int | None:
    v = info.get("end_ns")
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _plausible(proc: ProcessData) -> np.ndarray:
    """The process's collections that can be real: a generation of 0-2, a pause of zero to
    an hour, counts that are not negative, inside the process's life when it is known.
    The rest is a damaged stream: dropped, and said (bundle damage)."""
    ev = proc.gc_events()
    if not len(ev):
        return ev
    ok = (
        (ev["generation"] <= 2)
        & (ev["duration"] >= 0)
        & (ev["duration"] <= MAX_PAUSE_NS)
        & (ev["collected"] >= 0)
        & (ev["uncollectable"] >= 0)
    )
    end = _end_ns(proc.info)
    if proc.start_ns:
        ok &= ev["t"] >= proc.start_ns
    if end:
        ok &= ev["t"] <= end
    if not ok.all():
        proc.damage.append(
            f"{int((~ok).sum()):,} garbage-collector records with impossible values skipped in pid {proc.pid}"
        )
        ev = ev[ok]
    return ev


def analyze_gc(
    bundle: Bundle, bounds: tuple[int, int] | None = None, window_label: str = "whole run"
) -> GcAnalysis | None:
    marks = bundle.marks()
    procs, longest, all_ev = [], [], []
    for proc in bundle.processes:
        if "gc" not in (proc.info.get("probes") or {}):
            continue
        ev = _plausible(proc)
        start = proc.start_ns or (int(ev["t"][0]) if len(ev) else 0)
        end = _end_ns(proc.info) or (int(ev["t"][-1] + ev["duration"][-1]) if len(ev) else start)
        lo, hi = start, int(end)
        if bounds is not None:
            ev = ev[(ev["t"] >= bounds[0]) & (ev["t"] <= bounds[1])]
            lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
        wall = (hi - lo) / 1e9 if hi > lo else None
        pause = float(ev["duration"].sum(dtype=np.float64) / 1e9)
        settings = proc.info["probes"].get("gc", {})
        procs.append(
            GcProcess(
                pid=proc.pid,
                role=str(proc.info.get("role")),
                wall_s=wall,
                collections=int(len(ev)),
                pause_s=pause,
                max_pause_s=float(ev["duration"].max() / 1e9) if len(ev) else 0.0,
                time_share=(pause / wall) if wall else None,
                by_generation=_gen_stats(ev),
                thresholds=_ints(settings.get("thresholds_at_exit")) or _ints(settings.get("thresholds")),
                frozen=max(
                    (settings[k] for k in ("frozen", "frozen_at_exit") if _ints([settings.get(k)])), default=None
                ),
            )
        )
        all_ev.append(ev)
        mine = marks.pid == proc.pid
        mt, mname, mval = marks.t[mine], marks.name[mine], marks.value[mine]
        for i in np.argsort(ev["duration"])[::-1][:10]:
            e = ev[i]
            k = int(np.searchsorted(mt, e["t"], side="right")) - 1
            label = None
            if k >= 0:
                label = marks.names[int(mname[k])] + (f"={int(mval[k])}" if mval[k] else "")
            longest.append(
                Pause(
                    proc.pid,
                    int(e["generation"]),
                    (int(e["t"]) - start) / 1e9,
                    int(e["duration"]) / 1e9,
                    int(e["collected"]),
                    label,
                )
            )
    if not procs:
        return None
    ev = np.concatenate(all_ev) if all_ev else np.zeros(0, dtype=bundle.processes[0].gc_events().dtype)
    longest.sort(key=lambda p: -p.duration_s)
    shares = [p.time_share for p in procs if p.time_share is not None]
    a = GcAnalysis(
        window=window_label,
        collections=int(len(ev)),
        pause_s=float(ev["duration"].sum(dtype=np.float64) / 1e9),
        max_pause_s=float(ev["duration"].max() / 1e9) if len(ev) else 0.0,
        time_share=max(shares) if shares else None,
        uncollectable=int(ev["uncollectable"].sum()),
        by_generation=_gen_stats(ev),
        processes=procs,
        longest=longest[:10],
    )
    a.advice = _advice(a)
    return a


def _advice(a: GcAnalysis) -> list[dict[str, Any]]:
    out = []
    for p in a.processes:
        g2 = p.by_generation[2]
        if p.time_share is not None and p.time_share >= 0.02 and g2.pause_s >= 0.5 * p.pause_s and not p.frozen:
            out.append(
                {
                    "pid": p.pid,
                    "advice": "call gc.freeze() once start-up is done (after the model and engine are built)",
                    "why": f"full (generation 2) collections took {g2.pause_s:.3f} s of {p.pause_s:.3f} s of GC, "
                    f"{100 * p.time_share:.1f}% of the process's time; freezing moves the long-lived start-up objects out of their reach",
                }
            )
        elif p.time_share is not None and p.time_share >= 0.02 and p.by_generation[0].collections > 0:
            g0 = p.by_generation[0]
            out.append(
                {
                    "pid": p.pid,
                    "advice": "raise the generation-0 threshold (gc.set_threshold)",
                    "why": f"{g0.collections:,} young collections took {g0.pause_s:.3f} s, {100 * p.time_share:.1f}% of the process's time; "
                    f"thresholds {p.thresholds}",
                }
            )
        if p.max_pause_s >= 0.1:
            out.append(
                {
                    "pid": p.pid,
                    "advice": "look at what the longest pause interrupted ("
                    + ("fewer reference cycles" if p.frozen else "gc.freeze(), fewer reference cycles")
                    + ")",
                    "why": f"one collection paused the process for {1e3 * p.max_pause_s:.0f} ms",
                }
            )
    if a.uncollectable:
        out.append(
            {"pid": None, "advice": "inspect gc.garbage", "why": f"{a.uncollectable:,} objects could not be collected"}
        )
    return out


def section(bundle: Bundle, bounds: Window | None = None) -> SectionResult | None:
    """SECTION_ANALYZERS entry: the gc section, its metrics and findings (None without --probe gc)."""
    from kvprof.analysis import Finding, SectionResult, metric_entry

    label = "whole run" if bounds is None else getattr(bounds, "label", "between markers")
    a = analyze_gc(bundle, bounds, label)
    if a is None:
        return None

    def put(name: str, value: Any) -> tuple[str, dict[str, Any]]:
        return name, metric_entry(name, value, "gc", None if bounds is None else label)

    metrics = dict(
        [
            put("gc.collections", a.collections),
            put("gc.pause_seconds_total", a.pause_s),
            put("gc.pause_seconds_max", a.max_pause_s),
            put("gc.time_share", a.time_share),
            put("gc.collections_gen2", a.by_generation[2].collections),
            put("gc.uncollectable", a.uncollectable),
        ]
    )
    findings = []
    if a.time_share is not None and a.time_share >= 0.01:
        worst = max(a.processes, key=lambda p: p.time_share or 0)
        findings.append(
            Finding(
                "warning",
                f"the garbage collector took {100 * (worst.time_share or 0):.1f}% of process {worst.pid}'s time",
                f"{worst.collections:,} collections, {worst.pause_s:.3f} s in total, longest {1e3 * worst.max_pause_s:.1f} ms.",
                {"pid": worst.pid, "pause_s": worst.pause_s, "time_share": worst.time_share},
                "gc",
            )
        )
    for adv in a.advice:
        findings.append(
            Finding("info", adv["advice"], adv["why"] + (f" (process {adv['pid']})" if adv["pid"] else ""), {}, "gc")
        )
    return SectionResult(name="gc", metrics=metrics, section=dataclasses.asdict(a), findings=findings)
