"""SGLang's real scheduler-side memory code (sglang 0.5.23: PagedTokenToKVPoolAllocator,
TokenToKVPoolAllocator, RadixCache, Req, PrefillAdder, ScheduleBatch) driven with fake
tokens under `kvprof record`: the block stream replayed gives SGLang's own free pages,
evictable and protected sizes and request-held pages before every batch, and the
prefix-cache sums equal the prefix_len of every admission the scheduler made (first
admissions and re-admissions of retracted requests apart) and PrefillAdder's own
log_hit_tokens / reprocessed_log_hit_tokens.  Needs the SGLang environment: make test-sglang."""

import json
import os

import pytest

from kvprof.trace.format import EventKind as K
from kvprof.trace.reader import Bundle
from tests.conftest import WORKLOADS, run_kvprof, sglang_python

pytestmark = pytest.mark.sglang


def record(tmp_path, *args):
    out, truth = tmp_path / "sg.kvprof", tmp_path / "truth.json"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--",
        sglang_python(),
        "-W",
        "ignore",
        os.path.join(WORKLOADS, "sglang_sched.py"),
        str(truth),
        *args,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a = run_kvprof("analyze", str(out), "--json", str(tmp_path / "a.json"), "--no-report")
    assert a.returncode == 0, a.stderr
    return Bundle(str(out)), json.loads(truth.read_text()), json.loads((tmp_path / "a.json").read_text())


def replay_check(stream, truth):
    """Replay the block events; before each batch (a STEP) the free, free-cached, in-use-and-cached
    and in-use-uncached pages equal SGLang's free pages, evictable and protected sizes and the
    pages request rows hold outside the tree."""
    snaps = {s["step"]: s for s in truth["steps"]}
    n = truth["pages"]
    ref: dict = {}
    cached: set = set()
    off = stream.offsets
    checked = 0

    def counts():
        used = {b for b, r in ref.items() if r > 0}
        return {
            "free_pages": n - len(used | cached),
            "evictable_pages": len(cached - used),
            "protected_pages": len(used & cached),
            "row_pages": len(used - cached),
        }

    for i in range(len(stream)):
        kind = int(stream.kind[i])
        ids = stream.ids[off[i] : off[i + 1]].tolist()
        if kind == K.ALLOC:
            for b in ids:
                assert ref.get(b, 0) == 0 and b not in cached, f"event {i}: alloc of page {b} in use or still cached"
                ref[b] = 1
        elif kind == K.HIT:
            for b in ids:
                assert b in cached, f"event {i}: hit on page {b} the tree does not hold"
                ref[b] = ref.get(b, 0) + 1
        elif kind == K.FREE:
            for b in ids:
                assert ref.get(b, 0) > 0, f"event {i}: free of free page {b}"
                ref[b] -= 1
        elif kind == K.CACHE:
            assert not cached & set(ids), f"event {i}: page cached twice"
            cached.update(ids)
        elif kind == K.EVICT:
            assert all(ref.get(b, 0) == 0 and b in cached for b in ids), (
                f"event {i}: evict of a page in use or not cached"
            )
            cached.difference_update(ids)
        elif kind == K.STEP:
            snap = snaps[int(stream.arg[i])]
            got = counts()
            want = {k: snap[k] for k in got}
            assert got == want, f"step {snap['step']}: replay {got} != SGLang {want}"
            checked += 1
    assert checked == len(truth["steps"]) > 0
    final = counts()
    assert final["row_pages"] == final["protected_pages"] == 0
    assert (final["free_pages"], final["evictable_pages"]) == (
        truth["final"]["free_pages"],
        truth["final"]["evictable_pages"],
    )


@pytest.mark.parametrize("page_size,pages", [(16, 64), (1, 1024)], ids=["paged", "token"])
def test_stream_replays_to_sglang_state_and_counts(tmp_path, page_size, pages):
    b, truth, analysis = record(tmp_path, "--page-size", str(page_size), "--pages", str(pages), "--requests", "60")
    print(f"page_size {page_size}:", {k: v for k, v in truth.items() if k not in ("steps", "final")})
    assert (
        truth["retractions"] > 0 and truth["readmissions"] > 0 and truth["hits"] > 0
    )  # pressure and the cache both exercised
    (proc,) = [p for p in b.processes if p.pools]
    note = proc.info["probes"]["blocks"]["engines"]["sglang"]
    assert note["version"] == "0.5.23" and note["missing"] == []
    for hook in (
        "RadixCache.insert",
        "RadixCache.inc_lock_ref",
        "RadixCache.dec_lock_ref",
        "RadixCache.evict",
        "PrefillAdder.add_one_req",
        "ScheduleBatch.prepare_for_extend",
        "ScheduleBatch.prepare_for_decode",
        "PagedTokenToKVPoolAllocator.alloc_extend" if page_size > 1 else "TokenToKVPoolAllocator.free",
    ):
        assert hook in note["attached"]
    s = b.block_stream()
    assert [(p.name, p.num_blocks, p.block_size) for p in s.pools] == [("sglang", pages + 1, page_size)]
    replay_check(s, truth)

    m = {k: v["value"] for k, v in analysis["metrics"].items()}
    # the prefix_len of every admission the scheduler made, first admissions and re-admissions apart
    assert (
        m["blocks.prefix_cache.query_tokens"] == truth["queries"]
        and m["blocks.prefix_cache.hit_tokens"] == truth["hits"]
    )
    assert m["blocks.prefix_cache.preempted_query_tokens"] == truth["preempted_queries"]
    assert m["blocks.prefix_cache.preempted_hit_tokens"] == truth["preempted_hits"]
    # ... and PrefillAdder's own counters (reprocessed_* is its count of retracted requests coming back)
    assert truth["hits"] + truth["preempted_hits"] == truth["log_hit_tokens"]
    assert truth["preempted_hits"] == truth["reprocessed_log_hit_tokens"]
    assert m["blocks.preemptions"] == truth["retractions"]
    agg = analysis["sections"]["blocks"]["aggregate"]
    assert (
        agg["refcount_errors"] == 0
        and agg["out_of_range_ids"] == 0
        and agg["leaked_blocks"] == 0
        and agg["in_use_at_end"] == 0
    )
    assert agg["reserved"] == 1 and agg["requests"] == 60 and agg["evictions"] > 0
    kinds = s.kind
    assert (kinds == K.REQ_ARRIVE).sum() == (kinds == K.REQ_FINISH).sum() == truth["finished"] == 60
    assert (kinds == K.REQ_QUERY).sum() == truth["admissions"] == 60 and (
        kinds == K.REQ_QUERY_PREEMPTED
    ).sum() == truth["readmissions"]
