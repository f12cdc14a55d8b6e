"""Chrome trace-event JSON (the format ui.perfetto.dev and chrome://tracing open).

Per recorded process: counter tracks of KV blocks (in use, free-cached, free) for each
pool, heap live bytes (tracemalloc snapshots), torch allocated/reserved (the torch
probe's memory_stats samples), instant events for markers, preemptions, refused
allocations and CUDA OOMs, and one complete event per garbage collection.  A bare PyTorch
snapshot exports its allocated / reserved timeline and its OOMs.  Times are
microseconds from the earliest event in the file.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from kvprof.errors import BundleError, UsageError
from kvprof.trace.format import EventKind as K


def bundle_events(path: str) -> list:
    from kvprof.analysis.timeseries import pool_counts
    from kvprof.trace.reader import Bundle

    bundle = Bundle(path)
    stream = bundle.block_stream()
    starts = [int(stream.t.min())] if len(stream.t) else []
    marks = bundle.marks()
    if len(marks.t):
        starts.append(int(marks.t.min()))
    for proc in bundle.processes:
        g = proc.gc_events()
        if len(g):
            starts.append(int(g["t"].min()))
        snaps, _ = proc.heap_snapshots()
        if len(snaps):
            starts.append(int(snaps["t"].min()))
        starts.extend(int(r["t"]) for r in proc.notes if r.get("type") in ("torch_stats", "torch_oom") and r.get("t"))
    t0 = min(starts) if starts else 0
    us = lambda ns: (int(ns) - t0) / 1000.0  # noqa: E731
    out: list = []
    for proc in bundle.processes:
        role = proc.info.get("role") or "process"
        out.append({"name": "process_name", "ph": "M", "pid": proc.pid, "tid": proc.pid, "args": {"name": f"{role} {proc.pid}"}})
    for p in stream.pools:
        c = pool_counts(stream, p.index)
        if c is None:
            continue
        cap = c["capacity"]
        for t, u, umax, ca in zip(c["t_ns"].tolist(), c["in_use"].tolist(), c["in_use_max"].tolist(), c["cached"].tolist()):
            out.append({"name": f"KV blocks {p.label}", "ph": "C", "ts": us(t), "pid": p.pid, "tid": p.pid,
                        "args": {"in use": u, "free-cached": ca, "free": cap - u - ca}})
            if umax != u:
                out.append({"name": f"KV blocks in use, bucket max {p.label}", "ph": "C", "ts": us(t), "pid": p.pid, "args": {"in use": umax}})
        sel = np.flatnonzero((stream.pool == p.index) & np.isin(stream.kind, [K.REQ_PREEMPT, K.ALLOC_FAIL]))
        for i in sel[:100000].tolist():
            req = stream.requests[int(stream.req[i])] if stream.req[i] >= 0 else ""
            name = "preempt" if stream.kind[i] == K.REQ_PREEMPT else "allocation refused"
            out.append({"name": f"{name} {req}".strip(), "ph": "i", "s": "p", "ts": us(stream.t[i]), "pid": p.pid, "tid": p.pid,
                        "args": {"pool": p.label, "request": req}})
    for i in range(min(len(marks.t), 200000)):
        pid = int(marks.pid[i])
        out.append({"name": marks.names[int(marks.name[i])], "ph": "i", "s": "t", "ts": us(marks.t[i]), "pid": pid, "tid": pid,
                    "args": {"value": int(marks.value[i])}})
    for proc in bundle.processes:
        for e in proc.gc_events()[:200000]:
            out.append({"name": f"gc gen {int(e['generation'])}", "ph": "X", "ts": us(e["t"]), "dur": int(e["duration"]) / 1000.0,
                        "pid": proc.pid, "tid": proc.pid, "args": {"collected": int(e["collected"]), "uncollectable": int(e["uncollectable"])}})
        snaps, _ = proc.heap_snapshots()
        for s in snaps:
            out.append({"name": "heap live bytes (tracemalloc)", "ph": "C", "ts": us(s["t"]), "pid": proc.pid, "tid": proc.pid,
                        "args": {"live": int(s["live"])}})
        for rec in proc.notes:  # --probe torch: memory_stats samples, OOMs the allocator reported
            kind, t = rec.get("type"), int(rec.get("t") or 0)
            if kind == "torch_stats":
                for dev, st in sorted((rec.get("devices") or {}).items()):
                    out.append({"name": f"torch memory cuda:{dev}", "ph": "C", "ts": us(t), "pid": proc.pid, "tid": proc.pid,
                                "args": {"allocated": int(st.get("allocated", 0)), "reserved": int(st.get("reserved", 0))}})
            elif kind == "torch_oom":
                out.append({"name": "CUDA OOM", "ph": "i", "s": "p", "ts": us(t), "pid": proc.pid, "tid": proc.pid,
                            "args": {k: rec.get(k) for k in ("device", "requested", "device_free")}})
    return out


def snapshot_events(path: str) -> list:
    from kvprof.analysis.torch_memory import analyze_snapshot
    from kvprof.trace import torch_snapshot

    a = analyze_snapshot(torch_snapshot.load(path))
    out: list = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": os.path.basename(path)}}]
    tl = a.timeline
    if tl.get("t_us"):
        t0 = tl["t_us"][0]
        for t, al, re in zip(tl["t_us"], tl["allocated"], tl["reserved"]):
            out.append({"name": "torch memory", "ph": "C", "ts": float(t - t0), "pid": 0, "tid": 0, "args": {"allocated": al, "reserved": re}})
        for o in a.ooms:
            ts = getattr(o, "time_us", None)
            out.append({"name": "OOM", "ph": "i", "s": "g", "ts": float((ts or tl["t_us"][-1]) - t0), "pid": 0, "tid": 0,
                        "args": {"requested": o.requested, "fragmentation_oom": bool(o.fragmentation_oom)}})
    return out


def export(path: str, output: str) -> None:
    if not os.path.exists(path):
        raise BundleError(f"no such file or bundle: {path}")
    if os.path.isdir(path):
        events = bundle_events(path)
    else:
        from kvprof.trace.torch_snapshot import looks_like_pickle

        if not looks_like_pickle(path):
            raise BundleError(f"not a kvprof bundle nor a PyTorch memory snapshot: {path}")
        events = snapshot_events(path)
    text = json.dumps({"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"exporter": "kvprof", "source": os.path.basename(path)}})
    if output == "-":
        sys.stdout.write(text + "\n")
        return
    from kvprof.trace.atomic import write_text

    try:
        write_text(output, text)
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror}") from None
