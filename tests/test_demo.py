"""The built-in demo: deterministic, exercises every block metric, knobs do what they say."""

import sys

import pytest

from kvprof.demo import DemoConfig, run_demo
from tests.conftest import analyzed_metrics, recorded_events, run_kvprof

pytestmark = pytest.mark.slow  # records the demo, several runs a test (make test-quick leaves it out)


def _record(tmp_path, name, *args):
    out = tmp_path / f"{name}.kvprof"
    r = run_kvprof("record", "-q", "-o", str(out), "--", sys.executable, "-m", "kvprof.commands", "demo", *args)
    assert r.returncode == 0, r.stderr
    return out


def test_same_seed_same_events_byte_for_byte(tmp_path):
    a = _record(tmp_path, "a", "--seed", "7", "--requests", "150")
    b = _record(tmp_path, "b", "--seed", "7", "--requests", "150")
    c = _record(tmp_path, "c", "--seed", "8", "--requests", "150")

    ea, eb, ec = recorded_events(a), recorded_events(b), recorded_events(c)
    assert len(ea["blocks"]) > 1000 and ea == eb
    assert ea["blocks"] != ec["blocks"]
    assert analyzed_metrics(a) == analyzed_metrics(b)


def test_default_demo_exercises_every_block_metric(tmp_path):
    m = analyzed_metrics(_record(tmp_path, "d"))
    assert m["blocks.preemptions"] > 0
    assert m["blocks.allocation_failures"] > 0
    assert 0 < m["blocks.prefix_cache.hit_tokens"] < m["blocks.prefix_cache.query_tokens"]
    assert m["blocks.evictions"] > 0 and 0 < m["blocks.evicted_before_reuse_ratio"] <= 1
    assert 0 < m["blocks.internal_fragmentation.time_weighted"] < 0.5
    assert m["blocks.usage.high_watermark"] == 1.0
    assert m["blocks.external_fragmentation.at_peak"] == 0.0  # the pool is full at its peak: nothing free to be split
    assert m["blocks.fragmentation_that_hurts"] == 0
    assert m["blocks.leaked_blocks"] == 0 and m["blocks.refcount_errors"] == 0 and m["blocks.in_use_at_idle"] == 0


def test_leak_knob_and_block_size_show_up(tmp_path):
    leaky = analyzed_metrics(_record(tmp_path, "leak", "--leak-every", "10", "--requests", "100"))
    assert leaky["blocks.leaked_blocks"] == 10
    small = analyzed_metrics(_record(tmp_path, "b16", "--requests", "100"))
    big = analyzed_metrics(_record(tmp_path, "b64", "--requests", "100", "--block-size", "64", "--num-blocks", "128"))
    assert big["blocks.internal_fragmentation.time_weighted"] > small["blocks.internal_fragmentation.time_weighted"]


def _allocations(bundle):
    """(block ids taken by each allocation, in order) and the free blocks before each, from the
    recorded stream, replayed: what each policy chose among what was free."""
    from kvprof.trace.format import EventKind as K
    from kvprof.trace.reader import Bundle

    s = Bundle(str(bundle)).block_stream()
    off = s.offsets
    ref = {}
    free_before, taken = [], []
    for i in range(len(s)):
        ids = s.ids[off[i] : off[i + 1]].tolist()
        if s.kind[i] == K.ALLOC:
            free_before.append(sorted(b for b in range(1, 256) if ref.get(b, 0) == 0))
            taken.append(ids)
        if s.kind[i] in (K.ALLOC, K.HIT):
            for b in ids:
                ref[b] = ref.get(b, 0) + 1
        elif s.kind[i] == K.FREE:
            for b in ids:
                ref[b] -= 1
    return taken, free_before


def test_free_orders_run_and_differ_in_placement(tmp_path):
    seen = {}
    for order in ("lru", "lifo", "lowest-id"):
        assert run_demo(DemoConfig(requests=80, free_order=order, num_blocks=256)).finished == 80
        taken, free = _allocations(
            _record(tmp_path, order, "--requests", "80", "--num-blocks", "256", "--free-order", order)
        )
        seen[order] = taken
        if order == "lowest-id":  # always the lowest free ids
            assert all(t == f[: len(t)] for t, f in zip(taken, free))
    assert seen["lru"] != seen["lifo"] != seen["lowest-id"] != seen["lru"]
    # lru takes the blocks freed longest ago, so the lowest-id property does not hold for it
    assert any(t != f[: len(t)] for t, f in zip(seen["lru"], _allocations(tmp_path / "lru.kvprof")[1]))


def test_no_prefix_cache_means_no_hits(tmp_path):
    m = analyzed_metrics(_record(tmp_path, "nopc", "--no-prefix-cache", "--requests", "80"))
    assert m["blocks.prefix_cache.hit_tokens"] == 0 and m["blocks.evictions"] == 0


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--free-order", "best"], "--free-order must be one of"),
        (["--free-order", "fifo"], "--free-order must be one of"),
        (["--block-size", "0"], "--block-size must be"),
    ],
)
def test_bad_demo_options(args, msg):
    r = run_kvprof("demo", *args)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


def test_preempted_lookups_are_counted_apart_and_equal_the_demos_own_sums(tmp_path):
    """Requests preempted and admitted again look the cache up again: vLLM counts those
    lookups apart, and so does kvprof (blocks.prefix_cache.preempted_*), equal to the
    simulator's own sums; first admissions stay in query_tokens/hit_tokens."""
    stats = run_demo(DemoConfig(seed=3, requests=300, num_blocks=96, block_size=16))
    assert stats.preemptions > 10 and stats.preempted_query_tokens > 0 and stats.preempted_hit_tokens > 0
    m = analyzed_metrics(_record(tmp_path, "p", "--seed", "3", "--requests", "300", "--num-blocks", "96"))
    assert m["blocks.prefix_cache.preempted_query_tokens"] == stats.preempted_query_tokens
    assert m["blocks.prefix_cache.preempted_hit_tokens"] == stats.preempted_hit_tokens
    assert (m["blocks.prefix_cache.query_tokens"], m["blocks.prefix_cache.hit_tokens"]) == (
        stats.query_tokens,
        stats.hit_tokens,
    )
    assert m["blocks.prefix_cache.preempted_hit_rate"] == stats.preempted_hit_tokens / stats.preempted_query_tokens
