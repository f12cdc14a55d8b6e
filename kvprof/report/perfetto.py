"""Chrome trace-event JSON (the format ui.perfetto.dev and chrome://tracing open).

Per recorded process: counter tracks of KV blocks (in use, free-cached, free) for each
pool, heap live bytes (tracemalloc snapshots), torch allocated/reserved (the torch
probe's memory_stats samples), instant events for markers, preemptions, refused
allocations and CUDA OOMs, and one complete event per garbage collection.  A bare PyTorch
snapshot exports its allocated / reserved timeline and its OOMs.  Times are
microseconds from the earliest event of their clock (a pool on a simulated clock starts
at 0 like the monotonic streams).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

from kvprof.errors import BundleError
from kvprof.trace.format import EventKind as K


def _origins(bundle, spans_by_pool: dict, marks) -> tuple[dict, Callable[[int], str]]:
    """Times are microseconds from the earliest event of their clock.  Pools on a clock of
    their own (a simulator's: ``kvprof.blocks.Pool(clock=...)``) start at 0 like the
    monotonic clock every other stream uses, instead of hours apart from it.  A marker
    belongs to the clock whose events' span it is nearest (a simulated pool's own markers
    are on its clock)."""
    spans: dict = {}

    def add(clock, lo, hi):
        if lo is None:
            return
        a, b = spans.get(clock, (None, None))
        spans[clock] = (lo if a is None else min(a, lo), hi if b is None else max(b, hi))

    for idx, (lo, hi) in spans_by_pool.items():
        p = bundle.pools[idx]
        add(p.clock if p.clock != "monotonic" else "monotonic", int(lo), int(hi))
    for proc in bundle.processes:
        g = proc.gc_events()["t"]
        if len(g):
            add("monotonic", int(g.min()), int(g.max()))
        snaps, _ = proc.heap_snapshots()
        if len(snaps):
            add("monotonic", int(snaps["t"].min()), int(snaps["t"].max()))
        ts = [
            int(r["t"])
            for r in proc.notes
            if r.get("type") in ("torch_stats", "torch_oom") and isinstance(r.get("t"), int) and r.get("t")
        ]
        if ts:
            add("monotonic", min(ts), max(ts))
    if not spans and len(marks.t):
        add("monotonic", int(marks.t.min()), int(marks.t.max()))

    def clock_of_mark(t: int) -> str:
        if len(spans) < 2:
            return next(iter(spans), "monotonic")
        return min(spans, key=lambda c: max(spans[c][0] - t, 0, t - spans[c][1]))

    return {c: lo for c, (lo, _) in spans.items()}, clock_of_mark


def bundle_events(path: str, progress=None) -> list:
    from kvprof.analysis.engine import block_pass
    from kvprof.trace.reader import Bundle

    bundle = Bundle(path)
    bp = block_pass(bundle, None, series=True, progress=progress)
    series = bp.series
    marks = bundle.marks()
    origin, clock_of_mark = _origins(bundle, series.get("pool_spans") or {}, marks)

    def us(ns, clock="monotonic"):
        return (int(ns) - origin.get(clock, 0)) / 1000.0

    counts = {c["pool"]: c for c in series.get("pool_counts") or []}
    instants = {x["pool"]: x for x in series.get("instants") or []}
    out: list = []
    for proc in bundle.processes:
        role = proc.info.get("role") or "process"
        where = f" on {proc.node[1]}" if getattr(proc, "node", (None, None))[1] else ""  # a bundle of several nodes
        out.append(
            {
                "name": "process_name",
                "ph": "M",
                "pid": proc.pid,
                "tid": proc.pid,
                "args": {"name": f"{role} {proc.pid}{where}"},
            }
        )
    for p in bundle.pools:
        clock = p.clock if p.clock in origin else "monotonic"
        label = p.label if clock == "monotonic" else f"{p.label} ({clock} clock)"
        c = counts.get(p.label)
        if c is not None:  # a pool whose every allocation was refused has no counts, only the refusals below
            cap = c["capacity"]
            thinned = bool(np.any(c["in_use_max"] != c["in_use"]))
            for t, u, umax, ca in zip(
                c["t_ns"].tolist(), c["in_use"].tolist(), c["in_use_max"].tolist(), c["cached"].tolist()
            ):
                out.append(
                    {
                        "name": f"KV blocks {label}",
                        "ph": "C",
                        "ts": us(t, clock),
                        "pid": p.pid,
                        "tid": p.pid,
                        "args": {"in use": u, "free-cached": ca, "free": cap - u - ca},
                    }
                )
                if thinned:  # a counter holds its value until the next event: one at every point
                    out.append(
                        {
                            "name": f"KV blocks in use, bucket max {label}",
                            "ph": "C",
                            "ts": us(t, clock),
                            "pid": p.pid,
                            "tid": p.pid,
                            "args": {"in use": umax},
                        }
                    )
        x = instants.get(p.index)
        if x is not None:
            for t, k, r in zip(x["t"].tolist(), x["kind"].tolist(), x["req"].tolist()):
                req = bundle.request_name(r) if r >= 0 else ""
                name = "preempt" if k == K.REQ_PREEMPT else "allocation refused"
                out.append(
                    {
                        "name": f"{name} {req}".strip(),
                        "ph": "i",
                        "s": "p",
                        "ts": us(t, clock),
                        "pid": p.pid,
                        "tid": p.pid,
                        "args": {"pool": p.label, "request": req},
                    }
                )
    for i in range(min(len(marks.t), 200000)):
        pid, t = int(marks.pid[i]), int(marks.t[i])
        out.append(
            {
                "name": marks.names[int(marks.name[i])],
                "ph": "i",
                "s": "t",
                "ts": us(t, clock_of_mark(t)),
                "pid": pid,
                "tid": pid,
                "args": {"value": int(marks.value[i])},
            }
        )
    for proc in bundle.processes:
        for e in proc.gc_events()[:200000]:
            out.append(
                {
                    "name": f"gc gen {int(e['generation'])}",
                    "ph": "X",
                    "ts": us(e["t"]),
                    "dur": int(e["duration"]) / 1000.0,
                    "pid": proc.pid,
                    "tid": proc.pid,
                    "args": {"collected": int(e["collected"]), "uncollectable": int(e["uncollectable"])},
                }
            )
        snaps, _ = proc.heap_snapshots()
        for s in snaps:
            out.append(
                {
                    "name": "heap live bytes (tracemalloc)",
                    "ph": "C",
                    "ts": us(s["t"]),
                    "pid": proc.pid,
                    "tid": proc.pid,
                    "args": {"live": int(s["live"])},
                }
            )
        for rec in proc.notes:  # --probe torch: memory_stats samples, OOMs the allocator reported
            kind, t = rec.get("type"), rec.get("t")
            if not isinstance(t, int) or isinstance(t, bool):
                continue
            if kind == "torch_stats":
                devices = rec.get("devices")
                for dev, st in sorted(devices.items()) if isinstance(devices, dict) else []:
                    if isinstance(st, dict):
                        out.append(
                            {
                                "name": f"torch memory cuda:{dev}",
                                "ph": "C",
                                "ts": us(t),
                                "pid": proc.pid,
                                "tid": proc.pid,
                                "args": {"allocated": _num(st.get("allocated")), "reserved": _num(st.get("reserved"))},
                            }
                        )
            elif kind == "torch_oom":
                out.append(
                    {
                        "name": "CUDA OOM",
                        "ph": "i",
                        "s": "p",
                        "ts": us(t),
                        "pid": proc.pid,
                        "tid": proc.pid,
                        "args": {k: rec.get(k) for k in ("device", "requested", "device_free")},
                    }
                )
    return out


def _num(v) -> int:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) < 1e30 else 0


def snapshot_events(path: str) -> list:
    from kvprof.analysis.torch_memory import analyze_snapshot
    from kvprof.trace import torch_snapshot

    a = analyze_snapshot(torch_snapshot.load(path))
    out: list = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": os.path.basename(path)}}]
    tl = a.timeline
    times = list(tl.get("t_us") or [])
    known = [o.time_us for o in a.ooms if getattr(o, "time_us", None) is not None]
    t0 = min(times[:1] + known) if times or known else 0
    for t, rq, re in zip(times, tl.get("requested") or [], tl.get("reserved") or []):
        out.append(
            {
                "name": "torch memory",
                "ph": "C",
                "ts": float(t - t0),
                "pid": 0,
                "tid": 0,
                "args": {"requested": rq, "reserved": re},
            }
        )
    for o in a.ooms:  # every OOM, at its own time when the snapshot has one (0 is a time), else at the end
        ts = getattr(o, "time_us", None)
        at = ts if ts is not None else (times[-1] if times else t0)
        out.append(
            {
                "name": "OOM",
                "ph": "i",
                "s": "g",
                "ts": float(at - t0),
                "pid": 0,
                "tid": 0,
                "args": {
                    "requested": o.requested,
                    "fragmentation_oom": bool(o.fragmentation_oom),
                    "time_known": ts is not None,
                },
            }
        )
    return out


def export(path: str, output: str, progress=None) -> None:
    from kvprof.analysis.sources import BUNDLE, SNAPSHOT, kind_of_existing

    kind = kind_of_existing(path)
    if kind == BUNDLE:
        events = bundle_events(path, progress)
    elif kind == SNAPSHOT:
        events = snapshot_events(path)
    else:
        raise BundleError(f"not a kvprof bundle nor a PyTorch memory snapshot: {path}")
    text = json.dumps(
        {
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {"exporter": "kvprof", "source": os.path.basename(path)},
        }
    )
    from kvprof.trace.atomic import write_output

    write_output(output, text + "\n")
