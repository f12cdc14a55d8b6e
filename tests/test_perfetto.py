"""kvprof export --format perfetto: the JSON follows the Chrome trace-event format as
Perfetto's importer reads it, its counters agree with analyze, every clock starts at its own
origin, and snapshot OOMs and gc collections are kept."""

import json
import os
import pickle
import sys

import pytest

from tests.conftest import ROOT, WORKLOADS, analyze_json, run_kvprof

pytestmark = pytest.mark.slow  # records gc, heap and demo runs to export (make test-quick leaves it out)

FIXTURES = os.path.join(ROOT, "fixtures")


def _validate_trace_events(doc):
    """The Chrome trace-event format (the JSON Object form), as Perfetto's importer reads it."""
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list) and doc.get("displayTimeUnit") in ("ms", "ns")
    for e in doc["traceEvents"]:
        assert isinstance(e["name"], str) and e["name"], e
        assert e["ph"] in ("M", "C", "i", "X"), e
        assert isinstance(e["pid"], int) and isinstance(e.get("tid", 0), int), e
        if e["ph"] == "M":
            assert e["name"] == "process_name" and isinstance(e["args"]["name"], str)
            continue
        assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0, e
        if e["ph"] == "C":
            assert e["args"] and all(isinstance(v, (int, float)) for v in e["args"].values()), e
        elif e["ph"] == "i":
            assert e["s"] in ("g", "p", "t"), e
        elif e["ph"] == "X":
            assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0, e


def test_perfetto_export(tmp_path):
    out = tmp_path / "demo.json"
    r = run_kvprof("export", os.path.join(FIXTURES, "demo.kvprof"), "--format", "perfetto", "-o", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    _validate_trace_events(doc)
    ev = doc["traceEvents"]
    counters = [e for e in ev if e["ph"] == "C" and e["name"].startswith("KV blocks demo")]
    a = analyze_json(os.path.join(FIXTURES, "demo.kvprof"))
    agg = a["sections"]["blocks"]["aggregate"]
    # the counter track keeps the watermark and the pool's size
    assert max(e["args"]["in use"] for e in counters) == agg["peak_blocks"]
    assert all(e["args"]["in use"] + e["args"]["free-cached"] + e["args"]["free"] == agg["capacity"] for e in counters)
    assert sum(1 for e in ev if e["name"].startswith("preempt")) == agg["preemptions"]
    assert {e["name"] for e in ev if e["ph"] == "i" and e.get("s") == "t"} == {"steady_state", "drained"}


def test_perfetto_export_of_gc_heap_and_a_snapshot(tmp_path):
    bundle = tmp_path / "g.kvprof"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(bundle),
        "--probe",
        "gc,tracemalloc",
        "--",
        sys.executable,
        os.path.join(WORKLOADS, "gc_cycles.py"),
        str(tmp_path / "t.json"),
        "100",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    r = run_kvprof("export", str(bundle), "-o", "-")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    _validate_trace_events(doc)
    a = analyze_json(str(bundle))
    assert (
        sum(1 for e in doc["traceEvents"] if e["ph"] == "X" and e["name"].startswith("gc gen"))
        == a["sections"]["gc"]["collections"]
    )
    # the heap counter: one sample per tracemalloc snapshot, the same live bytes analyze reads
    (tm,) = [p["tracemalloc"] for p in a["sections"]["heap"]["processes"]]
    heap = [e["args"]["live"] for e in doc["traceEvents"] if e["name"] == "heap live bytes (tracemalloc)"]
    assert len(heap) == tm["snapshots"] > 10 and max(heap) == max(v for _, v in tm["series"]) > 0
    snap = os.path.join(FIXTURES, "torch-snapshots", "assignment2-systems.pickle")
    r = run_kvprof("export", snap, "-o", "-")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    _validate_trace_events(doc)
    # the snapshot's counter is analyze's (thinned) timeline, point for point, from 0
    tl = analyze_json(snap)["sections"]["torch"]["timeline"]
    mem = [e for e in doc["traceEvents"] if e["name"] == "torch memory"]
    assert len(mem) == len(tl["t_us"]) > 1000
    assert [e["args"]["requested"] for e in mem] == tl["requested"] and [e["args"]["reserved"] for e in mem] == tl[
        "reserved"
    ]
    assert [e["ts"] for e in mem] == [t - tl["t_us"][0] for t in tl["t_us"]]


def test_perfetto_puts_each_clock_at_its_own_origin(tmp_path):
    """The demo's pool runs on a simulated clock, the gc probe on the monotonic one: both
    start near 0 in the export instead of hours apart."""
    bundle = tmp_path / "d.kvprof"
    r = run_kvprof(
        "record", "-q", "-o", str(bundle), "--probe", "blocks,gc", "-m", "kvprof.demo", "--", "--requests", "200"
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(run_kvprof("export", str(bundle), "-o", "-").stdout)
    _validate_trace_events(doc)
    ev = doc["traceEvents"]
    kv = [
        e["ts"]
        for e in ev
        if e["ph"] == "C" and e["name"].startswith("KV blocks demo") and e["name"].endswith("(simulated clock)")
    ]
    gc = [e["ts"] for e in ev if e["ph"] == "X"]
    assert kv and gc and min(kv) < 1e6 and min(gc) < 60e6 and max(gc) < 600e6
    marks = {e["name"]: e["ts"] for e in ev if e["ph"] == "i" and e.get("s") == "t"}
    assert marks["drained"] == pytest.approx(max(kv), abs=1e5)  # the pool's own markers are on its clock


def test_perfetto_keeps_every_snapshot_oom(tmp_path):
    seg = {
        "device": 0,
        "address": 1 << 40,
        "total_size": 2 << 20,
        "stream": 0,
        "segment_type": "large",
        "allocated_size": 1 << 20,
        "active_size": 1 << 20,
        "blocks": [
            {"size": 1 << 20, "state": "active_allocated", "requested_size": 1 << 20},
            {"size": 1 << 20, "state": "inactive"},
        ],
    }
    oom = {"action": "oom", "addr": 0, "size": 8 << 20, "stream": 0, "device_free": 0, "frames": []}
    cases = {
        "only": [dict(oom, time_us=1000)],
        "at0": [
            {"action": "alloc", "addr": 1 << 40, "size": 1 << 20, "stream": 0, "time_us": 0, "frames": []},
            dict(oom, time_us=0),
            {
                "action": "alloc",
                "addr": (1 << 40) + (1 << 20),
                "size": 1 << 19,
                "stream": 0,
                "time_us": 500,
                "frames": [],
            },
        ],
    }
    for name, trace in cases.items():
        path = tmp_path / f"{name}.pickle"
        path.write_bytes(pickle.dumps({"segments": [seg], "device_traces": [trace]}, protocol=4))
        doc = json.loads(run_kvprof("export", str(path), "-o", "-").stdout)
        _validate_trace_events(doc)
        (o,) = [e for e in doc["traceEvents"] if e["name"] == "OOM"]
        assert o["ts"] == 0.0 and o["args"]["requested"] == 8 << 20, (name, o)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["export", os.path.join(FIXTURES, "demo.kvprof"), "--format", "speedscope", "-o", "x.json"],
            "--format must be perfetto",
        ),
        (["export", "nope.kvprof", "-o", "x.json"], "no such file or bundle"),
    ],
)
def test_bad_export_input_is_one_line(tmp_path, args, message):
    r = run_kvprof(*args, cwd=str(tmp_path))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
