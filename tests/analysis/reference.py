"""A slow, event-by-event replay of block streams: the obviously-correct twin of
kvprof.analysis.blocks, used by the property tests.  Same definitions, no numpy."""

from kvprof.trace.format import EventKind as K

STATE_KINDS = {K.ALLOC, K.FREE, K.HIT, K.CACHE, K.EVICT}


def replay(events, num_blocks, block_size):
    reserved = set()
    for e in events:
        if e[1] == K.RESERVE:
            reserved.update(e[6])
    capacity = num_blocks - len(reserved)
    ref = [0] * num_blocks
    hashed = [False] * num_blocks
    hits_since_set = [0] * num_blocks
    inuse = 0
    peak, peak_t, peak_states = 0, None, None
    evictions = before_reuse = refcount_errors = 0
    allocated = hit_blocks = frees_to_zero = 0
    have_state = False
    query = hits = 0
    req_waste = {}
    changes = []  # (t, inuse, waste) after each event
    counts_ok = True

    def state(b):
        if b in reserved:
            return 3
        return 2 if ref[b] > 0 else (1 if hashed[b] else 0)

    for t, kind, _pool, req, arg, arg2, ids in events:
        if kind in STATE_KINDS:
            for b in ids:
                if b in reserved:
                    continue
                before = state(b)
                allocated += kind == K.ALLOC
                hit_blocks += kind == K.HIT
                if kind == K.ALLOC:
                    if ref[b] > 0:
                        refcount_errors += 1
                    if before == 1:
                        evictions += 1
                        before_reuse += hits_since_set[b] == 0
                    ref[b] += 1
                    hashed[b] = False
                    hits_since_set[b] = 0
                elif kind == K.HIT:
                    ref[b] += 1
                    hits_since_set[b] += 1
                elif kind == K.FREE:
                    if ref[b] <= 0:
                        refcount_errors += 1
                    ref[b] -= 1
                elif kind == K.CACHE:
                    hashed[b] = True
                    hits_since_set[b] = 0
                elif kind == K.EVICT:
                    if hashed[b]:
                        evictions += 1
                        before_reuse += hits_since_set[b] == 0
                    hashed[b] = False
                    hits_since_set[b] = 0
                after = state(b)
                inuse += (after == 2) - (before == 2)
                frees_to_zero += before == 2 and after != 2
                if inuse > peak:
                    peak, peak_t = inuse, t
                    peak_states = [state(x) for x in range(num_blocks)]
                states = [state(x) for x in range(num_blocks)]
                counts_ok &= (
                    sum(1 for s in states if s in (0, 1)) + sum(1 for s in states if s == 2) + len(reserved)
                    == num_blocks
                )
        elif kind == K.REQ_QUERY:
            query += arg
            hits += arg2
        elif kind == K.REQ_STATE:
            have_state = True
            req_waste[req] = max(arg2 * block_size - arg, 0)
        elif kind in (K.REQ_FINISH, K.REQ_PREEMPT):
            req_waste[req] = 0
        changes.append((t, inuse, sum(req_waste.values())))
    end_inuse = sum(1 for b in range(num_blocks) if b not in reserved and ref[b] > 0)
    # integrals over [first event, last event]
    wi = si = ui = 0.0
    for (t0, u, w), (t1, _, _) in zip(changes, changes[1:]):
        dt = t1 - t0
        ui += u * dt
        si += u * block_size * dt
        wi += min(w, u * block_size) * dt
    span = changes[-1][0] - changes[0][0] if changes else 0
    return {
        "capacity": capacity,
        "peak_blocks": peak,
        "peak_time_ns": peak_t,
        "peak_states": peak_states,
        "evictions": evictions,
        "evicted_before_reuse": before_reuse,
        "refcount_errors": refcount_errors,
        "in_use_at_end": end_inuse,
        "query_tokens": query,
        "hit_tokens": hits,
        "usage_time_weighted": (ui / (span * capacity)) if span and capacity else None,
        "internal_time_weighted": (wi / si) if si and have_state else None,
        "counts_ok": counts_ok,
        "allocated_blocks": allocated,
        "hit_blocks": hit_blocks,
        "frees_to_zero": frees_to_zero,
        "high_watermark": (peak / capacity) if capacity else None,
    }
