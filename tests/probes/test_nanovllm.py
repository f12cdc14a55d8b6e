"""nano-vllm adapter against nano-vllm's real engine code (PyPI nano-vllm-fork, the
December 2025 API) and the 2026 API double: the recorded stream, replayed, gives
the engine's own used and cached blocks at every step, and the prefix-cache and
preemption counts the engine shows."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from kvprof.trace.format import EventKind as K
from kvprof.trace.reader import Bundle
from tests.conftest import WORKLOADS, run_kvprof

APIS = [
    pytest.param(
        "2025-12",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("nanovllm") is None, reason="nano-vllm-fork not installed (make install)"
        ),
    ),
    "2026",
]


def replay_check(stream, truth):
    """Replay block events; at each STEP compare with the engine's snapshot."""
    snaps = {s["step"]: s for s in truth["steps"]}
    ref: dict[int, int] = {}
    cached: set[int] = set()
    off = stream.offsets
    checked = 0
    for i in range(len(stream)):
        kind = int(stream.kind[i])
        ids = stream.ids[off[i] : off[i + 1]].tolist()
        if kind == K.ALLOC:
            for b in ids:
                assert ref.get(b, 0) == 0, f"event {i}: alloc of in-use block {b}"
                ref[b] = 1
                cached.discard(b)
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
            assert sorted(b for b, r in ref.items() if r > 0) == snap["used"], (
                f"step {snap['step']}: used blocks differ"
            )
            assert sorted(cached) == snap["cached"], f"step {snap['step']}: cached blocks differ"
            checked += 1
    assert checked == len(truth["steps"])
    assert sorted(b for b, r in ref.items() if r > 0) == truth["final_used"] == []


@pytest.mark.slow
@pytest.mark.parametrize("api", APIS)
def test_stream_replays_to_the_engine_state(tmp_path, api):
    out, truth_path = tmp_path / "nv.kvprof", tmp_path / "truth.json"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--",
        sys.executable,
        os.path.join(WORKLOADS, "nanovllm_sched.py"),
        str(truth_path),
        "--api",
        api,
        "--requests",
        "30",
        "--blocks",
        "20",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    truth = json.loads(truth_path.read_text())
    assert truth["preemptions"] > 0 and truth["hits"] > 0  # the run exercises pressure and the cache
    b = Bundle(str(out))
    note = b.processes[0].info["probes"]["blocks"]["engines"]["nano-vllm"]
    assert note["api"] == api and note["missing"] == []
    if api == "2025-12":
        assert note["version"].startswith("nano-vllm-fork ")
    s = b.block_stream()
    assert [(p.name, p.num_blocks, p.block_size) for p in s.pools] == [("nano-vllm", 20, 256)]
    replay_check(s, truth)

    r = run_kvprof("analyze", str(out), "--json", str(tmp_path / "a.json"))
    assert r.returncode == 0, r.stderr
    m = {k: v["value"] for k, v in json.loads((tmp_path / "a.json").read_text())["metrics"].items()}
    assert m["blocks.prefix_cache.query_tokens"] == truth["queries"]
    assert m["blocks.prefix_cache.hit_tokens"] == truth["hits"]
    assert m["blocks.prefix_cache.preempted_query_tokens"] == truth["preempted_queries"]
    assert m["blocks.prefix_cache.preempted_hit_tokens"] == truth["preempted_hits"]
    assert m["blocks.preemptions"] == truth["preemptions"]
    assert m["blocks.leaked_blocks"] == 0
    assert m["blocks.evictions"] > 0
    # every request arrived, had its tokens reported, and finished
    kinds = s.kind
    assert (kinds == K.REQ_ARRIVE).sum() == (kinds == K.REQ_FINISH).sum() == truth["finished"] == 30
    assert (kinds == K.REQ_STATE).sum() > 0 and np.all(s.arg[kinds == K.REQ_STATE] > 0)


@pytest.mark.slow
@pytest.mark.parametrize("api", APIS)
def test_readmission_lookups_are_counted_apart(tmp_path, api):
    """40 blocks of 256 tokens, 80 requests: preempted sequences come back and find part of
    their prefix still cached.  Those lookups are REQ_QUERY_PREEMPTED, one per re-admission,
    and kvprof's preempted_* sums equal the engine's own (2025-12, seed 0: 7 preemptions, 2,560
    of 5,303 tokens found on re-admission; first admissions 25,088 of 57,599)."""
    out, truth_path = tmp_path / "nv.kvprof", tmp_path / "truth.json"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--",
        sys.executable,
        os.path.join(WORKLOADS, "nanovllm_sched.py"),
        str(truth_path),
        "--api",
        api,
        "--requests",
        "80",
        "--blocks",
        "40",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    truth = json.loads(truth_path.read_text())
    assert truth["readmissions"] > 0 and truth["preempted_hits"] > 0
    s = Bundle(str(out)).block_stream()
    pre = s.kind == K.REQ_QUERY_PREEMPTED
    assert int(pre.sum()) == truth["readmissions"]
    assert int(s.arg[pre].sum()) == truth["preempted_queries"] and int(s.arg2[pre].sum()) == truth["preempted_hits"]
    assert int((s.kind == K.REQ_QUERY).sum()) == 80  # one first lookup per request, never a second
    r = run_kvprof("analyze", str(out), "--json", str(tmp_path / "a.json"))
    assert r.returncode == 0, r.stderr
    analysis = json.loads((tmp_path / "a.json").read_text())
    m = {k: v["value"] for k, v in analysis["metrics"].items()}
    print(
        api,
        "engine:",
        {
            k: truth[k]
            for k in ("preemptions", "readmissions", "queries", "hits", "preempted_queries", "preempted_hits")
        },
    )
    assert m["blocks.preemptions"] == truth["preemptions"]
    assert (
        m["blocks.prefix_cache.query_tokens"] == truth["queries"]
        and m["blocks.prefix_cache.hit_tokens"] == truth["hits"]
    )
    assert m["blocks.prefix_cache.preempted_query_tokens"] == truth["preempted_queries"]
    assert m["blocks.prefix_cache.preempted_hit_tokens"] == truth["preempted_hits"]
    assert m["blocks.prefix_cache.preempted_hit_rate"] == pytest.approx(
        truth["preempted_hits"] / truth["preempted_queries"]
    )
    # re-admissions that find less than half their tokens while the cache evicts: the finding
    recomputed = [f for f in analysis["findings"] if f["title"].startswith("Preempted requests recomputed")]
    assert bool(recomputed) == (
        truth["preempted_hits"] < 0.5 * truth["preempted_queries"] and m["blocks.evictions"] > 0
    )
    if api == "2025-12":  # the real engine code, seed 0
        assert (truth["preemptions"], truth["hits"], truth["preempted_hits"], truth["preempted_queries"]) == (
            7,
            25088,
            2560,
            5303,
        )
        assert recomputed and recomputed[0]["evidence"]["recomputed_tokens"] == 5303 - 2560
