"""Series for drawing: the block map over time, the prefix-cache hit rate over time, the
in-use and free-cached counts for the Perfetto export, marker times and GC pauses.

The block series are consumers of the analysis pass (each observes the chunks a pool's
BlockAnalyzer sees, see ``ChunkView``), so drawing never reads the bundle a second
time.  Time buckets start at the common origin of every chart (the first block event of
the bundle) and double their width to stay within a fixed count: drawing only; every
figure of the analysis is computed on all events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kvprof.analysis.blocks import CACHED, EMPTY, IN_USE, RESERVED, ChunkView
from kvprof.trace.format import EventKind as K

if TYPE_CHECKING:
    from kvprof.trace.reader import Bundle, PoolInfo

_RANK = np.array([0, 1, 3, 2], dtype=np.int8)  # state -> rank: EMPTY < CACHED < RESERVED < IN_USE
_BACK = np.array([EMPTY, CACHED, RESERVED, IN_USE], dtype=np.int8)  # rank -> state


class _Columns:
    """Column c covers [t0 + c*width, t0 + (c+1)*width); at most 2*target are kept, the
    width doubling (pairs merged) whenever a later time needs more."""

    def __init__(self, t0: int, target: int):
        self.t0 = int(t0)
        self.target = target
        self.n = 2 * target
        self.width = 1

    def index(self, t: np.ndarray) -> np.ndarray:
        return (t - self.t0) // self.width

    def fit(self, t_last: int) -> bool:
        """Make room for ``t_last``; True when the width changed (the caller merges)."""
        changed = False
        while (int(t_last) - self.t0) // self.width >= self.n:
            self.width *= 2
            changed = True
        return changed


class BlockMapSeries:
    """The state of every block of one pool at the end of each time column: rows are block
    ids, or groups of consecutive ids when the pool is larger than ``max_rows`` (a group
    shows its busiest state: in use > reserved > cached > free)."""

    def __init__(self, info: PoolInfo, t0: int, columns: int = 300, max_rows: int = 512):
        self.info = info
        n = info.num_blocks
        self.group = -(-n // max_rows) if n > max_rows else 1
        self.rows = -(-n // self.group)
        self.counts = np.zeros((self.rows, 4), dtype=np.int64)
        sizes = np.full(self.rows, self.group, dtype=np.int64)
        sizes[-1] = n - self.group * (self.rows - 1)
        self.counts[:, EMPTY] = sizes
        self.cols = _Columns(t0, columns)
        self.grid = np.full((self.cols.n, self.rows), -1, dtype=np.int8)  # rank per column, -1: not reached yet
        self.col = 0  # the column the current state belongs to
        self.seen = False

    def _now(self) -> np.ndarray:
        have = self.counts > 0
        r = np.where(have[:, IN_USE], 3, np.where(have[:, RESERVED], 2, np.where(have[:, CACHED], 1, 0)))
        return r.astype(np.int8)

    def _merge(self, old_width: int) -> None:
        f = self.cols.width // old_width
        g = self.grid
        while f > 1:
            later = g[1::2]
            g = np.where(later >= 0, later, g[0::2])
            g = np.r_[g, np.full((len(g), self.rows), -1, dtype=np.int8)]
            f //= 2
            self.col //= 2
        self.grid = g

    def observe(self, v: ChunkView) -> None:
        if not len(v.bt):
            return
        old = self.cols.width
        if self.cols.fit(int(v.bt[-1])):
            self._merge(old)
        col = self.cols.index(v.bt)
        change = v.state_before != v.state_after
        bounds = np.r_[0, np.flatnonzero(col[1:] != col[:-1]) + 1, len(col)]
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            c = int(col[a])
            if c > self.col:  # columns up to here end in the current state
                self.grid[self.col : c] = self._now()
                self.col = c
            sel = np.flatnonzero(change[a:b]) + a
            if len(sel):
                g = v.key[sel] // self.group
                np.add.at(self.counts, (g, v.state_before[sel]), -1)
                np.add.at(self.counts, (g, v.state_after[sel]), 1)
        self.seen = True

    def result(self, t1: int, reserved: np.ndarray | None = None) -> dict[str, Any] | None:
        if not self.seen:
            return None
        old = self.cols.width
        if self.cols.fit(int(t1)):
            self._merge(old)
        last = int(self.cols.index(np.array([t1]))[0])
        self.grid[self.col : last + 1] = self._now()
        grid = self.grid[: last + 1].copy()
        while len(grid) > self.cols.target:  # at most `target` columns drawn
            if len(grid) % 2:
                grid = np.r_[grid, grid[-1:]]
            grid = np.where(grid[1::2] >= 0, grid[1::2], grid[0::2])
            self.cols.width *= 2
        if reserved is not None and reserved.any():
            res_rows = np.zeros(self.rows, dtype=bool)
            res_rows[np.flatnonzero(reserved) // self.group] = True
            grid[:, res_rows] = np.maximum(grid[:, res_rows], 2)
        ncol = len(grid)
        span = ncol * self.cols.width
        return {
            "pool": self.info.label,
            "t_s": (np.arange(1, ncol + 1) * self.cols.width / 1e9).tolist(),
            "span_s": span / 1e9,
            "rows": self.rows,
            "blocks_per_row": self.group,
            "num_blocks": self.info.num_blocks,
            "grid": _BACK[np.maximum(grid, 0)].T.copy(),  # rows x columns of state codes
        }


class HitRateSeries:
    """Prefix-cache hit rate (tokens) per time bucket and cumulative."""

    def __init__(self, t0: int, columns: int = 300):
        self.cols = _Columns(t0, columns)
        self.q = np.zeros(self.cols.n)
        self.h = np.zeros(self.cols.n)
        self.seen = False

    def _merge(self, old: int) -> None:
        f = self.cols.width // old
        while f > 1:
            self.q = np.r_[self.q[0::2] + self.q[1::2], np.zeros(len(self.q) // 2)]
            self.h = np.r_[self.h[0::2] + self.h[1::2], np.zeros(len(self.h) // 2)]
            f //= 2

    def observe(self, v: ChunkView) -> None:
        c = v.chunk
        sel = np.flatnonzero(c.kind == K.REQ_QUERY)
        if not len(sel):
            return
        old = self.cols.width
        if self.cols.fit(int(c.t[sel[-1]])):
            self._merge(old)
        b = self.cols.index(c.t[sel])
        self.q += np.bincount(b, weights=c.arg[sel], minlength=self.cols.n)
        self.h += np.bincount(b, weights=c.arg2[sel], minlength=self.cols.n)
        self.seen = True

    def result(self, t1: int) -> dict[str, Any] | None:
        if not self.seen:
            return None
        old = self.cols.width
        if self.cols.fit(int(t1)):
            self._merge(old)
        n = int(self.cols.index(np.array([t1]))[0]) + 1
        q, h = self.q[:n], self.h[:n]
        while len(q) > self.cols.target:
            if len(q) % 2:
                q, h = np.r_[q, 0.0], np.r_[h, 0.0]
            q, h = q[0::2] + q[1::2], h[0::2] + h[1::2]
            self.cols.width *= 2
        cq, ch = np.cumsum(q), np.cumsum(h)
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "t_s": (np.arange(1, len(q) + 1) * self.cols.width / 1e9).tolist(),
                "bucket": np.where(q > 0, h / np.maximum(q, 1), np.nan).tolist(),
                "cumulative": np.where(cq > 0, ch / np.maximum(cq, 1), np.nan).tolist(),
            }


class PoolCountsSeries:
    """In-use and free-cached blocks of one pool after each call that changed them, thinned
    to ``max_points`` once there are more (the last value of each time bucket, and the
    bucket's largest in-use count, so the watermark survives thinning)."""

    def __init__(self, info: PoolInfo, max_points: int = 20000):
        self.info = info
        self.max_points = max_points
        self.t: list[Any] = []
        self.use: list[Any] = []
        self.use_max: list[Any] = []
        self.cached: list[Any] = []
        self.last: tuple[int, int] | None = None  # (in use, cached) of the last point kept
        self.points = 0
        self.cols: _Columns | None = None  # buckets, once thinning started

    def observe(self, v: ChunkView) -> None:
        if not len(v.bt):
            return
        call_last = np.r_[v.ev_of[1:] != v.ev_of[:-1], True]  # the state after each call
        t, use, cached = v.bt[call_last], v.inuse[call_last], v.cached[call_last]
        prev = self.last if self.last is not None else (None, None)
        change = np.r_[True, (use[1:] != use[:-1]) | (cached[1:] != cached[:-1])]
        if prev[0] is not None:
            change[0] = (use[0] != prev[0]) or (cached[0] != prev[1])
        t, use, cached = t[change], use[change], cached[change]
        if not len(t):
            return
        self.last = (int(use[-1]), int(cached[-1]))
        self.t.append(t)
        self.use.append(use)
        self.use_max.append(use)
        self.cached.append(cached)
        self.points += len(t)
        if self.points > 2 * self.max_points:
            self._thin()

    def _thin(self) -> None:
        t = np.concatenate(self.t)
        use, umax, cached = np.concatenate(self.use), np.concatenate(self.use_max), np.concatenate(self.cached)
        if self.cols is None:
            self.cols = _Columns(int(t[0]), self.max_points)
        self.cols.fit(int(t[-1]))
        while True:
            b = self.cols.index(t)
            ends = np.r_[np.flatnonzero(b[1:] != b[:-1]), len(b) - 1]
            if len(ends) <= self.max_points:
                break
            self.cols.width *= 2
        starts = np.r_[0, ends[:-1] + 1]
        self.t = [t[ends]]
        self.use = [use[ends]]
        self.use_max = [np.maximum.reduceat(umax, starts)]
        self.cached = [cached[ends]]
        self.points = len(ends)

    def result(self, capacity: int) -> dict[str, Any] | None:
        if not self.points:
            return None
        if self.points > self.max_points:
            self._thin()
        cat = np.concatenate
        return {
            "pool": self.info.label,
            "pid": self.info.pid,
            "capacity": capacity,
            "t_ns": cat(self.t),
            "in_use": cat(self.use),
            "in_use_max": cat(self.use_max),
            "cached": cat(self.cached),
        }


class InstantSeries:
    """A pool's preemptions and refused allocations (time, kind, request key), the first
    ``limit`` of them, for the Perfetto export's instant events."""

    def __init__(self, info: PoolInfo, limit: int = 100000):
        self.info = info
        self.limit = limit
        self.parts: list[Any] = []
        self.kept = 0

    def observe(self, v: ChunkView) -> None:
        c = v.chunk
        if self.kept >= self.limit:
            return
        sel = np.flatnonzero((c.kind == K.REQ_PREEMPT) | (c.kind == K.ALLOC_FAIL))[: self.limit - self.kept]
        if len(sel):
            self.parts.append((c.t[sel], c.kind[sel], c.req[sel]))
            self.kept += len(sel)

    def result(self) -> dict[str, Any]:
        def cat(i: int, dt: Any) -> np.ndarray:
            return np.concatenate([p[i] for p in self.parts]) if self.parts else np.zeros(0, dtype=dt)

        return {"pool": self.info.index, "t": cat(0, np.int64), "kind": cat(1, np.uint8), "req": cat(2, np.int64)}


def marker_times(bundle: Bundle, t0_ns: int | None, limit: int = 400) -> list[Any]:
    """(seconds since t0, name, pid) of the markers, thinned to ``limit`` evenly."""
    marks = bundle.marks()
    if not len(marks.t):
        return []
    t0 = int(marks.t.min()) if t0_ns is None else t0_ns
    idx = np.arange(len(marks.t))
    if len(idx) > limit:
        idx = np.unique(np.linspace(0, len(idx) - 1, limit).astype(np.int64))
    return [((int(marks.t[i]) - t0) / 1e9, marks.names[int(marks.name[i])], int(marks.pid[i])) for i in idx]


def gc_pauses(bundle: Bundle, t0_ns: int | None, limit: int = 5000) -> list[Any]:
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
    return [
        {"pid": int(p), "t_s": (int(a) - base) / 1e9, "pause_s": int(d) / 1e9, "generation": int(x)}
        for p, a, d, x in zip(pid, t, dur, gen)
    ]


def segment_layout(snapshot: dict[str, Any], max_segments: int = 120, max_blocks: int = 4000) -> list[Any]:
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
            addr = (
                addr if isinstance(addr, int) and addr >= 0 and base >= 0 else base + off
            )  # the oldest format has no block addresses
            if budget > 0:
                blocks.append([addr - base, size, str(b.get("state", ""))])
                budget -= 1
            off += size
        out.append(
            {
                "address": base,
                "size": int(s.get("total_size") or 0),
                "stream": int(s.get("stream") or 0),
                "pool": s.get("segment_type")
                if s.get("segment_type") in ("large", "small")
                else ("large" if int(s.get("total_size") or 0) > 2 << 20 else "small"),
                "device": int(s.get("device") or 0),
                "blocks": blocks,
            }
        )
    return out
