"""Property tests: on random event streams the vectorised analyzer agrees with a
slow event-by-event replay, and the pool invariants hold."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvprof.analysis.blocks import analyze_blocks
from kvprof.trace.format import EventKind as K
from kvprof.trace.reader import BlockStream
from tests.analysis.reference import replay

N, B = 12, 4


@st.composite
def streams(draw, allow_errors=False):
    """A plausible engine: requests allocate, hit cached blocks, grow, cache full blocks, free."""
    events = [(0, K.RESERVE, 0, -1, 0, 0, [0])] if draw(st.booleans()) else []
    reserved = {0} if events else set()
    ref = [0] * N
    hashed = [False] * N
    held = {}  # req -> blocks
    t = 0
    for _ in range(draw(st.integers(0, 40))):
        t += draw(st.integers(0, 3))
        op = draw(st.sampled_from(["alloc", "hit", "free", "cache", "evict", "state", "query", "bogus"]))
        free = [b for b in range(N) if b not in reserved and ref[b] == 0]
        if op == "alloc" and free:
            req = draw(st.integers(0, 4))
            k = draw(st.integers(1, min(3, len(free))))
            ids = draw(st.permutations(free))[:k]
            for b in ids:
                ref[b] += 1
                hashed[b] = False
            held.setdefault(req, []).extend(ids)
            events.append((t, K.ALLOC, 0, req, 0, 0, ids))
        elif op == "hit":
            cand = [b for b in range(N) if hashed[b] and b not in reserved]
            if cand:
                req = draw(st.integers(0, 4))
                b = draw(st.sampled_from(cand))
                ref[b] += 1
                held.setdefault(req, []).append(b)
                events.append((t, K.HIT, 0, req, 0, 0, [b]))
        elif op == "free" and held:
            req = draw(st.sampled_from(sorted(held)))
            ids = held.pop(req)
            for b in ids:
                ref[b] -= 1
            events.append((t, K.FREE, 0, req, 0, 0, ids[::-1]))
            events.append((t, K.REQ_FINISH, 0, req, 0, 0, None))
        elif op == "cache":
            cand = [b for b in range(N) if ref[b] > 0 and not hashed[b]]
            if cand:
                b = draw(st.sampled_from(cand))
                hashed[b] = True
                events.append((t, K.CACHE, 0, -1, 0, 0, [b]))
        elif op == "evict":
            cand = [b for b in range(N) if hashed[b] and ref[b] == 0]
            if cand:
                b = draw(st.sampled_from(cand))
                hashed[b] = False
                events.append((t, K.EVICT, 0, -1, 0, 0, [b]))
        elif op == "state" and held:
            req = draw(st.sampled_from(sorted(held)))
            nb = len(held[req])
            filled = draw(st.integers(max(0, (nb - 1) * B - B), nb * B))
            events.append((t, K.REQ_STATE, 0, req, filled, nb, None))
        elif op == "query":
            q = draw(st.integers(0, 64))
            events.append((t, K.REQ_QUERY, 0, draw(st.integers(0, 4)), q, draw(st.integers(0, q)), None))
        elif op == "bogus" and allow_errors:
            b = draw(st.integers(1, N - 1))
            events.append((t, draw(st.sampled_from([K.FREE, K.ALLOC])), 0, -1, 0, 0, [b]))
    return events


def _check(events):
    s = BlockStream.from_events(events, [{"num_blocks": N, "block_size": B}])
    a = analyze_blocks(s)
    ref = replay(events, N, B)
    assert ref["counts_ok"]
    assert a.capacity == ref["capacity"]
    assert a.peak_blocks == ref["peak_blocks"]
    if ref["peak_blocks"]:
        assert a.peak_time_ns == ref["peak_time_ns"]
        expanded = [st for st, n in a.block_map_at_peak for _ in range(n)]
        assert expanded == ref["peak_states"]
        assert sum(n for _, n in a.block_map_at_peak) == N  # free + in-use + reserved = N
    assert a.evictions == ref["evictions"]
    assert a.evicted_before_reuse == ref["evicted_before_reuse"]
    assert a.refcount_errors == ref["refcount_errors"]
    assert a.in_use_at_end == ref["in_use_at_end"]
    assert (a.query_tokens, a.hit_tokens) == (ref["query_tokens"], ref["hit_tokens"])
    assert a.hit_tokens <= a.query_tokens
    if ref["usage_time_weighted"] is None:
        assert a.usage_time_weighted in (None, 0.0)
    else:
        assert a.usage_time_weighted == pytest.approx(ref["usage_time_weighted"])
    assert (a.internal_time_weighted is None) == (ref["internal_time_weighted"] is None)
    if a.internal_time_weighted is not None:
        assert a.internal_time_weighted == pytest.approx(ref["internal_time_weighted"])
        assert 0.0 <= a.internal_time_weighted <= 1.0
    assert (a.allocated_blocks, a.hit_blocks, a.frees_to_zero) == (
        ref["allocated_blocks"],
        ref["hit_blocks"],
        ref["frees_to_zero"],
    )
    assert a.high_watermark == (pytest.approx(ref["high_watermark"]) if ref["high_watermark"] is not None else None)
    assert 0.0 <= (a.high_watermark or 0.0) <= 1.0
    if a.external_at_peak is not None:
        assert 0.0 <= a.external_at_peak <= 1.0


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(streams())
def test_matches_reference_on_valid_streams(events):
    _check(events)
    a = analyze_blocks(BlockStream.from_events(events, [{"num_blocks": N, "block_size": B}]))
    assert a.refcount_errors == 0


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(streams(allow_errors=True))
def test_matches_reference_with_refcount_errors(events):
    _check(events)
