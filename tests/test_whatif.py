"""kvprof whatif: the replay reproduces analyze on the recorded configuration (demo runs of
every demo policy, and the fixtures), hand-worked allocator and replay cases, property
tests of the buddy allocator and the free queue, and the command line."""

import json
import os
import random
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvprof.analysis import allocators
from kvprof.analysis import whatif as W
from kvprof.trace.format import EventKind as K
from kvprof.trace.reader import BlockStream, Bundle
from tests.conftest import ROOT, run_kvprof

FIXTURES = os.path.join(ROOT, "fixtures")


def _fidelity(bundle_path, **kw):
    stream = Bundle(str(bundle_path)).block_stream()
    return W.run(stream, W.WhatifOptions(block_sizes=(8, 32), policies=("free-queue", "buddy"), jobs=1, **kw))


@pytest.mark.parametrize("name", ["demo.kvprof", "demo-leak.kvprof"])
def test_replay_of_the_recorded_configuration_equals_analyze_on_the_fixtures(name):
    w = _fidelity(os.path.join(FIXTURES, name))
    bad = {k: v for k, v in w["fidelity"].items() if not v["equal"]}
    assert not bad, bad
    assert (
        w["fidelity"]["blocks.preemptions"]["replay"] > 0
        and w["fidelity"]["blocks.prefix_cache.hit_tokens"]["replay"] > 0
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--free-order", "lifo"],
        ["--free-order", "lowest-id", "--block-size", "32", "--num-blocks", "120"],
        ["--no-prefix-cache", "--num-blocks", "150"],
        ["--block-size", "8", "--num-blocks", "500", "--prefix-share", "0.9"],
        # a hit that takes blocks computed by two requests (one re-computed a block whose first
        # copy had been evicted): 112 hit tokens short before content classes replaced the
        # parent-and-shared-length model
        [
            "--seed",
            "2",
            "--num-blocks",
            "100",
            "--block-size",
            "8",
            "--free-order",
            "lowest-id",
            "--prefix-share",
            "0.9",
        ],
    ],
)
def test_replay_equals_analyze_for_every_demo_engine_policy(tmp_path, args):
    out = tmp_path / "d.kvprof"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--",
        sys.executable,
        "-m",
        "kvprof.demo",
        "--requests",
        "150",
        "--seed",
        "3",
        *args,
    )
    assert r.returncode == 0, r.stderr
    w = _fidelity(out)
    assert all(v["equal"] for v in w["fidelity"].values()), w["fidelity"]


# -- hand-worked replays --------------------------------------------------------------------------------
def _stream(events, num_blocks, block_size, requests, engine="custom"):
    return BlockStream.from_events(
        events, [{"num_blocks": num_blocks, "block_size": block_size, "engine": engine}], requests
    )


def _row(sched, **kw):
    return W.replay(sched, W.Config(**kw)).metrics


def test_one_request_under_other_block_sizes():
    # 10 tokens at B=4: 3 blocks; at B=2: 5 blocks; at B=8: 2 blocks, 6 of 16 slots empty
    ev = [
        (1, K.REQ_ARRIVE, 0, 0, 10, 1, ()),
        (2, K.ALLOC, 0, 0, 0, 0, (0, 1, 2)),
        (2, K.REQ_STATE, 0, 0, 10, 3, ()),
        (9, K.FREE, 0, 0, 0, 0, (2, 1, 0)),
        (9, K.REQ_FINISH, 0, 0, 0, 0, ()),
    ]
    s = W.extract(_stream(ev, 8, 4, ["a"]), 0)
    assert _row(s, block_size=4, num_blocks=8)["blocks.peak_blocks"] == 3
    assert _row(s, block_size=2, num_blocks=W.UNLIMITED)["blocks.peak_blocks"] == 5
    m = _row(s, block_size=8, num_blocks=W.UNLIMITED)
    assert m["blocks.peak_blocks"] == 2 and m["blocks.internal_fragmentation.time_weighted"] == pytest.approx(6 / 16)


def _prefix_stream(q_b):
    """A computes 8 tokens and caches both 4-token blocks; B (q_b tokens) hits them."""
    need_b = -(-q_b // 4)
    ev = [
        (1, K.REQ_ARRIVE, 0, 0, 8, 1, ()),
        (1, K.REQ_QUERY, 0, 0, 8, 0, ()),
        (1, K.ALLOC, 0, 0, 0, 0, (0, 1)),
        (1, K.CACHE, 0, 0, 0, 0, (0, 1)),
        (1, K.REQ_STATE, 0, 0, 8, 2, ()),
        (2, K.REQ_ARRIVE, 0, 1, q_b, 1, ()),
        (2, K.REQ_QUERY, 0, 1, q_b, 4 * min(2, (q_b - 1) // 4), ()),
        (2, K.HIT, 0, 1, 0, 0, tuple([0, 1][: min(2, (q_b - 1) // 4)])),
        (2, K.ALLOC, 0, 1, 0, 0, tuple(range(2, 2 + need_b - min(2, (q_b - 1) // 4)))),
        (2, K.REQ_STATE, 0, 1, q_b, need_b, ()),
        (
            5,
            K.FREE,
            0,
            1,
            0,
            0,
            tuple(reversed([0, 1][: min(2, (q_b - 1) // 4)] + list(range(2, 2 + need_b - min(2, (q_b - 1) // 4))))),
        ),
        (5, K.REQ_FINISH, 0, 1, 0, 0, ()),
        (6, K.FREE, 0, 0, 0, 0, (1, 0)),
        (6, K.REQ_FINISH, 0, 0, 0, 0, ()),
    ]
    return W.extract(_stream(ev, 16, 4, ["a", "b"]), 0)


def test_prefix_hits_follow_the_shared_tokens_across_block_sizes():
    s = _prefix_stream(9)  # B shares A's 8 tokens; all but its last token may hit
    for b in (1, 2, 4, 8):
        m = _row(s, block_size=b, num_blocks=W.UNLIMITED)
        assert m["blocks.prefix_cache.hit_tokens"] == 8, b
        assert m["blocks.prefix_cache.query_tokens"] == 8 + 9
    assert _row(s, block_size=4, num_blocks=16, prefix_cache=False)["blocks.prefix_cache.hit_tokens"] == 0
    s = _prefix_stream(8)  # B is A's prompt: its last token is computed, so the second block never hits at B=4
    assert _row(s, block_size=4, num_blocks=16)["blocks.prefix_cache.hit_tokens"] == 4
    assert _row(s, block_size=2, num_blocks=16)["blocks.prefix_cache.hit_tokens"] == 4  # sharing known to 4 tokens only


def test_blocks_the_engine_hit_and_the_replay_recomputed_are_cached_at_the_recorded_size():
    """At the recorded block size the replay caches the blocks the engine cached; a block the
    engine found cached (a hit, never cached again by the engine) that another allocator had
    evicted is computed by the replay and must be cached too, or the content never comes back:
    buddy at the recorded size of the 20k-request demo kept a 1.3% hit rate against 43% for the
    free queue and ~41% for buddy at other sizes."""
    a, x, b, c = range(4)
    ev = [
        (1, K.REQ_QUERY, 0, a, 5, 0, ()),
        (1, K.ALLOC, 0, a, 0, 0, (0, 1)),
        (1, K.CACHE, 0, a, 0, 0, (0,)),
        (1, K.REQ_STATE, 0, a, 5, 2, ()),
        (2, K.FREE, 0, a, 0, 0, (1, 0)),
        (2, K.REQ_FINISH, 0, a, 0, 0, ()),
        # x takes the free queue's head (block 2); a run allocator takes the lowest id, block 0: a's content goes
        (3, K.ALLOC, 0, x, 0, 0, (2,)),
        (3, K.REQ_STATE, 0, x, 4, 1, ()),
        (4, K.REQ_QUERY, 0, b, 5, 4, ()),
        (4, K.HIT, 0, b, 0, 0, (0,)),
        (4, K.ALLOC, 0, b, 0, 0, (3,)),
        (4, K.REQ_STATE, 0, b, 5, 2, ()),
        (5, K.REQ_STATE, 0, b, 8, 2, ()),
        (5, K.CACHE, 0, b, 0, 0, (3,)),  # the engine caches b's own block only
        (6, K.FREE, 0, b, 0, 0, (3, 0)),
        (6, K.REQ_FINISH, 0, b, 0, 0, ()),
        (6, K.FREE, 0, x, 0, 0, (2,)),
        (6, K.REQ_FINISH, 0, x, 0, 0, ()),
        (7, K.REQ_QUERY, 0, c, 5, 4, ()),
        (7, K.HIT, 0, c, 0, 0, (0,)),
        (7, K.ALLOC, 0, c, 0, 0, (1,)),
        (7, K.REQ_STATE, 0, c, 5, 2, ()),
        (8, K.FREE, 0, c, 0, 0, (1, 0)),
        (8, K.REQ_FINISH, 0, c, 0, 0, ()),
    ]
    s = W.extract(_stream(ev, 4, 4, list("axbc")), 0)
    assert _row(s, block_size=4, num_blocks=4)["blocks.prefix_cache.hit_tokens"] == 8  # the recorded run: b and c hit
    for pol in ("first-fit", "buddy"):
        # b misses (a's block was reused) and computes the prefix; c finds b's copy (0 before the fix)
        assert _row(s, block_size=4, num_blocks=4, policy=pol)["blocks.prefix_cache.hit_tokens"] == 4, pol
    assert (
        _row(s, block_size=2, num_blocks=8, policy="first-fit")["blocks.prefix_cache.hit_tokens"] == 4
    )  # as at another size


def _holes_stream():
    """Six one-block requests fill a 6-block pool; every other one finishes; G then needs 2 blocks."""
    ev = []
    for i in range(6):
        ev += [(i + 1, K.ALLOC, 0, i, 0, 0, (i,)), (i + 1, K.REQ_STATE, 0, i, 4, 1, ())]
    for i in (1, 3, 5):
        ev += [(10 + i, K.FREE, 0, i, 0, 0, (i,)), (10 + i, K.REQ_FINISH, 0, i, 0, 0, ())]
    ev += [(20, K.ALLOC, 0, 6, 0, 0, (5, 3)), (20, K.REQ_STATE, 0, 6, 8, 2, ())]
    for i in (0, 2, 4, 6):
        ev += [(30 + i, K.FREE, 0, i, 0, 0, (i,) if i != 6 else (3, 5)), (30 + i, K.REQ_FINISH, 0, i, 0, 0, ())]
    return W.extract(_stream(ev, 6, 4, list("abcdefg")), 0)


def test_run_allocators_fail_on_fragmentation_that_a_paged_pool_does_not_see():
    s = _holes_stream()
    paged = _row(s, block_size=4, num_blocks=6)
    assert paged["blocks.allocation_failures"] == 0 and paged["blocks.peak_blocks"] == 6
    for pol in ("first-fit", "best-fit", "buddy"):
        m = _row(s, block_size=4, num_blocks=6, policy=pol, recovery="preempt")
        assert m["blocks.allocation_failures"] >= 1 and m["blocks.fragmentation_that_hurts"] >= 1, pol
        assert m["whatif.unserved_requests"] == 1 and m["blocks.preemptions"] == 0, (
            pol
        )  # an admission waits, it does not preempt
    m = _row(s, block_size=4, num_blocks=6, policy="first-fit", recovery="seeds")
    # compaction moves the blocks of C (2 -> 1) and E (4 -> 2): a run of three follows
    assert m["whatif.defrag_blocks_moved"] == 2 and m["whatif.unserved_requests"] == 0 and m["blocks.peak_blocks"] == 6
    assert m["blocks.allocation_failures"] == 1 and m["blocks.fragmentation_that_hurts"] == 1


def test_a_smaller_pool_preempts_the_newest_and_counts_recomputed_tokens():
    # three requests growing one block at a time; the engine had room, a 4-block pool does not
    ev = []
    for i in range(3):
        ev += [(1 + i, K.ALLOC, 0, i, 0, 0, (2 * i,)), (1 + i, K.REQ_STATE, 0, i, 4, 1, ())]
    for i in range(3):
        ev += [(10 + i, K.ALLOC, 0, i, 0, 0, (2 * i + 1,)), (10 + i, K.REQ_STATE, 0, i, 5, 2, ())]
    for i in range(3):
        ev += [(20 + i, K.FREE, 0, i, 0, 0, (2 * i + 1, 2 * i)), (20 + i, K.REQ_FINISH, 0, i, 0, 0, ())]
    s = W.extract(_stream(ev, 6, 4, list("abc")), 0)
    assert _row(s, block_size=4, num_blocks=6)["blocks.preemptions"] == 0
    m = _row(s, block_size=4, num_blocks=4)
    # at t=11 b grows: a holds 2, b 1, c 1: the newest (c) is preempted with its 4 tokens
    assert m["blocks.preemptions"] == 1 and m["whatif.recomputed_tokens"] == 4 and m["blocks.peak_blocks"] == 4


# -- allocators: hand-worked -----------------------------------------------------------------------------
def test_free_queue_orders():
    q = allocators.FreeQueue(6, reserved=[0])
    assert q.alloc(2) == [1, 2]
    q.take(4)
    q.free(2)
    assert q.alloc(3) == [3, 5, 2]  # FIFO: 4 was taken by a hit, 2 went to the tail
    v = allocators.FreeQueue(6, uncached_first=True)
    assert v.alloc(4) == [0, 1, 2, 3]
    v.free_many([3, 2, 1], [False, True, False])  # vLLM: uncached to the head in order, cached to the tail
    assert v.alloc(5) == [3, 1, 4, 5, 2]
    lifo = allocators.FreeQueue(4, order="lifo")
    assert lifo.alloc(1) == [3]
    low = allocators.FreeQueue(5, order="lowest")
    assert low.alloc(2) == [0, 1]
    low.free(1)
    assert low.alloc(1) == [1]


def test_run_allocators_hand_cases():
    for cls, expect in ((allocators.FirstFit, 0), (allocators.BestFit, 6)):
        a = cls(10)
        a.alloc(10)
        for b in (0, 1, 2, 3, 6, 7, 8):  # free runs: [0..3] (4) and [6..8] (3)
            a.free(b)
        assert a.alloc(3)[0] == expect, cls
        assert a.alloc(5) is None and a.free_count == 4
    b = allocators.Buddy(8)
    assert b.alloc(3) == [0, 1, 2, 3]  # rounded up to a chunk of 4
    assert b.alloc(1) == [4]
    assert b.largest_run() == 2
    for x in (0, 1, 2, 3, 4):
        b.free(x)
    assert b.chunks() == [(0, 3)]  # everything merged back
    b6 = allocators.Buddy(6)
    assert sorted(b6.chunks(), key=lambda c: c[0]) == [(0, 2), (4, 1)]
    b6.take(5)
    assert sorted(b6.chunks(), key=lambda c: c[0]) == [(0, 2), (4, 0)]


# -- allocators: properties --------------------------------------------------------------------------------
def _check_buddy(a, used):
    cover = {}
    chunks = set(a.chunks())
    for s, o in chunks:
        assert s % (1 << o) == 0 and s + (1 << o) <= a.n
        for x in range(s, s + (1 << o)):
            assert x not in cover, "free chunks overlap"
            cover[x] = s
    assert set(cover) == {x for x in range(a.n) if a.free_mask[x]} and len(cover) == a.free_count
    assert not set(cover) & used, "an allocated block is listed free"
    for s, o in chunks:  # buddies merge whenever both are free
        if o < a.max_order:
            mate = s ^ (1 << o)
            assert (mate, o) not in chunks, f"free buddies {s} and {mate} of order {o} not merged"


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 80), seed=st.integers(0, 2**32 - 1), reserve=st.booleans())
def test_buddy_blocks_never_overlap_and_buddies_always_merge(n, seed, reserve):
    rng = random.Random(seed)
    a = allocators.Buddy(n, [0] if reserve else [])
    used = {0} if reserve else set()
    held = []
    for _ in range(120):
        x = rng.random()
        if x < 0.4:
            ids = a.alloc(rng.randint(1, 9))
            if ids is not None:
                assert len(ids) & (len(ids) - 1) == 0 and ids[0] % len(ids) == 0  # an aligned power-of-two chunk
                assert not set(ids) & used, "handed out a block twice"
                used |= set(ids)
                held += ids
        elif x < 0.8 and held:
            b = held.pop(rng.randrange(len(held)))
            used.discard(b)
            a.free(b)
        else:
            free = [b for b in range(n) if a.free_mask[b]]
            if free:
                b = rng.choice(free)
                a.take(b)
                used.add(b)
                held.append(b)
        _check_buddy(a, used)
    for b in held:
        a.free(b)
    _check_buddy(a, {0} if reserve else set())
    assert a.free_count == n - (1 if reserve else 0)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from("atf"), st.integers(1, 5), st.integers(0, 10**6)), max_size=80),
    uncached_first=st.booleans(),
)
def test_free_queue_matches_a_list_model(ops, uncached_first):
    n = 12
    q = allocators.FreeQueue(n, uncached_first=uncached_first)
    model = list(range(n))
    held = []
    for op, k, pick in ops:
        if op == "a":
            got = q.alloc(k)
            if k > len(model):
                assert got is None
                continue
            assert got == model[:k]
            del model[:k]
            held += got
        elif op == "t" and model:
            b = model.pop(pick % len(model))
            q.take(b)
            held.append(b)
        elif op == "f" and held:
            batch = [held.pop(pick % len(held)) for _ in range(min(k, len(held)))]
            cached = [(b + pick) % 2 == 0 for b in batch]
            q.free_many(batch, cached)
            if uncached_first:
                model[:0] = [b for b, c in zip(batch, cached) if not c]
                model += [b for b, c in zip(batch, cached) if c]
            else:
                model += batch
        assert list(q.queue) == model and q.free_count == len(model)
        assert {b for b in range(n) if q.free_mask[b]} == set(model)


# -- the command line --------------------------------------------------------------------------------------
def test_cli_table_and_json(tmp_path):
    out = tmp_path / "w.json"
    r = run_kvprof(
        "whatif",
        os.path.join(FIXTURES, "demo.kvprof"),
        "--block-size",
        "16,32",
        "--policy",
        "free-queue,buddy",
        "--recovery",
        "preempt,seeds",
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert "equals analyze" in r.stdout and "Blocks needed" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["schema"] == "kvprof.analysis/1"
    w = doc["sections"]["whatif"]
    # free-queue: one row per size; buddy: one per size and recovery
    assert [(x["block_size"], x["policy"], x["recovery"]) for x in w["rows"]] == [
        (16, "free-queue", "n/a"),
        (16, "buddy", "preempt"),
        (16, "buddy", "seeds"),
        (32, "free-queue", "n/a"),
        (32, "buddy", "preempt"),
        (32, "buddy", "seeds"),
    ]
    assert [x["num_blocks"] for x in w["rows"]] == [256, 256, 256, 128, 128, 128]  # the recorded KV memory
    from kvprof import metrics

    for row in w["rows"] + w["blocks_needed"]:
        assert set(row["metrics"]) <= set(metrics.REGISTRY), set(row["metrics"]) - set(metrics.REGISTRY)
    assert w["rows"][0]["recorded"] and not w["rows"][3]["recorded"]


@pytest.mark.slow
def test_cli_capacity_options(tmp_path):
    demo = os.path.join(FIXTURES, "demo.kvprof")
    r = run_kvprof(
        "whatif", demo, "--block-size", "16", "--kv-memory", "1MiB", "--bytes-per-token", "1024", "--json", "-"
    )
    assert r.returncode == 0, r.stderr
    w = json.loads(r.stdout)["sections"]["whatif"]
    assert w["rows"][0]["num_blocks"] == 64  # 1 MiB / (16 tokens x 1 KiB)
    assert w["advice"]["closed_form_block_size"] == pytest.approx((2 * w["advice"]["mean_length"] * 64 / 1024) ** 0.5)
    r = run_kvprof("whatif", demo, "--num-blocks", "unlimited", "--json", "-")
    w = json.loads(r.stdout)["sections"]["whatif"]
    assert w["rows"] == [] and len(w["blocks_needed"]) == 5


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--policy", "worst-fit"], "--policy: unknown worst-fit"),
        (["--block-size", "16,x"], "--block-size: not a list of numbers"),
        (["--num-blocks", "1"], "--num-blocks must be at least 2"),
        (["--num-blocks", "lots"], "--num-blocks must be a number or 'unlimited'"),
        (["--kv-memory", "12XB"], "not a size"),
        (["--kv-memory", "1GiB"], "--kv-memory needs the bytes one token takes"),
        (["--recovery", "pray"], "--recovery: unknown pray"),
        (["--prefix-cache", "maybe"], "--prefix-cache must be on or off"),
        (["--pool", "nope"], "no pool 'nope'"),
        (["--metadata-bytes", "-1", "--bytes-per-token", "100"], "--metadata-bytes must be 1 or more"),
        (["--bytes-per-token", "nan"], "--bytes-per-token must be a positive number"),
        (["--bytes-per-token", "inf"], "--bytes-per-token must be a positive number"),
        (["--num-blocks", "200000000"], "--num-blocks: at most 16,777,216"),
        (["--kv-memory", "1KiB", "--bytes-per-token", "1e-300"], "more than 16,777,216 blocks"),
        (["--width", "-3"], "Invalid value for '--width': -3 is not in the range x>=40"),
        (["--json", ""], "--json needs a file name"),
        (
            ["--num-blocks", "unlimited", "--policy", "buddy"],
            "--num-blocks unlimited replays the engine's free queue only",
        ),
        (["--policy", "free-queue", "--recovery", "seeds"], "--recovery applies to the run allocators"),
    ],
)
def test_cli_bad_options_are_one_line(args, message):
    r = run_kvprof("whatif", os.path.join(FIXTURES, "demo.kvprof"), *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cli_bad_inputs(tmp_path):
    r = run_kvprof("whatif", str(tmp_path / "missing.kvprof"))
    assert r.returncode == 2 and "no such bundle" in r.stderr
    f = tmp_path / "x.json"
    f.write_text("{}")
    r = run_kvprof("whatif", str(f))
    assert r.returncode == 2 and "not a kvprof bundle" in r.stderr
    r = run_kvprof("whatif", os.path.join(FIXTURES, "crash-sigkill.kvprof"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_prefix_cache_off_replays_without_hits_and_still_checks_the_recorded_run():
    r = run_kvprof(
        "whatif", os.path.join(FIXTURES, "demo.kvprof"), "--block-size", "16", "--prefix-cache", "off", "--json", "-"
    )
    assert r.returncode == 0, r.stderr
    w = json.loads(r.stdout)["sections"]["whatif"]
    assert all(v["equal"] for v in w["fidelity"].values())  # the recorded configuration had the cache on
    (row,) = w["rows"]
    assert row["prefix_cache"] is False and row["metrics"]["blocks.prefix_cache.hit_tokens"] == 0
    m, rec = row["metrics"], {k: v["replay"] for k, v in w["fidelity"].items()}
    # nothing shared: nothing evicted, the pool fills sooner and refuses more
    assert m["blocks.evictions"] == 0 and m["blocks.peak_blocks"] == 255
    assert (
        m["blocks.allocation_failures"] > rec["blocks.allocation_failures"]
        and m["blocks.usage.time_weighted"] > rec["blocks.usage.time_weighted"]
    )


def test_a_refusal_with_no_later_state_is_replayed_from_the_blocks_the_engine_wanted(tmp_path):
    """An aborted request (or the last event of a crashed run) has no state after its refused
    allocation: the replay uses the event's own blocks-needed figure."""
    script = tmp_path / "refused.py"
    script.write_text(
        "import kvprof.blocks\n"
        "pool = kvprof.blocks.Pool(num_blocks=4, block_size=4, name='p')\n"
        "pool.request_arrived('a', prompt_tokens=12)\n"
        "pool.alloc([0, 1, 2], request='a')\n"
        "pool.request_state('a', filled_tokens=12, blocks_held=3)\n"
        "pool.request_arrived('b', prompt_tokens=8)\n"
        "pool.allocation_failed('b', 2, 1)\n"
        "pool.request_finished('b')\n"
        "pool.free([0, 1, 2], request='a')\n"
        "pool.request_finished('a')\n"
    )
    out = tmp_path / "r.kvprof"
    assert run_kvprof("record", "-q", "-o", str(out), "--", sys.executable, str(script)).returncode == 0
    w = _fidelity(out)
    assert w["fidelity"]["blocks.allocation_failures"] == {
        **w["fidelity"]["blocks.allocation_failures"],
        "analyze": 1,
        "replay": 1,
        "equal": True,
    }


@pytest.mark.slow
def test_cli_bytes_per_token_and_plain_byte_sizes():
    """--bytes-per-token reaches the rows' peak and compaction bytes, not only the advice; a
    --kv-memory in plain bytes is a size."""
    r = run_kvprof(
        "whatif",
        os.path.join(FIXTURES, "demo.kvprof"),
        "--block-size",
        "16",
        "--kv-memory",
        "1048576",
        "--bytes-per-token",
        "100",
        "--policy",
        "first-fit",
        "-j",
        "1",
        "--json",
        "-",
    )
    assert r.returncode == 0, r.stderr
    w = json.loads(r.stdout)["sections"]["whatif"]
    (row,) = [x for x in w["rows"] if x["policy"] == "first-fit" and x["recovery"] == "preempt"]
    assert row["num_blocks"] == 1048576 // (16 * 100)
    assert row["metrics"]["whatif.peak_bytes"] == row["metrics"]["blocks.peak_blocks"] * 16 * 100
