"""Analysis: bundle → typed results → metrics map and findings.

Analyzers are pure functions of streams (see blocks.py).  This module opens
the input, runs the analyzers that have data, fills the flat metrics map from
the registry, and states findings in plain words with their evidence.  It
formats no text for the terminal: renderers do that.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field

from kvprof import metrics as registry
from kvprof._version import __version__
from kvprof.errors import BundleError, UsageError

SCHEMA = "kvprof.analysis/1"

# The bundle's sections, as "module:function".  Each is called as function(bundle, bounds)
# with bounds = (t0, t1) or None (a Window, whose .label names it), after the one pass over
# the block events (its result is ``bundle.block_pass``), and returns a SectionResult, or
# None when the bundle holds no data for it.
SECTION_ANALYZERS: list[str] = ["kvprof.analysis:blocks_section", "kvprof.analysis.heap:section", "kvprof.analysis.gc:section",
                                "kvprof.analysis.cpu:section", "kvprof.analysis.gpu:torch_section", "kvprof.analysis.gpu:nvml_section"]


@dataclass
class Finding:
    severity: str  # "error", "warning", "info"
    title: str
    detail: str
    evidence: dict = field(default_factory=dict)
    source: str = "blocks"


@dataclass
class SectionResult:
    name: str  # key under "sections"
    metrics: dict  # name -> metric_entry(...)
    section: dict  # JSON-ready details
    findings: list  # [Finding]


@dataclass
class AnalysisResult:
    source: dict
    metrics: dict  # name -> {"value", "unit", "better", "window", "source"}
    sections: dict
    findings: list[Finding]
    series: dict = field(default_factory=dict)  # what the HTML report and the Perfetto export draw (not in the JSON)

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "kvprof_version": __version__,
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": self.source,
            "metrics": self.metrics,
            "sections": self.sections,
            "findings": [dataclasses.asdict(f) for f in self.findings],
        }


def metric_entry(name: str, value, source: str, window: str | None = None) -> dict:
    m = registry.get(name)
    if m is None:
        raise KeyError(f"metric {name!r} is not in the registry")
    if value is not None and not isinstance(value, (int, bool)):
        value = float(value)
    return {"value": value, "unit": m.unit, "better": m.better, "window": window or m.window, "source": source, "noisy": m.noisy}


def _window_bounds(bundle, window: str | None):
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


class Window(tuple):
    """(t0, t1) of an analysis window, carrying its label for the sections' metrics."""

    def __new__(cls, bounds, label: str):
        self = super().__new__(cls, bounds)
        self.label = label
        return self


def analyze_path(path: str, window: str | None = None, *, series: bool = False, whatif: bool = False, progress=None) -> AnalysisResult:
    """A bundle directory, a bare PyTorch memory snapshot (a .pickle file) or a memray
    capture.  ``series``: also what the HTML report draws (``result.series``);
    ``whatif``: with it, the report's what-if replay; ``progress``: see engine.block_pass."""
    if not os.path.exists(path):
        raise BundleError(f"no such file or bundle: {path}")
    if os.path.isdir(path):
        from kvprof.trace.reader import Bundle

        return analyze_bundle(Bundle(path), window=window, series=series, whatif=whatif, progress=progress)
    from kvprof.trace import torch_snapshot

    if looks_like_memray(path):
        if window:
            raise UsageError("--window needs a bundle's markers; a bare memray capture has none")
        from kvprof.analysis import heap

        part = heap.analyze_capture(path)
        source = {"memray_capture": os.path.abspath(path), "window": "whole capture"}
        return AnalysisResult(source=source, metrics=part.metrics, sections={part.name: part.section}, findings=part.findings)
    if torch_snapshot.looks_like_pickle(path):
        if window:
            raise UsageError("--window needs a bundle's markers; a bare snapshot has none")
        result = analyze_snapshot_file(path)
        if series:
            from kvprof.analysis.timeseries import segment_layout

            result.series["segments"] = segment_layout(torch_snapshot.load(path))
        return result
    raise BundleError(f"not a kvprof bundle, a PyTorch memory snapshot nor a memray capture{file_hint(path)}: {path}")


def file_hint(path: str) -> str:
    """A hint for the files people mistake for snapshots."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return ""
    if not head:
        return " (an empty file)"
    if head == b"PK\x03\x04":
        return " (a zip archive, as torch.save writes; a memory snapshot is torch.cuda.memory._dump_snapshot()'s pickle)"
    return ""


def is_recording(path: str) -> bool:
    """Whether analyze_path reads this as a recording (a bundle, a PyTorch snapshot, a
    memray capture) rather than something else, such as an analysis JSON."""
    from kvprof.trace.torch_snapshot import looks_like_pickle

    return os.path.isdir(path) or looks_like_memray(path) or looks_like_pickle(path)


def looks_like_memray(path: str) -> bool:
    """memray's capture files start with b"memray", or an lz4 frame when compressed on exit."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
    except OSError:
        return False
    return head.startswith(b"memray") or (head[:4] == b"\x04\x22\x4d\x18" and b"memray" in head)


def analyze_snapshot_file(path: str) -> AnalysisResult:
    from kvprof.analysis.torch_memory import analyze_snapshot
    from kvprof.trace import torch_snapshot

    part = torch_section(analyze_snapshot(torch_snapshot.load(path)), source=os.path.basename(path))
    source = {"snapshot": os.path.abspath(path), "window": "whole snapshot"}
    return AnalysisResult(source=source, metrics=part.metrics, sections={part.name: part.section}, findings=part.findings)


def torch_section(a, source: str) -> SectionResult:
    """Metrics map, JSON section and findings of one TorchAnalysis."""
    put = lambda name, value: (name, metric_entry(name, value, "torch"))  # noqa: E731
    metrics = dict([
        put("torch.segments", a.segments), put("torch.reserved_bytes", a.reserved), put("torch.allocated_bytes", a.allocated),
        put("torch.requested_bytes", a.requested), put("torch.pending_free_bytes", a.pending_free),
        put("torch.rounding_waste_bytes", a.rounding_waste), put("torch.cached_free_bytes", a.cached_free),
        put("torch.total_free_bytes", a.total_free), put("torch.internal_free_ratio", a.internal_free_ratio),
        put("torch.external_fragmentation", a.external_fragmentation), put("torch.largest_free_block_bytes", a.largest_inactive),
        put("torch.ooms", len(a.ooms)), put("torch.fragmentation_ooms", sum(1 for o in a.ooms if o.fragmentation_oom)),
        put("torch.leaked_bytes", a.leaked_bytes), put("torch.allocations", a.alloc_count),
        put("torch.allocated_bytes_total", a.alloc_bytes), put("torch.allocations_per_second", a.allocs_per_second),
        put("torch.short_lived_allocations", a.short_lived),
    ])
    findings = []
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    for o in a.ooms:
        kind = "fragmentation OOM" if o.fragmentation_oom else "OOM"
        findings.append(Finding(
            "error", f"{kind}: {mib(o.requested)} could not be allocated on device {o.device}",
            (f"The cache held {mib(o.inactive_bytes)} free but its largest free block was {mib(o.largest_inactive)}: the memory was there, in pieces."
             if o.fragmentation_oom else f"The cache held {mib(o.inactive_bytes)} free (largest block {mib(o.largest_inactive)}): the request did not fit, fragmentation aside.")
            + (" (allocator state at the snapshot, which came after the OOM)" if o.state_at == "snapshot" else ""),
            {"requested": o.requested, "inactive_bytes": o.inactive_bytes, "largest_inactive": o.largest_inactive, "device_free": o.device_free}, "torch"))
    if a.leaked_bytes:
        top = a.leaks_by_stack[0]
        findings.append(Finding(
            "warning", f"{mib(a.leaked_bytes)} allocated during the trace is still allocated at its end",
            f"Largest site: {top.stack}, {top.count} allocation(s), {mib(top.bytes)}. Allocations made before the trace window began are not counted.",
            {"leaked_bytes": a.leaked_bytes, "top_stack": top.stack}, "torch"))
    for adv in a.advice:
        findings.append(Finding("info", f"try {adv['setting']}", adv["why"], {}, "torch"))
    section = dataclasses.asdict(a)
    section["source"] = source
    return SectionResult(name="torch", metrics=metrics, section=section, findings=findings)


def analyze_bundle(bundle, window: str | None = None, *, series: bool = False, whatif: bool = False, progress=None) -> AnalysisResult:
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
    metrics: dict = {}
    sections: dict = {}
    findings: list[Finding] = run_findings(bundle)
    bp = block_pass(bundle, bounds, series=series, schedule_pools="all" if (whatif and series) else (), progress=progress)
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
        findings.append(Finding("warning", "Parts of the bundle could not be read", "; ".join(damage[:5]) + (f"; and {len(damage) - 5} more" if len(damage) > 5 else ""),
                                {"damage": damage[:50]}, "run"))
    order = {"error": 0, "warning": 1, "info": 2}
    findings.sort(key=lambda f: order.get(f.severity, 3))
    result = AnalysisResult(source=source, metrics=metrics, sections=sections, findings=findings)
    if series:
        result.series = _bundle_series(bundle, result, bp, replay_pool, window_label)
    return result


def _bundle_series(bundle, result, bp, replay_pool, window_label) -> dict:
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

        # analyze's figures are the pool's own when there is one pool and the analysis
        # covers the whole run: the fidelity check reads them instead of analysing again
        try:
            out["whatif"] = W.run_schedule(bp.schedules[replay_pool], W.WhatifOptions(unlimited=True, jobs=1), pool_metrics(bp, replay_pool, window_label))
        except ValueError as exc:  # a pool without request states: no replay, say why
            out["whatif_note"] = str(exc)
    return out


def blocks_section(bundle, bounds) -> SectionResult | None:
    """The block pools: every pool's analysis and all pools together, from the pass."""
    from kvprof.analysis.findings import block_findings

    bp = bundle.block_pass
    if not bp.per_pool:
        return None
    metrics: dict = {}
    block_metrics(metrics, bp.total, len(bp.per_pool), getattr(bounds, "label", None))
    section = {"aggregate": dataclasses.asdict(bp.total), "pools": [dataclasses.asdict(p) for p in bp.per_pool]}
    return SectionResult(name="blocks", metrics=metrics, section=section, findings=block_findings(bp.total, bp.per_pool))


def whatif_bundle(bundle, opts, progress=None) -> dict:
    """`kvprof whatif`: one pass over the bundle gives every pool's analysis and schedule;
    the chosen pool's schedule is replayed under ``opts`` and checked against its analysis."""
    from kvprof.analysis import whatif as W
    from kvprof.analysis.engine import block_pass

    bp = block_pass(bundle, None, schedule_pools="all", progress=progress)
    pool = bp.replay_pool(opts.pool, bundle.pools)
    if pool is None:
        raise ValueError("this bundle has no block pool to replay (record with the blocks probe)")
    return W.run_schedule(bp.schedules[pool], opts, pool_metrics(bp, pool, None))


def pool_metrics(bp, pool: int, window_label: str | None) -> dict:
    """analyze's figures (name -> value) for one pool over the whole run, for the what-if
    fidelity check: the pass's own when it covered the whole run."""
    entries: dict = {}
    block_metrics(entries, bp.whole_run.get(pool) or bp.per_pool[pool], 1, None)
    return {k: v["value"] for k, v in entries.items()}


def block_metrics(out: dict, a, npools: int, window_label: str | None) -> None:
    src = "blocks"
    w = window_label

    def put(name, value, window=None):
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


def _marker_summary(bundle) -> dict:
    marks = bundle.marks()
    out = {}
    for i, name in enumerate(marks.names):
        sel = marks.name == i
        out[name] = {"count": int(sel.sum()), "processes": sorted({int(p) for p in marks.pid[sel]})}
    return out
