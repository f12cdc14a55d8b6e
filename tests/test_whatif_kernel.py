"""The compiled what-if (kvprof/analysis/whatif_kernel.py) against the pure-Python reference
(tests/whatif_reference.py): the schedule built from chunks equals the reference's
extraction operation for operation, and every replay equals the reference's metric for
metric, on the fixtures, demo recordings of every demo free order and synthetic engines that
exercise what the demo does not (partial frees, blocks taken without a request, refusals
and preemptions, gaps of seconds, vLLM's free order).  Also: chunk boundaries anywhere,
threads, one compiled version per kernel function, the cache directory fallback."""

import os
import random
import subprocess
import sys

import numpy as np
import pytest

from kvprof.analysis import whatif as W
from kvprof.trace import chunks
from kvprof.trace.format import EventKind as K
from kvprof.trace.reader import BlockStream, Bundle
from tests import whatif_reference as R
from tests.conftest import ROOT, run_kvprof, vllm_python

FIXTURES = os.path.join(ROOT, "fixtures")


# -- a synthetic engine ------------------------------------------------------------------------------
def synthetic(seed: int, engine: str = "custom", B: int = 4, n: int = 40, steps: int = 160) -> BlockStream:
    """A small engine with a free queue, prefix sharing in three groups, refusals and
    preemptions (newest first, blocks freed before the report), sliding-window frees of a
    request's first block, blocks taken and freed without a request, queries reported
    before or after the admission's allocations, and gaps of up to 6 s between steps."""
    rng = random.Random(seed)
    ev = []
    free = list(range(1, n))  # block 0 reserved
    ref = [0] * n
    content = [None] * n  # cached content: (group, position)
    cache = {}  # (group, position) -> block
    reqs = {}  # key -> dict
    order = []  # running keys, admission order
    foreign = []
    t = 10_000
    nkeys = 0
    ev.append((t, K.RESERVE, 0, -1, 0, 0, (0,)))

    def take():
        b = free.pop(0)
        if content[b] is not None:
            cache.pop(content[b], None)
            content[b] = None
        ref[b] = 1
        return b

    def release(blocks):
        for b in blocks:
            ref[b] -= 1
            if ref[b] == 0:
                if engine == "vllm" and content[b] is None:
                    free.insert(0, b)
                else:
                    free.append(b)

    def drop(k, why):
        q = reqs[k]
        blocks = [b for b in reversed(q["tab"]) if b is not None]
        if blocks:
            ev.append((t, K.FREE, 0, k, 0, 0, tuple(blocks)))
        release(blocks)
        ev.append((t, why, 0, k, 0, 0, ()))
        if k in order:
            order.remove(k)

    for step in range(steps):
        t += rng.choice([1_000, 1_000, 50_000, 2_000_000, 6_000_000_000 if rng.random() < 0.05 else 3_000])
        ev.append((t, K.STEP, 0, -1, step, 0, ()))
        # arrivals
        if rng.random() < 0.5:
            k = nkeys
            nkeys += 1
            g = rng.randrange(3)
            prompt = rng.randint(1, 6 * B)
            q = {"g": g, "tab": [], "filled": 0, "prompt": prompt, "shared": rng.randint(0, 3) * B}
            reqs[k] = q
            ev.append((t, K.REQ_ARRIVE, 0, k, prompt, -1, ()))
            hits = []
            while (
                len(hits) * B < min(q["shared"], prompt - 1)
                and (g, len(hits)) in cache
                and (len(hits) + 1) * B <= prompt - 1
            ):
                hits.append(cache[(g, len(hits))])
            need = -(-prompt // B) - len(hits)
            early = rng.random() < 0.5
            if early:
                ev.append((t, K.REQ_QUERY, 0, k, prompt, len(hits) * B, ()))
            if need > len(free) - sum(1 for b in hits if ref[b] == 0):
                ev.append((t, K.ALLOC_FAIL, 0, k, need, len(free), ()))
                ev.append((t, K.REQ_FINISH, 0, k, 0, 0, ()))  # given up
                continue
            for b in hits:
                if ref[b] == 0:
                    free.remove(b)
                ref[b] += 1
            if hits:
                ev.append((t, K.HIT, 0, k, 0, 0, tuple(hits)))
            new = [take() for _ in range(need)]
            ev.append((t, K.ALLOC, 0, k, 0, 0, tuple(new)))
            q["tab"] = hits + new
            if not early:
                ev.append((t, K.REQ_QUERY, 0, k, prompt, len(hits) * B, ()))
            full = [
                (j, b)
                for j, b in enumerate(q["tab"])
                if (j + 1) * B <= prompt and content[b] is None and j * B < q["shared"]
            ]
            for j, b in full:
                if (g, j) not in cache:
                    cache[(g, j)] = b
                    content[b] = (g, j)
            if full:
                ev.append((t, K.CACHE, 0, k, 0, 0, tuple(b for _, b in full)))
            q["filled"] = prompt
            ev.append((t, K.REQ_STATE, 0, k, prompt, len(q["tab"]), ()))
            order.append(k)
        # decode one token each
        for k in list(order):
            if k not in order:
                continue
            q = reqs[k]
            if q["filled"] + 1 > len(q["tab"]) * B:
                if not free:
                    ev.append((t, K.ALLOC_FAIL, 0, k, 1, 0, ()))
                    victim = order[-1]
                    drop(victim, K.REQ_PREEMPT)
                    reqs[victim]["tab"] = []
                    reqs[victim]["filled"] = 0
                    continue
                b = take()
                ev.append((t, K.ALLOC, 0, k, 0, 0, (b,)))
                q["tab"].append(b)
            q["filled"] += 1
            ev.append((t, K.REQ_STATE, 0, k, q["filled"], len(q["tab"]), ()))
            if (
                rng.random() < 0.04 and len(q["tab"]) > 2 and q["tab"][0] is not None
            ):  # a sliding window drops the first block
                ev.append((t, K.FREE, 0, k, 0, 0, (q["tab"][0],)))
                release([q["tab"][0]])
                q["tab"][0] = None
            if rng.random() < 0.08:
                drop(k, K.REQ_FINISH)
        # blocks without a request
        if rng.random() < 0.05 and free:
            b = take()
            foreign.append(b)
            ev.append((t, K.ALLOC, 0, -1, 0, 0, (b,)))
        if rng.random() < 0.05 and foreign:
            b = foreign.pop(0)
            ev.append((t, K.FREE, 0, -1, 0, 0, (b,)))
            release([b])
        if rng.random() < 0.02:
            ev.append((t, K.EVICT, 0, -1, 0, 0, ()))
    t += 1000
    for k in list(order):
        drop(k, K.REQ_FINISH)
    return BlockStream.from_events(
        ev, [{"num_blocks": n, "block_size": B, "engine": engine}], [f"r{i}" for i in range(max(nkeys, 1))]
    )


# -- the schedule ------------------------------------------------------------------------------------
def as_tuples(s: W.Schedule) -> list:
    """The compiled schedule in the reference's tuple form."""
    from kvprof.analysis import whatif_kernel as KK

    out = []
    key = s.request_keys
    t = s.t_start
    pc = 0
    pending = None
    for i in range(len(s.code)):
        c = int(s.code[i])
        dt, r, a, b = (int(x) for x in s.ops[i])
        if c == KK.OP_TIME:
            t += (a << 32) + (dt & 0xFFFFFFFF)
            continue
        t += dt & 0xFFFFFFFF
        if c == KK.OP_NOP:
            continue
        rk = int(key[r])
        if pending is not None:  # a decision takes the time of the free it precedes
            out.append((KK.OP_PREEMPT, t, pending, True))
            pending = None
        if c == KK.OP_STEP:
            out.append((c, t))
        elif c == KK.OP_QUERY:
            out.append((c, t, rk, a))
        elif c == KK.OP_LOOKUP:
            out.append((c, t, rk, a, int(s.payload[pc])))
            pc += 1
        elif c == KK.OP_GROW:
            target, hint = int(s.payload[pc]), int(s.payload[pc + 1])
            pc += 2
            out.append((c, t, rk, target if target >= 0 else a * s.block_size, a, hint))
        elif c in (KK.OP_CACHE, KK.OP_FREE):
            pos = tuple(int(x) for x in s.payload[pc : pc + b])
            pc += b
            out.append((c, t, rk, a, pos) if c == KK.OP_CACHE else (c, t, rk, pos, bool(a)))
        elif c == KK.OP_STATE:
            out.append((c, t, rk, a, b))
        elif c == KK.OP_PREEMPT:
            if a:
                pending = rk
            else:
                out.append((c, t, rk, False))
        elif c == KK.OP_FINISH:
            out.append((c, t, rk))
        elif c == KK.OP_FAIL:
            out.append((c, t, rk, int(s.payload[pc]), int(s.payload[pc + 1]), a))
            pc += 2
        elif c in (KK.OP_FALLOC, KK.OP_FFREE):
            out.append((c, t, tuple(int(x) for x in s.payload[pc : pc + b])))
            pc += b
    assert pc == len(s.payload)
    return out


def _classes(s: W.Schedule) -> dict:
    out = {}
    for r in range(len(s.request_keys)):
        for j in range(int(s.class_off[r + 1] - s.class_off[r])):
            out[(int(s.request_keys[r]), j)] = int(s.class_of[s.class_off[r] + j])
    return out


def assert_same_schedule(new: W.Schedule, ref) -> None:
    assert as_tuples(new) == ref.ops
    assert sorted(new.final_lengths.tolist()) == sorted(ref.final_lengths)
    assert (new.t_start, new.t_end, new.requests, new.prefix_caching, new.reserved_ids, new.unsupported) == (
        ref.t_start,
        ref.t_end,
        ref.requests,
        ref.prefix_caching,
        ref.reserved_ids,
        ref.unsupported,
    )
    # the same content classes: the same nodes, grouped the same way
    cls = _classes(new)
    assert set(cls) == set(ref.content)
    pairs = {(cls[node], ref.content[node]) for node in cls}
    assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


def _bundles(tmp_path_factory):
    """The fixtures and demo recordings of every demo free order (recorded once per session)."""
    out = [os.path.join(FIXTURES, "demo.kvprof"), os.path.join(FIXTURES, "demo-leak.kvprof")]
    d = tmp_path_factory.mktemp("demos")
    for i, args in enumerate(
        [
            ["--free-order", "lifo", "--num-blocks", "90"],
            ["--free-order", "lowest-id", "--block-size", "32", "--num-blocks", "60"],
            ["--block-size", "8", "--num-blocks", "300", "--prefix-share", "0.9", "--seed", "2"],
            ["--no-prefix-cache", "--num-blocks", "120"],
        ]
    ):
        path = d / f"d{i}.kvprof"
        r = run_kvprof(
            "record",
            "-q",
            "-o",
            str(path),
            "--",
            sys.executable,
            "-m",
            "kvprof.demo",
            "--requests",
            "120",
            "--seed",
            "5",
            *args,
        )
        assert r.returncode == 0, r.stderr
        out.append(str(path))
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return _bundles(tmp_path_factory)


def _streams(bundles):
    for path in bundles:
        s = Bundle(path).block_stream()
        yield os.path.basename(path), s, W.pick_pool(s, None).index
    for seed, engine in ((1, "custom"), (2, "vllm"), (3, "custom"), (4, "vllm")):
        yield f"synthetic-{seed}-{engine}", synthetic(seed, engine), 0


@pytest.mark.slow
def test_the_schedule_equals_the_reference_extraction(bundles):
    for name, stream, pool in _streams(bundles):
        assert_same_schedule(W.extract(stream, pool), R.extract(stream, pool)), name


@pytest.mark.slow
@pytest.mark.parametrize("chunk_events", [1, 3, 64])
def test_chunk_boundaries_do_not_matter(bundles, chunk_events):
    """Pending patches, decision slots and groups cross chunk boundaries: any cut gives the
    same schedule (a single event per chunk splits even a run of equal times, which the
    reader never does)."""
    for name, stream, pool in list(_streams(bundles))[-3:]:
        whole = W.extract(stream, pool)
        b = W.ScheduleBuilder(stream.pools[pool])
        for c in chunks.from_stream(stream, [pool], chunk_events=chunk_events):
            b.feed(c)
        part = b.finish()
        for f in ("code", "ops", "payload", "class_off", "class_of", "max_tokens", "final_lengths", "request_keys"):
            assert np.array_equal(getattr(whole, f), getattr(part, f)), (name, f)


def test_other_pools_in_a_chunk_are_skipped():
    a, b = synthetic(7), synthetic(8)
    ev = []
    for pool, s in ((0, a), (1, b)):
        off = s.offsets
        for i in range(len(s.t)):
            ev.append(
                (
                    int(s.t[i]),
                    int(s.kind[i]),
                    pool,
                    int(s.req[i]) + (1000 if pool and s.req[i] >= 0 else 0),
                    int(s.arg[i]),
                    int(s.arg2[i]),
                    tuple(int(x) for x in s.ids[off[i] : off[i + 1]]),
                )
            )
    ev.sort(key=lambda e: e[0])
    both = BlockStream.from_events(ev, [{"num_blocks": 40, "block_size": 4}] * 2)
    builder = W.ScheduleBuilder(both.pools[1])
    for c in chunks.from_stream(both):  # all pools' events
        builder.feed(c)
    mixed, alone = builder.finish(), W.extract(b, 0)
    assert np.array_equal(mixed.code, alone.code) and np.array_equal(mixed.payload, alone.payload)
    assert np.array_equal(mixed.ops[:, [0, 2, 3]], alone.ops[:, [0, 2, 3]])


# -- the replay ----------------------------------------------------------------------------------------
def _configs(sched) -> list:
    B0, n0 = sched.block_size, sched.num_blocks
    out = [W.Config(B0, n0)]
    for B in sorted({B0 // 2 or 1, B0, B0 * 2}):
        n = max(n0 * B0 // B, 2)
        out.append(W.Config(B, W.UNLIMITED))
        out.append(W.Config(B, n, "free-queue", "preempt", False))
        for pol in ("free-queue", "first-fit", "best-fit", "buddy"):
            for rec in ("preempt", "seeds") if pol != "free-queue" else ("preempt",):
                out.append(W.Config(B, n, pol, rec))
                out.append(W.Config(B, max(n // 3, 2), pol, rec))
    return out


@pytest.mark.slow
def test_the_compiled_replay_equals_the_reference(bundles):
    checked = 0
    for name, stream, pool in _streams(bundles):
        new, ref = W.extract(stream, pool), R.extract(stream, pool)
        for cfg in _configs(new):
            got, want = W.replay(new, cfg).metrics, R.replay(ref, cfg)
            assert got == want, (name, cfg, {k: (got[k], want[k]) for k in want if got[k] != want[k]})
            checked += 1
    assert checked > 300


@pytest.mark.slow
def test_threads_give_what_one_after_another_gives(bundles):
    from kvprof.analysis import whatif_kernel as KK

    assert KK.replay.targetoptions["nogil"]  # the threads replay at once, on as many cores
    s = W.extract(Bundle(bundles[2]).block_stream(), 0)
    configs = _configs(s)[:12]
    assert [r.metrics for r in W.replay_many(s, configs, jobs=1)] == [
        r.metrics for r in W.replay_many(s, configs, jobs=3)
    ]


@pytest.mark.slow
def test_each_kernel_function_is_compiled_once(bundles):
    """Literal arguments compile a version of their own per value (and int32 against int64
    another): the kernels cast every scalar they pass, so that each compiles once."""
    from kvprof.analysis import whatif_kernel as KK

    for _, stream, pool in list(_streams(bundles))[:3]:
        s = W.extract(stream, pool)
        for cfg in _configs(s)[:20]:
            W.replay(s, cfg)
    many = {
        name: len(f.signatures) for name, f in vars(KK).items() if hasattr(f, "signatures") and len(f.signatures) > 1
    }
    assert not many, many


# -- the cache directory ----------------------------------------------------------------------------
def test_an_unwritable_cache_falls_back_to_the_temporary_directory(monkeypatch, tmp_path):
    from kvprof.analysis import whatif_kernel as KK

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setattr(KK, "_writable", lambda d: d.startswith(str(tmp_path)))
    monkeypatch.setattr(KK.tempfile, "gettempdir", lambda: str(tmp_path))
    chosen = KK.cache_dir_fallback()
    assert chosen and chosen.startswith(str(tmp_path)) and os.environ["NUMBA_CACHE_DIR"] == chosen
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/somewhere")  # the user's choice stands
    assert KK.cache_dir_fallback() is None


@pytest.mark.slow
def test_kernels_still_run_where_no_cache_can_be_written(tmp_path):
    """A cache directory that cannot be created (a path under a file): the kernels compile
    and run all the same (numba skips the cache; where it refuses ``cache=True`` outright,
    whatif_kernel.jit compiles without it)."""
    code = (
        "from kvprof.analysis import whatif_kernel as K\n"
        "import numpy as np\n"
        "keys = np.full(16, -1, np.int64)\n"
        "print(K._c32(np.int64(5)), K.hm_find(keys, np.int64(3)) < 0, int(K.jit(lambda a: a.sum() + 1)(np.arange(4))))\n"
    )
    (tmp_path / "file").write_text("not a directory")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "file" / "dir"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["5", "True", "7"], r.stderr


@pytest.mark.slow
def test_a_compiled_kernel_is_cached(bundles):
    """After a replay, its kernel's cache index exists: later processes load, not compile
    (and kvprof says it compiles only when an index is missing)."""
    from kvprof.analysis import whatif_kernel as KK

    s = W.extract(Bundle(bundles[0]).block_stream(), 0)
    W.replay(s, W.Config(s.block_size, s.num_blocks))
    assert not KK.cache_is_cold(KK.build_chunk, KK.replay)


@pytest.mark.vllm
def test_the_compiled_replay_equals_the_reference_on_a_real_vllm_run(tmp_path):
    """vLLM 0.32's own bundle (uncached blocks reused first, the null block reserved,
    preemptions and refusals): schedule and every configuration equal the reference.
    Slow: `make test-vllm`."""
    from tests.conftest import WORKLOADS

    bundle = tmp_path / "v.kvprof"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(bundle),
        "--",
        vllm_python(),
        os.path.join(WORKLOADS, "vllm_tiny.py"),
        str(tmp_path / "t.json"),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    stream = Bundle(str(bundle)).block_stream()
    pool = W.pick_pool(stream, None).index
    new, ref = W.extract(stream, pool), R.extract(stream, pool)
    assert new.engine == "vllm" and new.free_order() == (True, "fifo")
    assert_same_schedule(new, ref)
    for cfg in _configs(new):
        got, want = W.replay(new, cfg).metrics, R.replay(ref, cfg)
        assert got == want, (cfg, {k: (got[k], want[k]) for k in want if got[k] != want[k]})


def test_the_analysis_engine_s_way_gives_what_run_gives():
    """The engine feeds one builder per pool during its own pass, picks the pool, and runs
    the report's replays with analyze's figures: the section equals W.run's."""
    from kvprof.analysis import block_metrics
    from kvprof.analysis.blocks import analyze_blocks

    stream = Bundle(os.path.join(FIXTURES, "demo.kvprof")).block_stream()
    builders = [W.ScheduleBuilder(info) for info in stream.pools]
    for chunk in chunks.from_stream(stream):  # every pool's events, as the engine reads them
        for b in builders:
            b.feed(chunk)
    sched = W.pick_schedule([b.finish() for b in builders], None)
    info = W.pick_pool(stream, None)
    assert sched.pool == info.label
    entries: dict = {}
    block_metrics(entries, analyze_blocks(stream, [info.index]), 1, None)
    analyzed = {k: v["value"] for k, v in entries.items()}
    opts = W.WhatifOptions(unlimited=True, jobs=None)
    got, want = W.run_schedule(sched, opts, analyzed), W.run(stream, opts)
    got.pop("seconds"), want.pop("seconds")
    assert got == want and all(f["equal"] for f in got["fidelity"].values())
    with pytest.raises(ValueError, match="no pool 'nope'"):
        W.pick_schedule([sched], "nope")
    assert W.pick_schedule([sched], sched.pool.rsplit("@", 1)[0]) is sched
