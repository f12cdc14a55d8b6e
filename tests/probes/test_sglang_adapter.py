"""The SGLang adapter on a double of SGLang's memory layer (tests/doubles/sglang: a paged
allocator and a radix cache with lock references, node splits and LRU eviction), in the default
suite; the real SGLang is tested by make test-sglang.  The stream replayed at each marker gives
the double's free, evictable and protected pages."""

import json
import os
import sys

from kvprof.trace.format import EventKind as K
from kvprof.trace.reader import Bundle
from tests.conftest import ROOT, WORKLOADS, run_kvprof

DOUBLE = os.path.join(ROOT, "tests", "doubles", "sglang")


def test_stream_replays_to_the_doubles_pages(tmp_path):
    out, truth_path = tmp_path / "sd.kvprof", tmp_path / "truth.json"
    env = {"PYTHONPATH": DOUBLE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--",
        sys.executable,
        os.path.join(WORKLOADS, "sglang_double.py"),
        str(truth_path),
        env=env,
    )
    assert r.returncode == 0, r.stderr
    truth = json.loads(truth_path.read_text())
    b = Bundle(str(out))
    note = b.processes[0].info["probes"]["blocks"]["engines"]["sglang"]
    assert note["version"] == "0.0.test" and note["missing"] == [] and not b.processes[0].info.get("errors")
    assert {
        "PagedTokenToKVPoolAllocator.alloc",
        "PagedTokenToKVPoolAllocator._release_page_ids",
        "RadixCache.insert",
        "RadixCache.inc_lock_ref",
        "RadixCache.dec_lock_ref",
        "RadixCache.evict",
        "RadixCache.checkpoint",
    } <= set(note["attached"])
    s = b.block_stream()
    assert [(p.name, p.num_blocks, p.block_size) for p in s.pools] == [("sglang", 25, 4)]
    marks = b.marks()
    state_id = marks.names.index("state")
    mt = marks.t[marks.name == state_id]
    ref: dict = {}
    cached: set = set()
    off = s.offsets
    i = 0
    counts = {"hit": 0, "evict": 0}
    for j, t in enumerate(mt):  # block events up to each marker, then the double's state
        while i < len(s) and s.t[i] <= t:
            kind, ids = int(s.kind[i]), s.ids[off[i] : off[i + 1]].tolist()
            if kind == K.ALLOC:
                assert all(ref.get(p, 0) == 0 and p not in cached for p in ids), f"event {i}"
                ref.update({p: 1 for p in ids})
            elif kind == K.HIT:
                assert all(p in cached for p in ids), f"event {i}"
                for p in ids:
                    ref[p] = ref.get(p, 0) + 1
                counts["hit"] += 1
            elif kind == K.FREE:
                assert all(ref.get(p, 0) > 0 for p in ids), f"event {i}"
                for p in ids:
                    ref[p] -= 1
            elif kind == K.CACHE:
                cached.update(ids)
            elif kind == K.EVICT:
                assert all(ref.get(p, 0) == 0 for p in ids), f"event {i}"
                cached.difference_update(ids)
                counts["evict"] += 1
            i += 1
        used = {p for p, r in ref.items() if r > 0}
        got = {
            "free_pages": truth["pages"] - len(used | cached),
            "evictable_pages": len(cached - used),
            "protected_pages": len(used & cached),
        }
        assert got == truth["snaps"][j], f"marker {j}: replay {got} != double {truth['snaps'][j]}"
    assert len(mt) == len(truth["snaps"]) > 40 and counts["hit"] > 0 and counts["evict"] > 0
