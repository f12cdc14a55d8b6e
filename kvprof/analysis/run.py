"""The analysis, orchestrated: open the input, one pass over the bundle's block events
(engine.py), every section, the flat metrics map from the registry, findings in plain
words.  Formats no text for the terminal: renderers do that."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvprof.analysis.results import AnalysisResult, Finding, SectionResult, Window, metric_entry
from kvprof.analysis.sources import BUNDLE, MEMRAY, SNAPSHOT, file_hint, kind_of_existing
from kvprof.errors import BundleError, UsageError

if TYPE_CHECKING:
    from kvprof.analysis.blocks import PoolAnalysis
    from kvprof.analysis.engine import BlockPass
    from kvprof.analysis.whatif import WhatifOptions
    from kvprof.trace.reader import Bundle

# The bundle's sections, as "module:function".  Each is called as function(bundle, bounds)
# with bounds = (t0, t1) or None (a Window, whose .label names it), after the one pass over
# the block events (its result is ``bundle.block_pass``), and returns a SectionResult, or
# None when the bundle holds no data for it.
SECTION_ANALYZERS: list[str] = [
    "kvprof.analysis.run:blocks_section",
    "kvprof.analysis.fleet:section",
    "kvprof.analysis.heap:section",
    "kvprof.analysis.gc:section",
    "kvprof.analysis.cpu:section",
    "kvprof.analysis.gpu:torch_snapshots_section",
    "kvprof.analysis.gpu:nvml_section",
]


def _window_bounds(bundle: Bundle, window: str | None) -> tuple[Window | None, str | None]:
    if not window:
        return None, None
    start, _, end = window.partition(":")
    marks = bundle.marks()
    if start and start not in marks.names:
        raise UsageError(f"no marker named {start!r} in this bundle (markers: {', '.join(marks.names) or 'none'})")
    if end and end not in marks.names:
        raise UsageError(f"no marker named {end!r} in this bundle (markers: {', '.join(marks.names) or 'none'})")
    t0 = int(marks.times_of(start)[0]) if start else -(2**62)
    t1 = int(marks.times_of(end)[-1]) if end else 2**62
    if t1 < t0:
        raise UsageError(f"window ends ({end}) before it starts ({start})")
    label = f"between markers {start or 'start'} and {end or 'end'}"
    return Window((t0, t1), label), label


def analyze_path(
    path: str,
    window: str | None = None,
    *,
    series: bool = False,
    whatif: bool = False,
    progress: Callable[[int], object] | None = None,
) -> AnalysisResult:
    """A bundle directory, a bare PyTorch memory snapshot (a .pickle file) or a memray
    capture.  ``series``: also what the HTML report draws (``result.series``);
    ``whatif``: with it, the report's what-if replay; ``progress``: see engine.block_pass."""
    kind = kind_of_existing(path)
    if kind == BUNDLE:
        from kvprof.trace.reader import Bundle

        return analyze_bundle(Bundle(path), window=window, series=series, whatif=whatif, progress=progress)
    from kvprof.trace import torch_snapshot

    if kind == MEMRAY:
        if window:
            raise UsageError("--window needs a bundle's markers; a bare memray capture has none")
        from kvprof.analysis import heap

        part = heap.analyze_capture(path)
        source = {"memray_capture": os.path.abspath(path), "window": "whole capture"}
        return AnalysisResult(
            source=source, metrics=part.metrics, sections={part.name: part.section}, findings=part.findings
        )
    if kind == SNAPSHOT:
        if window:
            raise UsageError("--window needs a bundle's markers; a bare snapshot has none")
        result = analyze_snapshot_file(path)
        if series:
            from kvprof.analysis.timeseries import segment_layout

            result.series["segments"] = segment_layout(torch_snapshot.load(path))
        return result
    raise BundleError(f"not a kvprof bundle, a PyTorch memory snapshot nor a memray capture{file_hint(path)}: {path}")


def analyze_snapshot_file(path: str) -> AnalysisResult:
    from kvprof.analysis.torch_memory import analyze_snapshot, snapshot_section
    from kvprof.trace import torch_snapshot

    part = snapshot_section(analyze_snapshot(torch_snapshot.load(path)), source=os.path.basename(path))
    source = {"snapshot": os.path.abspath(path), "window": "whole snapshot"}
    return AnalysisResult(
        source=source, metrics=part.metrics, sections={part.name: part.section}, findings=part.findings
    )


def analyze_bundle(
    bundle: Bundle,
    window: str | None = None,
    *,
    series: bool = False,
    whatif: bool = False,
    progress: Callable[[int], object] | None = None,
) -> AnalysisResult:
    """Everything kvprof computes from a bundle, in one pass over its block events."""
    import importlib

    from kvprof.analysis.engine import block_pass
    from kvprof.analysis.findings import run_findings

    bounds, window_label = _window_bounds(bundle, window)
    man = bundle.manifest
    source = {
        "bundle": bundle.path,
        "command": man.get("command"),
        "status": man.get("status"),
        "target": man.get("target"),
        "start_time": man.get("start_time"),
        "processes": len(bundle.processes),
        "window": window_label or "whole run",
    }
    metrics: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    findings: list[Finding] = run_findings(bundle)
    bp = block_pass(
        bundle, bounds, series=series, schedule_pools="all" if (whatif and series) else (), progress=progress
    )
    replay_pool = bp.replay_pool() if (whatif and series) else None
    bundle.block_pass = bp
    bundle.pool_steps = bp.pool_steps
    for spec in SECTION_ANALYZERS:
        mod, _, fn = spec.partition(":")
        part = getattr(importlib.import_module(mod), fn)(bundle, bounds)
        if part is not None:
            metrics.update(part.metrics)
            sections[part.name] = part.section
            findings.extend(part.findings)
    sections["markers"] = _marker_summary(bundle)
    damage = bundle.damage()
    if damage:
        findings.append(
            Finding(
                "warning",
                "Parts of the bundle could not be read",
                "; ".join(damage[:5]) + (f"; and {len(damage) - 5} more" if len(damage) > 5 else ""),
                {"damage": damage[:50]},
                "run",
            )
        )
    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: order.get(f.severity, 3))
    result = AnalysisResult(source=source, metrics=metrics, sections=sections, findings=findings)
    if series:
        result.series = _bundle_series(bundle, result, bp, replay_pool, window_label)
    return result


def _bundle_series(
    bundle: Bundle, result: AnalysisResult, bp: BlockPass, replay_pool: int | None, window_label: str | None
) -> dict[str, Any]:
    """What the HTML report and the Perfetto export draw, beside the analysis."""
    from kvprof.analysis import timeseries as ts

    out = dict(bp.series)
    t0 = out.get("t0_ns")
    out["markers"] = ts.marker_times(bundle, t0)
    out["gc_pauses"] = ts.gc_pauses(bundle, t0)
    out.setdefault("block_maps", [])
    out.setdefault("hit_rate", None)
    tsec = result.sections.get("torch") or {}
    if tsec.get("source"):  # the snapshot the torch section came from: its segment map
        from kvprof.trace import torch_snapshot

        p = os.path.normpath(os.path.join(bundle.path, tsec["source"]))
        if p.startswith(os.path.normpath(bundle.path) + os.sep) and os.path.isfile(p):
            out["segments"] = ts.segment_layout(torch_snapshot.load(p))
    if replay_pool is not None and replay_pool in bp.schedules:
        from kvprof.analysis import whatif as W

        # the replays run in a thread of their own (the compiled kernel lets go of the GIL)
        # while the caller draws the rest; resolve_series() waits for them
        sched, analyzed = bp.schedules[replay_pool], pool_metrics(bp, replay_pool, window_label)
        out["whatif"] = Pending(lambda: W.run_schedule(sched, W.WhatifOptions(unlimited=True, jobs=None), analyzed))
    return out


class Pending:
    """A series still being computed in a background thread."""

    def __init__(self, fn: Callable[[], Any]):
        import threading

        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name="kvprof-whatif", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # handed over to resolve()
            self._error = exc

    def resolve(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def resolve_series(series: dict[str, Any]) -> dict[str, Any]:
    """Wait for the series still being computed; a replay the pool cannot have (no request
    states) becomes a note."""
    w = series.get("whatif")
    if isinstance(w, Pending):
        try:
            series["whatif"] = w.resolve()
        except ValueError as exc:
            series.pop("whatif")
            series["whatif_note"] = str(exc)
    return series


def blocks_section(bundle: Bundle, bounds: Window | None) -> SectionResult | None:
    """The block pools: every pool's analysis and all pools together, from the pass."""
    from kvprof.analysis.findings import block_findings

    bp = bundle.block_pass
    if not bp.per_pool:
        return None
    metrics: dict[str, Any] = {}
    block_metrics(metrics, bp.total, len(bp.per_pool), getattr(bounds, "label", None))
    section = {"aggregate": dataclasses.asdict(bp.total), "pools": [dataclasses.asdict(p) for p in bp.per_pool]}
    return SectionResult(
        name="blocks", metrics=metrics, section=section, findings=block_findings(bp.total, bp.per_pool)
    )


def whatif_bundle(
    bundle: Bundle, opts: WhatifOptions, progress: Callable[[int], object] | None = None
) -> dict[str, Any]:
    """`kvprof whatif`: one pass over the bundle gives every pool's analysis and schedule;
    the chosen pool's schedule is replayed under ``opts`` and checked against its analysis."""
    from kvprof.analysis import whatif as W
    from kvprof.analysis.engine import block_pass

    bp = block_pass(bundle, None, schedule_pools="all", progress=progress)
    pool = bp.replay_pool(opts.pool, bundle.pools)
    if pool is None:
        raise ValueError("this bundle has no block pool to replay (record with the blocks probe)")
    return W.run_schedule(bp.schedules[pool], opts, pool_metrics(bp, pool, None))


def pool_metrics(bp: BlockPass, pool: int, window_label: str | None) -> dict[str, Any]:
    """analyze's figures (name -> value) for one pool over the whole run, for the what-if
    fidelity check: the pass's own when it covered the whole run."""
    entries: dict[str, Any] = {}
    block_metrics(entries, bp.whole_run.get(pool) or bp.per_pool[pool], 1, None)
    return {k: v["value"] for k, v in entries.items()}


def block_metrics(out: dict[str, Any], a: PoolAnalysis, npools: int, window_label: str | None) -> None:
    src = "blocks"
    w = window_label

    def put(name: str, value: Any, window: str | None = None) -> None:
        out[name] = metric_entry(name, value, src, window or w)

    put("blocks.events", a.block_events)
    put("blocks.pools", npools)
    put("blocks.capacity", a.capacity)
    put("blocks.requests", a.requests)
    put("blocks.usage.high_watermark", a.high_watermark)
    put("blocks.usage.time_weighted", a.usage_time_weighted)
    put("blocks.peak_blocks", a.peak_blocks)
    put("blocks.internal_fragmentation.time_weighted", a.internal_time_weighted)
    put("blocks.internal_fragmentation.at_peak", a.internal_at_peak)
    put("blocks.internal_fragmentation.lookahead_time_weighted", a.internal_lookahead_time_weighted)
    put("blocks.internal_fragmentation.per_request_mean_slots", a.per_request_waste.mean)
    put("blocks.external_fragmentation.at_peak", a.external_at_peak)
    put("blocks.free_runs.at_peak", a.free_runs_at_peak)
    put("blocks.fragmentation_that_hurts", a.fragmentation_that_hurts)
    put("blocks.allocation_failures", a.allocation_failures)
    put("blocks.preemptions", a.preemptions)
    put("blocks.prefix_cache.query_tokens", a.query_tokens)
    put("blocks.prefix_cache.hit_tokens", a.hit_tokens)
    put("blocks.prefix_cache.hit_rate", a.hit_rate)
    put("blocks.prefix_cache.preempted_query_tokens", a.preempted_query_tokens)
    put("blocks.prefix_cache.preempted_hit_tokens", a.preempted_hit_tokens)
    put("blocks.prefix_cache.preempted_hit_rate", a.preempted_hit_rate)
    put("blocks.prefix_cache.block_hit_rate", a.block_hit_rate)
    put("blocks.evictions", a.evictions)
    put("blocks.evicted_before_reuse_ratio", a.evicted_before_reuse_ratio)
    put("blocks.allocations", a.allocated_blocks)
    put("blocks.churn.allocations_per_second", a.allocations_per_second)
    put("blocks.churn.allocations_per_step", a.allocations_per_step)
    put("blocks.churn.reallocated_within_step", a.reallocated_within_step)
    put("blocks.churn.evictions_per_second", a.evictions_per_second)
    put("blocks.lifetime.p50_seconds", a.lifetime_s.p50)
    put("blocks.idle_before_eviction.p50_seconds", a.idle_before_eviction_s.p50)
    put("blocks.reuse_gap.p50_seconds", a.reuse_gap_s.p50)
    put("blocks.leaked_blocks", a.leaked_blocks)
    put("blocks.in_use_at_idle", a.in_use_at_idle)
    put("blocks.refcount_errors", a.refcount_errors)


def _marker_summary(bundle: Bundle) -> dict[str, Any]:
    marks = bundle.marks()
    out: dict[str, Any] = {}
    for i, name in enumerate(marks.names):
        sel = marks.name == i
        out[name] = {"count": int(sel.sum()), "processes": sorted({int(p) for p in marks.pid[sel]})}
    return out
