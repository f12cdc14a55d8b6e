"""The whole-stream block analyzer kvprof used before the streaming engine (tests only):
the streamed analysis must equal it on every fixture and random stream.  Unchanged but
for this docstring; see kvprof/analysis/blocks.py for the definitions.

Original docstring: Block-pool analyzer: a pure function from a BlockStream to a typed result.

Invariants this module keeps (and the property tests check):

* every non-reserved block is in exactly one state at any instant, so
  free-empty + free-cached + in-use + reserved = N;
* a block is in use iff its reference count (ALLOC and HIT add one, FREE takes
  one) is positive; a free block is free-cached iff it was CACHEd and not
  evicted since (an ALLOC of a cached free block is its eviction);
* hit tokens never exceed queried tokens as long as the probe reports them so.

Everything is vectorised with numpy over block-level events (one per block per
call), sorted once by block; no Python loop runs per event.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kvprof.trace.format import EventKind as K
from kvprof.trace.reader import BlockStream, PoolInfo

EMPTY, CACHED, IN_USE, RESERVED = 0, 1, 2, 3
STATE_NAMES = {EMPTY: "free-empty", CACHED: "free-cached", IN_USE: "in-use", RESERVED: "reserved"}
WHATIF_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
TIMELINE_POINTS = 600


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
    # what-if
    whatif: list
    contiguous: dict
    timeline: dict = field(default_factory=dict)


def replay_sorted(skind: np.ndarray, gs: np.ndarray):
    """Replay block-level events sorted by block (time order kept within a block; ``gs``
    marks each block's first event): reference count and cached flag before and after each
    event, and the index of the last event that set or cleared the cached flag.  ALLOC and
    HIT add a reference, FREE drops one; CACHE sets the flag, EVICT and ALLOC clear it."""
    m = len(skind)
    gstart = np.flatnonzero(gs)
    gid = np.cumsum(gs) - 1
    delta = np.zeros(m, dtype=np.int64)
    delta[(skind == K.ALLOC) | (skind == K.HIT)] = 1
    delta[skind == K.FREE] = -1
    cs = np.cumsum(delta)
    ref_after = cs - (cs - delta)[gstart][gid] if m else cs
    setv = np.full(m, -1, dtype=np.int8)
    setv[skind == K.CACHE] = 1
    setv[(skind == K.EVICT) | (skind == K.ALLOC)] = 0
    idx = np.arange(m, dtype=np.int64)
    last_set = np.maximum.accumulate(np.where((setv >= 0) | gs, idx, -1)) if m else idx
    hashed_after = setv[last_set] == 1 if m else np.zeros(0, dtype=bool)
    hashed_before = np.zeros(m, dtype=bool)
    if m:
        hashed_before[1:] = hashed_after[:-1]
        hashed_before[gs] = False
    return ref_after - delta, ref_after, hashed_before, hashed_after, last_set


def _pct(x):
    return None if x is None else float(x)


def _group_max(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.maximum.reduceat(values, starts) if len(values) else values


def analyze_blocks(
    stream: BlockStream, pools: list[int] | None = None, window: tuple[int, int] | None = None
) -> PoolAnalysis:
    """Analyze the pools ``pools`` (global indices; None: all) of ``stream``.

    ``window`` = (t0, t1) restricts counts, integrals and the watermark to that
    span; block states are still replayed from the start of the run.
    """
    infos: list[PoolInfo] = stream.pools if pools is None else [stream.pools[i] for i in pools]
    sel = np.zeros(len(stream.pools), dtype=bool)
    for p in infos:
        sel[p.index] = True
    evmask = sel[stream.pool] if len(stream) else np.zeros(0, dtype=bool)

    base = np.zeros(len(stream.pools) + 1, dtype=np.int64)
    bsize = np.zeros(len(stream.pools), dtype=np.int64)
    for p in stream.pools:
        base[p.index + 1] = p.num_blocks
        bsize[p.index] = p.block_size
    np.cumsum(base, out=base)
    nkeys = int(base[-1])

    # ---- call level ---------------------------------------------------------------
    t_call = stream.t
    kind_call = stream.kind
    n_call = stream.n.astype(np.int64)
    offsets = stream.offsets

    # ---- expand to block level (selected pools only) ---------------------------------
    state_kinds = np.zeros(256, dtype=bool)
    state_kinds[[K.ALLOC, K.FREE, K.HIT, K.CACHE, K.EVICT, K.RESERVE]] = True
    call_sel = evmask & state_kinds[kind_call] & (n_call > 0)
    csel = np.flatnonzero(call_sel)
    reps = n_call[csel]
    ev_of = np.repeat(csel, reps)
    if len(csel):
        # ids of selected calls, in order
        starts = offsets[csel]
        within = np.arange(int(reps.sum()), dtype=np.int64) - np.repeat(np.cumsum(reps) - reps, reps)
        bid = stream.ids[np.repeat(starts, reps) + within].astype(np.int64)
    else:
        bid = np.zeros(0, dtype=np.int64)
    bpool = stream.pool[ev_of].astype(np.int64)
    nblocks_of_pool = (base[1:] - base[:-1])[bpool] if len(bpool) else np.zeros(0, dtype=np.int64)
    ok = (bid >= 0) & (bid < nblocks_of_pool)
    out_of_range = int((~ok).sum())
    if out_of_range:
        ev_of, bid, bpool = ev_of[ok], bid[ok], bpool[ok]
    key = base[bpool] + bid
    bkind = kind_call[ev_of]
    bt = t_call[ev_of]

    reserved = np.zeros(nkeys, dtype=bool)
    reserved[key[bkind == K.RESERVE]] = True
    keep = ~reserved[key]
    if not keep.all():
        key, bkind, bt, ev_of = key[keep], bkind[keep], bt[keep], ev_of[keep]
    m = len(key)

    capacity = sum(p.num_blocks for p in infos) - int(
        sum(reserved[base[p.index] : base[p.index + 1]].sum() for p in infos)
    )
    n_reserved = sum(p.num_blocks for p in infos) - capacity
    sizes = {p.block_size for p in infos}
    block_size = sizes.pop() if len(sizes) == 1 else None

    # ---- per-block replay (sorted by block, stable keeps time order inside) -------------
    # the narrowest key type lets numpy use its radix sort (<= 16 bits) or a cheaper merge
    small = key.astype(np.uint16 if nkeys <= 1 << 16 else np.uint32 if nkeys <= 1 << 32 else np.int64)
    order = np.argsort(small, kind="stable")
    sk = key[order]
    skind = bkind[order]
    gs = np.ones(m, dtype=bool)
    if m:
        gs[1:] = sk[1:] != sk[:-1]
    gstart = np.flatnonzero(gs)
    gid = np.cumsum(gs) - 1
    idx = np.arange(m, dtype=np.int64)
    ref_before, ref_after, hashed_before, hashed_after, last_set = replay_sorted(skind, gs)
    refcount_errors = int(((skind == K.FREE) & (ref_before <= 0)).sum() + ((skind == K.ALLOC) & (ref_before > 0)).sum())
    st_after = np.where(ref_after > 0, IN_USE, np.where(hashed_after, CACHED, EMPTY)).astype(np.int8)
    st_before = np.where(ref_before > 0, IN_USE, np.where(hashed_before, CACHED, EMPTY)).astype(np.int8)

    # ---- global counts in time order ------------------------------------------------------
    d_inuse_sorted = (st_after == IN_USE).astype(np.int8) - (st_before == IN_USE).astype(np.int8)
    d_cached_sorted = (st_after == CACHED).astype(np.int8) - (st_before == CACHED).astype(np.int8)
    d_inuse = np.empty(m, dtype=np.int64)
    d_inuse[order] = d_inuse_sorted
    d_cached = np.empty(m, dtype=np.int64)
    d_cached[order] = d_cached_sorted
    inuse = np.cumsum(d_inuse)
    cached = np.cumsum(d_cached)
    bsz_b = bsize[(np.searchsorted(base, key, side="right") - 1)] if m else np.zeros(0, dtype=np.int64)

    # ---- request events -------------------------------------------------------------------
    req_kinds = (kind_call >= K.REQ_ARRIVE) & (kind_call <= K.ALLOC_FAIL)
    rsel = np.flatnonzero(evmask & req_kinds)
    r_t, r_kind, r_req = t_call[rsel], kind_call[rsel], stream.req[rsel]
    r_arg, r_arg2 = stream.arg[rsel], stream.arg2[rsel]
    r_bs = bsize[stream.pool[rsel]] if len(rsel) else np.zeros(0, dtype=np.int64)
    step_times = t_call[evmask & (kind_call == K.STEP)]

    t_sel = t_call[evmask]  # the pools' span: first to last event of any kind
    t_start = int(t_sel[0]) if len(t_sel) else 0
    t_end = int(t_sel[-1]) if len(t_sel) else 0
    w0, w1 = (t_start, t_end) if window is None else (max(window[0], t_start), min(window[1], t_end))
    in_win_b = (bt >= w0) & (bt <= w1)
    in_win_r = (r_t >= w0) & (r_t <= w1)

    # per-request waste: REQ_STATE sets (filled, held); FINISH/PREEMPT reset to nothing held
    st_mask = (r_kind == K.REQ_STATE) | (r_kind == K.REQ_FINISH) | (r_kind == K.REQ_PREEMPT)
    s_idx = np.flatnonzero(st_mask & (r_req >= 0))
    s_t, s_req = r_t[s_idx], r_req[s_idx]
    is_state = r_kind[s_idx] == K.REQ_STATE
    filled = np.where(is_state, r_arg[s_idx], 0)
    held = np.where(is_state, r_arg2[s_idx], 0)
    bs_s = r_bs[s_idx]
    waste = np.maximum(held * bs_s - filled, 0)
    needed = -(-filled // np.maximum(bs_s, 1))
    lookahead = np.maximum(held - needed, 0) * bs_s
    lookahead = np.minimum(lookahead, waste)
    s_order = np.argsort(s_req, kind="stable")
    sr = s_req[s_order]
    sgs = np.ones(len(sr), dtype=bool)
    if len(sr):
        sgs[1:] = sr[1:] != sr[:-1]

    def _group_diff(v: np.ndarray) -> np.ndarray:
        vs = v[s_order]
        d = np.empty_like(vs)
        if len(vs):
            d[0] = vs[0]
            d[1:] = vs[1:] - vs[:-1]
            d[sgs] = vs[sgs]
        out = np.empty_like(d)
        out[s_order] = d
        return out

    dwaste = _group_diff(waste)
    dlook = _group_diff(lookahead)
    have_state = bool(is_state.any())

    # merged step functions of in-use slots and unfilled slots over time: both event
    # sets are in call order already, so merge by call index instead of sorting
    s_call = rsel[s_idx]
    nb, ns = m, len(s_idx)
    pos_b = np.arange(nb, dtype=np.int64) + np.searchsorted(s_call, ev_of, side="left")
    pos_s = np.arange(ns, dtype=np.int64) + np.searchsorted(ev_of, s_call, side="left")
    tl_t = np.empty(nb + ns, dtype=np.int64)
    tl_t[pos_b] = bt
    tl_t[pos_s] = s_t

    def _merged(block_values, state_values):
        out = np.zeros(nb + ns, dtype=np.int64)
        if block_values is not None:
            out[pos_b] = block_values
        if state_values is not None:
            out[pos_s] = state_values
        return np.cumsum(out)

    v_blocks = _merged(d_inuse, None)
    v_slots = _merged(d_inuse * bsz_b, None)
    v_waste = _merged(None, dwaste)
    v_look = _merged(None, dlook)
    if len(tl_t) and w1 > w0:
        tt = np.clip(tl_t, w0, w1)
        dt = np.diff(tt, append=w1).astype(np.float64)
    else:
        dt = np.zeros(len(tl_t))

    def _integral(values: np.ndarray) -> float:
        return float(values @ dt) if len(dt) else 0.0

    span = float(w1 - w0)
    usage_tw = _integral(v_blocks) / (span * capacity) if span > 0 and capacity else None
    slot_int = _integral(v_slots)
    internal_tw = (_integral(np.minimum(v_waste, v_slots)) / slot_int) if have_state and slot_int > 0 else None
    look_tw = (_integral(np.minimum(v_look, v_slots)) / slot_int) if have_state and slot_int > 0 else None

    # ---- high watermark ------------------------------------------------------------------------
    cand = np.flatnonzero(in_win_b)
    if len(cand) and capacity:
        peak_pos = int(cand[np.argmax(inuse[cand])])
        peak_blocks = int(inuse[peak_pos])
        peak_time = int(bt[peak_pos])
        hw = peak_blocks / capacity
        # end of the plateau: the next block event that lowers in-use
        later = np.flatnonzero(d_inuse[peak_pos + 1 :] < 0)
        plateau_end = int(bt[peak_pos + 1 + later[0]]) if len(later) else t_end
    else:
        peak_pos, peak_blocks, peak_time, hw, plateau_end = -1, 0, None, (0.0 if capacity else None), t_end
    if have_state and peak_pos >= 0 and peak_blocks:
        j = int(np.searchsorted(tl_t, plateau_end, side="left")) - 1
        if j >= 0 and v_slots[j] > 0:
            internal_peak = float(min(v_waste[j], v_slots[j]) / v_slots[j])
        else:
            internal_peak = None
    else:
        internal_peak = None

    # ---- block map and external fragmentation at the peak ---------------------------------------
    free_runs = largest_run = 0
    run_hist: dict = {}
    ext_peak = None
    block_map: list = []
    if infos:
        states = np.full(nkeys, EMPTY, dtype=np.int8)
        states[reserved] = RESERVED
        if peak_pos >= 0:
            cand_sorted = np.where(order <= peak_pos, idx, -1)
            lastj = _group_max(cand_sorted, gstart)
            have = lastj >= 0
            states[sk[gstart[have]]] = st_after[lastj[have]]
        pieces = [states[base[p.index] : base[p.index + 1]] for p in infos]
        for piece in pieces:
            free = (piece == EMPTY) | (piece == CACHED)
            _, runs = true_runs(free)
            free_runs += len(runs)
            if len(runs):
                largest_run = max(largest_run, int(runs.max()))
                for r in runs:
                    b = 1 << int(np.log2(r))
                    run_hist[b] = run_hist.get(b, 0) + 1
        total_free = sum(int(((pc == EMPTY) | (pc == CACHED)).sum()) for pc in pieces)
        ext_peak = (1.0 - largest_run / total_free) if total_free else 0.0
        allstates = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int8)
        block_map = _rle(allstates)
    run_hist = {str(k): v for k, v in sorted(run_hist.items())}

    # ---- evictions, reuse ----------------------------------------------------------------------------
    evict_sorted = ((skind == K.ALLOC) & (st_before == CACHED)) | ((skind == K.EVICT) & hashed_before)
    epoch_before = np.full(m, -1, dtype=np.int64)
    if m:
        epoch_before[1:] = last_set[:-1]
        epoch_before[gs] = -1
    hit_sorted = skind == K.HIT
    hits_per_epoch = np.bincount(last_set[hit_sorted], minlength=m) if m else np.zeros(0, dtype=np.int64)
    ev_pos = np.flatnonzero(evict_sorted)
    ev_epoch = epoch_before[ev_pos]
    never_hit = (ev_epoch < 0) | (hits_per_epoch[np.maximum(ev_epoch, 0)] == 0)
    win_sorted = in_win_b[order]
    ev_in = win_sorted[ev_pos]
    evictions = int(ev_in.sum())
    before_reuse = int((never_hit & ev_in).sum())

    # in-use intervals
    start_mask = (st_before != IN_USE) & (st_after == IN_USE)
    end_mask = (st_before == IN_USE) & (st_after != IN_USE)
    st_t = bt[order]
    last_start = np.maximum.accumulate(np.where(start_mask, idx, -1)) if m else idx
    last_end = np.maximum.accumulate(np.where(end_mask, idx, -1)) if m else idx
    ends = np.flatnonzero(end_mask & win_sorted)
    ls = last_start[ends]
    okl = (ls >= 0) & (gid[np.maximum(ls, 0)] == gid[ends])
    lifetimes = st_t[ends[okl]] - st_t[ls[okl]]
    prev_end = np.full(m, -1, dtype=np.int64)
    if m:
        prev_end[1:] = last_end[:-1]
    same = (prev_end >= 0) & (gid[np.maximum(prev_end, 0)] == gid)
    idle_sel = ev_pos[ev_in & same[ev_pos]]
    idle = st_t[idle_sel] - st_t[prev_end[idle_sel]]
    reuse_sel = np.flatnonzero(hit_sorted & (st_before == CACHED) & same & win_sorted)
    reuse = st_t[reuse_sel] - st_t[prev_end[reuse_sel]]

    # churn
    alloc_b = (bkind == K.ALLOC) & in_win_b
    allocated = int(alloc_b.sum())
    hit_blocks = int(((bkind == K.HIT) & in_win_b).sum())
    frees_to_zero = int((end_mask & win_sorted).sum())
    steps_in = step_times[(step_times >= w0) & (step_times <= w1)]
    realloc = 0
    if len(step_times) and m:
        step_of = np.searchsorted(step_times, st_t, side="right")
        restart = np.flatnonzero(start_mask & same & win_sorted)
        realloc = int((step_of[restart] == step_of[prev_end[restart]]).sum())
    span_s = span / 1e9 if span > 0 else None

    # ---- failures, preemptions, prefix cache --------------------------------------------------------
    fail_idx = np.flatnonzero((r_kind == K.ALLOC_FAIL) & in_win_r)
    alloc_failures = len(fail_idx)
    hurts = mismatches = 0
    if len(fail_idx):
        # state just before the failure in call order (timestamps may tie on a simulated clock)
        pos = np.searchsorted(ev_of, rsel[fail_idx], side="left") - 1
        before = (
            inuse[np.clip(pos, 0, m - 1)] if m else np.zeros(len(pos), dtype=np.int64)
        )  # no block ever moved: all free
        free_now = capacity - np.where(pos >= 0, before, 0)
        need = r_arg[fail_idx]
        hurts = int(((need >= 0) & (need <= free_now)).sum())
        seen = r_arg2[fail_idx]
        mismatches = int(((seen >= 0) & (seen != free_now)).sum())
    preemptions = int(((r_kind == K.REQ_PREEMPT) & in_win_r).sum())
    q = (r_kind == K.REQ_QUERY) & in_win_r
    query_tokens = int(r_arg[q].sum())
    hit_tokens = int(r_arg2[q].sum())

    # ---- requests: liveness, final waste, lengths --------------------------------------------------
    rr = r_req >= 0
    nreq_all = len(stream.requests)
    seen = np.zeros(nreq_all + 1, dtype=bool)
    seen[r_req[rr]] = True
    n_req = int(seen.sum())
    fin_seen = np.zeros(nreq_all + 1, dtype=bool)
    fin_seen[r_req[rr & (r_kind == K.REQ_FINISH)]] = True
    finished = np.flatnonzero(fin_seen)
    live_at_end = n_req - len(finished)
    per_req_waste = np.zeros(0)
    lengths = np.zeros(0, dtype=np.int64)
    if have_state:
        sidx = np.flatnonzero(is_state)
        o2 = np.argsort(s_req[sidx], kind="stable")
        sreq = s_req[sidx][o2]
        last = np.ones(len(sreq), dtype=bool)
        last[:-1] = sreq[1:] != sreq[:-1]
        final = sidx[o2][last]
        # the last block's waste: slack in the block holding the final token
        per_req_waste = np.where(filled[final] > 0, (-filled[final]) % np.maximum(bs_s[final], 1), 0)
        grp = np.flatnonzero(np.r_[True, sreq[1:] != sreq[:-1]])
        lengths = np.maximum.reduceat(filled[sidx][o2], grp) if len(grp) else lengths
    ref_waste = (block_size - 1) / 2 if block_size else None

    # idle points: live requests drop to zero
    live_delta = np.zeros(len(r_t), dtype=np.int64)
    first_seen = np.zeros(len(r_t), dtype=bool)
    if n_req:
        ro = np.argsort(r_req, kind="stable")
        rs = r_req[ro]
        fs = np.r_[True, rs[1:] != rs[:-1]] & (rs >= 0)
        first_seen[ro[fs]] = True
    live_delta[first_seen] += 1
    fin_first = np.zeros(len(r_t), dtype=bool)
    if len(finished):
        fo = np.flatnonzero((r_kind == K.REQ_FINISH) & rr)
        _, first_fin = np.unique(r_req[fo], return_index=True)
        fin_first[fo[first_fin]] = True
    live_delta[fin_first] -= 1
    live = np.cumsum(live_delta)
    idle_at = np.flatnonzero(fin_first & (live == 0))
    in_use_at_idle = 0
    idle_points = len(idle_at)
    for i in idle_at:  # one per idle point, not per event
        # evaluate once frees triggered by the finish (possibly deferred) have landed:
        # just before the next request event, or at the very end
        j = int(np.searchsorted(ev_of, rsel[i + 1], side="left")) - 1 if i + 1 < len(r_t) else len(bt) - 1
        if j >= 0:
            in_use_at_idle = max(in_use_at_idle, int(inuse[j]))

    # leaks at the end
    final_state = st_after[np.r_[gstart[1:] - 1, m - 1]] if m else np.zeros(0, dtype=np.int8)
    end_keys = sk[gstart] if m else np.zeros(0, dtype=np.int64)
    inuse_keys = end_keys[final_state == IN_USE]
    in_use_at_end = len(inuse_keys)
    leaked_ids: list = []
    if in_use_at_end:
        finished_set = set(finished.tolist())
        g_end = np.r_[gstart[1:], m]
        for g in np.flatnonzero(final_state == IN_USE):
            a, b = int(gstart[g]), int(g_end[g])
            ls0 = int(last_start[b - 1])
            refs = {int(stream.req[ev_of[order[j]]]) for j in range(max(ls0, a), b) if skind[j] in (K.ALLOC, K.HIT)}
            refs.discard(-1)
            if (refs and refs <= finished_set) or (not refs and live_at_end == 0):
                k = int(sk[a])
                pi = int(np.searchsorted(base, k, side="right") - 1)
                leaked_ids.append([stream.pools[pi].label, k - int(base[pi])])
    leaked = len(leaked_ids)

    # what-if over block sizes (finished lengths)
    whatif = []
    total_tokens = int(lengths.sum())
    for b in WHATIF_SIZES:
        if not len(lengths):
            break
        nb = -(-lengths // b)
        slots = int((nb * b).sum())
        whatif.append(
            {
                "block_size": b,
                "allocated_slots": slots,
                "wasted_slots": slots - total_tokens,
                "waste_ratio": (slots - total_tokens) / slots if slots else 0.0,
                "block_table_entries": int(nb.sum()),
                "mean_last_block_waste": float(((-lengths) % b).mean()),
                "recorded": b == block_size,
            }
        )
    contiguous = {}
    if len(lengths):
        max_len = max(int(lengths.max()), *(int(p.extra.get("max_model_len") or 0) for p in infos))
        contiguous = {
            "max_len": max_len,
            "utilization": total_tokens / (len(lengths) * max_len) if max_len else None,
            "requests": int(len(lengths)),
            "tokens": total_tokens,
        }

    timeline = _timeline(
        bt,
        inuse,
        cached,
        tl_t,
        v_slots,
        v_waste,
        capacity,
        step_times,
        r_t[r_kind == K.REQ_PREEMPT],
        t_start,
        None if window is None else (w0, w1),
    )

    return PoolAnalysis(
        label="all pools" if pools is None else ", ".join(p.label for p in infos),
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
        capacity=capacity,
        reserved=n_reserved,
        block_size=block_size,
        t_start=t_start,
        t_end=t_end,
        block_events=int(in_win_b.sum()),
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
        allocation_failures=alloc_failures,
        fragmentation_that_hurts=hurts,
        engine_free_mismatches=mismatches,
        preemptions=preemptions,
        query_tokens=query_tokens,
        hit_tokens=hit_tokens,
        hit_rate=(hit_tokens / query_tokens) if query_tokens else None,
        hit_blocks=hit_blocks,
        allocated_blocks=allocated,
        block_hit_rate=(hit_blocks / (hit_blocks + allocated)) if (hit_blocks + allocated) else None,
        evictions=evictions,
        evicted_before_reuse=before_reuse,
        evicted_before_reuse_ratio=(before_reuse / evictions) if evictions else None,
        lifetime_s=Distribution.of(lifetimes, 1e-9),
        idle_before_eviction_s=Distribution.of(idle, 1e-9),
        reuse_gap_s=Distribution.of(reuse, 1e-9),
        steps=len(steps_in),
        frees_to_zero=frees_to_zero,
        allocations_per_second=(allocated / span_s) if span_s else None,
        evictions_per_second=(evictions / span_s) if span_s else None,
        allocations_per_step=(allocated / len(steps_in)) if len(steps_in) else None,
        reallocated_within_step=realloc,
        in_use_at_end=in_use_at_end,
        leaked_blocks=leaked,
        leaked_block_ids=leaked_ids[:50],
        live_requests_at_end=live_at_end,
        in_use_at_idle=in_use_at_idle,
        idle_points=idle_points,
        refcount_errors=refcount_errors,
        out_of_range_ids=out_of_range,
        whatif=whatif,
        contiguous=contiguous,
        timeline=timeline,
    )


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


def _timeline(bt, inuse, cached, tl_t, v_slots, v_waste, capacity, steps, preempt_t, t0, window=None) -> dict:
    """A downsampled usage timeline for drawing (the numbers above use every event), whole
    run, in seconds from ``t0`` (the pools' first event, the origin of every chart)."""
    if not len(bt):
        return {}
    t0 = int(t0)
    edges = np.linspace(bt[0], bt[-1] + 1, TIMELINE_POINTS + 1)
    bucket = np.clip(np.searchsorted(edges, bt, side="right") - 1, 0, TIMELINE_POINTS - 1)
    present = np.unique(bucket)
    starts = np.searchsorted(bucket, present, side="left")
    peak_inuse = np.maximum.reduceat(inuse, starts)
    last = np.r_[starts[1:] - 1, len(bucket) - 1]
    out = {
        "t_s": [float((edges[b] - t0) / 1e9) for b in present],
        "in_use_max": peak_inuse.tolist(),
        "cached": cached[last].tolist(),
        "capacity": capacity,
        "preemptions_t_s": [float((x - t0) / 1e9) for x in preempt_t[:1000]],
        "t0_ns": t0,
    }
    if window is not None:  # the analysis window, for charts that show the whole run
        out["window_s"] = [float((window[0] - t0) / 1e9), float((window[1] - t0) / 1e9)]
    if len(tl_t) and np.any(v_waste):
        j = np.clip(np.searchsorted(tl_t, edges[present + 1], side="left") - 1, 0, len(tl_t) - 1)
        slots = v_slots[j].astype(np.float64)
        out["internal_fragmentation"] = (
            np.where(slots > 0, np.minimum(v_waste[j], slots) / np.maximum(slots, 1), 0.0).round(4).tolist()
        )
    return out
