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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvprof.trace.chunks import BlockChunk
from kvprof.trace.format import EventKind as K
from kvprof.trace.reader import PoolInfo

if TYPE_CHECKING:
    from kvprof.trace.reader import BlockStream

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
    def of(cls, values: np.ndarray, scale: float = 1.0) -> Distribution:
        if len(values) == 0:
            return cls(0, None, None, None, None, None)
        v = values.astype(np.float64) * scale
        p50, p90, p99 = np.percentile(v, [50, 90, 99])
        return cls(len(v), float(v.mean()), float(p50), float(p90), float(p99), float(v.max()))


@dataclass
class PoolAnalysis:
    """Everything kvprof knows about one pool (or all pools together: pool = None)."""

    label: str
    pools: list[dict[str, Any]]
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
    free_run_histogram: dict[str, Any]
    block_map_at_peak: list[Any]  # run-length encoded [[state, count], ...] over block ids
    # failures
    allocation_failures: int
    fragmentation_that_hurts: int
    engine_free_mismatches: int
    preemptions: int
    # prefix cache
    query_tokens: int
    hit_tokens: int
    hit_rate: float | None
    preempted_query_tokens: int  # lookups of preempted requests coming back, counted apart (vLLM's preempted_queries)
    preempted_hit_tokens: int
    preempted_hit_rate: float | None
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
    leaked_block_ids: list[Any]
    live_requests_at_end: int
    in_use_at_idle: int
    idle_points: int
    refcount_errors: int
    out_of_range_ids: int
    damaged_queries: int  # lookups reporting more hit tokens than queried, or negative counts: left out
    # the recorded final lengths rounded up to other block sizes (not the replay: that is `kvprof whatif`)
    rounding: list[Any]
    contiguous: dict[str, Any]
    timeline: dict[str, Any] = field(default_factory=dict)


def true_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of every run of True in a boolean array."""
    d = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts = np.flatnonzero(d == 1)
    return starts, np.flatnonzero(d == -1) - starts


def _rle(states: np.ndarray) -> list[Any]:
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

    # the arrays, set by name (the requests' phase: _Requests.R)
    seen: np.ndarray
    finished: np.ndarray
    has_state: np.ndarray
    last_waste: np.ndarray
    last_look: np.ndarray
    last_filled: np.ndarray
    max_filled: np.ndarray
    bs: np.ndarray

    def __init__(self, **dtypes: Any):
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
        self.t0: int | None = None
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

        def z(dt: Any) -> np.ndarray:
            return np.zeros(h, dtype=dt)

        self.in_max = np.r_[np.maximum(self.in_max[0::2], self.in_max[1::2]), z(np.int64)]
        self.cached = np.r_[np.where(self.present[1::2], self.cached[1::2], self.cached[0::2]), z(np.int64)]
        self.tl_waste = np.r_[np.where(self.tl_have[1::2], self.tl_waste[1::2], self.tl_waste[0::2]), z(np.int64)]
        self.tl_slots = np.r_[np.where(self.tl_have[1::2], self.tl_slots[1::2], self.tl_slots[0::2]), z(np.int64)]
        self.present = np.r_[self.present[0::2] | self.present[1::2], z(bool)]
        self.tl_have = np.r_[self.tl_have[0::2] | self.tl_have[1::2], z(bool)]
        self.width *= 2

    def _fit(self, t_last: int) -> None:
        assert self.t0 is not None  # set by the first add_blocks
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

    def timeline(
        self, capacity: int, t0: int, preempt_t: list[Any], window: tuple[int, int] | None, have_state: bool
    ) -> dict[str, Any]:
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
                out["internal_fragmentation"] = (
                    np.where(s > 0, np.minimum(w, s) / np.maximum(s, 1), 0.0).round(4).tolist()
                )
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


class _Chunk:
    """One chunk as every phase sees it: its calls, its request events, and its block-level
    events both in time order and sorted by block (``order`` maps sorted -> time order),
    with each block's state before and after each event.  Built by the replay phase."""

    __slots__ = (
        "c",
        "t",
        "kind",
        "win_c",
        "ev_of",
        "key",
        "bkind",
        "bt",
        "bsz",
        "m",
        "order",
        "sk",
        "skind",
        "gs",
        "gstart",
        "gid",
        "gkey",
        "gend",
        "gstart_of",
        "idx",
        "isset",
        "hashed_before",
        "hashed_after",
        "st_before",
        "st_after",
        "ref_after",
        "d_in",
        "inuse0",
        "inuse",
        "cached",
        "win_b",
        "win_sorted",
        "st_t",
        "start_m",
        "end_m",
        "lsi",
        "lei",
        "rsel",
        "r_t",
        "r_kind",
        "r_req",
        "r_arg",
        "r_arg2",
        "r_bs",
        "win_r",
        "step_t",
        "steps_before",
    )
    c: BlockChunk
    m: int  # block-level events
    inuse0: int
    t: np.ndarray
    kind: np.ndarray
    win_c: np.ndarray
    ev_of: np.ndarray
    key: np.ndarray
    bkind: np.ndarray
    bt: np.ndarray
    bsz: np.ndarray
    order: np.ndarray
    sk: np.ndarray
    skind: np.ndarray
    gs: np.ndarray
    gstart: np.ndarray
    gid: np.ndarray
    gkey: np.ndarray
    gend: np.ndarray
    gstart_of: np.ndarray
    idx: np.ndarray
    isset: np.ndarray
    hashed_before: np.ndarray
    hashed_after: np.ndarray
    st_before: np.ndarray
    st_after: np.ndarray
    ref_after: np.ndarray
    d_in: np.ndarray
    inuse: np.ndarray
    cached: np.ndarray
    win_b: np.ndarray
    win_sorted: np.ndarray
    st_t: np.ndarray
    start_m: np.ndarray
    end_m: np.ndarray
    lsi: np.ndarray
    lei: np.ndarray
    rsel: np.ndarray
    r_t: np.ndarray
    r_kind: np.ndarray
    r_req: np.ndarray
    r_arg: np.ndarray
    r_arg2: np.ndarray
    r_bs: np.ndarray
    win_r: np.ndarray
    step_t: np.ndarray
    steps_before: np.ndarray


# -- phases: each keeps its own carried state, reads a _Chunk, returns a small result ----------
@dataclass
class ReplayResult:
    capacity: int
    reserved: int
    block_events: int
    refcount_errors: int
    out_of_range_ids: int


class _Replay:
    """Per-block reference counts and cached flags, carried from chunk to chunk."""

    def __init__(self, a: BlockAnalyzer):
        nk = a.nkeys
        self.a = a
        self.ref = np.zeros(nk, dtype=np.int64)
        self.hashed = np.zeros(nk, dtype=bool)
        self.state = np.zeros(nk, dtype=np.int8)  # after the last chunk
        self.reserved = np.zeros(nk, dtype=bool)
        self.inuse = 0
        self.cached = 0
        self.refcount_errors = 0
        self.out_of_range = 0
        self.block_events = 0

    def view(self, c: BlockChunk, in_win: Callable[[np.ndarray], np.ndarray]) -> _Chunk:
        a = self.a
        x = _Chunk()
        x.c, x.t, x.kind = c, c.t, c.kind
        t, kind = c.t, c.kind
        x.win_c = in_win(t)
        # block level: one row per block per call
        if len(c.ids):
            owner = np.repeat(np.arange(len(c), dtype=np.int64), c.n)
            statek = _STATE_KINDS[kind[owner]]
            ev_of = owner[statek]
            bid = c.ids[statek].astype(np.int64)
        else:
            ev_of = bid = np.zeros(0, dtype=np.int64)
        pl = a.pos[c.pool[ev_of]]
        ok = (bid >= 0) & (bid < a.nblocks[pl])
        if not ok.all():
            self.out_of_range += int((~ok).sum())
            ev_of, bid, pl = ev_of[ok], bid[ok], pl[ok]
        key = a.base[pl] + bid
        bkind = kind[ev_of]
        res = bkind == K.RESERVE
        if res.any():
            self._reserve(np.unique(key[res]))
        keep = ~self.reserved[key]
        if not keep.all():
            key, bkind, ev_of, pl = key[keep], bkind[keep], ev_of[keep], pl[keep]
        x.ev_of, x.key, x.bkind, x.bt, x.bsz = ev_of, key, bkind, t[ev_of], a.bsize[pl]
        m = x.m = len(key)
        # sorted by block (stable: time order kept within a block), from the carried state
        x.order = order = np.argsort(key.astype(a.key_dtype), kind="stable")
        sk = x.sk = key[order]
        skind = x.skind = bkind[order]
        gs = x.gs = np.ones(m, dtype=bool)
        if m:
            gs[1:] = sk[1:] != sk[:-1]
        gstart = x.gstart = np.flatnonzero(gs)
        gid = x.gid = np.cumsum(gs) - 1
        gkey = x.gkey = sk[gstart]
        x.gend = np.r_[gstart[1:] - 1, m - 1] if m else gstart
        idx = x.idx = np.arange(m, dtype=np.int64)
        x.gstart_of = gstart[gid] if m else idx
        delta = _DELTA[skind]
        cs = np.cumsum(delta)
        x.ref_after = ref_after = self.ref[gkey][gid] + cs - (cs - delta)[gstart][gid] if m else cs
        ref_before = ref_after - delta
        setv = _SETV[skind]
        x.isset = isset = setv >= 0
        ls = np.maximum.accumulate(np.where(isset | gs, idx, -1)) if m else idx
        carried = self.hashed[gkey][gid] if m else np.zeros(0, dtype=bool)
        x.hashed_after = hashed_after = np.where(isset[ls], setv[ls] == 1, carried) if m else carried
        x.hashed_before = hashed_before = np.empty(m, dtype=bool)
        if m:
            hashed_before[1:] = hashed_after[:-1]
            hashed_before[gstart] = self.hashed[gkey]
        self.refcount_errors += int(
            ((skind == K.FREE) & (ref_before <= 0)).sum() + ((skind == K.ALLOC) & (ref_before > 0)).sum()
        )
        x.st_after = st_after = np.where(ref_after > 0, IN_USE, np.where(hashed_after, CACHED, EMPTY)).astype(np.int8)
        x.st_before = st_before = np.where(ref_before > 0, IN_USE, np.where(hashed_before, CACHED, EMPTY)).astype(
            np.int8
        )
        # in use and free-cached over time (time order)
        d_in = x.d_in = np.empty(m, dtype=np.int64)
        d_in[order] = (st_after == IN_USE).astype(np.int64) - (st_before == IN_USE)
        d_ca = np.empty(m, dtype=np.int64)
        d_ca[order] = (st_after == CACHED).astype(np.int64) - (st_before == CACHED)
        x.inuse0 = self.inuse
        x.inuse = self.inuse + np.cumsum(d_in)
        x.cached = self.cached + np.cumsum(d_ca)
        x.win_b = in_win(x.bt)
        x.win_sorted = x.win_b[order]
        self.block_events += int(x.win_b.sum())
        # in-use intervals: where each starts and ends, and the last start/end at or before each event
        x.st_t = x.bt[order]
        x.start_m = (st_before != IN_USE) & (st_after == IN_USE)
        x.end_m = (st_before == IN_USE) & (st_after != IN_USE)
        x.lsi = np.maximum.accumulate(np.where(x.start_m, idx, -1)) if m else idx
        x.lei = np.maximum.accumulate(np.where(x.end_m, idx, -1)) if m else idx
        # request events and steps
        x.rsel = rsel = np.flatnonzero((kind >= K.REQ_ARRIVE) & (kind <= K.ALLOC_FAIL))
        x.r_t, x.r_kind, x.r_req = t[rsel], kind[rsel], c.req[rsel]
        x.r_arg, x.r_arg2 = c.arg[rsel], c.arg2[rsel]
        x.r_bs = a.bsize[a.pos[c.pool[rsel]]] if len(rsel) else np.zeros(0, dtype=np.int64)
        x.win_r = in_win(x.r_t)
        x.step_t = t[kind == K.STEP]
        return x

    def carry(self, x: _Chunk) -> None:
        if x.m:
            self.ref[x.gkey] = x.ref_after[x.gend]
            self.hashed[x.gkey] = x.hashed_after[x.gend]
            self.state[x.gkey] = x.st_after[x.gend]
            self.inuse = int(x.inuse[-1])
            self.cached = int(x.cached[-1])

    def _reserve(self, keys: np.ndarray) -> None:
        """Blocks set aside: out of every count from now on."""
        new = keys[~self.reserved[keys]]
        if not len(new):
            return
        st = self.state[new]
        self.inuse -= int((st == IN_USE).sum())
        self.cached -= int((st == CACHED).sum())
        self.reserved[new] = True

    def result(self) -> ReplayResult:
        n_reserved = int(self.reserved.sum())
        return ReplayResult(
            capacity=sum(p.num_blocks for p in self.a.infos) - n_reserved,
            reserved=n_reserved,
            block_events=self.block_events,
            refcount_errors=self.refcount_errors,
            out_of_range_ids=self.out_of_range,
        )


@dataclass
class RequestResult:
    requests: int
    live_at_end: int
    lengths: np.ndarray  # each request's longest state, tokens
    per_request_waste: np.ndarray  # slack in the block holding each request's final token
    in_use_at_idle: int
    idle_points: int
    allocation_failures: int
    fragmentation_that_hurts: int
    engine_free_mismatches: int
    preemptions: int


class _Requests:
    """Per request: its waste and lookahead (for the slot integrals), its length, whether it
    arrived and finished; liveness and the idle points; refused allocations."""

    def __init__(self, a: BlockAnalyzer):
        self.R = _Grow(
            seen=bool,
            finished=bool,
            has_state=bool,
            last_waste=np.int64,
            last_look=np.int64,
            last_filled=np.int64,
            max_filled=np.int64,
            bs=np.int64,
        )
        self.have_state = False
        self.live = 0
        self.idle_points = 0
        self.in_use_at_idle = 0
        self.idle_pending = False
        self.fail_need: list[Any] = []
        self.fail_seen: list[Any] = []
        self.failures = 0
        self.preemptions = 0

    def waste(self, x: _Chunk) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The chunk's state events (call indices) and the change of waste and lookahead slots each makes."""
        if len(x.rsel):
            top = int(x.r_req.max())
            if top >= 0:
                self.R.fit(top)
        st_mask = ((x.r_kind == K.REQ_STATE) | (x.r_kind == K.REQ_FINISH) | (x.r_kind == K.REQ_PREEMPT)) & (
            x.r_req >= 0
        )
        s_idx = np.flatnonzero(st_mask)
        s_req = x.r_req[s_idx]
        is_state = x.r_kind[s_idx] == K.REQ_STATE
        # REQ_STATE sets (filled, held); FINISH and PREEMPT reset to nothing held
        filled = np.where(is_state, x.r_arg[s_idx], 0)
        held = np.where(is_state, x.r_arg2[s_idx], 0)
        bs = x.r_bs[s_idx]
        waste = np.maximum(held * bs - filled, 0)
        needed = -(-filled // np.maximum(bs, 1))
        look = np.minimum(np.maximum(held - needed, 0) * bs, waste)
        o = np.argsort(s_req, kind="stable")  # one sort by request serves both
        dwaste, dlook = self._group_diff(s_req, waste, look, o)
        if is_state.any():
            self.have_state = True
            keep = is_state[o]
            self._lengths(s_req[o][keep], filled[o][keep], bs[o][keep])
        return x.rsel[s_idx], x.r_t[s_idx], dwaste, dlook

    def feed(self, x: _Chunk) -> None:
        R = self.R
        fail = np.flatnonzero((x.r_kind == K.ALLOC_FAIL) & x.win_r)
        if len(fail):
            # in use just before the failure in call order (timestamps may tie on a simulated clock)
            p: Any = np.searchsorted(x.ev_of, x.rsel[fail], side="left") - 1
            before = np.where(p >= 0, x.inuse[np.maximum(p, 0)] if x.m else 0, x.inuse0)
            need, seen = x.r_arg[fail], x.r_arg2[fail]
            self.fail_need.append((need + before)[need >= 0])
            self.fail_seen.append((seen + before)[seen >= 0])
            self.failures += len(fail)
        self.preemptions += int(((x.r_kind == K.REQ_PREEMPT) & x.win_r).sum())
        # liveness: a request lives from its first event to its first finish; idle points
        # are finishes that leave none alive
        rr = np.flatnonzero(x.r_req >= 0)
        idle_at = np.zeros(0, dtype=np.int64)
        if len(rr):
            keys = x.r_req[rr]
            _, first = np.unique(keys, return_index=True)
            new = np.zeros(len(x.rsel), dtype=bool)
            new[rr[first][~R.seen[keys[first]]]] = True
            R.seen[keys] = True
            fin = rr[x.r_kind[rr] == K.REQ_FINISH]
            fin_first = np.zeros(len(x.rsel), dtype=bool)
            if len(fin):
                _, ff = np.unique(x.r_req[fin], return_index=True)
                firsts = fin[ff]
                fin_first[firsts[~R.finished[x.r_req[firsts]]]] = True
                R.finished[x.r_req[fin]] = True
            live = self.live + np.cumsum(new.astype(np.int64) - fin_first)
            self.live = int(live[-1])
            idle_at = np.flatnonzero(fin_first & (live == 0))
        # in use at an idle point: once the frees the finish triggered (possibly deferred)
        # have landed, just before the next request event, or at the very end
        if len(x.rsel) and self.idle_pending:
            p = int(np.searchsorted(x.ev_of, x.rsel[0], side="left")) - 1
            self._idle(int(x.inuse[p]) if p >= 0 else x.inuse0)
            self.idle_pending = False
        for i in idle_at.tolist():  # one per idle point, not per event
            self.idle_points += 1
            if i + 1 < len(x.rsel):
                p = int(np.searchsorted(x.ev_of, x.rsel[i + 1], side="left")) - 1
                self._idle(int(x.inuse[p]) if p >= 0 else x.inuse0)
            else:
                self.idle_pending = True

    def _idle(self, value: int) -> None:
        self.in_use_at_idle = max(self.in_use_at_idle, value)

    def _group_diff(
        self, s_req: np.ndarray, waste: np.ndarray, look: np.ndarray, o: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Change of each request's waste and lookahead since its previous state (``o``: the
        stable sort of the state events by request)."""
        if not len(s_req):
            return waste, look
        sr = s_req[o]
        first = np.ones(len(sr), dtype=bool)
        first[1:] = sr[1:] != sr[:-1]
        last = np.r_[first[1:], True]
        out = []
        for vals, carry in ((waste, self.R.last_waste), (look, self.R.last_look)):
            vs = vals[o]
            dd = np.empty_like(vs)
            dd[1:] = vs[1:] - vs[:-1]
            dd[first] = vs[first] - carry[sr[first]]
            carry[sr[last]] = vs[last]
            res = np.empty_like(dd)
            res[o] = dd
            out.append(res)
        return out[0], out[1]

    def _lengths(self, sr: np.ndarray, filled: np.ndarray, bs: np.ndarray) -> None:
        """Each request's longest and last state; arrays sorted by request (time order kept)."""
        R = self.R
        first = np.flatnonzero(np.r_[True, sr[1:] != sr[:-1]])
        last = np.r_[first[1:] - 1, len(sr) - 1]
        keys = sr[first]
        mx = np.maximum.reduceat(filled, first)
        R.max_filled[keys] = np.where(R.has_state[keys], np.maximum(R.max_filled[keys], mx), mx)
        R.last_filled[keys] = filled[last]
        R.bs[keys] = bs[last]
        R.has_state[keys] = True

    def result(self, capacity: int, inuse_at_end: int) -> RequestResult:
        R = self.R
        if self.idle_pending:
            self._idle(inuse_at_end)
            self.idle_pending = False
        n_req = int(R.seen.sum())
        with_state = np.flatnonzero(R.has_state)
        lf = R.last_filled[with_state]
        need = np.concatenate(self.fail_need) if self.fail_need else np.zeros(0, dtype=np.int64)
        seen = np.concatenate(self.fail_seen) if self.fail_seen else np.zeros(0, dtype=np.int64)
        return RequestResult(
            requests=n_req,
            live_at_end=n_req - int(R.finished.sum()),
            lengths=R.max_filled[with_state],
            per_request_waste=np.where(lf > 0, (-lf) % np.maximum(R.bs[with_state], 1), 0),
            in_use_at_idle=self.in_use_at_idle,
            idle_points=self.idle_points,
            allocation_failures=self.failures,
            fragmentation_that_hurts=int((need <= capacity).sum()),
            engine_free_mismatches=int((seen != capacity).sum()),
            preemptions=self.preemptions,
        )


@dataclass
class OccupancyResult:
    peak_blocks: int
    peak_time_ns: int | None
    high_watermark: float | None
    usage_time_weighted: float | None
    internal_time_weighted: float | None
    internal_lookahead_time_weighted: float | None
    internal_at_peak: float | None
    span_ns: float


class _Occupancy:
    """Blocks and slots in use and unfilled over time: their integrals (exact, in integers),
    the high watermark, the end of its plateau and the pool's state at it."""

    def __init__(self, a: BlockAnalyzer):
        self.a = a
        self.v = np.zeros(4, dtype=np.int64)  # blocks, slots, waste, lookahead after the last timeline point
        self.tl_last: int | None = None  # clipped time of the last timeline point
        self.integrals = [0, 0, 0, 0]  # blocks, slots, min(waste, slots), min(lookahead, slots)
        self.before_end = (0, 0)  # (waste, slots) at the last point before the chunk's last time
        self.peak: tuple[int, int] | None = None  # (blocks, time)
        self.peak_states = None  # every block's state just after the peak
        self.plateau: tuple[int, int] | None = None  # (waste, slots) just before the plateau ends; None until seen

    def feed(
        self,
        x: _Chunk,
        state_call: np.ndarray,
        state_t: np.ndarray,
        dwaste: np.ndarray,
        dlook: np.ndarray,
        states_before_chunk: np.ndarray,
    ) -> tuple[Any, ...]:
        a = self.a
        # merged step functions over the chunk's timeline: block events and request states in call order
        nb, ns = x.m, len(state_call)
        # position in the merged order: events of the other kind at earlier calls, counted
        ncall = len(x.t)
        s_per = np.bincount(state_call, minlength=ncall)
        b_per = np.bincount(x.ev_of, minlength=ncall)
        pos_b = np.arange(nb, dtype=np.int64) + (np.cumsum(s_per) - s_per)[x.ev_of]
        pos_s = np.arange(ns, dtype=np.int64) + (np.cumsum(b_per) - b_per)[state_call]
        L = nb + ns
        tl_t = np.empty(L, dtype=np.int64)
        tl_t[pos_b] = x.bt
        tl_t[pos_s] = state_t
        d = np.zeros((4, L), dtype=np.int64)
        d[0, pos_b] = x.d_in
        d[1, pos_b] = x.d_in * x.bsz
        d[2, pos_s] = dwaste
        d[3, pos_s] = dlook
        v = self.v[:, None] + np.cumsum(d, axis=1)
        v_prev = self.v.copy()
        if L:
            tt = np.clip(tl_t, a.w0, a.W1)
            seg = np.diff(
                np.r_[self.tl_last if self.tl_last is not None else tt[0], tt]
            )  # from the previous point to each
            prev = np.concatenate([v_prev[:, None], v[:, :-1]], axis=1)
            for k, vals in enumerate((prev[0], prev[1], np.minimum(prev[2], prev[1]), np.minimum(prev[3], prev[1]))):
                self.integrals[k] += _dot(vals, seg)
            self.tl_last = int(tt[-1])
            self.v = v[:, -1].copy()
        j = int(np.searchsorted(tl_t, int(x.t[-1]), side="left")) - 1
        self.before_end = (int(v[2, j]), int(v[1, j])) if j >= 0 else (int(v_prev[2]), int(v_prev[1]))
        # the high watermark (first time reached) and the end of its plateau: the next block
        # event that lowers in-use, in or out of the window
        cand = np.flatnonzero(x.win_b)
        new_peak = None
        if len(cand):
            i = int(cand[np.argmax(x.inuse[cand])])
            if self.peak is None or x.inuse[i] > self.peak[0]:
                new_peak = i
                self.peak = (int(x.inuse[i]), int(x.bt[i]))
                self.plateau = None
        if self.peak is not None and self.plateau is None:
            start = new_peak + 1 if new_peak is not None else 0
            down = np.flatnonzero(x.d_in[start:] < 0)
            if len(down):
                jj = int(np.searchsorted(tl_t, int(x.bt[start + down[0]]), side="left")) - 1
                self.plateau = (int(v[2, jj]), int(v[1, jj])) if jj >= 0 else (int(v_prev[2]), int(v_prev[1]))
        if new_peak is not None:
            snap = states_before_chunk.copy()
            if x.m:
                upto = np.maximum.reduceat(np.where(x.order <= new_peak, x.idx, -1), x.gstart)
                have = upto >= 0
                snap[x.gkey[have]] = x.st_after[upto[have]]
            self.peak_states = snap
        return tl_t, v

    def result(self, capacity: int, t_start: int, t_end: int, have_state: bool) -> OccupancyResult:
        a = self.a
        w0 = t_start if a.window is None else max(a.W0, t_start)
        w1 = t_end if a.window is None else min(a.W1, t_end)
        span = float(w1 - w0)
        if self.tl_last is not None and w1 > w0:
            tail = w1 - self.tl_last
            vals = self.v
            for k, val in enumerate((vals[0], vals[1], min(vals[2], vals[1]), min(vals[3], vals[1]))):
                self.integrals[k] += int(val) * tail
            blocks_int, slot_int, waste_int, look_int = self.integrals
        else:
            blocks_int = slot_int = waste_int = look_int = 0
        if self.peak is not None and capacity:
            peak_blocks, peak_time = self.peak
            hw: float | None = peak_blocks / capacity
            plateau = self.plateau if self.plateau is not None else self.before_end
        else:
            peak_blocks, peak_time, hw, plateau = 0, None, (0.0 if capacity else None), None
            self.peak_states = None
        internal_peak = None
        if have_state and plateau is not None and peak_blocks and plateau[1] > 0:
            internal_peak = float(min(plateau[0], plateau[1]) / plateau[1])
        return OccupancyResult(
            peak_blocks=peak_blocks,
            peak_time_ns=peak_time,
            high_watermark=hw,
            usage_time_weighted=blocks_int / (span * capacity) if span > 0 and capacity else None,
            internal_time_weighted=(waste_int / slot_int) if have_state and slot_int > 0 else None,
            internal_lookahead_time_weighted=(look_int / slot_int) if have_state and slot_int > 0 else None,
            internal_at_peak=internal_peak,
            span_ns=span,
        )


@dataclass
class ExternalResult:
    external_at_peak: float | None
    free_runs_at_peak: int
    largest_free_run_at_peak: int
    free_run_histogram: dict[str, Any]
    block_map_at_peak: list[Any]


def _external(a: BlockAnalyzer, peak_states: np.ndarray | None, reserved: np.ndarray) -> ExternalResult:
    """Free runs in block-id space at the high watermark, and the pool's map there."""
    if not a.infos:
        return ExternalResult(None, 0, 0, {}, [])
    states = peak_states.copy() if peak_states is not None else np.full(a.nkeys, EMPTY, dtype=np.int8)
    states[reserved] = RESERVED
    pieces = [states[a.base[i] : a.base[i + 1]] for i in range(len(a.infos))]
    free_runs = largest = total_free = 0
    hist: dict[str, Any] = {}
    for piece in pieces:
        free = (piece == EMPTY) | (piece == CACHED)
        total_free += int(free.sum())
        _, runs = true_runs(free)
        free_runs += len(runs)
        if len(runs):
            largest = max(largest, int(runs.max()))
            b, cnt = np.unique(1 << np.floor(np.log2(runs)).astype(np.int64), return_counts=True)
            for k, n in zip(b.tolist(), cnt.tolist()):
                hist[k] = hist.get(k, 0) + n
    return ExternalResult(
        external_at_peak=(1.0 - largest / total_free) if total_free else 0.0,
        free_runs_at_peak=free_runs,
        largest_free_run_at_peak=largest,
        free_run_histogram={str(k): v for k, v in sorted(hist.items())},
        block_map_at_peak=_rle(np.concatenate(pieces)),
    )


@dataclass
class CacheResult:
    query_tokens: int
    hit_tokens: int
    hit_blocks: int
    allocated_blocks: int
    evictions: int
    evicted_before_reuse: int
    damaged_queries: int
    preempted_query_tokens: int
    preempted_hit_tokens: int


class _PrefixCache:
    """Lookups, hits and allocations; evictions, and whether the content evicted was ever
    hit between being cached and being evicted (its epoch)."""

    def __init__(self, a: BlockAnalyzer):
        nk = a.nkeys
        self.ep_seen = np.zeros(nk, dtype=bool)
        self.ep_hits = np.zeros(nk, dtype=np.int64)  # hits in each block's current epoch
        self.query = self.hits = self.hit_blocks = self.allocated = self.evictions = self.before_reuse = (
            self.damaged
        ) = 0
        self.pre_query = self.pre_hits = 0

    def feed(self, x: _Chunk) -> np.ndarray:
        """Counts; returns the chunk's evictions (sorted order) for the lifetimes phase."""
        q = (x.r_kind == K.REQ_QUERY) & x.win_r
        bad = q & (
            (x.r_arg < 0) | (x.r_arg2 < 0) | (x.r_arg2 > x.r_arg)
        )  # a damaged record: no lookup finds more than it asked
        if bad.any():
            self.damaged += int(bad.sum())
            q &= ~bad
        self.query += int(x.r_arg[q].sum())
        self.hits += int(x.r_arg2[q].sum())
        pq = (x.kind == K.REQ_QUERY_PREEMPTED) & x.win_c
        if pq.any():  # lookups of preempted requests coming back: counted apart, as vLLM does
            a, h = x.c.arg[pq], x.c.arg2[pq]
            bad = (a < 0) | (h < 0) | (h > a)
            self.damaged += int(bad.sum())
            self.pre_query += int(a[~bad].sum())
            self.pre_hits += int(h[~bad].sum())
        self.allocated += int(((x.bkind == K.ALLOC) & x.win_b).sum())
        self.hit_blocks += int(((x.bkind == K.HIT) & x.win_b).sum())
        evict: np.ndarray = ((x.skind == K.ALLOC) & (x.st_before == CACHED)) | ((x.skind == K.EVICT) & x.hashed_before)
        m = x.m
        if not m:
            return evict
        # the epoch of each event: the last set or clear of the cached flag in this chunk, or
        # (-1) the one carried in from before
        hit = x.skind == K.HIT
        lso = np.maximum.accumulate(np.where(x.isset, x.idx, -1))
        cur = np.where(lso >= x.gstart_of, lso, -1)
        hp = np.bincount(cur[hit & (cur >= 0)], minlength=m)
        hc = np.bincount(x.gid[hit & (cur < 0)], minlength=len(x.gstart)) + self.ep_hits[x.gkey]
        before = np.empty(m, dtype=np.int64)
        before[1:] = cur[:-1]
        before[x.gstart] = -1
        first_ever = x.gs & ~self.ep_seen[x.gkey][x.gid]
        hits_before = np.where(before >= 0, hp[np.maximum(before, 0)], hc[x.gid])
        never_hit = first_ever | (hits_before == 0)
        ev_in = evict & x.win_sorted
        self.evictions += int(ev_in.sum())
        self.before_reuse += int((never_hit & ev_in).sum())
        last = cur[x.gend]
        self.ep_hits[x.gkey] = np.where(last >= 0, hp[np.maximum(last, 0)], hc)
        self.ep_seen[x.gkey] = True
        return evict

    def result(self) -> CacheResult:
        return CacheResult(
            self.query,
            self.hits,
            self.hit_blocks,
            self.allocated,
            self.evictions,
            self.before_reuse,
            self.damaged,
            self.pre_query,
            self.pre_hits,
        )


@dataclass
class LifetimeResult:
    lifetimes_ns: np.ndarray  # each in-use interval that ended in the window
    idle_before_eviction_ns: np.ndarray
    reuse_gap_ns: np.ndarray
    frees_to_zero: int
    reallocated_within_step: int
    steps: int  # in the window
    steps_total: int


class _Lifetimes:
    """In-use intervals: how long blocks stay in use, how long they sit cached before being
    evicted or reused, and blocks freed and taken again within one engine step."""

    def __init__(self, a: BlockAnalyzer):
        nk = a.nkeys
        self.has_start = np.zeros(nk, dtype=bool)
        self.start_t = np.zeros(nk, dtype=np.int64)
        self.has_end = np.zeros(nk, dtype=bool)
        self.end_t = np.zeros(nk, dtype=np.int64)
        self.end_step = np.zeros(nk, dtype=np.int64)
        self.lifetimes: list[Any] = []
        self.idle: list[Any] = []
        self.reuse: list[Any] = []
        self.frees_to_zero = self.realloc = self.steps = self.steps_in = 0

    def feed(self, x: _Chunk, evict: np.ndarray, in_win: Callable[[np.ndarray], np.ndarray]) -> None:
        steps_before = self.steps
        self.steps += len(x.step_t)
        self.steps_in += int(in_win(x.step_t).sum())
        self.frees_to_zero += int((x.end_m & x.win_sorted).sum())
        if not x.m:
            return
        gk, gid, st_t = x.gkey, x.gid, x.st_t
        in_grp = x.lsi >= x.gstart_of
        start_time = np.where(in_grp, st_t[np.maximum(x.lsi, 0)], self.start_t[gk][gid])
        ends = x.end_m & x.win_sorted & (in_grp | self.has_start[gk][gid])
        if ends.any():
            self.lifetimes.append(st_t[ends] - start_time[ends])
        prev_e = np.empty(x.m, dtype=np.int64)  # the last end strictly before each event
        prev_e[1:] = x.lei[:-1]
        prev_e[x.gstart] = -1
        pe_in = prev_e >= x.gstart_of
        prev_end_t = np.where(pe_in, st_t[np.maximum(prev_e, 0)], self.end_t[gk][gid])
        has_prev = pe_in | self.has_end[gk][gid]
        sel = evict & x.win_sorted & has_prev
        if sel.any():
            self.idle.append(st_t[sel] - prev_end_t[sel])
        sel = (x.skind == K.HIT) & (x.st_before == CACHED) & has_prev & x.win_sorted
        if sel.any():
            self.reuse.append(st_t[sel] - prev_end_t[sel])
        step_of = steps_before + np.searchsorted(x.step_t, st_t, side="right")
        prev_step = np.where(pe_in, step_of[np.maximum(prev_e, 0)], self.end_step[gk][gid])
        restart = x.start_m & has_prev & x.win_sorted
        self.realloc += int((step_of[restart] == prev_step[restart]).sum())
        last_start = x.lsi[x.gend]
        started = last_start >= x.gstart
        self.has_start[gk[started]] = True
        self.start_t[gk[started]] = st_t[last_start[started]]
        last_end = x.lei[x.gend]
        ended = last_end >= x.gstart
        self.has_end[gk[ended]] = True
        self.end_t[gk[ended]] = st_t[last_end[ended]]
        self.end_step[gk[ended]] = step_of[last_end[ended]]

    def result(self) -> LifetimeResult:
        def cat(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

        return LifetimeResult(
            cat(self.lifetimes),
            cat(self.idle),
            cat(self.reuse),
            self.frees_to_zero,
            self.realloc if self.steps else 0,
            self.steps_in,
            self.steps,
        )


@dataclass
class LeakResult:
    in_use_at_end: int
    leaked_blocks: int
    leaked_block_ids: list[Any]  # the first 50, [pool label, block id]


class _Leaks:
    """Who referenced each block since it last came into use (each request once): a block
    in use at the end whose every referencing request finished is leaked (or, with none,
    when no request is alive at the end)."""

    def __init__(self, a: BlockAnalyzer):
        self.a = a
        self.start_seq = np.full(a.nkeys, -1, dtype=np.int64)
        self.key = np.zeros(0, dtype=np.int64)
        self.req = np.zeros(0, dtype=np.int64)
        self.seq = np.zeros(0, dtype=np.int64)
        self.compacted = 0
        self.bseq = 0  # block-level events so far

    def feed(self, x: _Chunk) -> None:
        if x.m:
            seq = self.bseq + x.order
            last_start = x.lsi[x.gend]
            started = last_start >= x.gstart
            self.start_seq[x.gkey[started]] = seq[last_start[started]]
            ah = (x.skind == K.ALLOC) | (x.skind == K.HIT)
            if ah.any():
                self.key = np.r_[self.key, x.sk[ah]]
                self.req = np.r_[self.req, x.c.req[x.ev_of[x.order[ah]]]]
                self.seq = np.r_[self.seq, seq[ah]]
        self.bseq += x.m
        if len(self.key) > max(1 << 16, 2 * self.compacted):
            self._compact()

    def _compact(self) -> None:
        keep = self.seq >= self.start_seq[self.key]
        k, r, s = self.key[keep], self.req[keep], self.seq[keep]
        if len(k):
            newest = np.argsort(-s, kind="stable")  # each pair keeps its latest reference
            k, r, s = k[newest], r[newest], s[newest]
            pair = np.unique(np.stack([k, r]), axis=1, return_index=True)[1]
            k, r, s = k[pair], r[pair], s[pair]
        self.key, self.req, self.seq = k, r, s
        self.compacted = len(k)

    def result(self, states: np.ndarray, reserved: np.ndarray, finished: np.ndarray, live_at_end: int) -> LeakResult:
        a = self.a
        live_keys = np.flatnonzero((states == IN_USE) & ~reserved)
        if not len(live_keys):
            return LeakResult(0, 0, [])
        self._compact()
        at_end = np.zeros(a.nkeys, dtype=bool)
        at_end[live_keys] = True
        sel = at_end[self.key] & (self.req >= 0)
        k, r = self.key[sel], self.req[sel]
        has_ref = np.zeros(a.nkeys, dtype=bool)
        has_ref[k] = True
        fin = finished[r] if len(r) and len(finished) > int(r.max()) else np.zeros(len(r), dtype=bool)
        unfinished = np.zeros(a.nkeys, dtype=bool)
        unfinished[k[~fin]] = True
        leaky = live_keys[(has_ref[live_keys] & ~unfinished[live_keys]) | (~has_ref[live_keys] & (live_at_end == 0))]
        ids = []
        for key in leaky[:50].tolist():
            pi = int(np.searchsorted(a.base, key, side="right") - 1)
            ids.append([a.infos[pi].label, key - int(a.base[pi])])
        return LeakResult(len(live_keys), len(leaky), ids)


def _rounding(lengths: np.ndarray, block_size: int | None, infos: list[PoolInfo]) -> tuple[list[Any], dict[str, Any]]:
    """The recorded final lengths rounded up to each block size; a contiguous reservation."""
    rows = []
    total = int(lengths.sum())
    for b in ROUNDING_SIZES:
        if not len(lengths):
            break
        nb = -(-lengths // b)
        slots = int((nb * b).sum())
        rows.append(
            {
                "block_size": b,
                "allocated_slots": slots,
                "wasted_slots": slots - total,
                "waste_ratio": (slots - total) / slots if slots else 0.0,
                "block_table_entries": int(nb.sum()),
                "mean_last_block_waste": float(((-lengths) % b).mean()),
                "recorded": b == block_size,
            }
        )
    contiguous: dict[str, Any] = {}
    if len(lengths):
        max_len = max(int(lengths.max()), *(int(p.extra.get("max_model_len") or 0) for p in infos))
        contiguous = {
            "max_len": max_len,
            "utilization": total / (len(lengths) * max_len) if max_len else None,
            "requests": int(len(lengths)),
            "tokens": total,
        }
    return rows, contiguous


class BlockAnalyzer:
    """Analyze the pools ``pools`` from time-ordered chunks of their events.

    ``window`` = (t0, t1) restricts counts, integrals and the watermark to that span;
    block states are still replayed from the start of the run.  Feed every event of the
    selected pools (events of other pools are ignored) in time order, then call
    :meth:`finish`.  The work is done by phases (replay, requests, occupancy, prefix
    cache, lifetimes, leaks), each carrying its own state from chunk to chunk.
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
        self.nkeys = int(self.base[-1])
        self.key_dtype = np.uint16 if self.nkeys <= 1 << 16 else np.uint32
        self.W0 = window[0] if window is not None else -_I64_MAX
        self.W1 = window[1] if window is not None else _I64_MAX
        self.t_start: int | None = None
        self.t_end: int | None = None
        self.w0: int | None = None
        self.calls = 0  # events of the pools, of any kind
        self.preempt_t: list[Any] = []
        self.replay = _Replay(self)
        self.requests = _Requests(self)
        self.occupancy = _Occupancy(self)
        self.cache = _PrefixCache(self)
        self.lifetimes = _Lifetimes(self)
        self.leaks = _Leaks(self)
        self.series = _Series(TIMELINE_POINTS)
        self.observers: list[
            Any
        ] = []  # drawing series fed each chunk's block-level view (kvprof/analysis/timeseries.py)

    @property
    def reserved(self) -> np.ndarray:
        return self.replay.reserved

    @property
    def have_state(self) -> bool:
        return self.requests.have_state

    @property
    def counts(self) -> dict[str, Any]:
        return {"steps": self.lifetimes.steps}

    def _in_win(self, t: np.ndarray) -> np.ndarray:
        if self.window is None:
            return np.ones(len(t), dtype=bool)
        return (t >= self.W0) & (t <= self.W1)

    def feed(self, c: BlockChunk) -> None:
        if not len(c):
            return
        ok = c.pool < len(self.pos)
        if not ok.all() or (self.pos[np.minimum(c.pool, len(self.pos) - 1)] < 0).any():
            ok[ok] = self.pos[c.pool[ok]] >= 0
            c = c.take(ok)
            if not len(c):
                return
        self.calls += len(c)
        if self.t_start is None:
            self.t_start = int(c.t[0])
            self.w0 = self.t_start if self.window is None else max(self.W0, self.t_start)
        self.t_end = int(c.t[-1])
        states_before = self.replay.state
        x = self.replay.view(c, self._in_win)
        state_call, state_t, dwaste, dlook = self.requests.waste(x)
        tl_t, v = self.occupancy.feed(x, state_call, state_t, dwaste, dlook, states_before)
        evict = self.cache.feed(x)
        self.lifetimes.feed(x, evict, self._in_win)
        self.leaks.feed(x)
        self.requests.feed(x)
        self.replay.carry(x)
        if len(self.preempt_t) < 1000:
            self.preempt_t.extend(x.r_t[x.r_kind == K.REQ_PREEMPT][: 1000 - len(self.preempt_t)].tolist())
        self.series.add_blocks(x.bt, x.inuse, x.cached)
        if len(tl_t):
            self.series.add_points(tl_t, v[2], v[1])
        if self.observers:
            sb = np.empty(x.m, dtype=np.int8)
            sa = np.empty(x.m, dtype=np.int8)
            sb[x.order] = x.st_before
            sa[x.order] = x.st_after
            view = ChunkView(c, x.ev_of, x.bt, x.key, sb, sa, x.inuse, x.cached)
            for obs in self.observers:
                obs.observe(view)

    def finish(self) -> PoolAnalysis:
        infos = self.infos
        rep = self.replay.result()
        sizes = {p.block_size for p in infos}
        block_size = sizes.pop() if len(sizes) == 1 else None
        t_start, t_end = self.t_start or 0, self.t_end or 0
        req = self.requests.result(rep.capacity, self.replay.inuse)
        occ = self.occupancy.result(rep.capacity, t_start, t_end, self.have_state)
        ext = _external(self, self.occupancy.peak_states, self.replay.reserved)
        cache = self.cache.result()
        life = self.lifetimes.result()
        leaks = self.leaks.result(self.replay.state, self.replay.reserved, self.requests.R.finished, req.live_at_end)
        rounding, contiguous = _rounding(req.lengths, block_size, infos)
        span_s = occ.span_ns / 1e9 if occ.span_ns > 0 else None
        w0 = t_start if self.window is None else max(self.W0, t_start)
        w1 = t_end if self.window is None else min(self.W1, t_end)
        return PoolAnalysis(
            label=self.label,
            pools=[
                {
                    "label": p.label,
                    "engine": p.engine,
                    "num_blocks": p.num_blocks,
                    "block_size": p.block_size,
                    "pid": p.pid,
                    "clock": p.clock,
                }
                for p in infos
            ],
            capacity=rep.capacity,
            reserved=rep.reserved,
            block_size=block_size,
            t_start=t_start,
            t_end=t_end,
            block_events=rep.block_events,
            requests=req.requests,
            high_watermark=occ.high_watermark,
            peak_blocks=occ.peak_blocks,
            peak_time_ns=occ.peak_time_ns,
            usage_time_weighted=occ.usage_time_weighted,
            internal_time_weighted=occ.internal_time_weighted,
            internal_lookahead_time_weighted=occ.internal_lookahead_time_weighted,
            internal_at_peak=occ.internal_at_peak,
            per_request_waste=Distribution.of(req.per_request_waste),
            per_request_waste_reference=(block_size - 1) / 2 if block_size else None,
            external_at_peak=ext.external_at_peak,
            free_runs_at_peak=ext.free_runs_at_peak,
            largest_free_run_at_peak=ext.largest_free_run_at_peak,
            free_run_histogram=ext.free_run_histogram,
            block_map_at_peak=ext.block_map_at_peak,
            allocation_failures=req.allocation_failures,
            fragmentation_that_hurts=req.fragmentation_that_hurts,
            engine_free_mismatches=req.engine_free_mismatches,
            preemptions=req.preemptions,
            query_tokens=cache.query_tokens,
            hit_tokens=cache.hit_tokens,
            hit_rate=(cache.hit_tokens / cache.query_tokens) if cache.query_tokens else None,
            preempted_query_tokens=cache.preempted_query_tokens,
            preempted_hit_tokens=cache.preempted_hit_tokens,
            preempted_hit_rate=(cache.preempted_hit_tokens / cache.preempted_query_tokens)
            if cache.preempted_query_tokens
            else None,
            hit_blocks=cache.hit_blocks,
            allocated_blocks=cache.allocated_blocks,
            block_hit_rate=(cache.hit_blocks / (cache.hit_blocks + cache.allocated_blocks))
            if (cache.hit_blocks + cache.allocated_blocks)
            else None,
            evictions=cache.evictions,
            evicted_before_reuse=cache.evicted_before_reuse,
            evicted_before_reuse_ratio=(cache.evicted_before_reuse / cache.evictions) if cache.evictions else None,
            lifetime_s=Distribution.of(life.lifetimes_ns, 1e-9),
            idle_before_eviction_s=Distribution.of(life.idle_before_eviction_ns, 1e-9),
            reuse_gap_s=Distribution.of(life.reuse_gap_ns, 1e-9),
            steps=life.steps,
            frees_to_zero=life.frees_to_zero,
            allocations_per_second=(cache.allocated_blocks / span_s) if span_s else None,
            evictions_per_second=(cache.evictions / span_s) if span_s else None,
            allocations_per_step=(cache.allocated_blocks / life.steps) if life.steps else None,
            reallocated_within_step=life.reallocated_within_step,
            in_use_at_end=leaks.in_use_at_end,
            leaked_blocks=leaks.leaked_blocks,
            leaked_block_ids=leaks.leaked_block_ids,
            live_requests_at_end=req.live_at_end,
            in_use_at_idle=req.in_use_at_idle,
            idle_points=req.idle_points,
            refcount_errors=rep.refcount_errors,
            out_of_range_ids=rep.out_of_range_ids,
            damaged_queries=cache.damaged_queries,
            rounding=rounding,
            contiguous=contiguous,
            timeline=self.series.timeline(
                rep.capacity, t_start, self.preempt_t, self.window and (w0, w1), self.have_state
            ),
        )


def analyze_blocks(
    stream: BlockStream,
    pools: list[int] | None = None,
    window: tuple[int, int] | None = None,
    chunk_events: int | None = None,
) -> PoolAnalysis:
    """Analyze the pools ``pools`` (global indices; None: all) of an in-memory BlockStream."""
    from kvprof.trace import chunks as ch

    infos = stream.pools if pools is None else [stream.pools[i] for i in pools]
    a = BlockAnalyzer(infos, window, label="all pools" if pools is None else None)
    for c in ch.from_stream(stream, None if pools is None else list(pools), chunk_events or ch.DEFAULT_CHUNK_EVENTS):
        a.feed(c)
    return a.finish()
