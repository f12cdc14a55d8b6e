"""Block analyzer on small streams whose every number was worked out by hand (see comments)."""

import pytest

from kvprof.analysis.blocks import analyze_blocks
from kvprof.trace.format import EventKind as K
from kvprof.trace.reader import BlockStream

R0, R1, R2, R3 = 0, 1, 2, 3

# Pool of 8 blocks of 4 slots, block 0 reserved (a null block).
HAND = [
    (0, K.RESERVE, 0, -1, 0, 0, [0]),
    (0, K.REQ_ARRIVE, 0, R0, 6, 10, None),
    (0, K.REQ_QUERY, 0, R0, 6, 0, None),
    (0, K.ALLOC, 0, R0, 0, 0, [1, 2]),
    (0, K.REQ_STATE, 0, R0, 6, 2, None),  # waste 8-6 = 2
    (10, K.CACHE, 0, -1, 0, 0, [1]),
    (10, K.ALLOC, 0, R1, 0, 0, [5]),  # peak: {1,2,5}; free {3,4,6,7} = runs [3,4] [6,7]
    (10, K.REQ_STATE, 0, R1, 1, 1, None),  # waste 3
    (15, K.CACHE, 0, -1, 0, 0, [5]),
    (20, K.REQ_STATE, 0, R0, 8, 2, None),  # waste 0
    (30, K.FREE, 0, R0, 0, 0, [2, 1]),  # 1 -> free-cached, 2 -> free-empty
    (30, K.REQ_FINISH, 0, R0, 0, 0, None),
    (40, K.REQ_QUERY, 0, R2, 6, 4, None),
    (40, K.HIT, 0, R2, 0, 0, [1]),  # reuse of block 1, gap 10
    (40, K.ALLOC, 0, R2, 0, 0, [2]),
    (40, K.REQ_STATE, 0, R2, 6, 2, None),  # waste 2
    (50, K.FREE, 0, R1, 0, 0, [5]),
    (50, K.REQ_FINISH, 0, R1, 0, 0, None),
    (60, K.FREE, 0, R2, 0, 0, [2, 1]),
    (60, K.REQ_FINISH, 0, R2, 0, 0, None),
    (70, K.ALLOC, 0, R3, 0, 0, [1, 5]),  # evicts 1 (was hit) and 5 (never hit)
    (70, K.REQ_STATE, 0, R3, 5, 2, None),  # waste 3
    (80, K.FREE, 0, R3, 0, 0, [1, 5]),
    (80, K.REQ_FINISH, 0, R3, 0, 0, None),
]


def analyze(events, num_blocks=8, block_size=4, window=None):
    s = BlockStream.from_events(events, [{"num_blocks": num_blocks, "block_size": block_size}])
    return analyze_blocks(s, window=window)


def test_usage_and_watermark():
    a = analyze(HAND)
    assert a.capacity == 7 and a.reserved == 1
    assert a.peak_blocks == 3 and a.peak_time_ns == 10
    assert a.high_watermark == pytest.approx(3 / 7)
    # in-use integral: 2*10 + 3*20 + 1*10 + 3*10 + 2*10 + 0*10 + 2*10 = 160 over 80 ns x 7 blocks
    assert a.usage_time_weighted == pytest.approx(160 / 560)


def test_internal_fragmentation():
    a = analyze(HAND)
    # unfilled slots: [0,10) 2, [10,20) 5, [20,40) 3, [40,50) 5, [50,60) 2, [70,80) 3 -> 230
    # in-use slots:   [0,10) 8, [10,30) 12, [30,40) 4, [40,50) 12, [50,60) 8, [70,80) 8 -> 640
    assert a.internal_time_weighted == pytest.approx(230 / 640)
    assert a.internal_lookahead_time_weighted == 0
    # at the end of the peak plateau (t=30): 3 unfilled of 12 slots
    assert a.internal_at_peak == pytest.approx(0.25)
    # last-block waste at each request's final state: 0, 3, 2, 3
    assert a.per_request_waste.mean == pytest.approx(2.0)
    assert a.per_request_waste_reference == 1.5


def test_external_fragmentation_and_block_map():
    a = analyze(HAND)
    assert a.free_runs_at_peak == 2 and a.largest_free_run_at_peak == 2
    assert a.external_at_peak == pytest.approx(0.5)
    # reserved, in-use x2, free x2, in-use, free x2
    assert a.block_map_at_peak == [[3, 1], [2, 2], [0, 2], [2, 1], [0, 2]]


def test_prefix_cache_and_evictions():
    a = analyze(HAND)
    assert (a.query_tokens, a.hit_tokens) == (12, 4)
    assert a.hit_rate == pytest.approx(1 / 3)
    assert (a.hit_blocks, a.allocated_blocks) == (1, 6)
    assert a.block_hit_rate == pytest.approx(1 / 7)
    assert a.evictions == 2 and a.evicted_before_reuse == 1
    assert a.evicted_before_reuse_ratio == pytest.approx(0.5)


def test_lifetimes_idle_and_reuse_gap():
    a = analyze(HAND)
    # in-use intervals: block 1: 30, 20, 10; block 2: 30, 20; block 5: 40, 10
    assert a.lifetime_s.count == 7
    assert a.lifetime_s.p50 == pytest.approx(20e-9)
    assert a.lifetime_s.max == pytest.approx(40e-9)
    # block 1 idle 60->70, block 5 idle 50->70
    assert a.idle_before_eviction_s.count == 2
    assert a.idle_before_eviction_s.mean == pytest.approx(15e-9)
    assert a.reuse_gap_s.count == 1 and a.reuse_gap_s.p50 == pytest.approx(10e-9)


def test_no_leak_and_block_size_rounding():
    a = analyze(HAND)
    assert a.leaked_blocks == 0 and a.in_use_at_end == 0 and a.refcount_errors == 0
    assert a.live_requests_at_end == 0 and a.requests == 4
    rows = {r["block_size"]: r for r in a.rounding}
    # final lengths 8, 1, 6, 5 tokens
    assert rows[1]["allocated_slots"] == 20 and rows[1]["wasted_slots"] == 0
    assert rows[4]["allocated_slots"] == 28 and rows[4]["block_table_entries"] == 7 and rows[4]["recorded"]
    assert rows[8]["allocated_slots"] == 32
    assert a.contiguous["max_len"] == 8 and a.contiguous["utilization"] == pytest.approx(20 / 32)


def test_window_restricts_counts():
    a = analyze(HAND, window=(35, 65))
    assert (a.query_tokens, a.hit_tokens) == (6, 4)
    assert a.allocated_blocks == 1 and a.evictions == 0
    assert a.peak_blocks == 3 and a.peak_time_ns == 40


def test_leak_refcount_error_and_hurting_failure():
    ev = [
        (0, K.ALLOC, 0, R0, 0, 0, [1]),
        (0, K.REQ_STATE, 0, R0, 3, 1, None),
        (5, K.FREE, 0, -1, 0, 0, [2]),  # never allocated: ref-count error
        (6, K.ALLOC_FAIL, 0, R1, 2, 7, None),  # 2 needed while 7 of 8 free: hurts; engine saw 7 = ok
        (7, K.ALLOC_FAIL, 0, R1, 9, 3, None),  # 9 needed: does not hurt; engine saw 3 != 7
        (8, K.REQ_FINISH, 0, R1, 0, 0, None),  # R1 given up
        (10, K.REQ_FINISH, 0, R0, 0, 0, None),  # finished without freeing block 1
    ]
    a = analyze(ev)
    assert a.leaked_blocks == 1 and a.leaked_block_ids == [["pool0@0", 1]]
    assert a.refcount_errors == 1
    assert a.allocation_failures == 2 and a.fragmentation_that_hurts == 1
    assert a.engine_free_mismatches == 1
    assert a.in_use_at_idle == 1


def test_lookahead_waste_is_its_own_line():
    ev = [
        (0, K.ALLOC, 0, R0, 0, 0, [1, 2, 3]),
        (0, K.REQ_STATE, 0, R0, 5, 3, None),  # 2 blocks needed for 5 tokens, 1 allocated ahead
        (10, K.FREE, 0, R0, 0, 0, [1, 2, 3]),
        (10, K.REQ_FINISH, 0, R0, 0, 0, None),
    ]
    a = analyze(ev)
    assert a.internal_time_weighted == pytest.approx(7 / 12)
    assert a.internal_lookahead_time_weighted == pytest.approx(4 / 12)


def test_shared_prefix_block_counts_once():
    # two requests share full block 1; each has its own tail block: physical waste only in tails
    ev = [
        (0, K.ALLOC, 0, R0, 0, 0, [1, 2]),
        (0, K.REQ_STATE, 0, R0, 6, 2, None),
        (0, K.CACHE, 0, -1, 0, 0, [1]),
        (0, K.HIT, 0, R1, 0, 0, [1]),
        (0, K.ALLOC, 0, R1, 0, 0, [3]),
        (0, K.REQ_STATE, 0, R1, 5, 2, None),
        (10, K.FREE, 0, R0, 0, 0, [2, 1]),
        (10, K.FREE, 0, R1, 0, 0, [3, 1]),
    ]
    a = analyze(ev)
    # 3 physical blocks = 12 slots; waste 2 + 3 = 5
    assert a.peak_blocks == 3
    assert a.internal_at_peak == pytest.approx(5 / 12)


def test_empty_stream():
    a = analyze([])
    assert a.block_events == 0 and a.peak_blocks == 0 and a.internal_time_weighted is None
    assert a.high_watermark == 0.0 and a.rounding == []
