"""Series for drawing: the block map over time, the prefix-cache hit rate over time,
marker times.  Pure functions of a bundle's streams, downsampled to a fixed number of
columns for drawing only (every figure in the analysis is computed on all events).
"""

from __future__ import annotations

import numpy as np

from kvprof.analysis.blocks import CACHED, EMPTY, IN_USE, RESERVED, replay_sorted
from kvprof.trace.format import EventKind as K


def _block_states(stream, pool_index: int, kinds):
    """Block-level events of one pool sorted by block (time order kept within a block):
    (event index, block id, kind, ref count before/after, cached before/after, sort order)."""
    info = stream.pools[pool_index]
    sel = np.flatnonzero((stream.pool == pool_index) & np.isin(stream.kind, kinds))
    reps = stream.n[sel].astype(np.int64)
    ev = np.repeat(sel, reps)
    within = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)
    bid = stream.ids[np.repeat(stream.offsets[sel], reps) + within].astype(np.int64)
    ok = (bid >= 0) & (bid < info.num_blocks)
    ev, bid = ev[ok], bid[ok]
    order = np.argsort(bid, kind="stable")
    sb, sk = bid[order], stream.kind[ev][order]
    gs = np.ones(len(sb), dtype=bool)
    gs[1:] = sb[1:] != sb[:-1]
    ref_before, ref_after, hashed_before, hashed_after, _ = replay_sorted(sk, gs)
    return ev, order, sb, sk, np.flatnonzero(gs), ref_before, ref_after, hashed_before, hashed_after


def block_map(stream, pool_index: int, columns: int = 300, max_rows: int = 512, span: tuple[int, int] | None = None) -> dict | None:
    """The state of every block of one pool at ``columns`` instants (the end of each time
    bucket): rows are block ids, or groups of consecutive ids when the pool is larger than
    ``max_rows`` (a group shows its busiest state: in use > cached > free).  ``span``
    (t0, t1): the time axis, in common with the other charts (default: the pool's own)."""
    info = stream.pools[pool_index]
    t_pool = stream.t[stream.pool == pool_index]
    ev, order, sb, sk, gstart, _, ref, _, hashed = _block_states(stream, pool_index, [K.ALLOC, K.FREE, K.HIT, K.CACHE, K.EVICT, K.RESERVE])
    if not len(ev) or not len(t_pool):
        return None
    n = info.num_blocks
    reserved = np.zeros(n, dtype=bool)
    reserved[sb[sk == K.RESERVE]] = True
    stt = stream.t[ev][order]
    m = len(sb)
    state = np.where(ref > 0, IN_USE, np.where(hashed, CACHED, EMPTY)).astype(np.int8)

    t0, t1 = (int(t_pool.min()), int(t_pool.max())) if span is None else span
    times = np.linspace(t0, t1, columns + 1)[1:]
    grid = np.full((n, columns), EMPTY, dtype=np.int8)
    gend = np.r_[gstart[1:], m]
    for g0, g1 in zip(gstart.tolist(), gend.tolist()):
        b = int(sb[g0])
        j = np.searchsorted(stt[g0:g1], times, side="right") - 1  # last event of this block at each instant
        have = j >= 0
        grid[b, have] = state[g0:g1][j[have]]
    grid[reserved] = RESERVED
    group = 1
    if n > max_rows:
        group = -(-n // max_rows)
        pad = (-n) % group
        g = np.concatenate([grid, np.full((pad, columns), EMPTY, dtype=np.int8)]) if pad else grid
        rank = np.array([0, 1, 3, 2], dtype=np.int8)  # EMPTY < CACHED < RESERVED < IN_USE
        back = np.array([EMPTY, CACHED, RESERVED, IN_USE], dtype=np.int8)  # rank -> state
        grid = back[rank[g].reshape(-1, group, columns).max(axis=1)]
    return {
        "pool": info.label,
        "t_s": ((times - t0) / 1e9).tolist(),
        "span_s": (t1 - t0) / 1e9,
        "rows": int(grid.shape[0]),
        "blocks_per_row": group,
        "num_blocks": n,
        "grid": grid,  # rows x columns of state codes
    }


def hit_rate_over_time(stream, pool_indices, columns: int = 300, span: tuple[int, int] | None = None) -> dict | None:
    """Prefix-cache hit rate (tokens) per time bucket and cumulative; ``span`` as in block_map."""
    mask = np.isin(stream.pool, pool_indices)
    sel = np.flatnonzero(mask & (stream.kind == K.REQ_QUERY))
    t_pool = stream.t[mask]
    if not len(sel) or not len(t_pool):
        return None
    t0, t1 = (int(t_pool.min()), int(t_pool.max())) if span is None else span
    edges = np.linspace(t0, t1 + 1, columns + 1)
    b = np.clip(np.searchsorted(edges, stream.t[sel], side="right") - 1, 0, columns - 1)
    q = np.bincount(b, weights=stream.arg[sel], minlength=columns)
    h = np.bincount(b, weights=stream.arg2[sel], minlength=columns)
    cq, ch = np.cumsum(q), np.cumsum(h)
    return {
        "t_s": ((edges[1:] - t0) / 1e9).tolist(),
        "bucket": np.where(q > 0, h / np.maximum(q, 1), np.nan).tolist(),
        "cumulative": np.where(cq > 0, ch / np.maximum(cq, 1), np.nan).tolist(),
    }


def marker_times(bundle, t0_ns: int | None, limit: int = 400) -> list:
    """(seconds since t0, name, pid) of the markers, thinned to ``limit`` evenly."""
    marks = bundle.marks()
    if not len(marks.t):
        return []
    t0 = int(marks.t.min()) if t0_ns is None else t0_ns
    idx = np.arange(len(marks.t))
    if len(idx) > limit:
        idx = np.unique(np.linspace(0, len(idx) - 1, limit).astype(np.int64))
    return [((int(marks.t[i]) - t0) / 1e9, marks.names[int(marks.name[i])], int(marks.pid[i])) for i in idx]


def gc_pauses(bundle, t0_ns: int | None, limit: int = 5000) -> list:
    """Every collection (the longest ``limit`` when there are more): process, start (s since
    t0), pause (s), generation."""
    rows = []
    for proc in bundle.processes:
        g = proc.gc_events()
        if not len(g):
            continue
        rows.append((np.full(len(g), proc.pid), g["t"], g["duration"], g["generation"]))
    if not rows:
        return []
    pid, t, dur, gen = (np.concatenate([r[i] for r in rows]) for i in range(4))
    if len(t) > limit:
        keep = np.argsort(dur)[-limit:]
        pid, t, dur, gen = pid[keep], t[keep], dur[keep], gen[keep]
    base = int(t.min()) if t0_ns is None else t0_ns
    return [{"pid": int(p), "t_s": (int(a) - base) / 1e9, "pause_s": int(d) / 1e9, "generation": int(x)} for p, a, d, x in zip(pid, t, dur, gen)]


def segment_layout(snapshot: dict, max_segments: int = 120, max_blocks: int = 4000) -> list:
    """The largest segments of a PyTorch snapshot with their blocks in address order:
    [{"address", "size", "stream", "pool", "blocks": [[offset, size, state], ...]}]."""
    segs = sorted(snapshot.get("segments") or [], key=lambda s: -int(s.get("total_size") or 0))[:max_segments]
    out = []
    budget = max_blocks
    for s in segs:
        base = int(s.get("address") or 0)
        blocks = []
        off = 0
        for b in s.get("blocks") or []:
            size = int(b.get("size") or 0)
            addr = b.get("address")
            addr = addr if isinstance(addr, int) and addr >= 0 and base >= 0 else base + off  # the oldest format has no block addresses
            if budget > 0:
                blocks.append([addr - base, size, str(b.get("state", ""))])
                budget -= 1
            off += size
        out.append({"address": base, "size": int(s.get("total_size") or 0), "stream": int(s.get("stream") or 0),
                    "pool": s.get("segment_type") if s.get("segment_type") in ("large", "small") else ("large" if int(s.get("total_size") or 0) > 2 << 20 else "small"), "device": int(s.get("device") or 0), "blocks": blocks})
    return out


def collect(path: str, result, whatif: bool = True) -> dict:
    """Everything the HTML report and the Perfetto export draw, beside the analysis."""
    import os

    series: dict = {}
    if not os.path.isdir(path):
        from kvprof.trace import torch_snapshot

        if torch_snapshot.looks_like_pickle(path):
            series["segments"] = segment_layout(torch_snapshot.load(path))
        return series
    from kvprof.trace.reader import Bundle

    bundle = Bundle(path)
    stream = bundle.block_stream()
    # one time origin for every chart: the pools' first event (analyze's timeline uses it too)
    t0 = span = None
    if len(stream.t):
        t0 = int(stream.t.min())
        span = (t0, int(stream.t.max()))
    series["t0_ns"] = t0
    series["markers"] = marker_times(bundle, t0)
    series["block_maps"] = [m for m in (block_map(stream, p.index, span=span) for p in stream.pools) if m is not None]
    series["hit_rate"] = hit_rate_over_time(stream, [p.index for p in stream.pools], span=span) if stream.pools else None
    series["gc_pauses"] = gc_pauses(bundle, t0)
    tsec = result.sections.get("torch") or {}
    if tsec.get("source"):  # the snapshot the torch section came from: its segment map
        from kvprof.trace import torch_snapshot

        p = os.path.normpath(os.path.join(bundle.path, tsec["source"]))
        if p.startswith(os.path.normpath(bundle.path) + os.sep) and os.path.isfile(p):
            series["segments"] = segment_layout(torch_snapshot.load(p))
    if whatif and stream.pools and "blocks" in result.sections:
        from kvprof.analysis import whatif as W

        # analyze's figures are the pool's own when there is one pool and the analysis
        # covers the whole run: the fidelity check need not analyze it again
        whole = len(stream.pools) == 1 and result.source.get("window") == "whole run"
        analyzed = {k: v["value"] for k, v in result.metrics.items() if k.startswith("blocks.")} if whole else None
        try:
            series["whatif"] = W.run(stream, W.WhatifOptions(unlimited=True, jobs=1), analyzed)
        except ValueError as exc:  # a pool without request states: no replay, say why
            series["whatif_note"] = str(exc)
    return series


def pool_counts(stream, pool_index: int, max_points: int = 20000) -> dict | None:
    """In-use and free-cached blocks of one pool after each call that changed them, thinned
    to ``max_points`` (the last value of each time bucket, and the bucket's largest in-use
    count, so the watermark survives thinning)."""
    info = stream.pools[pool_index]
    ev, order, _, _, _, ref_before, ref_after, hashed_before, hashed_after = _block_states(stream, pool_index, [K.ALLOC, K.FREE, K.HIT, K.CACHE, K.EVICT])
    if not len(ev):
        return None
    m = len(ev)
    d_use = np.zeros(m, dtype=np.int64)
    d_use[order] = (ref_after > 0).astype(np.int64) - (ref_before > 0)
    d_cached = np.zeros(m, dtype=np.int64)
    d_cached[order] = ((ref_after <= 0) & hashed_after).astype(np.int64) - ((ref_before <= 0) & hashed_before)
    in_use, cached = np.cumsum(d_use), np.cumsum(d_cached)
    last = np.r_[ev[1:] != ev[:-1], True]  # the state after each call
    t, in_use, cached = stream.t[ev][last], in_use[last], cached[last]
    change = np.r_[True, (in_use[1:] != in_use[:-1]) | (cached[1:] != cached[:-1])]  # calls that changed nothing: dropped
    t, in_use, cached = t[change], in_use[change], cached[change]
    peak = in_use.copy()
    if len(t) > max_points:
        edges = np.linspace(t[0], t[-1] + 1, max_points + 1)
        b = np.searchsorted(edges, t, side="right") - 1
        ends = np.r_[np.flatnonzero(b[1:] != b[:-1]), len(b) - 1]
        starts = np.r_[0, ends[:-1] + 1]
        peak = np.maximum.reduceat(in_use, starts)
        t, in_use, cached = t[ends], in_use[ends], cached[ends]
    reserved = set()  # reserve calls are few (vLLM's null block)
    for i in np.flatnonzero((stream.pool == pool_index) & (stream.kind == K.RESERVE)).tolist():
        reserved.update(stream.ids[stream.offsets[i] : stream.offsets[i + 1]].tolist())
    reserved = len(reserved)
    return {"pool": info.label, "pid": info.pid, "capacity": info.num_blocks - reserved, "t_ns": t, "in_use": in_use, "in_use_max": peak, "cached": cached}
