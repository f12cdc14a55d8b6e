"""The pure-Python what-if replay, kept as the tests' reference (kvprof/analysis/whatif.py
before the compiled kernels): one tuple per schedule operation, Python dicts and the
allocator classes of kvprof/analysis/allocators.py.  Slow (~2 s per configuration of a
million block events) and simple; tests/test_whatif_kernel.py holds the compiled replay
to equal it, metric for metric.

    ref = reference.replay(reference.extract(stream, pool_index), W.Config(...))  # metrics dict
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kvprof.analysis import allocators
from kvprof.analysis.blocks import true_runs  # noqa: F401 (the metrics below)
from kvprof.trace.format import EventKind as K

if TYPE_CHECKING:
    from kvprof.analysis.whatif import Config

# schedule operations
(
    OP_STEP,
    OP_QUERY,
    OP_LOOKUP,
    OP_GROW,
    OP_CACHE,
    OP_FREE,
    OP_STATE,
    OP_PREEMPT,
    OP_FINISH,
    OP_FAIL,
    OP_FALLOC,
    OP_FFREE,
) = range(12)
UNLIMITED = -1
RECOVERIES = ("preempt", "seeds")


@dataclass
class Schedule:
    pool: str
    engine: str
    block_size: int
    num_blocks: int
    reserved_ids: list
    bytes_per_block: int | None
    t_start: int
    t_end: int
    ops: list
    requests: int
    prefix_caching: bool
    final_lengths: list = field(default_factory=list)  # tokens of each request at its last state
    unsupported: dict = field(default_factory=dict)  # events the replay cannot use, by kind
    # (request, block index at the recorded size) -> its content class: blocks whose token
    # prefixes the recorded hits show equal (absent: a class of its own)
    content: dict = field(default_factory=dict)

    engine_policy: str | None = None  # the pool's own free-block policy, when it declared one

    def free_order(self) -> tuple[bool, str]:
        """The engine's own free queue: (uncached blocks reused first, order blocks leave in)."""
        if self.engine == "vllm":
            return True, "fifo"  # vLLM 0.32 BlockPool.free_blocks: uncached to the head, cached to the tail
        return False, {"lifo": "lifo", "lowest-id": "lowest", "first-fit": "lowest"}.get(
            self.engine_policy or "", "fifo"
        )

    def free_order_label(self) -> str:
        first, order = self.free_order()
        return {"fifo": "LRU queue", "lifo": "LIFO stack", "lowest": "lowest id first"}[order] + (
            ", uncached blocks reused first" if first else ""
        )

    bytes_per_token_given: float | None = None  # --bytes-per-token, over the bundle's own figure

    @property
    def bytes_per_token(self) -> float | None:
        if self.bytes_per_token_given:
            return self.bytes_per_token_given
        return self.bytes_per_block / self.block_size if self.bytes_per_block else None


def _without_gc(fn):
    """Run without the cyclic collector: the schedule is millions of small tuples and no
    cycles, and generation-2 collections over them cost more than the work itself."""
    import functools
    import gc

    @functools.wraps(fn)
    def wrapper(*a, **k):
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*a, **k)
        finally:
            if was:
                gc.enable()

    return wrapper


@_without_gc
def extract(stream, pool_index: int) -> Schedule:
    """The replayable schedule of one pool (a global pool index of ``stream``)."""
    info = stream.pools[pool_index]
    B = info.block_size
    sel = np.flatnonzero(stream.pool == pool_index)
    kind_sel = stream.kind[sel]
    kinds = kind_sel.tolist()
    times = stream.t[sel].tolist()
    reqs = stream.req[sel].tolist()
    args = stream.arg[sel].tolist()
    starts = stream.offsets[sel].tolist()
    ends = stream.offsets[sel + 1].tolist()
    ids_all = stream.ids
    n = len(sel)
    ALLOC, FREE, HIT, CACHE, EVICT, RESERVE = K.ALLOC, K.FREE, K.HIT, K.CACHE, K.EVICT, K.RESERVE
    STATE, QUERY, PREEMPT, FINISH, FAIL, STEP = (
        K.REQ_STATE,
        K.REQ_QUERY,
        K.REQ_PREEMPT,
        K.REQ_FINISH,
        K.ALLOC_FAIL,
        K.STEP,
    )

    # tokens each state's table is for: filled plus whole blocks held beyond them (lookahead)
    f_arr, h_arr = stream.arg[sel], stream.arg2[sel]
    state_tokens_arr = f_arr + np.maximum(h_arr - -(-f_arr // B), 0) * B

    # for each allocation (and refusal): the tokens T of the state it was for, the next state of
    # its request before the request is preempted or finishes; and the prefix-cache query of
    # the admission, which an engine may report after the admission's allocations (vLLM
    # records its stats then) while the replay's lookup needs it first.  Vectorised per request.
    req_sel = stream.req[sel]
    rel = np.flatnonzero(np.isin(kind_sel, [STATE, QUERY, PREEMPT, FINISH, ALLOC, HIT, FAIL]) & (req_sel >= 0))
    order = rel[np.argsort(req_sel[rel], kind="stable")]
    ks, rs = kind_sel[order], req_sel[order]
    m = len(order)
    pos = np.arange(m)
    big = np.int64(m + 1)

    def _next(mask):
        cand = np.where(mask, pos, big)
        return np.minimum.accumulate(cand[::-1])[::-1] if m else cand

    nreset = _next((ks == PREEMPT) | (ks == FINISH))
    target_arr = np.full(n, -1, dtype=np.int64)
    qhint_arr = np.full(n, -1, dtype=np.int64)
    ask = np.flatnonzero((ks == ALLOC) | (ks == HIT) | (ks == FAIL))
    for mask, values, out in (
        ((ks == STATE), state_tokens_arr, target_arr),
        ((ks == QUERY), stream.arg[sel], qhint_arr),
    ):
        nx = _next(mask)[ask]
        ok = (nx < m) & (nx < nreset[ask])
        ok[ok] = rs[nx[ok]] == rs[ask[ok]]
        out[order[ask[ok]]] = values[order[nx[ok]]]
    target = target_arr.tolist()
    qhint = qhint_arr.tolist()

    # pass 2: operations
    ops: list = []
    append = ops.append
    tables: dict = {}  # request -> recorded block ids by position
    pos_of: dict = {}  # request -> {block id: position}
    freed: dict = {}  # request -> count of positions freed
    owner: dict = {}  # block id -> (request that computed it, position)
    uf: dict = {}  # union-find over (request, block index): content classes
    foreign: set = set()
    reserved: list = []
    final_len: dict = {}
    unsupported: dict = {}
    cached_any = False
    last_free: dict = {}  # request -> index in ops of its last whole-table free
    before: dict = {}  # index in ops -> an operation to insert before it
    # request states are most of the stream: built in one go, then merged by call index
    is_state = kind_sel == STATE
    state_idx = np.flatnonzero(is_state)
    state_ops = list(
        zip(
            [OP_STATE] * len(state_idx),
            stream.t[sel][state_idx].tolist(),
            req_sel[state_idx].tolist(),
            f_arr[state_idx].tolist(),
            state_tokens_arr[state_idx].tolist(),
        )
    )
    if len(state_idx):  # final length of each request: its last state
        rr = req_sel[state_idx]
        _, first_from_end = np.unique(rr[::-1], return_index=True)
        last = state_idx[len(state_idx) - 1 - first_from_end]
        final_len = dict(zip(req_sel[last].tolist(), f_arr[last].tolist()))
    others = np.flatnonzero(~is_state).tolist()
    bounds: list = []  # per non-state call: how many ops it produced so far (for the merge)
    for i in others:
        bounds.append(len(ops))
        k = kinds[i]
        if k == STEP:
            append((OP_STEP, times[i]))
        elif k == ALLOC or k == HIT:
            r, t = reqs[i], times[i]
            ids = ids_all[starts[i] : ends[i]].tolist()
            if r < 0:
                if k == ALLOC:
                    foreign.update(ids)
                    append((OP_FALLOC, t, tuple(ids)))
                else:
                    unsupported["hit without a request"] = unsupported.get("hit without a request", 0) + 1
                continue
            tab = tables.get(r)
            if tab is None or freed[r] >= len(tab):  # a new admission
                tab = tables[r] = []
                pos_of[r] = {}
                freed[r] = 0
            pmap = pos_of[r]
            if k == HIT:
                append((OP_LOOKUP, t, r, len(ids) * B, qhint[i]))
                # a hit of block j computed as block j of request o: the two token prefixes
                # up to the end of block j are equal (content hashes chain), so are all blocks
                # before it.  One request's hit may take blocks of several (one re-computed a
                # block the other's copy of which had been evicted): each owner's furthest block.
                furthest: dict = {}
                for j, b in enumerate(ids, len(tab)):
                    o = owner.get(b)
                    if o is not None and o[0] != r and o[1] == j and j > furthest.get(o[0], -1):
                        furthest[o[0]] = j
                for o, jmax in furthest.items():
                    for j in range(jmax + 1):
                        _union(uf, (r, j), (o, j))
            else:
                # tokens the table grows for; and, for a replay at the recorded size, the length
                # the engine grew it to (so lookahead and chunking land exactly where they did)
                append(
                    (
                        OP_GROW,
                        t,
                        r,
                        target[i] if target[i] >= 0 else (len(tab) + len(ids)) * B,
                        len(tab) + len(ids),
                        qhint[i],
                    )
                )
            for b in ids:
                if k == ALLOC:
                    owner[b] = (r, len(tab))
                    foreign.discard(b)
                pmap[b] = len(tab)
                tab.append(b)
        elif k == FREE:
            r, t = reqs[i], times[i]
            by_req: dict = {}
            for b in ids_all[starts[i] : ends[i]].tolist():
                if b in foreign:
                    by_req.setdefault(-1, []).append(b)
                    continue
                holder = r if (r >= 0 and b in pos_of.get(r, ())) else None
                if holder is None:  # unattributed: the last request that took it
                    o = owner.get(b)
                    holder = o[0] if o is not None and b in pos_of.get(o[0], ()) else None
                if holder is None:
                    unsupported["free of a block no request holds"] = (
                        unsupported.get("free of a block no request holds", 0) + 1
                    )
                    continue
                by_req.setdefault(holder, []).append(pos_of[holder].pop(b))
            for h, pos in by_req.items():
                if h == -1:
                    foreign.difference_update(pos)
                    append((OP_FFREE, t, tuple(pos)))
                    continue
                freed[h] += len(pos)
                whole = freed[h] >= len(tables[h])
                if whole:
                    last_free[h] = len(ops)
                append((OP_FREE, t, h, tuple(pos), whole))
        elif k == CACHE:
            cached_any = True
            cov: dict = {}
            for b in ids_all[starts[i] : ends[i]].tolist():
                o = owner.get(b)
                if o is not None:
                    cov.setdefault(o[0], []).append(o[1])
            for o, pos in cov.items():  # tokens covered, and the exact positions (for the recorded size)
                append((OP_CACHE, times[i], o, (max(pos) + 1) * B, tuple(pos)))
        elif k == QUERY:
            append((OP_QUERY, times[i], reqs[i], args[i]))
        elif k == PREEMPT:
            # engines free the victim's blocks, then report the preemption (vLLM, the demo):
            # the replay must know it is a preemption before it frees, so that it can skip it
            r, t = reqs[i], times[i]
            j = last_free.get(r)
            if j is not None and not any(
                o[0] not in (OP_STEP, OP_FALLOC, OP_FFREE) and o[2] == r for o in ops[j + 1 :]
            ):
                before[j] = (OP_PREEMPT, ops[j][1], r, True)  # the decision, before the free
            append((OP_PREEMPT, t, r, False))  # the report itself (the analyzer's waste reset)
        elif k == FINISH:
            append((OP_FINISH, times[i], reqs[i]))
        elif k == FAIL:
            append((OP_FAIL, times[i], reqs[i], target[i], qhint[i], args[i]))  # args: the blocks the engine wanted
        elif k == RESERVE:
            reserved.extend(ids_all[starts[i] : ends[i]].tolist())
        elif k == EVICT:
            unsupported["explicit eviction"] = unsupported.get("explicit eviction", 0) + 1
    if before:
        merged: list = []
        for j, op in enumerate(ops):
            pre = before.get(j)
            if pre is not None:
                merged.append(pre)
            merged.append(op)
        # shift the call boundaries past the inserted decisions
        ins = np.zeros(len(ops) + 1, dtype=np.int64)
        ins[np.fromiter(before.keys(), dtype=np.int64)] = 1
        shift = np.cumsum(ins)
        bounds = [b + int(shift[b]) - int(ins[b]) for b in bounds]
        ops = merged
    bounds.append(len(ops))
    if state_ops:  # merge: each non-state call's ops go before the states that followed it
        states_before = (
            np.cumsum(is_state)[np.asarray(others, dtype=np.int64)] if others else np.zeros(0, dtype=np.int64)
        )
        out: list = []
        si = 0
        for c, nst in enumerate(states_before.tolist()):
            if nst > si:
                out.extend(state_ops[si:nst])
                si = nst
            out.extend(ops[bounds[c] : bounds[c + 1]])
        out.extend(state_ops[si:])
        ops = out
    seen_req = np.unique(stream.req[sel])
    t_start = int(times[0]) if n else 0
    t_end = int(times[-1]) if n else 0
    return Schedule(
        pool=info.label,
        engine=info.engine,
        block_size=B,
        num_blocks=info.num_blocks,
        reserved_ids=sorted(set(reserved)),
        bytes_per_block=info.bytes_per_block or info.extra.get("bytes_per_block"),
        t_start=t_start,
        t_end=t_end,
        ops=ops,
        requests=int((seen_req >= 0).sum()),
        prefix_caching=cached_any,
        final_lengths=list(final_len.values()),
        unsupported=unsupported,
        engine_policy=info.extra.get("free_order") or info.extra.get("policy"),
        content={node: _find(uf, node) for node in uf},
    )


def _find(uf: dict, x):
    root = x
    while uf.get(root, root) != root:
        root = uf[root]
    while x != root:  # path compression
        uf[x], x = root, uf[x]
    return root


def _union(uf: dict, a, b) -> None:
    ra, rb = _find(uf, a), _find(uf, b)
    if ra != rb:
        uf[ra] = rb
        uf.setdefault(rb, rb)


class _Replay:
    """One configuration's replay.  Python state per request; one pass over the ops."""

    def __init__(self, sched: Schedule, cfg: Config):
        self.s, self.c = sched, cfg
        self.B = cfg.block_size
        self.B0 = sched.block_size
        if cfg.num_blocks == UNLIMITED:
            need = sum(-(-max(x, 1) // self.B) for x in sched.final_lengths) + len(sched.reserved_ids) + 64
            foreign = sum(len(op[2]) for op in sched.ops if op[0] == OP_FALLOC)
            self.n = max(need + foreign, 2)
        else:
            self.n = cfg.num_blocks
        self.reserved = [b for b in sched.reserved_ids if b < self.n]
        self.capacity = self.n - len(self.reserved)
        self.uncached_first, self.order = sched.free_order()
        self.alloc = allocators.make(cfg.policy, self.n, self.reserved, self.uncached_first, self.order)
        self.prefix = cfg.prefix_cache and sched.prefix_caching
        self.ref = [0] * self.n
        self.key_of: list = [None] * self.n
        self.cache: dict = {}
        self.table: dict = {}
        self.running: dict = {}  # admitted requests in admission order (newest last)
        self.content = sched.content
        self.cov: dict = {}
        self.filled: dict = {}
        self.known: dict = {}
        self.waste: dict = {}
        self.suspended: dict = {}  # request -> tokens to recompute when it resumes
        self.keep: set = set()  # requests whose recorded preemption was skipped
        self.decided: dict = {}  # request -> whether its pending recorded preemption is replayed
        self.pending_query: dict = {}
        self.admit_hits: dict = {}  # request -> hit tokens of an admission whose query the engine reports later
        self.admission: dict = {}  # request -> hit tokens of the admission in progress
        self.foreign: dict = {}
        self.missed: dict = {}  # request -> positions [lo, hi) the engine hit and the replay computed
        self.freed_pos: dict = {}
        self.honor = False
        # counters
        self.inuse = 0
        self.waste_sum = 0
        self.query_tokens = self.hit_tokens = 0
        self.failures = self.frag_failures = 0
        self.preemptions = self.recomputed = 0
        self.evictions = 0
        self.defrag_moved = 0
        self.max_running = 0
        self.unserved = 0
        self.peak = -1
        self.peak_mask = None
        self.plateau_open = False
        self.internal_at_peak = None
        self.i_blocks = self.i_slots = self.i_waste = 0.0
        self.t_prev = sched.t_start
        self.cur_t = sched.t_start
        self.prev_vals = (0, 0)

    # -- content keys ---------------------------------------------------------------------------
    def key(self, r, j):
        """The content of block j of request r at this block size: its tokens' prefix ends in
        recorded block m-1, so two requests share it when their recorded blocks m-1 are one
        content class (sharing is known to the recorded block granularity)."""
        node = (r, -(-(j + 1) * self.B // self.B0) - 1)
        return (self.content.get(node, node), j)

    # -- block bookkeeping ----------------------------------------------------------------------
    def _took(self, b):
        """A free block leaves the free pool for a new use: its cached content goes."""
        k = self.key_of[b]
        if k is not None:
            self.key_of[b] = None
            if self.cache.get(k) == b:
                del self.cache[k]
            self.evictions += 1
        self.ref[b] = 1
        self.inuse += 1

    def _release_many(self, blocks):
        """One free call (blocks in the order the engine frees them)."""
        ref = self.ref
        out = []
        for b in blocks:
            ref[b] -= 1
            if ref[b] == 0:
                out.append(b)
        if out:
            self.inuse -= len(out)
            self.alloc.free_many(out, [self.key_of[b] is not None for b in out])
            self._on_decrease()

    def _new_blocks(self, k):
        ids = self.alloc.alloc(k)
        if ids is None:
            return None
        for b in ids:
            self._took(b)
        self._on_increase()
        return ids

    def _on_increase(self):
        if self.inuse > self.peak:
            self.peak = self.inuse
            self.peak_mask = self.alloc.free_mask.copy()
            self.plateau_open = True

    def _on_decrease(self):
        if self.plateau_open:
            w, s = self.prev_vals  # analyze's rule: the state before the decrease's instant
            self.internal_at_peak = (min(w, s) / s) if s > 0 else None
            self.plateau_open = False

    # -- requests --------------------------------------------------------------------------------
    def _set_waste(self, r, value):
        self.waste_sum += value - self.waste.get(r, 0)
        self.waste[r] = value

    def _lookup(self, r, limit_tokens, dry=False):
        hits = []
        if not self.prefix:
            return hits
        cache = self.cache
        for j in range(max(limit_tokens, 0) // self.B):
            b = cache.get(self.key(r, j))
            if b is None:
                break
            hits.append(b)
        if dry:
            return hits
        for b in hits:
            if self.ref[b] == 0:
                self.alloc.take(b)
                self.ref[b] = 1
                self.inuse += 1
            else:
                self.ref[b] += 1
        if hits:
            self._on_increase()
        return hits

    def _limit(self, r, qhint):
        """Tokens an admission may find in the cache: all but the last of the tokens it brings
        (vLLM's and the demo's rule: the last token is always computed)."""
        q = self.pending_query.get(r)
        if q is None and qhint is not None and qhint >= 0:
            q = qhint
        return (q - 1) if q is not None else (self.known.get(r, 0) - 1)

    def _admit_lookup(self, r, rec_hit_tokens, qhint=-1):
        """First lookup of an admission: prefix hits become the start of the table.  The
        admission is in progress until its allocation succeeds (_admitted) or fails."""
        limit = self._limit(r, qhint)
        hits = self._lookup(r, max(limit, rec_hit_tokens))
        # blocks the engine found cached and this replay did not: it computes them, and caches them
        self.missed[r] = (len(hits), rec_hit_tokens // self.B0)
        self.table[r] = hits
        self.freed_pos[r] = set()
        self.running[r] = None
        self.admission[r] = len(hits) * self.B
        return hits

    def _admitted(self, r):
        """The admission in progress succeeded: its prefix-cache query counts now, or when the
        engine reports it (vLLM records its stats after the admission's allocations)."""
        hits = self.admission.pop(r, None)
        if hits is None:
            return
        self.max_running = max(self.max_running, len(self.running))
        q = self.pending_query.pop(r, None)
        if q is not None:
            self.query_tokens += q
            self.hit_tokens += hits
        else:
            self.admit_hits[r] = hits

    def _admission_failed(self, r):
        """Give the hits back; the request waits, its query still to count."""
        self.admission.pop(r, None)
        self._release_many(
            list(reversed(self.table.pop(r, None) or []))
        )  # the table, not the hits: a compaction may have moved them
        self.running.pop(r, None)

    def _free_table(self, r):
        tab = self.table.pop(r, None) or []
        self._release_many([b for b in reversed(tab) if b is not None])  # tail first, as vLLM and the demo free
        self.running.pop(r, None)

    def _grow(self, r, tokens, admitting):
        """Grow r's table to hold ``tokens``; on a shortage, recover; False if r must wait."""
        need = -(-tokens // self.B) - len(self.table[r])
        while need > 0:
            ids = self._new_blocks(need)
            if ids is not None:
                self.table[r].extend(ids)  # looked up again: a compaction rebuilds the tables
                return True
            self.failures += 1
            if self.alloc.free_count >= need:
                self.frag_failures += 1
                if self.c.recovery == "seeds" and self.alloc.contiguous and self._defragment(need):
                    continue
            if admitting:  # a new admission waits; it does not preempt running requests
                return False
            victim = next(reversed(self.running))
            self._preempt(victim)
            if victim == r:
                return False
        return True

    def _preempt(self, v):
        self.preemptions += 1
        self.recomputed += self.filled.get(v, 0)
        self._free_table(v)
        self.suspended[v] = self.filled.get(v, 0)
        self._set_waste(v, 0)

    def _defragment(self, need):
        """The seeds' recovery for run allocators: cached content is already free to take, so
        compact: move every in-use block down into one run; true if a run of ``need`` results."""
        in_use = [b for b in range(self.n) if self.ref[b] > 0]
        fixed = set(self.reserved)
        slots = [b for b in range(self.n) if b not in fixed]
        new_of = {}
        for b, nb in zip(in_use, slots):
            new_of[b] = nb
        moved = sum(1 for b, nb in new_of.items() if b != nb)
        if not moved:
            return False
        self.defrag_moved += moved
        for r, tab in self.table.items():
            self.table[r] = [None if b is None else new_of[b] for b in tab]
        for fk, b in list(self.foreign.items()):
            self.foreign[fk] = new_of[b]
        # moved blocks keep their content; a free cached block that a moved block lands on loses it
        dest = set(new_of.values())
        key_of = [None] * self.n
        for b, k in enumerate(self.key_of):
            if k is None:
                continue
            if b in new_of:
                key_of[new_of[b]] = k
            elif b in dest:
                self.evictions += 1
            else:
                key_of[b] = k
        self.key_of = key_of
        self.cache = {k: b for b, k in enumerate(key_of) if k is not None}
        ref = [0] * self.n
        for b, nb in new_of.items():
            ref[nb] = self.ref[b]
        self.ref = ref
        self.alloc = allocators.make(self.c.policy, self.n, self.reserved, self.uncached_first, self.order)
        for nb in new_of.values():
            self.alloc.take(nb)
        return self.alloc.can_alloc(need)

    def _resume(self, r, tokens, qhint=-1):
        self._admit_lookup(r, 0, qhint)
        if self._grow(r, tokens, admitting=True):
            self.suspended.pop(r, None)
            self._admitted(r)
            return True
        self._admission_failed(r)
        return False

    # -- the pass --------------------------------------------------------------------------------
    def run(self) -> dict:
        B, B0 = self.B, self.B0
        s = self.s
        for op in s.ops:
            code, t = op[0], op[1]
            if t != self.cur_t:
                dt = t - self.t_prev
                if dt > 0:
                    slots = self.inuse * B
                    self.i_blocks += self.inuse * dt
                    self.i_slots += slots * dt
                    self.i_waste += min(self.waste_sum, slots) * dt
                self.t_prev = t
                self.prev_vals = (self.waste_sum, self.inuse * B)
                self.cur_t = t
            if code == OP_GROW:
                r, tokens = op[2], op[3]
                if B == B0:
                    tokens = op[4] * B
                if r in self.suspended:
                    self._resume(r, tokens, op[5])
                    continue
                self.keep.discard(r)
                if r not in self.table:
                    self._admit_lookup(r, 0, op[5])
                admitting = r in self.admission  # looked up here or at the recorded hit just before
                if self._grow(r, tokens, admitting):
                    if admitting:
                        self._admitted(r)
                elif admitting:
                    self._admission_failed(r)
                    self.suspended.setdefault(r, 0)
                if self.honor_for == r:
                    self.honor = False
            elif code == OP_STATE:
                r, f, tokens = op[2], op[3], op[4]
                self.filled[r] = f
                if f > self.known.get(r, 0):
                    self.known[r] = f
                if r in self.suspended:
                    if not self._resume(r, tokens):
                        continue
                tab = self.table.get(r)
                self._set_waste(r, max(len(tab) * B - f, 0) if tab else 0)
            elif code == OP_LOOKUP:
                r, rec_hits = op[2], op[3]
                if r in self.suspended or r in self.table:
                    continue
                self._admit_lookup(r, rec_hits, op[4])
            elif code == OP_CACHE:
                r, c = op[2], op[3]
                if c > self.cov.get(r, 0):
                    self.cov[r] = c
                tab = self.table.get(r)
                if tab and self.prefix:
                    # at the recorded size, exactly the blocks the engine cached (it skips
                    # content another block already holds), and those it had found cached
                    # where the replay computed them (the engine would have cached them had it
                    # computed them: without them, content the replay evicted never came back);
                    # at others, every full block
                    if B == B0:
                        lo, hi = self.missed.get(r, (0, 0))
                        js = list(op[4]) + list(range(lo, min(hi, self.cov[r] // B, len(tab))))
                    else:
                        js = range(min(self.cov[r] // B, len(tab)))
                    for j in js:
                        if j >= len(tab):
                            continue
                        b = tab[j]
                        if b is None or self.key_of[b] is not None:
                            continue
                        k = self.key(r, j)
                        if k not in self.cache:
                            self.cache[k] = b
                            self.key_of[b] = k
            elif code == OP_FREE:
                r, pos, whole = op[2], op[3], op[4]
                if r in self.keep or r in self.suspended or r not in self.table:
                    continue
                if whole:
                    self._free_table(r)
                    continue
                fp = self.freed_pos[r]
                fp.update(pos)
                tab = self.table[r]
                gone = []
                for j in range(len(tab) - 1, -1, -1):  # blocks all of whose tokens were freed
                    b = tab[j]
                    if b is None:
                        continue
                    lo, hi = j * B // B0, ((j + 1) * B - 1) // B0
                    if all(p in fp for p in range(lo, hi + 1)):
                        tab[j] = None
                        gone.append(b)
                self._release_many(gone)
            elif code == OP_QUERY:
                r, q = op[2], op[3]
                if r in self.admit_hits:  # the lookup came first: count it now
                    self.query_tokens += q
                    self.hit_tokens += self.admit_hits.pop(r)
                else:
                    self.pending_query[r] = q
            elif code == OP_PREEMPT:
                r, decision = op[2], op[3]
                if decision or r not in self.decided:
                    if r in self.suspended:
                        continue
                    if self.honor:  # the engine was short, and so is the replay
                        self.preemptions += 1
                        self.recomputed += self.filled.get(r, 0)
                        self.decided[r] = True
                    else:  # the replay has room: the victim keeps its blocks
                        self.keep.add(r)
                        self.decided[r] = False
                if not decision and self.decided.pop(r, False):
                    self._set_waste(r, 0)
            elif code == OP_FINISH:
                r = op[2]
                self._set_waste(r, 0)
                self.running.pop(r, None)  # blocks it never freed stay in use (a leak)
                if r in self.suspended:
                    self.unserved += 1
                    self.suspended.pop(r)
                self.keep.discard(r)
            elif code == OP_FAIL:
                r, tokens = op[2], op[3]
                if (
                    tokens < 0 and op[5] > 0
                ):  # no later state says how long: the blocks the engine wanted, beyond the table
                    tokens = len(self.table.get(r) or ()) * B + op[5] * B0
                self.honor = self._short(r, tokens, op[4])
                self.honor_for = r
                if self.honor:
                    self.failures += 1
                    if self.alloc.free_count >= self._need(r, tokens, op[4]):
                        self.frag_failures += 1
            elif code == OP_STEP:
                self.honor = False
            elif code == OP_FALLOC:
                ids = self._new_blocks(len(op[2]))
                if ids is None:
                    self.failures += 1
                    continue
                for rec, b in zip(op[2], ids):
                    self.foreign[rec] = b
            elif code == OP_FFREE:
                for rec in op[2]:
                    b = self.foreign.pop(rec, None)
                    if b is not None:
                        self._release_many([b])
        # the tail of the span
        dt = s.t_end - self.t_prev
        if dt > 0:
            slots = self.inuse * B
            self.i_blocks += self.inuse * dt
            self.i_slots += slots * dt
            self.i_waste += min(self.waste_sum, slots) * dt
        if self.plateau_open:
            w, sl = self.prev_vals if self.cur_t == s.t_end else (self.waste_sum, self.inuse * B)
            self.internal_at_peak = (min(w, sl) / sl) if sl > 0 else None
        self.unserved += len(self.suspended)
        return self._metrics()

    honor_for = None

    def _need(self, r, tokens, qhint=-1):
        tab = self.table.get(r)
        if tokens < 0:
            return 1
        if tab:
            return max(-(-tokens // self.B) - len(tab), 0)
        hits = self._lookup(r, self._limit(r, qhint), dry=True)
        return max(-(-tokens // self.B) - len(hits), 0) + sum(1 for b in hits if self.ref[b] == 0)

    def _short(self, r, tokens, qhint=-1) -> bool:
        need = self._need(r, tokens, qhint)
        if need <= 0:
            return False
        return not self.alloc.can_alloc(need)

    def _metrics(self) -> dict:
        span = self.s.t_end - self.s.t_start
        peak = max(self.peak, 0)
        ext = runs = compaction = None
        if self.peak_mask is not None:
            mask = self.peak_mask
            free_total = int(mask.sum())
            starts, lengths = true_runs(mask)
            runs = len(lengths)
            ext = (1.0 - int(lengths.max()) / free_total) if free_total else 0.0
            used = ~mask
            used[self.reserved] = False
            # compaction at the watermark: in-use blocks above the first `peak` usable ids must move
            usable = np.ones(self.n, dtype=bool)
            usable[self.reserved] = False
            low = np.flatnonzero(usable)[:peak]
            lowmask = np.zeros(self.n, dtype=bool)
            lowmask[low] = True
            compaction = int((used & ~lowmask).sum())
        bpb = None
        if self.s.bytes_per_token:
            bpb = self.s.bytes_per_token * self.B
        lengths = [x for x in self.s.final_lengths if x > 0]
        mean_blocks = (sum(-(-x // self.B) for x in lengths) / len(lengths)) if lengths else None
        return {
            "blocks.peak_blocks": peak,
            "blocks.capacity": self.capacity if self.c.num_blocks != UNLIMITED else None,
            "blocks.usage.high_watermark": (peak / self.capacity)
            if self.c.num_blocks != UNLIMITED and self.capacity
            else None,
            "blocks.usage.time_weighted": (self.i_blocks / (span * self.capacity))
            if span > 0 and self.capacity and self.c.num_blocks != UNLIMITED
            else None,
            "blocks.internal_fragmentation.time_weighted": (self.i_waste / self.i_slots) if self.i_slots > 0 else None,
            "blocks.internal_fragmentation.at_peak": self.internal_at_peak,
            "blocks.external_fragmentation.at_peak": ext if self.c.num_blocks != UNLIMITED else None,
            "blocks.free_runs.at_peak": runs if self.c.num_blocks != UNLIMITED else None,
            "blocks.prefix_cache.query_tokens": self.query_tokens,
            "blocks.prefix_cache.hit_tokens": self.hit_tokens,
            "blocks.prefix_cache.hit_rate": (self.hit_tokens / self.query_tokens) if self.query_tokens else None,
            "blocks.evictions": self.evictions,
            "blocks.allocation_failures": self.failures,
            "blocks.fragmentation_that_hurts": self.frag_failures,
            "blocks.preemptions": self.preemptions,
            "whatif.recomputed_tokens": self.recomputed,
            "whatif.unserved_requests": self.unserved,
            "whatif.max_running_requests": self.max_running,
            "whatif.requests_held": (
                int(self.capacity // mean_blocks) if mean_blocks and self.c.num_blocks != UNLIMITED else None
            ),
            "whatif.peak_bytes": (peak * bpb) if bpb else None,
            "whatif.compaction_blocks_at_peak": compaction if self.c.num_blocks != UNLIMITED else None,
            "whatif.compaction_bytes_at_peak": (compaction * bpb)
            if (bpb and compaction is not None and self.c.num_blocks != UNLIMITED)
            else None,
            "whatif.defrag_blocks_moved": self.defrag_moved,
        }


@_without_gc
def replay(sched: Schedule, cfg) -> dict:
    """The metrics of one configuration (cfg: anything with block_size, num_blocks, policy,
    recovery and prefix_cache, e.g. kvprof.analysis.whatif.Config)."""
    if cfg.policy not in allocators.POLICIES:
        raise ValueError(f"unknown allocator policy {cfg.policy!r}")
    return _Replay(sched, cfg).run()
