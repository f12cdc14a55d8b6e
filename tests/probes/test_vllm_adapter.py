"""The vLLM adapter's BlockPool hooks on a test double (no vLLM needed): lazy batches,
the null block, blocks forwarded between pools, completeness of the stream."""

import json
import os
import sys

import numpy as np

from kvprof.trace.format import EventKind as K
from kvprof.trace.reader import Bundle
from tests.conftest import ROOT, WORKLOADS, run_kvprof

DOUBLES = os.path.join(ROOT, "tests", "doubles")


def _record(tmp_path, iters):
    out = tmp_path / "double.kvprof"
    env = {"PYTHONPATH": DOUBLES + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--",
        sys.executable,
        os.path.join(WORKLOADS, "vllm_double.py"),
        str(iters),
        env=env,
    )
    assert r.returncode == 0, r.stderr
    return Bundle(str(out))


def test_every_block_event_of_the_double_is_recorded(tmp_path):
    iters = 3000  # 3 events per iteration (+1 on forwarding ones): several LAZY_BATCH batches
    b = _record(tmp_path, iters)
    s = b.block_stream()
    assert [p.name for p in s.pools] == ["vllm", "vllm"]
    assert [p.num_blocks for p in s.pools] == [64, 16]
    note = b.processes[0].info["probes"]["blocks"]["engines"]["vllm"]
    assert note["version"] == "0.0.test"
    assert {"BlockPool.get_new_blocks", "BlockPool.touch", "BlockPool.free_blocks"} <= set(note["attached"])
    assert "BlockPool.cache_full_blocks" in note["missing"]  # reported, not fatal
    off = s.offsets
    per_event = [s.ids[off[i] : off[i + 1]] for i in range(len(s))]
    a_ev = s.pool == 0
    kinds = s.kind[a_ev]
    assert (kinds == K.RESERVE).sum() == 1 and (s.kind == K.RESERVE).sum() == 2
    assert (kinds == K.ALLOC).sum() == iters
    assert (kinds == K.HIT).sum() == iters
    assert (kinds == K.FREE).sum() == 2 * iters
    # the null block (id 0) is reserved once and never appears in a state change
    for i in np.flatnonzero(s.kind != K.RESERVE):
        assert 0 not in per_event[i].tolist()
    assert all(len(per_event[i]) == 2 for i in np.flatnonzero(a_ev & (s.kind == K.HIT)))
    # forwarded blocks: freed in pool b, never in a's FREE events
    b_free = np.flatnonzero((s.pool == 1) & (s.kind == K.FREE))
    assert len(b_free) == iters // 100
    a_free_sizes = sorted({len(per_event[i]) for i in np.flatnonzero(a_ev & (s.kind == K.FREE))})
    assert a_free_sizes == [2, 4]
    # time order, and every allocated block freed: nothing leaks, in both pools
    assert (np.diff(s.t) >= 0).all()
    r = run_kvprof("analyze", str(tmp_path / "double.kvprof"), "--json", str(tmp_path / "a.json"))
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "a.json").read_text())["metrics"]
    assert m["blocks.leaked_blocks"]["value"] == 0
    # one per block: alloc 4 + hit 2 + free 2 + free 4, and pool b's 2 + 2 every 100th (reserve is no change)
    assert m["blocks.events"]["value"] == iters * (4 + 2 + 2 + 4) + (iters // 100) * 4
