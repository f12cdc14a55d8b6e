"""The columnar snapshot analysis gives the figures the entry-by-entry one gave: every metric of
the real snapshots as it was before the rewrite, and the Python and numpy replays of the trace
(and the two ways of putting call sites together) equal on real, repeated and generated traces."""

import dataclasses
import os
import sys

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from kvprof.analysis.torch_memory import snapshot_section
from kvprof.analysis.torch_memory import analyze_snapshot
from kvprof.trace import torch_snapshot as T
from tests.conftest import ROOT

SNAPS = os.path.join(ROOT, "fixtures", "torch-snapshots")

# `kvprof analyze --json` metrics of the real snapshots before the columnar rewrite (commit 0110395)
BEFORE = {
    "assignment2-systems.pickle": {
        "torch.segments": 216,
        "torch.reserved_bytes": 14180941824,
        "torch.allocated_bytes": 1377753600,
        "torch.requested_bytes": 1373919236,
        "torch.pending_free_bytes": 0,
        "torch.rounding_waste_bytes": 3834364,
        "torch.cached_free_bytes": 12803188224,
        "torch.total_free_bytes": 12807022588,
        "torch.internal_free_ratio": 0.0002993954272863347,
        "torch.external_fragmentation": 0.9742835254594786,
        "torch.largest_free_block_bytes": 329252864,
        "torch.ooms": 0,
        "torch.fragmentation_ooms": 0,
        "torch.leaked_bytes": 327680004,
        "torch.allocations": 1721,
        "torch.allocated_bytes_total": 58890300607,
        "torch.allocations_per_second": 6934.455095273208,
        "torch.short_lived_allocations": 149,
    },
    "docubox.pickle": {
        "torch.segments": 12,
        "torch.reserved_bytes": 109051904,
        "torch.allocated_bytes": 90861056,
        "torch.requested_bytes": 90861056,
        "torch.pending_free_bytes": 0,
        "torch.rounding_waste_bytes": 0,
        "torch.cached_free_bytes": 18190848,
        "torch.total_free_bytes": 18190848,
        "torch.internal_free_ratio": 0.0,
        "torch.external_fragmentation": 0.36592642629964256,
        "torch.largest_free_block_bytes": 11534336,
        "torch.ooms": 0,
        "torch.fragmentation_ooms": 0,
        "torch.leaked_bytes": None,
        "torch.allocations": 0,
        "torch.allocated_bytes_total": 0,
        "torch.allocations_per_second": None,
        "torch.short_lived_allocations": 0,
    },
    "sketchkv2.pickle": {
        "torch.segments": 259,
        "torch.reserved_bytes": 17133731840,
        "torch.allocated_bytes": 16397578240,
        "torch.requested_bytes": 16380108168,
        "torch.pending_free_bytes": 0,
        "torch.rounding_waste_bytes": 17470072,
        "torch.cached_free_bytes": 736153600,
        "torch.total_free_bytes": 753623672,
        "torch.internal_free_ratio": 0.02318142681696442,
        "torch.external_fragmentation": 0.3846598970649604,
        "torch.largest_free_block_bytes": 452984832,
        "torch.ooms": 0,
        "torch.fragmentation_ooms": 0,
        "torch.leaked_bytes": 0,
        "torch.allocations": 0,
        "torch.allocated_bytes_total": 0,
        "torch.allocations_per_second": None,
        "torch.short_lived_allocations": 0,
    },
}


def _both(snap) -> dict:
    """The analysis with the Python replay; asserts the numpy replay gives the very same."""
    a = dataclasses.asdict(analyze_snapshot(snap, use_numpy=False))
    b = dataclasses.asdict(analyze_snapshot(snap, use_numpy=True))
    assert a == b
    assert repr(a) == repr(b)  # the same types too (an int stays an int)
    return a


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_every_metric_is_what_it_was(name):
    snap = T.loads(open(os.path.join(SNAPS, name), "rb").read(), name)
    for use_numpy in (False, True):
        metrics = snapshot_section(analyze_snapshot(snap, use_numpy=use_numpy), source=name).metrics
        assert {k: v["value"] for k, v in metrics.items()} == BEFORE[name]
    _both(snap)


def test_call_sites_the_same_both_ways(monkeypatch):
    import numpy  # noqa: F401 - the numpy way needs it imported

    data = open(os.path.join(SNAPS, "assignment2-systems.pickle"), "rb").read()
    monkeypatch.setattr(T, "CALL_SITES_NUMPY", 10**9)
    c = T.loads(data)["columns"]
    slow = (list(c.alloc_stack), c.stacks)
    monkeypatch.setattr(T, "CALL_SITES_NUMPY", 1)
    c = T.loads(data)["columns"]
    assert (list(c.alloc_stack), c.stacks) == slow
    assert (
        slow[1][0]
        == "forward (model.py:54) < _call_impl (module.py:1790) < _wrapped_call_impl (module.py:1779) < forward (model.py:245)"
    )


def test_the_benchmarks_repeated_trace_is_consistent(tmp_path):
    """benchmarks/bench_torch_snapshot.py repeats a real trace: every copy but the last frees
    what it allocates, so the repeated trace leaks what the original leaks, at the same sites."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from bench_torch_snapshot import build_repeated
    finally:
        sys.path.pop(0)
    orig = _both(T.loads(open(os.path.join(SNAPS, "assignment2-systems.pickle"), "rb").read()))
    for share in (False, True):
        path = tmp_path / f"rep-{share}.pickle"
        n = build_repeated(str(path), 25_000, share_frames=share)
        a = _both(T.load(str(path)))
        copies = (n - 5163) // 5157
        assert a["trace_entries"] == n == 5163 + copies * 5157 and copies == 4
        assert a["alloc_count"] == 1721 + copies * 1719
        assert (a["leaked_bytes"], a["leaks_by_stack"]) == (orig["leaked_bytes"], orig["leaks_by_stack"])
        assert a["reserved"] == orig["reserved"] and a["timeline"]["reserved"][-1] == orig["reserved"]
        assert a["timeline"]["t_us"][-1] == orig["timeline"]["t_us"][-1]


# -- generated traces: the two replays agree ----------------------------------------------------
ACTIONS = [
    "alloc",
    "alloc",
    "alloc",
    "free_requested",
    "free_completed",
    "free_completed",
    "free",
    "segment_alloc",
    "segment_free",
    "segment_map",
    "segment_unmap",
    "oom",
    "snapshot",
    "other",
]


@st.composite
def snapshots(draw):
    sites = [[{"name": f"f{i}", "filename": f"/p/m{i % 3}.py", "line": i} for i in range(k)] for k in range(6)]
    segs = []
    for s in range(draw(st.integers(0, 4))):
        blocks = [
            {
                "size": draw(st.sampled_from([512, 1 << 20, 2 << 20, 3 << 20])),
                "state": draw(st.sampled_from(["active_allocated", "inactive", "active_pending_free"])),
                "requested_size": draw(st.integers(0, 3 << 20)),
                "frames": [],
            }
            for _ in range(draw(st.integers(0, 5)))
        ]
        segs.append(
            {
                "device": draw(st.integers(0, 1)),
                "address": s << 32,
                "total_size": sum(b["size"] for b in blocks) + draw(st.sampled_from([0, 512])),
                "stream": draw(st.sampled_from([0, 7])),
                "segment_type": draw(st.sampled_from(["large", "small"])),
                "segment_pool_id": draw(st.sampled_from([(0, 0), (1, 0)])),
                "blocks": blocks,
            }
        )
    floats = draw(st.booleans())
    traces = []
    for _ in range(draw(st.integers(0, 3))):
        entries, t = [], draw(st.integers(0, 50))
        for _ in range(draw(st.integers(0, 120))):
            t += draw(st.sampled_from([0, 1, 7]))
            e = {
                "action": draw(st.sampled_from(ACTIONS)),
                "addr": draw(st.integers(0, 6)),
                "size": draw(st.sampled_from([0, 100, 1 << 20, 5 << 20])),
                "stream": draw(st.sampled_from([0, 7])),
                "frames": draw(st.sampled_from(sites)),
            }
            when = draw(st.integers(0, 9))
            if when < 8:
                e["time_us"] = t + 0.5 if floats else t
            elif when == 8:
                e["time_us"] = None
            if e["action"] == "oom":
                e["device_free"] = draw(st.integers(-1, 1 << 30))
            entries.append(e)
        traces.append(entries)
    return {
        "segments": segs,
        "device_traces": traces,
        "allocator_settings": {"expandable_segments": draw(st.booleans())},
    }


@pytest.mark.slow
@seed(20261201)
@settings(
    max_examples=int(os.environ.get("KVPROF_FUZZ_EXAMPLES", "60")),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(snapshots())
def test_python_and_numpy_replays_agree(snap):
    _both(T.normalize(snap))


def test_timeline_is_thinned_the_same_way():
    """More steps than the timeline keeps (2,000): the same points, peaks and last point."""
    trace = []
    for i in range(6000):
        trace.append(
            {"action": "alloc", "addr": i, "size": 1 + (i * 7919) % 1000, "stream": 0, "time_us": i, "frames": []}
        )
        if i % 3:
            trace.append(
                {
                    "action": "free_requested",
                    "addr": i - 1,
                    "size": 1 + ((i - 1) * 7919) % 1000,
                    "stream": 0,
                    "time_us": i,
                    "frames": [],
                }
            )
    a = _both(T.normalize({"segments": [], "device_traces": [trace]}))
    assert 2000 <= len(a["timeline"]["t_us"]) <= 2003
