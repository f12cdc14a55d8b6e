"""The streaming block analyzer equals the whole-stream one it replaced
(tests/analysis/legacy_blocks.py), field for field, whatever the chunk size: on random
streams of several pools with windows, on the fixtures and on demo runs."""

import dataclasses
import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvprof.analysis import blocks as new
from kvprof.trace.format import EventKind as K
from kvprof.trace.reader import Bundle, BlockStream
from tests.analysis import legacy_blocks as old

N, B = 10, 4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def differences(a, b, path=""):
    """Where two analysis results differ: ints and structure exactly, floats to 1e-9
    relative (the integrals are exact integers now, the old ones float dot products)."""
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k != "timeline":  # drawing buckets: compared in their own test
                out += differences(a.get(k), b.get(k), f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)}"]
        for i, (x, y) in enumerate(zip(a, b)):
            out += differences(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        if not (a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9 * max(abs(a), abs(b))):
            out.append(f"{path}: {a!r} != {b!r}")
    elif a != b:
        out.append(f"{path}: {a!r} != {b!r}")
    return out


def assert_same(stream, pools=None, window=None, chunk_sizes=(1, 3, 50, 1 << 17)):
    want = dataclasses.asdict(old.analyze_blocks(stream, pools, window))
    want["rounding"] = want.pop("whatif")  # renamed: the replay is `kvprof whatif`
    for cs in chunk_sizes:
        got = dataclasses.asdict(new.analyze_blocks(stream, pools, window, chunk_events=cs))
        assert got.pop("damaged_queries") == 0  # new: the generated lookups are all sound
        for new_field in (
            "preempted_query_tokens",
            "preempted_hit_tokens",
            "preempted_hit_rate",
        ):  # new: kind 16, unknown before
            got.pop(new_field)
        bad = differences(want, got)
        assert not bad, f"chunk size {cs}: {bad[:8]}"


@st.composite
def engine_streams(draw):
    """Several pools, each a plausible engine with some faults: arrivals, queries, hits of
    cached blocks, allocations (some of ids out of range), per-step states, caching,
    evictions, preemptions, refused allocations, frees, finishes, steps, a reserved block."""
    npools = draw(st.integers(1, 3))
    events = []
    t = 0
    states = []
    for p in range(npools):
        ref = [0] * N
        hashed = [False] * N
        reserved = set()
        if draw(st.booleans()):
            reserved.add(0)
            events.append((t, K.RESERVE, p, -1, 0, 0, [0]))
        states.append((ref, hashed, reserved, {}))
    for _ in range(draw(st.integers(0, 60))):
        t += draw(st.sampled_from([0, 0, 1, 2, 5]))
        p = draw(st.integers(0, npools - 1))
        ref, hashed, reserved, held = states[p]
        op = draw(
            st.sampled_from(
                [
                    "arrive",
                    "alloc",
                    "hit",
                    "free",
                    "cache",
                    "evict",
                    "state",
                    "query",
                    "step",
                    "preempt",
                    "fail",
                    "finish",
                    "bogus",
                ]
            )
        )
        req = draw(st.integers(0, 5))
        free = [b for b in range(N) if b not in reserved and ref[b] == 0]
        if op == "arrive":
            events.append((t, K.REQ_ARRIVE, p, req, draw(st.integers(0, 40)), -1, None))
        elif op == "alloc" and free:
            k = draw(st.integers(1, min(5, len(free))))
            ids = draw(st.permutations(free))[:k]
            for b in ids:
                ref[b] += 1
                hashed[b] = False
            held.setdefault(req, []).extend(ids)
            if draw(st.integers(0, 9)) == 0:
                ids = ids + [N + 3]  # out of range
            events.append((t, K.ALLOC, p, req, 0, 0, ids))
        elif op == "hit":
            cand = [b for b in range(N) if hashed[b] and b not in reserved]
            if cand:
                b = draw(st.sampled_from(cand))
                ref[b] += 1
                held.setdefault(req, []).append(b)
                events.append((t, K.HIT, p, req, 0, 0, [b]))
        elif op in ("free", "preempt", "finish") and held:
            r = draw(st.sampled_from(sorted(held)))
            ids = held.pop(r)
            for b in ids:
                ref[b] -= 1
            events.append((t, K.FREE, p, draw(st.sampled_from([r, -1])), 0, 0, ids[::-1]))
            if op != "free":
                events.append((t, K.REQ_PREEMPT if op == "preempt" else K.REQ_FINISH, p, r, 0, 0, None))
        elif op == "finish":
            events.append((t, K.REQ_FINISH, p, req, 0, 0, None))
        elif op == "cache":
            cand = [b for b in range(N) if ref[b] > 0 and not hashed[b]]
            if cand:
                b = draw(st.sampled_from(cand))
                hashed[b] = True
                events.append((t, K.CACHE, p, -1, 0, 0, [b]))
        elif op == "evict":
            cand = [b for b in range(N) if hashed[b] and ref[b] == 0]
            if cand:
                b = draw(st.sampled_from(cand))
                hashed[b] = False
                events.append((t, K.EVICT, p, -1, 0, 0, [b]))
        elif op == "state" and held:
            r = draw(st.sampled_from(sorted(held)))
            nb = len(held[r])
            filled = draw(st.integers(max(0, (nb - 2) * B), nb * B))
            events.append((t, K.REQ_STATE, p, r, filled, nb, None))
        elif op == "query":
            q = draw(st.integers(0, 64))
            events.append((t, K.REQ_QUERY, p, req, q, draw(st.integers(0, q)), None))
        elif op == "step":
            events.append((t, K.STEP, p, -1, draw(st.integers(0, 100)), 0, None))
        elif op == "fail":
            events.append((t, K.ALLOC_FAIL, p, req, draw(st.integers(-1, N)), draw(st.integers(-1, N)), None))
        elif op == "bogus":
            events.append(
                (
                    t,
                    draw(st.sampled_from([K.FREE, K.ALLOC, K.HIT])),
                    p,
                    draw(st.integers(-1, 5)),
                    0,
                    0,
                    [draw(st.integers(1, N - 1))],
                )
            )
    pools = [{"num_blocks": N, "block_size": B, "name": f"p{i}"} for i in range(npools)]
    return BlockStream.from_events(events, pools, [f"r{i}" for i in range(6)]), t


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(engine_streams(), st.data())
def test_streaming_equals_whole_stream(stream_t, data):
    stream, t_last = stream_t
    for p in range(len(stream.pools)):
        assert_same(stream, [p])
    assert_same(stream, None)
    if t_last:
        a = data.draw(st.integers(-2, t_last + 2))
        b = data.draw(st.integers(a, t_last + 3))
        assert_same(stream, [0], (a, b), chunk_sizes=(1, 7, 1 << 17))
        assert_same(stream, None, (a, b), chunk_sizes=(2, 1 << 17))


@pytest.mark.parametrize("name", ["demo.kvprof", "demo-leak.kvprof", "crash-sigkill.kvprof"])
def test_streaming_equals_whole_stream_on_fixtures(name):
    stream = Bundle(os.path.join(ROOT, "fixtures", name)).block_stream()
    for p in range(len(stream.pools)):
        assert_same(stream, [p], chunk_sizes=(97, 4096, 1 << 17))
