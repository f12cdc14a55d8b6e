"""PyTorch CUDA memory snapshots: safe loading, accounting against PyTorch's own tool,
hand-made cases for every format and finding, hostile pickles."""

import json
import os
import pickle
import re
import subprocess
import sys

import pytest

from kvprof.analysis.torch_memory import analyze_snapshot
from kvprof.errors import BundleError
from kvprof.trace.torch_snapshot import loads, normalize
from tests.conftest import ROOT, run_kvprof

SNAPS = os.path.join(ROOT, "fixtures", "torch-snapshots")
FILES = ["assignment2-systems.pickle", "docubox.pickle", "sketchkv2.pickle"]


def torch_size(num: float) -> str:
    """PyTorch's _memory_viz size format."""
    for unit in ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "Zi"]:
        if abs(num) < 1024.0:
            return f"{num:3.1f}{unit}B"
        num /= 1024.0
    return f"{num:.1f}YiB"


def truth() -> dict:
    out, cur = {}, None
    for line in open(os.path.join(SNAPS, "stats.txt")):
        if line.startswith("== "):
            cur = out.setdefault(line[3:].strip(), {})
        elif ":" in line:
            k, v = line.split(":", 1)
            cur[k] = v.strip()
    return out


@pytest.mark.parametrize("name", FILES)
def test_totals_equal_pytorchs_memory_viz_stats(name, tmp_path):
    r = run_kvprof("analyze", os.path.join(SNAPS, name), "--json", str(tmp_path / "a.json"), "--no-report")
    assert r.returncode == 0, r.stderr
    m = {k: v["value"] for k, v in json.loads((tmp_path / "a.json").read_text())["metrics"].items()}
    t = truth()[name]
    assert str(m["torch.segments"]) == t["segments"]
    assert torch_size(m["torch.reserved_bytes"]) == t["total_reserved"]
    assert torch_size(m["torch.requested_bytes"]) == t["total_allocated"]  # torch's "allocated" is the requested bytes
    internal = 100 * m["torch.internal_free_ratio"]
    assert f"{torch_size(m['torch.total_free_bytes'])} ({internal:.1f}% internal)" == t["total_free"]
    # the contract's own identity: reserved = requested + rounding + cached slack + pending
    assert m["torch.reserved_bytes"] == m["torch.requested_bytes"] + m["torch.rounding_waste_bytes"] + m["torch.cached_free_bytes"] + m["torch.pending_free_bytes"]


def _torch_python():
    exe = os.environ.get("KVPROF_TORCH_PYTHON")
    if exe:
        return exe
    try:
        import torch  # noqa: F401

        return sys.executable
    except ImportError:
        return None


@pytest.mark.skipif(_torch_python() is None, reason="torch not installed (set KVPROF_TORCH_PYTHON to a Python with torch)")
@pytest.mark.parametrize("name", FILES)
def test_every_segment_line_equals_pytorchs_live(name):
    """Where torch is installed: PyTorch's tool, run now, per segment and in total."""
    path = os.path.join(SNAPS, name)
    r = subprocess.run([_torch_python(), "-m", "torch.cuda._memory_viz", "stats", path], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    theirs = [l for l in r.stdout.splitlines() if re.match(r"^\[.*\] .* allocated, .* free", l)]
    snap = loads(open(path, "rb").read())
    mine = []
    for s in sorted(snap["segments"], key=lambda s: (s["total_size"], sum(b["size"] for b in s["blocks"] if b["state"] == "active_allocated"))):
        if s["total_size"] < 20 * 2**20:
            continue
        req = sum(b["requested_size"] for b in s["blocks"] if b["state"] == "active_allocated")
        rounding = sum(b["size"] - b["requested_size"] for b in s["blocks"] if b["state"] == "active_allocated")
        free = s["total_size"] - req
        pct = f" ({100 * rounding / free:.1f}% internal)" if free else ""
        stream = f" stream_{s['stream']}" if s["stream"] else ""
        mine.append(f"{torch_size(s['total_size'])} allocated, {torch_size(free)}{pct} free{stream}")
    assert [l.split("] ", 1)[1] for l in theirs] == mine


# -- hand-made snapshots: every format and every finding -------------------------------------
MiB = 2**20


def seg(blocks, stream=0, total=None, kind="large", address=0x1000, **extra):
    total = total if total is not None else sum(b["size"] for b in blocks)
    return {"device": 0, "address": address, "total_size": total, "stream": stream, "segment_type": kind, "segment_pool_id": (0, 0), "blocks": blocks, **extra}


def blk(size, state="active_allocated", req=None, frames=None):
    return {"size": size, "requested_size": size if req is None else req, "state": state, "frames": frames or []}


def test_accounting_with_pending_free_and_rounding():
    snap = normalize({"segments": [
        seg([blk(10 * MiB, req=9 * MiB), blk(4 * MiB, "active_pending_free"), blk(2 * MiB, "inactive"), blk(8 * MiB, "inactive")]),
        seg([blk(6 * MiB, "inactive")], stream=7, address=0x9000),
    ]})
    a = analyze_snapshot(snap)
    assert (a.reserved, a.allocated, a.requested) == (30 * MiB, 10 * MiB, 9 * MiB)
    assert (a.rounding_waste, a.pending_free, a.cached_free) == (1 * MiB, 4 * MiB, 16 * MiB)
    assert a.total_free == 21 * MiB and a.internal_free_ratio == pytest.approx(1 / 21)
    assert a.largest_inactive == 8 * MiB and a.external_fragmentation == pytest.approx(1 - 8 / 16)
    by_scope = {p.scope: p for p in a.pools}
    assert by_scope["device 0 stream 0 large pool (0, 0)"].external_fragmentation == pytest.approx(0.2)  # 8 of 10
    assert by_scope["device 0 stream 7 large pool (0, 0)"].external_fragmentation == 0.0


def test_legacy_formats_load():
    # the oldest: a bare list of segments, blocks with `history` instead of frames/requested_size
    legacy = [{"total_size": 4 * MiB, "stream": 0, "blocks": [
        {"size": 3 * MiB, "state": "active_allocated", "history": [{"real_size": 2 * MiB + 5, "frames": [{"name": "f", "filename": "a.py", "line": 3}]}]},
        {"size": 1 * MiB, "state": "inactive"},
    ]}]
    data = pickle.dumps(legacy, protocol=2)
    a = analyze_snapshot(loads(data))
    assert (a.requested, a.rounding_waste, a.cached_free) == (2 * MiB + 5, MiB - 5, MiB)
    # trace entries without time_us, and protocol 5
    snap = {"segments": [seg([blk(MiB)])], "device_traces": [[{"action": "alloc", "addr": 1, "size": MiB}, {"action": "free_completed", "addr": 1, "size": MiB}]]}
    a = analyze_snapshot(loads(pickle.dumps(snap, protocol=5)))
    assert a.alloc_count == 1 and a.leaked_bytes == 0 and a.trace_span_us is None and a.timeline["t_us"] == []


def _trace(*entries):
    return [[{"action": a, "addr": addr, "size": size, "stream": 0, "time_us": t, "frames": [{"name": site, "filename": "m.py", "line": 1}]}
             for (a, addr, size, t, site) in entries]]


def test_fragmentation_oom_and_real_oom():
    pieces = [blk(4 * MiB, "inactive"), blk(MiB), blk(4 * MiB, "inactive"), blk(MiB), blk(4 * MiB, "inactive")]
    snap = normalize({"segments": [seg(pieces)], "device_traces": _trace(("oom", 0, 10 * MiB, 5, "x"), ("oom", 0, 20 * MiB, 6, "y")),
                      "allocator_settings": {"expandable_segments": False}})
    a = analyze_snapshot(snap)
    frag, real = a.ooms
    assert frag.fragmentation_oom and (frag.inactive_bytes, frag.largest_inactive) == (12 * MiB, 4 * MiB) and frag.state_at == "oom"
    assert not real.fragmentation_oom  # 20 MiB > 12 MiB free in total: a real OOM
    assert a.advice and "expandable_segments:True" in a.advice[0]["setting"] and "10.0 MiB requested" in a.advice[0]["why"]


def test_leaks_churn_short_lived_and_timeline():
    snap = normalize({"segments": [seg([blk(2 * MiB), blk(6 * MiB, "inactive")], total=8 * MiB)],
                      "device_traces": _trace(
                          ("segment_alloc", 0x1000, 8 * MiB, 0, "s"),
                          ("alloc", 1, MiB, 10, "temp"),
                          ("free_requested", 1, MiB, 11, "temp"),  # freed before the next allocation: short-lived
                          ("free_completed", 1, MiB, 12, "temp"),
                          ("alloc", 2, 2 * MiB, 20, "kept"),  # never freed: still allocated at the end
                          ("alloc", 3, MiB, 30, "temp"),
                          ("free_completed", 3, MiB, 40, "temp"),  # old format: no free_requested
                      )})
    a = analyze_snapshot(snap)
    assert a.alloc_count == 3 and a.alloc_bytes == 4 * MiB
    assert a.leaked_bytes == 2 * MiB and a.leaks_by_stack[0].stack.startswith("kept")
    assert a.short_lived == 2 and a.churn_by_stack[0].count == 2 and a.churn_by_stack[0].median_lifetime_us == 5.5
    # rebuilt backwards from the snapshot's totals: 2 MiB allocated and 8 MiB reserved at the end
    assert a.timeline["t_us"] == [0, 10, 11, 20, 30, 40]
    assert a.timeline["requested"] == [0, MiB, 0, 2 * MiB, 3 * MiB, 2 * MiB]
    assert a.timeline["reserved"] == [8 * MiB] * 6


# -- hostile and broken input ------------------------------------------------------------------
def _reduce_pickle(marker, protocol):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps({"segments": [], "x": Evil()}, protocol=protocol)


def test_hostile_pickles_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    cases = {f"reduce-p{p}": _reduce_pickle(marker, p) for p in (2, 3, 4, 5)}  # GLOBAL / STACK_GLOBAL + REDUCE
    cases["inst"] = b"\x80\x02(S'touch " + str(marker).encode() + b"'\nios\nsystem\n."  # INST opcode
    cases["obj"] = b"\x80\x02cos\nsystem\n(S'touch " + str(marker).encode() + b"'\no."  # GLOBAL then OBJ
    cases["persid"] = b"\x80\x02P1\n."
    cases["ext"] = b"\x80\x02\x82\x01."  # EXT1: the copyreg extension registry
    for name, data in cases.items():
        p = tmp_path / f"{name}.pickle"
        p.write_bytes(data)
        r = run_kvprof("analyze", str(p))
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and str(p) in r.stderr, (name, r.stderr)
        assert not marker.exists(), name
    assert "refused" in run_kvprof("analyze", str(tmp_path / "reduce-p4.pickle")).stderr


def test_broken_snapshots_give_one_line(tmp_path):
    good = open(os.path.join(SNAPS, "docubox.pickle"), "rb").read()
    cases = {
        "truncated": good[: len(good) // 2],
        "protocol0": pickle.dumps({"segments": []}, protocol=0),
        "toplevel-int": pickle.dumps(42, protocol=4),
        "toplevel-str": pickle.dumps("segments", protocol=4),
        "no-segments": pickle.dumps({"blocks": []}, protocol=4),
        "bad-segment": pickle.dumps({"segments": [{"total_size": "big", "blocks": []}]}, protocol=4),
        "bad-trace": pickle.dumps({"segments": [], "device_traces": [[{"addr": 1}]]}, protocol=4),
        "empty": b"",
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.pickle"
        p.write_bytes(data)
        r = run_kvprof("analyze", str(p))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (name, r.stderr)
    with pytest.raises(BundleError, match="truncated"):
        loads(good[:-3])


def test_report_and_compare_on_snapshots(tmp_path):
    r = run_kvprof("analyze", os.path.join(SNAPS, "assignment2-systems.pickle"), "--width", "100")
    assert r.returncode == 0, r.stderr
    for text in ("PyTorch CUDA allocator", "13.2 GiB", "external fragmentation 97.4%", "Still allocated at the end of the trace", "expandable_segments"):
        assert text in r.stdout, text
    r = run_kvprof("compare", os.path.join(SNAPS, "docubox.pickle"), os.path.join(SNAPS, "sketchkv2.pickle"), "--json", "-")
    rows = {x["name"]: x for x in json.loads(r.stdout)["rows"]}
    assert r.returncode == 1 and rows["torch.reserved_bytes"]["verdict"] == "fail"
    assert "torch" not in sys.modules  # analysis never imported torch in this process either


def _seg(blocks, total=2 << 20):
    return {"device": 0, "address": 1 << 40, "total_size": total, "stream": 0, "segment_type": "large", "blocks": blocks}


def test_structure_bombs_are_refused_in_one_line(tmp_path):
    """Plain data can still hurt: a tuple key nested 200,000 deep overflows the C stack while
    the unpickler hashes it (a segfault no exception catches); one big list referenced many
    times through the memo stands for billions of blocks; a number of thousands of digits is
    not a size.  Each is refused before the analysis, in one line."""
    deep = b"\x80\x02}" + b")" + b"\x85" * 200_000 + b"K\x01s."
    blk = {"size": 1 << 20, "state": "inactive", "requested_size": 0}
    shared = [blk] * 100_000
    bomb = pickle.dumps({"segments": [_seg(shared)] * 1000}, protocol=4)
    assert len(bomb) < 2_000_000
    cases = {
        "deep.pickle": (deep, "nests containers more than 32 deep"),
        "bomb.pickle": (bomb, "more than 50,000,000 blocks and trace entries"),
        "huge.pickle": (pickle.dumps({"segments": [_seg([], total=10**5000)]}, protocol=2), "a number of 16610 bits"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        r = run_kvprof("analyze", str(path), timeout=60)
        assert r.returncode == 2 and message in r.stderr, (name, r.returncode, r.stderr[-500:])
        assert len(r.stderr.strip().splitlines()) == 1


def test_odd_settings_and_frames_are_kept_as_plain_data(tmp_path):
    """allocator_settings and frames pass through to JSON and reports: a settings dict that
    contains itself, bytes keys, or a frame whose name is not a string must not break them."""
    settings = {"expandable_segments": False, b"raw": 1, "nested": {"a": [1, 2, {"b": 3}]}}
    settings["self"] = settings
    blk = {"size": 1 << 20, "state": "active_allocated", "requested_size": 1 << 20,
           "frames": [{"filename": "x.py", "line": 3, "name": ("not", "a", "str")}]}
    path = tmp_path / "odd.pickle"
    path.write_bytes(pickle.dumps({"segments": [_seg([blk, {"size": 1 << 20, "state": "inactive"}])], "allocator_settings": settings}, protocol=4))
    r = run_kvprof("analyze", str(path), "--json", "-")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["metrics"]["torch.reserved_bytes"]["value"] == 2 << 20
    assert run_kvprof("report", str(path), "-o", str(tmp_path / "odd.html")).returncode == 0


def test_oom_diagnosis_looks_at_the_pool_that_serves_the_request():
    """A 3 MiB request is served by the large pool only: 1.5 MiB free in small-pool pieces
    beside 2.5 MiB in the large pool does not make it a fragmentation OOM; a private pool's
    free blocks do not count either; the state is 'oom' when only another device moved after."""
    MiB = 1 << 20

    def seg(addr, kind, blocks, pool=(0, 0), dev=0):
        return {"device": dev, "address": addr, "total_size": sum(b["size"] for b in blocks), "stream": 0, "segment_type": kind,
                "segment_pool_id": pool, "blocks": blocks}

    free = lambda n: {"size": n, "state": "inactive"}  # noqa: E731
    used = lambda n: {"size": n, "state": "active_allocated", "requested_size": n}  # noqa: E731
    oom = {"action": "oom", "addr": 0, "size": 3 * MiB, "stream": 0, "time_us": 100, "device_free": 0, "frames": []}
    small = [seg(1 << 30, "small", [used(MiB // 2), free(3 * MiB // 4), used(MiB // 4), free(3 * MiB // 4)])]
    large = [seg(1 << 31, "large", [used(4 * MiB), free(5 * MiB // 2)])]
    a = analyze_snapshot(normalize({"segments": small + large, "device_traces": [[oom]]}))
    (o,) = a.ooms
    assert not o.fragmentation_oom and o.inactive_bytes == 5 * MiB // 2
    # the same free bytes in pieces of the large pool: a fragmentation OOM
    a = analyze_snapshot(normalize({"segments": [seg(1 << 31, "large", [free(2 * MiB), used(MiB), free(2 * MiB)])], "device_traces": [[oom]]}))
    assert a.ooms[0].fragmentation_oom
    # a private pool's free blocks do not serve the default pool's request
    priv = [seg(1 << 32, "large", [free(4 * MiB), used(MiB), free(4 * MiB)], pool=(1, 0))]
    a = analyze_snapshot(normalize({"segments": priv + large, "device_traces": [[oom]]}))
    assert not a.ooms[0].fragmentation_oom and a.ooms[0].inactive_bytes == 5 * MiB // 2
    # device 1 allocating after device 0's OOM leaves device 0 as it was at the OOM
    other = {"action": "alloc", "addr": 1 << 33, "size": MiB, "stream": 0, "time_us": 150, "frames": []}
    a = analyze_snapshot(normalize({"segments": large + [seg(1 << 33, "large", [used(MiB)], dev=1)], "device_traces": [[oom], [other]]}))
    assert a.ooms[0].state_at == "oom"


def test_timeline_merges_devices_in_time_and_counts_requested_bytes():
    MiB = 1 << 20
    A = 1 << 28

    def seg(dev):
        return {"device": dev, "address": A, "total_size": 20 * MiB, "stream": 0, "segment_type": "large",
                "blocks": [{"address": A, "size": 20 * MiB, "requested_size": 20 * MiB - 3, "state": "active_allocated"}]}

    def ev(action, t, size=20 * MiB):
        return {"action": action, "addr": A, "size": size, "stream": 0, "time_us": t, "frames": []}

    snap = {"segments": [seg(0), seg(1)],
            "device_traces": [[ev("segment_alloc", 10), ev("alloc", 20, 20 * MiB - 3)], [ev("segment_alloc", 5), ev("alloc", 15, 20 * MiB - 3)]]}
    tl = analyze_snapshot(normalize(snap)).timeline
    assert tl["t_us"] == [5, 10, 15, 20]
    assert tl["reserved"] == [20 * MiB, 40 * MiB, 40 * MiB, 40 * MiB]
    assert tl["requested"] == [0, 0, 20 * MiB - 3, 40 * MiB - 6]  # from zero: the trace's sizes are the requested ones


def test_segment_map_of_blocks_without_addresses():
    """The oldest format has no block addresses: blocks are laid out from the segment's start."""
    from kvprof.analysis.timeseries import segment_layout

    snap = normalize([{"address": 1 << 30, "total_size": 3 << 20, "stream": 0, "segment_type": "small",
                       "blocks": [{"size": 1 << 20, "state": "active_allocated"}, {"size": 2 << 20, "state": "inactive"}]}])
    (seg,) = segment_layout(snap)
    assert seg["blocks"] == [[0, 1 << 20, "active_allocated"], [1 << 20, 2 << 20, "inactive"]] and seg["pool"] == "small"


def test_files_mistaken_for_snapshots_are_named(tmp_path):
    zipped, empty = tmp_path / "model.pt", tmp_path / "empty.pickle"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    empty.write_bytes(b"")
    for cmd in (["analyze"], ["compare", os.path.join(ROOT, "fixtures", "demo.kvprof")]):
        r = run_kvprof(*cmd, str(zipped))
        assert r.returncode == 2 and "a zip archive, as torch.save writes" in r.stderr, r.stderr
        r = run_kvprof(*cmd, str(empty))
        assert r.returncode == 2 and "(an empty file)" in r.stderr, r.stderr
