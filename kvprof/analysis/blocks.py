"""Block-pool analyzer: consumes time-ordered chunks of block events, keeps only live
state, and produces a typed result.

Invariants this module keeps (and the property tests check):

* every non-reserved block is in exactly one state at any instant, so
  free-empty + free-cached + in-use + reserved = N;
* a block is in use iff its reference count (ALLOC and HIT add one, FREE takes
  one) is positive; a free block is free-cached iff it was CACHEd and not
  evicted since (an ALLOC of a cached free block is its eviction);
* hit tokens never exceed queried tokens as long as the probe reports them so.

Memory: a few bytes per block of the pool (reference count, cached flag, state and the
times of the last in-use start and end), a few per request seen (its last waste and
length), and the values the distributions are made of (one per in-use interval, per
eviction and per reuse).  None of it grows with the number of events.  Each chunk is
handled by numpy over its block-level events sorted by block (the chunk's own sort),
starting from the state the chunks before it left; no Python loop runs per event.

Definitions: docs/metrics.md.  The whole-stream analyzer this replaced is kept in
tests/analysis/legacy_blocks.py; tests hold the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvprof.trace.chunks import BlockChunk
from kvprof.trace.format import EventKind as K
from kvprof.trace.reader import PoolInfo

EMPTY, CACHED, IN_USE, RESERVED = 0, 1, 2, 3
STATE_NAMES = {EMPTY: "free-empty", CACHED: "free-cached", IN_USE: "in-use", RESERVED: "reserved"}
ROUNDING_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
TIMELINE_POINTS = 600

_STATE_KINDS = np.zeros(256, dtype=bool)
_STATE_KINDS[[K.ALLOC, K.FREE, K.HIT, K.CACHE, K.EVICT, K.RESERVE]] = True
_DELTA = np.zeros(256, dtype=np.int64)
_DELTA[[K.ALLOC, K.HIT]] = 1
_DELTA[K.FREE] = -1
_SETV = np.full(256, -1, dtype=np.int8)
_SETV[K.CACHE] = 1
_SETV[[K.EVICT, K.ALLOC]] = 0
_I64_MAX = np.iinfo(np.int64).max


@dataclass
class Distribution:
    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None

    @classmethod
    def of(cls, values: np.ndarray, scale: float = 1.0) -> "Distribution":
        if len(values) == 0:
            return cls(0, None, None, None, None, None)
        v = values.astype(np.float64) * scale
        p50, p90, p99 = np.percentile(v, [50, 90, 99])
        return cls(len(v), float(v.mean()), float(p50), float(p90), float(p99), float(v.max()))


@dataclass
class PoolAnalysis:
    """Everything kvprof knows about one pool (or all pools together: pool = None)."""

    label: str
    pools: list[dict]
    capacity: int
    reserved: int
    block_size: int | None
    t_start: int
    t_end: int
    block_events: int
    requests: int
    # usage
    high_watermark: float | None
    peak_blocks: int
    peak_time_ns: int | None
    usage_time_weighted: float | None
    # internal fragmentation
    internal_time_weighted: float | None
    internal_lookahead_time_weighted: float | None
    internal_at_peak: float | None
    per_request_waste: Distribution
    per_request_waste_reference: float | None
    # external fragmentation at peak
    external_at_peak: float | None
    free_runs_at_peak: int
    largest_free_run_at_peak: int
    free_run_histogram: dict
    block_map_at_peak: list  # run-length encoded [[state, count], ...] over block ids
    # failures
    allocation_failures: int
    fragmentation_that_hurts: int
    engine_free_mismatches: int
    preemptions: int
    # prefix cache
    query_tokens: int
    hit_tokens: int
    hit_rate: float | None
    hit_blocks: int
    allocated_blocks: int
    block_hit_rate: float | None
    evictions: int
    evicted_before_reuse: int
    evicted_before_reuse_ratio: float | None
    lifetime_s: Distribution
    idle_before_eviction_s: Distribution
    reuse_gap_s: Distribution
    # churn
    steps: int
    frees_to_zero: int
    allocations_per_second: float | None
    evictions_per_second: float | None
    allocations_per_step: float | None
    reallocated_within_step: int
    # leaks
    in_use_at_end: int
    leaked_blocks: int
    leaked_block_ids: list
    live_requests_at_end: int
    in_use_at_idle: int
    idle_points: int
    refcount_errors: int
    out_of_range_ids: int
    # block-size rounding of the recorded lengths
    whatif: list
    contiguous: dict
    timeline: dict = field(default_factory=dict)


def true_runs(mask: np.ndarray):
    """Start and length of every run of True in a boolean array."""
    d = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts = np.flatnonzero(d == 1)
    return starts, np.flatnonzero(d == -1) - starts


def _rle(states: np.ndarray) -> list:
    if not len(states):
        return []
    change = np.flatnonzero(np.r_[True, states[1:] != states[:-1]])
    lengths = np.diff(np.r_[change, len(states)])
    return [[int(states[c]), int(n)] for c, n in zip(change, lengths)]


def _dot(v: np.ndarray, dt: np.ndarray) -> int:
    """sum(v * dt) exactly (both integer, dt >= 0): int64 when it cannot overflow."""
    if not len(v):
        return 0
    top = max(int(np.abs(v).max()), 1)
    if top * int(dt.sum()) < (1 << 62):
        return int(np.dot(v, dt))
    return sum(map(int.__mul__, v.tolist(), dt.tolist()))


class _Grow:
    """Per-request arrays that grow with the largest request key seen."""

    def __init__(self, **dtypes):
        self.dtypes = dtypes
        self.size = 0
        for name, dt in dtypes.items():
            setattr(self, name, np.zeros(0, dtype=dt))

    def fit(self, top: int) -> None:
        if top < self.size:
            return
        size = max(top + 1, 2 * self.size, 1024)
        for name, dt in self.dtypes.items():
            old = getattr(self, name)
            new = np.zeros(size, dtype=dt)
            new[: len(old)] = old
            setattr(self, name, new)
        self.size = size


class _Series:
    """Drawing buckets over time that double their width to stay under ``2 * points``:
    for each bucket the largest in-use count, the free-cached count and the waste and
    slots after its last event.  Exact per bucket; only the bucket width adapts."""

    def __init__(self, points: int):
        self.points = points
        self.t0 = None
        self.width = 1
        self.n = 2 * points
        self.present = np.zeros(self.n, dtype=bool)
        self.in_max = np.zeros(self.n, dtype=np.int64)
        self.cached = np.zeros(self.n, dtype=np.int64)
        self.tl_have = np.zeros(self.n, dtype=bool)
        self.tl_waste = np.zeros(self.n, dtype=np.int64)
        self.tl_slots = np.zeros(self.n, dtype=np.int64)

    def _double(self) -> None:
        """Merge bucket pairs: max of maxes, the later bucket's last values."""
        h = self.n // 2
        z = lambda dt: np.zeros(h, dtype=dt)  # noqa: E731
        self.in_max = np.r_[np.maximum(self.in_max[0::2], self.in_max[1::2]), z(np.int64)]
        self.cached = np.r_[np.where(self.present[1::2], self.cached[1::2], self.cached[0::2]), z(np.int64)]
        self.tl_waste = np.r_[np.where(self.tl_have[1::2], self.tl_waste[1::2], self.tl_waste[0::2]), z(np.int64)]
        self.tl_slots = np.r_[np.where(self.tl_have[1::2], self.tl_slots[1::2], self.tl_slots[0::2]), z(np.int64)]
        self.present = np.r_[self.present[0::2] | self.present[1::2], z(bool)]
        self.tl_have = np.r_[self.tl_have[0::2] | self.tl_have[1::2], z(bool)]
        self.width *= 2

    def _fit(self, t_last: int) -> None:
        while (t_last - self.t0) // self.width >= self.n:
            self._double()

    def add_blocks(self, bt: np.ndarray, inuse: np.ndarray, cached: np.ndarray) -> None:
        if not len(bt):
            return
        if self.t0 is None:
            self.t0 = int(bt[0])
        self._fit(int(bt[-1]))
        b = (bt - self.t0) // self.width
        ends = np.r_[np.flatnonzero(b[1:] != b[:-1]), len(b) - 1]
        starts = np.r_[0, ends[:-1] + 1]
        idx = b[ends]
        mx = np.maximum.reduceat(inuse, starts)
        was = self.present[idx]
        self.in_max[idx] = np.where(was, np.maximum(self.in_max[idx], mx), mx)
        self.cached[idx] = cached[ends]
        self.present[idx] = True

    def add_points(self, tl_t: np.ndarray, waste: np.ndarray, slots: np.ndarray) -> None:
        if not len(tl_t) or self.t0 is None:
            return
        self._fit(int(tl_t[-1]))
        b = np.maximum((tl_t - self.t0) // self.width, -1)
        ok = b >= 0
        if not ok.any():
            self.before = (int(waste[-1]), int(slots[-1]))
            return
        if not ok.all():
            self.before = (int(waste[~ok][-1]), int(slots[~ok][-1]))
            tl_t, waste, slots, b = tl_t[ok], waste[ok], slots[ok], b[ok]
        ends = np.r_[np.flatnonzero(b[1:] != b[:-1]), len(b) - 1]
        idx = b[ends]
        self.tl_waste[idx] = waste[ends]
        self.tl_slots[idx] = slots[ends]
        self.tl_have[idx] = True

    def timeline(self, capacity: int, t0: int, preempt_t: list, window, have_state: bool) -> dict:
        if self.t0 is None:
            return {}
        while self.present.any() and int(np.flatnonzero(self.present)[-1]) >= self.points:  # at most `points` buckets
            self._double()
        present = np.flatnonzero(self.present)
        edges = self.t0 + present * self.width
        out = {
            "t_s": [float((e - t0) / 1e9) for e in edges.tolist()],
            "in_use_max": self.in_max[present].tolist(),
            "cached": self.cached[present].tolist(),
            "capacity": capacity,
            "preemptions_t_s": [float((x - t0) / 1e9) for x in preempt_t[:1000]],
            "t0_ns": int(t0),
        }
        if window is not None:
            out["window_s"] = [float((window[0] - t0) / 1e9), float((window[1] - t0) / 1e9)]
        if have_state and self.tl_have.any():
            # the waste after the last point at or before each bucket's end, carried forward
            pos = np.where(self.tl_have, np.arange(self.n), -1)
            last = np.maximum.accumulate(pos)[present]
            w = np.where(last >= 0, self.tl_waste[np.maximum(last, 0)], getattr(self, "before", (0, 0))[0])
            s = np.where(last >= 0, self.tl_slots[np.maximum(last, 0)], getattr(self, "before", (0, 0))[1])
            if np.any(w):
                out["internal_fragmentation"] = np.where(s > 0, np.minimum(w, s) / np.maximum(s, 1), 0.0).round(4).tolist()
        return out


@dataclass
class ChunkView:
    """What one chunk did to the pool, for the drawing series: the chunk's calls, and its
    block-level events in time order (``ev_of``: the call of each; ``key``: the block,
    numbered over the analyzer's pools; states before and after; in-use and free-cached
    counts after each)."""

    chunk: BlockChunk
    ev_of: np.ndarray
    bt: np.ndarray
    key: np.ndarray
    state_before: np.ndarray
    state_after: np.ndarray
    inuse: np.ndarray
    cached: np.ndarray


class BlockAnalyzer:
    """Analyze the pools ``pools`` from time-ordered chunks of their events.

    ``window`` = (t0, t1) restricts counts, integrals and the watermark to that span;
    block states are still replayed from the start of the run.  Feed every event of the
    selected pools (events of other pools are ignored) in time order, then call
    :meth:`finish`.
    """

    def __init__(self, pools: list[PoolInfo], window: tuple[int, int] | None = None, label: str | None = None):
        self.infos = list(pools)
        self.label = label or ", ".join(p.label for p in pools)
        self.window = window
        top = max((p.index for p in pools), default=-1) + 1
        self.pos = np.full(max(top, 1), -1, dtype=np.int64)  # global pool index -> position in self.infos
        for i, p in enumerate(pools):
            self.pos[p.index] = i
        self.base = np.zeros(len(pools) + 1, dtype=np.int64)
        self.base[1:] = np.cumsum([p.num_blocks for p in pools])
        self.nblocks = np.array([p.num_blocks for p in pools] or [0], dtype=np.int64)
        self.bsize = np.array([p.block_size for p in pools] or [1], dtype=np.int64)
        nk = int(self.base[-1])
        self.nkeys = nk
        self.key_dtype = np.uint16 if nk <= 1 << 16 else np.uint32
        # per block
        self.ref = np.zeros(nk, dtype=np.int64)
        self.hashed = np.zeros(nk, dtype=bool)
        self.state = np.zeros(nk, dtype=np.int8)
        self.reserved = np.zeros(nk, dtype=bool)
        self.ep_seen = np.zeros(nk, dtype=bool)
        self.ep_hits = np.zeros(nk, dtype=np.int64)
        self.has_start = np.zeros(nk, dtype=bool)
        self.start_t = np.zeros(nk, dtype=np.int64)
        self.start_seq = np.full(nk, -1, dtype=np.int64)
        self.has_end = np.zeros(nk, dtype=bool)
        self.end_t = np.zeros(nk, dtype=np.int64)
        self.end_step = np.zeros(nk, dtype=np.int64)
        # per request
        self.req = _Grow(seen=bool, finished=bool, has_state=bool, last_waste=np.int64, last_look=np.int64,
                         last_filled=np.int64, max_filled=np.int64, bs=np.int64)
        # running counts
        self.inuse = 0
        self.cached = 0
        self.v = np.zeros(4, dtype=np.int64)  # blocks, slots, waste, lookahead after the last timeline point
        self.t_start = None
        self.t_end = None
        self.w0 = None
        self.W1 = window[1] if window is not None else _I64_MAX
        self.W0 = window[0] if window is not None else -_I64_MAX
        self.tl_last = None  # clipped time of the last timeline point
        self.integrals = [0, 0, 0, 0]  # blocks, slots, min(waste, slots), min(lookahead, slots)
        self.before_end = (0, 0)  # (waste, slots) at the last timeline point before the chunk's last time
        self.have_state = False
        self.bseq = 0  # block-level events so far (sequence numbers for the leak log)
        self.calls = 0  # events of the pools, of any kind
        self.counts = dict(refcount_errors=0, out_of_range=0, block_events=0, allocated=0, hit_blocks=0, frees_to_zero=0,
                           evictions=0, before_reuse=0, realloc=0, steps_in=0, steps=0, alloc_failures=0, preemptions=0,
                           query_tokens=0, hit_tokens=0, idle_points=0, in_use_at_idle=0, live=0)
        self.lifetimes: list = []
        self.idle: list = []
        self.reuse: list = []
        self.fail_need: list = []
        self.fail_seen: list = []
        self.preempt_t: list = []
        # high watermark
        self.peak = None  # (blocks, time)
        self.peak_states = None
        self.plateau = None  # None: the plateau's end not seen yet; else (waste, slots) just before it
        self.idle_pending = False
        self.log_key = np.zeros(0, dtype=np.int64)
        self.log_req = np.zeros(0, dtype=np.int64)
        self.log_seq = np.zeros(0, dtype=np.int64)
        self.log_compacted = 0
        self.series = _Series(TIMELINE_POINTS)
        self.observers: list = []  # drawing series fed each chunk's block-level view (kvprof/analysis/timeseries.py)

    # ------------------------------------------------------------------------------------
    def _in_win(self, t: np.ndarray) -> np.ndarray:
        if self.window is None:
            return np.ones(len(t), dtype=bool)
        return (t >= self.W0) & (t <= self.W1)

    def feed(self, c: BlockChunk) -> None:
        if not len(c):
            return
        pool_ok = c.pool < len(self.pos)
        if not pool_ok.all() or (self.pos[np.minimum(c.pool, len(self.pos) - 1)] < 0).any():
            keep = pool_ok.copy()
            keep[pool_ok] = self.pos[c.pool[pool_ok]] >= 0
            c = c.take(keep)
            if not len(c):
                return
        t = c.t
        kind = c.kind
        self.calls += len(c)
        if self.t_start is None:
            self.t_start = int(t[0])
            self.w0 = self.t_start if self.window is None else max(self.W0, self.t_start)
        self.t_end = int(t[-1])
        steps_before = self.counts["steps"]
        step_t = t[kind == K.STEP]
        self.counts["steps"] += len(step_t)
        self.counts["steps_in"] += int(self._in_win(step_t).sum())

        # ---- block level: one row per block per call ---------------------------------------
        if len(c.ids):
            owner = np.repeat(np.arange(len(c), dtype=np.int64), c.n)
            statek = _STATE_KINDS[kind[owner]]
            ev_of = owner[statek]
            bid = c.ids[statek].astype(np.int64)
        else:
            ev_of = bid = np.zeros(0, dtype=np.int64)
        pl = self.pos[c.pool[ev_of]]
        ok = (bid >= 0) & (bid < self.nblocks[pl])
        if not ok.all():
            self.counts["out_of_range"] += int((~ok).sum())
            ev_of, bid, pl = ev_of[ok], bid[ok], pl[ok]
        key = self.base[pl] + bid
        bkind = kind[ev_of]
        res = bkind == K.RESERVE
        if res.any():
            self._reserve(np.unique(key[res]))
        keep = ~self.reserved[key]
        if not keep.all():
            key, bkind, ev_of, pl = key[keep], bkind[keep], ev_of[keep], pl[keep]
        bt = t[ev_of]
        m = len(key)

        # ---- replay sorted by block, from the carried state ------------------------------
        order = np.argsort(key.astype(self.key_dtype), kind="stable")
        sk = key[order]
        skind = bkind[order]
        gs = np.ones(m, dtype=bool)
        if m:
            gs[1:] = sk[1:] != sk[:-1]
        gstart = np.flatnonzero(gs)
        gid = np.cumsum(gs) - 1
        gkey = sk[gstart]
        gend = np.r_[gstart[1:] - 1, m - 1] if m else gstart
        idx = np.arange(m, dtype=np.int64)
        gstart_of = gstart[gid] if m else idx
        delta = _DELTA[skind]
        cs = np.cumsum(delta)
        ref_after = self.ref[gkey][gid] + cs - (cs - delta)[gstart][gid] if m else cs
        ref_before = ref_after - delta
        setv = _SETV[skind]
        isset = setv >= 0
        ls = np.maximum.accumulate(np.where(isset | gs, idx, -1)) if m else idx
        carried_hashed = self.hashed[gkey][gid] if m else np.zeros(0, dtype=bool)
        hashed_after = np.where(isset[ls], setv[ls] == 1, carried_hashed) if m else carried_hashed
        hashed_before = np.empty(m, dtype=bool)
        if m:
            hashed_before[1:] = hashed_after[:-1]
            hashed_before[gstart] = self.hashed[gkey]
        self.counts["refcount_errors"] += int(((skind == K.FREE) & (ref_before <= 0)).sum() + ((skind == K.ALLOC) & (ref_before > 0)).sum())
        st_after = np.where(ref_after > 0, IN_USE, np.where(hashed_after, CACHED, EMPTY)).astype(np.int8)
        st_before = np.where(ref_before > 0, IN_USE, np.where(hashed_before, CACHED, EMPTY)).astype(np.int8)

        # ---- in use and free-cached over time (time order) ------------------------------------
        d_in = np.empty(m, dtype=np.int64)
        d_in[order] = (st_after == IN_USE).astype(np.int64) - (st_before == IN_USE)
        d_ca = np.empty(m, dtype=np.int64)
        d_ca[order] = (st_after == CACHED).astype(np.int64) - (st_before == CACHED)
        inuse0 = self.inuse
        inuse = inuse0 + np.cumsum(d_in)
        cached = self.cached + np.cumsum(d_ca)
        bsz = self.bsize[pl]
        win_b = self._in_win(bt)
        win_sorted = win_b[order]
        self.counts["block_events"] += int(win_b.sum())
        self.counts["allocated"] += int(((bkind == K.ALLOC) & win_b).sum())
        self.counts["hit_blocks"] += int(((bkind == K.HIT) & win_b).sum())

        # ---- request events ---------------------------------------------------------------------
        rsel = np.flatnonzero((kind >= K.REQ_ARRIVE) & (kind <= K.ALLOC_FAIL))
        r_t, r_kind, r_req = t[rsel], kind[rsel], c.req[rsel]
        r_arg, r_arg2 = c.arg[rsel], c.arg2[rsel]
        r_bs = self.bsize[self.pos[c.pool[rsel]]] if len(rsel) else np.zeros(0, dtype=np.int64)
        win_r = self._in_win(r_t)
        if len(rsel):
            top = int(r_req.max())
            if top >= 0:
                self.req.fit(top)
        R = self.req

        # per-request waste: REQ_STATE sets (filled, held); FINISH/PREEMPT reset to nothing held
        st_mask = ((r_kind == K.REQ_STATE) | (r_kind == K.REQ_FINISH) | (r_kind == K.REQ_PREEMPT)) & (r_req >= 0)
        s_idx = np.flatnonzero(st_mask)
        s_req = r_req[s_idx]
        is_state = r_kind[s_idx] == K.REQ_STATE
        filled = np.where(is_state, r_arg[s_idx], 0)
        held = np.where(is_state, r_arg2[s_idx], 0)
        bs_s = r_bs[s_idx]
        waste = np.maximum(held * bs_s - filled, 0)
        needed = -(-filled // np.maximum(bs_s, 1))
        look = np.minimum(np.maximum(held - needed, 0) * bs_s, waste)
        dwaste, dlook = self._group_diff(s_req, waste, look)
        if is_state.any():
            self.have_state = True
            self._request_lengths(s_req[is_state], filled[is_state], bs_s[is_state])

        # ---- merged step functions over the chunk's timeline (call order) ------------------------
        s_call = rsel[s_idx]
        nb, ns = m, len(s_idx)
        pos_b = np.arange(nb, dtype=np.int64) + np.searchsorted(s_call, ev_of, side="left")
        pos_s = np.arange(ns, dtype=np.int64) + np.searchsorted(ev_of, s_call, side="left")
        L = nb + ns
        tl_t = np.empty(L, dtype=np.int64)
        tl_t[pos_b] = bt
        tl_t[pos_s] = r_t[s_idx]
        d = np.zeros((4, L), dtype=np.int64)
        d[0, pos_b] = d_in
        d[1, pos_b] = d_in * bsz
        d[2, pos_s] = dwaste
        d[3, pos_s] = dlook
        v = self.v[:, None] + np.cumsum(d, axis=1)
        v_prev = self.v.copy()
        if L:
            tt = np.clip(tl_t, self.w0, self.W1)
            lo = self.tl_last if self.tl_last is not None else tt[0]
            seg = np.diff(np.r_[lo, tt])  # from the previous point to each point
            prev_vals = np.concatenate([v_prev[:, None], v[:, :-1]], axis=1)
            mins = np.stack([prev_vals[0], prev_vals[1], np.minimum(prev_vals[2], prev_vals[1]), np.minimum(prev_vals[3], prev_vals[1])])
            if self.tl_last is None:
                seg[0] = 0
            for k in range(4):
                self.integrals[k] += _dot(mins[k], seg)
            self.tl_last = int(tt[-1])
            self.v = v[:, -1].copy()
        tmax = int(t[-1])
        j_end = int(np.searchsorted(tl_t, tmax, side="left")) - 1
        self.before_end = (int(v[2, j_end]), int(v[1, j_end])) if j_end >= 0 else (int(v_prev[2]), int(v_prev[1]))

        # ---- high watermark and its plateau -----------------------------------------------------
        cand = np.flatnonzero(win_b)
        new_peak = None
        if len(cand):
            j = int(cand[np.argmax(inuse[cand])])
            if self.peak is None or inuse[j] > self.peak[0]:
                new_peak = j
                self.peak = (int(inuse[j]), int(bt[j]))
                self.plateau = None
        if self.peak is not None and self.plateau is None:
            start = new_peak + 1 if new_peak is not None else 0
            down = np.flatnonzero(d_in[start:] < 0)
            if len(down):
                pe_t = int(bt[start + down[0]])
                jj = int(np.searchsorted(tl_t, pe_t, side="left")) - 1
                self.plateau = (int(v[2, jj]), int(v[1, jj])) if jj >= 0 else (int(v_prev[2]), int(v_prev[1]))
        if new_peak is not None:
            snap = self.state.copy()
            if m:
                last_upto = np.maximum.reduceat(np.where(order <= new_peak, idx, -1), gstart)
                have = last_upto >= 0
                snap[gkey[have]] = st_after[last_upto[have]]
            self.peak_states = snap

        # ---- evictions and the epochs between caching and eviction ---------------------------------
        evict = ((skind == K.ALLOC) & (st_before == CACHED)) | ((skind == K.EVICT) & hashed_before)
        hit_sorted = skind == K.HIT
        if m:
            lso = np.maximum.accumulate(np.where(isset, idx, -1))
            cur_ep = np.where(lso >= gstart_of, lso, -1)
            hp = np.bincount(cur_ep[hit_sorted & (cur_ep >= 0)], minlength=m)
            hc = np.bincount(gid[hit_sorted & (cur_ep < 0)], minlength=len(gstart)) + self.ep_hits[gkey]
            ep_before = np.empty(m, dtype=np.int64)
            ep_before[1:] = cur_ep[:-1]
            ep_before[gstart] = -1
            first_ever = gs & ~self.ep_seen[gkey][gid]
            hits_before = np.where(ep_before >= 0, hp[np.maximum(ep_before, 0)], hc[gid])
            never_hit = first_ever | (hits_before == 0)
            ev_in = evict & win_sorted
            self.counts["evictions"] += int(ev_in.sum())
            self.counts["before_reuse"] += int((never_hit & ev_in).sum())
            last_ep = cur_ep[gend]
            self.ep_hits[gkey] = np.where(last_ep >= 0, hp[np.maximum(last_ep, 0)], hc)
            self.ep_seen[gkey] = True

        # ---- in-use intervals: lifetimes, idle before eviction, reuse gaps, churn in a step --------
        start_m = (st_before != IN_USE) & (st_after == IN_USE)
        end_m = (st_before == IN_USE) & (st_after != IN_USE)
        st_t = bt[order]
        self.counts["frees_to_zero"] += int((end_m & win_sorted).sum())
        if m:
            lsi = np.maximum.accumulate(np.where(start_m, idx, -1))
            in_grp = lsi >= gstart_of
            start_time = np.where(in_grp, st_t[np.maximum(lsi, 0)], self.start_t[gkey][gid])
            has_start = in_grp | self.has_start[gkey][gid]
            ends = end_m & win_sorted & has_start
            if ends.any():
                self.lifetimes.append(st_t[ends] - start_time[ends])
            lei = np.maximum.accumulate(np.where(end_m, idx, -1))
            prev_e = np.empty(m, dtype=np.int64)
            prev_e[1:] = lei[:-1]
            prev_e[gstart] = -1
            pe_in = prev_e >= gstart_of
            prev_end_t = np.where(pe_in, st_t[np.maximum(prev_e, 0)], self.end_t[gkey][gid])
            has_prev = pe_in | self.has_end[gkey][gid]
            sel = evict & win_sorted & has_prev
            if sel.any():
                self.idle.append(st_t[sel] - prev_end_t[sel])
            sel = hit_sorted & (st_before == CACHED) & has_prev & win_sorted
            if sel.any():
                self.reuse.append(st_t[sel] - prev_end_t[sel])
            step_of = steps_before + np.searchsorted(step_t, st_t, side="right")
            prev_step = np.where(pe_in, step_of[np.maximum(prev_e, 0)], self.end_step[gkey][gid])
            restart = start_m & has_prev & win_sorted
            self.counts["realloc"] += int((step_of[restart] == prev_step[restart]).sum())
            # leak log: who referenced each block since it last came into use
            seq_sorted = self.bseq + order
            lsi_end = lsi[gend]
            started = lsi_end >= gstart
            self.start_seq[gkey[started]] = seq_sorted[lsi_end[started]]
            ah = (skind == K.ALLOC) | (skind == K.HIT)
            if ah.any():
                self.log_key = np.r_[self.log_key, sk[ah]]
                self.log_req = np.r_[self.log_req, c.req[ev_of[order[ah]]]]
                self.log_seq = np.r_[self.log_seq, seq_sorted[ah]]
            # carry to the next chunk
            self.has_start[gkey[started]] = True
            self.start_t[gkey[started]] = st_t[lsi_end[started]]
            lei_end = lei[gend]
            ended = lei_end >= gstart
            self.has_end[gkey[ended]] = True
            self.end_t[gkey[ended]] = st_t[lei_end[ended]]
            self.end_step[gkey[ended]] = step_of[lei_end[ended]]
            self.ref[gkey] = ref_after[gend]
            self.hashed[gkey] = hashed_after[gend]
            self.state[gkey] = st_after[gend]
        self.bseq += m
        if len(self.log_key) > max(1 << 16, 2 * self.log_compacted):
            self._compact_log()

        # ---- failures, preemptions, prefix cache -----------------------------------------------
        fail = np.flatnonzero((r_kind == K.ALLOC_FAIL) & win_r)
        if len(fail):
            # in use just before the failure in call order (timestamps may tie on a simulated clock)
            p = np.searchsorted(ev_of, rsel[fail], side="left") - 1
            before = np.where(p >= 0, inuse[np.maximum(p, 0)] if m else 0, inuse0)
            need, seen = r_arg[fail], r_arg2[fail]
            self.fail_need.append((need + before)[need >= 0])
            self.fail_seen.append((seen + before)[seen >= 0])
            self.counts["alloc_failures"] += len(fail)
        pre = (r_kind == K.REQ_PREEMPT) & win_r
        self.counts["preemptions"] += int(pre.sum())
        if len(self.preempt_t) < 1000:
            self.preempt_t.extend(r_t[r_kind == K.REQ_PREEMPT][: 1000 - len(self.preempt_t)].tolist())
        q = (r_kind == K.REQ_QUERY) & win_r
        self.counts["query_tokens"] += int(r_arg[q].sum())
        self.counts["hit_tokens"] += int(r_arg2[q].sum())

        # ---- requests: liveness and idle points --------------------------------------------------
        rr = np.flatnonzero(r_req >= 0)
        if len(rr):
            keys = r_req[rr]
            _, first = np.unique(keys, return_index=True)
            new = np.zeros(len(rsel), dtype=bool)
            fresh = rr[first][~R.seen[keys[first]]]
            new[fresh] = True
            R.seen[keys] = True
            fin = rr[r_kind[rr] == K.REQ_FINISH]
            fin_first = np.zeros(len(rsel), dtype=bool)
            if len(fin):
                _, ff = np.unique(r_req[fin], return_index=True)
                firsts = fin[ff]
                firsts = firsts[~R.finished[r_req[firsts]]]
                fin_first[firsts] = True
                R.finished[r_req[fin]] = True
            delta_live = new.astype(np.int64) - fin_first
            live = self.counts["live"] + np.cumsum(delta_live)
            self.counts["live"] = int(live[-1])
            idle_at = np.flatnonzero(fin_first & (live == 0))
        else:
            idle_at = np.zeros(0, dtype=np.int64)
        if len(rsel) and self.idle_pending:  # an idle point at the end of an earlier chunk
            p = int(np.searchsorted(ev_of, rsel[0], side="left")) - 1
            self._idle_value(int(inuse[p]) if p >= 0 else inuse0)
            self.idle_pending = False
        for i in idle_at.tolist():  # one per idle point, not per event
            self.counts["idle_points"] += 1
            if i + 1 < len(rsel):
                p = int(np.searchsorted(ev_of, rsel[i + 1], side="left")) - 1
                self._idle_value(int(inuse[p]) if p >= 0 else inuse0)
            else:
                self.idle_pending = True

        if m:
            self.inuse = int(inuse[-1])
            self.cached = int(cached[-1])
        self.series.add_blocks(bt, inuse, cached)
        if L:
            self.series.add_points(tl_t, v[2], v[1])
        if self.observers:
            sb = np.empty(m, dtype=np.int8)
            sa = np.empty(m, dtype=np.int8)
            sb[order] = st_before
            sa[order] = st_after
            view = ChunkView(c, ev_of, bt, key, sb, sa, inuse, cached)
            for obs in self.observers:
                obs.observe(view)

    # ------------------------------------------------------------------------------------
    def _idle_value(self, value: int) -> None:
        self.counts["in_use_at_idle"] = max(self.counts["in_use_at_idle"], value)

    def _reserve(self, keys: np.ndarray) -> None:
        """Blocks set aside: out of every count from now on."""
        new = keys[~self.reserved[keys]]
        if not len(new):
            return
        st = self.state[new]
        self.inuse -= int((st == IN_USE).sum())
        self.cached -= int((st == CACHED).sum())
        self.reserved[new] = True

    def _group_diff(self, s_req: np.ndarray, waste: np.ndarray, look: np.ndarray):
        """Change of each request's waste and lookahead since its previous state."""
        if not len(s_req):
            return waste, look
        o = np.argsort(s_req, kind="stable")
        sr = s_req[o]
        first = np.ones(len(sr), dtype=bool)
        first[1:] = sr[1:] != sr[:-1]
        last = np.r_[first[1:], True]
        R = self.req
        out = []
        for vals, carry in ((waste, R.last_waste), (look, R.last_look)):
            vs = vals[o]
            dd = np.empty_like(vs)
            dd[1:] = vs[1:] - vs[:-1]
            dd[first] = vs[first] - carry[sr[first]]
            carry[sr[last]] = vs[last]
            res = np.empty_like(dd)
            res[o] = dd
            out.append(res)
        return out[0], out[1]

    def _request_lengths(self, req: np.ndarray, filled: np.ndarray, bs: np.ndarray) -> None:
        R = self.req
        o = np.argsort(req, kind="stable")
        sr = req[o]
        first = np.flatnonzero(np.r_[True, sr[1:] != sr[:-1]])
        last = np.r_[first[1:] - 1, len(sr) - 1]
        keys = sr[first]
        mx = np.maximum.reduceat(filled[o], first)
        R.max_filled[keys] = np.where(R.has_state[keys], np.maximum(R.max_filled[keys], mx), mx)
        R.last_filled[keys] = filled[o][last]
        R.bs[keys] = bs[o][last]
        R.has_state[keys] = True

    def _compact_log(self) -> None:
        """Keep the references made since each block last came into use, once per request."""
        keep = self.log_seq >= self.start_seq[self.log_key]
        k, r, s = self.log_key[keep], self.log_req[keep], self.log_seq[keep]
        if len(k):
            newest = np.argsort(-s, kind="stable")  # each pair keeps its latest reference
            k, r, s = k[newest], r[newest], s[newest]
            pair = np.unique(np.stack([k, r]), axis=1, return_index=True)[1]
            k, r, s = k[pair], r[pair], s[pair]
        self.log_key, self.log_req, self.log_seq = k, r, s
        self.log_compacted = len(k)

    # ------------------------------------------------------------------------------------
    def finish(self) -> PoolAnalysis:
        infos = self.infos
        c = self.counts
        n_reserved = int(self.reserved.sum())
        capacity = sum(p.num_blocks for p in infos) - n_reserved
        sizes = {p.block_size for p in infos}
        block_size = sizes.pop() if len(sizes) == 1 else None
        t_start = self.t_start or 0
        t_end = self.t_end or 0
        w0 = t_start if self.window is None else max(self.W0, t_start)
        w1 = t_end if self.window is None else min(self.W1, t_end)
        span = float(w1 - w0)
        if self.tl_last is not None and w1 > w0:
            tail = w1 - self.tl_last
            vals = self.v
            for k, val in enumerate((vals[0], vals[1], min(vals[2], vals[1]), min(vals[3], vals[1]))):
                self.integrals[k] += int(val) * tail
            blocks_int, slot_int, waste_int, look_int = self.integrals
        else:
            blocks_int = slot_int = waste_int = look_int = 0
        usage_tw = blocks_int / (span * capacity) if span > 0 and capacity else None
        internal_tw = (waste_int / slot_int) if self.have_state and slot_int > 0 else None
        look_tw = (look_int / slot_int) if self.have_state and slot_int > 0 else None

        # high watermark
        if self.peak is not None and capacity:
            peak_blocks, peak_time = self.peak
            hw = peak_blocks / capacity
            plateau = self.plateau if self.plateau is not None else self.before_end
        else:
            peak_blocks, peak_time, hw, plateau = 0, None, (0.0 if capacity else None), None
            self.peak_states = None
        internal_peak = None
        if self.have_state and plateau is not None and peak_blocks and plateau[1] > 0:
            internal_peak = float(min(plateau[0], plateau[1]) / plateau[1])

        # block map and external fragmentation at the peak
        free_runs = largest_run = 0
        run_hist: dict = {}
        ext_peak = None
        block_map: list = []
        if infos:
            states = self.peak_states.copy() if self.peak_states is not None else np.full(self.nkeys, EMPTY, dtype=np.int8)
            states[self.reserved] = RESERVED
            pieces = [states[self.base[i] : self.base[i + 1]] for i in range(len(infos))]
            total_free = 0
            for piece in pieces:
                free = (piece == EMPTY) | (piece == CACHED)
                total_free += int(free.sum())
                _, runs = true_runs(free)
                free_runs += len(runs)
                if len(runs):
                    largest_run = max(largest_run, int(runs.max()))
                    b, cnt = np.unique(1 << np.floor(np.log2(runs)).astype(np.int64), return_counts=True)
                    for k, v in zip(b.tolist(), cnt.tolist()):
                        run_hist[k] = run_hist.get(k, 0) + v
            ext_peak = (1.0 - largest_run / total_free) if total_free else 0.0
            block_map = _rle(np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int8))
        run_hist = {str(k): v for k, v in sorted(run_hist.items())}

        # failures
        need = np.concatenate(self.fail_need) if self.fail_need else np.zeros(0, dtype=np.int64)
        seen = np.concatenate(self.fail_seen) if self.fail_seen else np.zeros(0, dtype=np.int64)
        hurts = int((need <= capacity).sum())
        mismatches = int((seen != capacity).sum())

        # requests
        R = self.req
        n_req = int(R.seen.sum())
        finished = int(R.finished.sum())
        live_at_end = n_req - finished
        with_state = np.flatnonzero(R.has_state)
        lf = R.last_filled[with_state]
        per_req_waste = np.where(lf > 0, (-lf) % np.maximum(R.bs[with_state], 1), 0)
        lengths = R.max_filled[with_state]
        ref_waste = (block_size - 1) / 2 if block_size else None
        if self.idle_pending:
            self._idle_value(self.inuse)
            self.idle_pending = False

        # leaks at the end
        live_keys = np.flatnonzero((self.state == IN_USE) & ~self.reserved)
        in_use_at_end = len(live_keys)
        leaked_ids: list = []
        leaked = 0
        if in_use_at_end:
            self._compact_log()
            k, r = self.log_key, self.log_req
            at_end = np.zeros(self.nkeys, dtype=bool)
            at_end[live_keys] = True
            sel = at_end[k] & (r >= 0)
            k, r = k[sel], r[sel]
            has_ref = np.zeros(self.nkeys, dtype=bool)
            has_ref[k] = True
            fin = R.finished[r] if len(r) and len(R.finished) > int(r.max()) else np.zeros(len(r), dtype=bool)
            unfinished = np.zeros(self.nkeys, dtype=bool)
            unfinished[k[~fin]] = True
            leaky = (has_ref[live_keys] & ~unfinished[live_keys]) | (~has_ref[live_keys] & (live_at_end == 0))
            lk = live_keys[leaky]
            leaked = len(lk)
            for key in lk[:50].tolist():
                pi = int(np.searchsorted(self.base, key, side="right") - 1)
                leaked_ids.append([infos[pi].label, key - int(self.base[pi])])

        # block-size rounding of the recorded final lengths
        rounding = []
        total_tokens = int(lengths.sum())
        for b in ROUNDING_SIZES:
            if not len(lengths):
                break
            nb = -(-lengths // b)
            slots = int((nb * b).sum())
            rounding.append({"block_size": b, "allocated_slots": slots, "wasted_slots": slots - total_tokens,
                             "waste_ratio": (slots - total_tokens) / slots if slots else 0.0, "block_table_entries": int(nb.sum()),
                             "mean_last_block_waste": float(((-lengths) % b).mean()), "recorded": b == block_size})
        contiguous = {}
        if len(lengths):
            max_len = max(int(lengths.max()), *(int(p.extra.get("max_model_len") or 0) for p in infos))
            contiguous = {"max_len": max_len, "utilization": total_tokens / (len(lengths) * max_len) if max_len else None,
                          "requests": int(len(lengths)), "tokens": total_tokens}

        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
        steps_in = c["steps_in"]
        span_s = span / 1e9 if span > 0 else None
        allocated = c["allocated"]
        hit_blocks = c["hit_blocks"]
        evictions = c["evictions"]
        before_reuse = c["before_reuse"]
        timeline = self.series.timeline(capacity, t_start, self.preempt_t, self.window and (w0, w1), self.have_state)
        return PoolAnalysis(
            label=self.label,
            pools=[{"label": p.label, "engine": p.engine, "num_blocks": p.num_blocks, "block_size": p.block_size, "pid": p.pid, "clock": p.clock} for p in infos],
            capacity=capacity,
            reserved=n_reserved,
            block_size=block_size,
            t_start=t_start,
            t_end=t_end,
            block_events=c["block_events"],
            requests=n_req,
            high_watermark=hw,
            peak_blocks=peak_blocks,
            peak_time_ns=peak_time,
            usage_time_weighted=usage_tw,
            internal_time_weighted=internal_tw,
            internal_lookahead_time_weighted=look_tw,
            internal_at_peak=internal_peak,
            per_request_waste=Distribution.of(per_req_waste),
            per_request_waste_reference=ref_waste,
            external_at_peak=ext_peak,
            free_runs_at_peak=free_runs,
            largest_free_run_at_peak=largest_run,
            free_run_histogram=run_hist,
            block_map_at_peak=block_map,
            allocation_failures=c["alloc_failures"],
            fragmentation_that_hurts=hurts,
            engine_free_mismatches=mismatches,
            preemptions=c["preemptions"],
            query_tokens=c["query_tokens"],
            hit_tokens=c["hit_tokens"],
            hit_rate=(c["hit_tokens"] / c["query_tokens"]) if c["query_tokens"] else None,
            hit_blocks=hit_blocks,
            allocated_blocks=allocated,
            block_hit_rate=(hit_blocks / (hit_blocks + allocated)) if (hit_blocks + allocated) else None,
            evictions=evictions,
            evicted_before_reuse=before_reuse,
            evicted_before_reuse_ratio=(before_reuse / evictions) if evictions else None,
            lifetime_s=Distribution.of(cat(self.lifetimes), 1e-9),
            idle_before_eviction_s=Distribution.of(cat(self.idle), 1e-9),
            reuse_gap_s=Distribution.of(cat(self.reuse), 1e-9),
            steps=steps_in,
            frees_to_zero=c["frees_to_zero"],
            allocations_per_second=(allocated / span_s) if span_s else None,
            evictions_per_second=(evictions / span_s) if span_s else None,
            allocations_per_step=(allocated / steps_in) if steps_in else None,
            reallocated_within_step=c["realloc"] if c["steps"] else 0,
            in_use_at_end=in_use_at_end,
            leaked_blocks=leaked,
            leaked_block_ids=leaked_ids,
            live_requests_at_end=live_at_end,
            in_use_at_idle=c["in_use_at_idle"],
            idle_points=c["idle_points"],
            refcount_errors=c["refcount_errors"],
            out_of_range_ids=c["out_of_range"],
            whatif=rounding,
            contiguous=contiguous,
            timeline=timeline,
        )


def analyze_blocks(stream, pools: list[int] | None = None, window: tuple[int, int] | None = None, chunk_events: int | None = None) -> PoolAnalysis:
    """Analyze the pools ``pools`` (global indices; None: all) of an in-memory BlockStream."""
    from kvprof.trace import chunks as ch

    infos = stream.pools if pools is None else [stream.pools[i] for i in pools]
    a = BlockAnalyzer(infos, window, label="all pools" if pools is None else None)
    for c in ch.from_stream(stream, None if pools is None else list(pools), chunk_events or ch.DEFAULT_CHUNK_EVENTS):
        a.feed(c)
    return a.finish()
