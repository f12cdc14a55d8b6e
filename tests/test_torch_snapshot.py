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
    assert (
        m["torch.reserved_bytes"]
        == m["torch.requested_bytes"]
        + m["torch.rounding_waste_bytes"]
        + m["torch.cached_free_bytes"]
        + m["torch.pending_free_bytes"]
    )


def _torch_python():
    exe = os.environ.get("KVPROF_TORCH_PYTHON")
    if exe:
        return exe
    try:
        import torch  # noqa: F401

        return sys.executable
    except ImportError:
        return None


@pytest.mark.skipif(
    _torch_python() is None, reason="torch not installed (set KVPROF_TORCH_PYTHON to a Python with torch)"
)
@pytest.mark.parametrize("name", FILES)
def test_every_segment_line_equals_pytorchs_live(name):
    """Where torch is installed: PyTorch's tool, run now, per segment and in total."""
    path = os.path.join(SNAPS, name)
    r = subprocess.run(
        [_torch_python(), "-m", "torch.cuda._memory_viz", "stats", path], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    theirs = [ln for ln in r.stdout.splitlines() if re.match(r"^\[.*\] .* allocated, .* free", ln)]
    snap = loads(open(path, "rb").read())
    mine = []
    for s in sorted(
        snap["segments"],
        key=lambda s: (s["total_size"], sum(b["size"] for b in s["blocks"] if b["state"] == "active_allocated")),
    ):
        if s["total_size"] < 20 * 2**20:
            continue
        req = sum(b["requested_size"] for b in s["blocks"] if b["state"] == "active_allocated")
        rounding = sum(b["size"] - b["requested_size"] for b in s["blocks"] if b["state"] == "active_allocated")
        free = s["total_size"] - req
        pct = f" ({100 * rounding / free:.1f}% internal)" if free else ""
        stream = f" stream_{s['stream']}" if s["stream"] else ""
        mine.append(f"{torch_size(s['total_size'])} allocated, {torch_size(free)}{pct} free{stream}")
    assert [ln.split("] ", 1)[1] for ln in theirs] == mine


# -- hand-made snapshots: every format and every finding -------------------------------------
MiB = 2**20


def seg(blocks, stream=0, total=None, kind="large", address=0x1000, **extra):
    total = total if total is not None else sum(b["size"] for b in blocks)
    return {
        "device": 0,
        "address": address,
        "total_size": total,
        "stream": stream,
        "segment_type": kind,
        "segment_pool_id": (0, 0),
        "blocks": blocks,
        **extra,
    }


def blk(size, state="active_allocated", req=None, frames=None):
    return {"size": size, "requested_size": size if req is None else req, "state": state, "frames": frames or []}


def test_accounting_with_pending_free_and_rounding():
    snap = normalize(
        {
            "segments": [
                seg(
                    [
                        blk(10 * MiB, req=9 * MiB),
                        blk(4 * MiB, "active_pending_free"),
                        blk(2 * MiB, "inactive"),
                        blk(8 * MiB, "inactive"),
                    ]
                ),
                seg([blk(6 * MiB, "inactive")], stream=7, address=0x9000),
            ]
        }
    )
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
    legacy = [
        {
            "total_size": 4 * MiB,
            "stream": 0,
            "blocks": [
                {
                    "size": 3 * MiB,
                    "state": "active_allocated",
                    "history": [{"real_size": 2 * MiB + 5, "frames": [{"name": "f", "filename": "a.py", "line": 3}]}],
                },
                {"size": 1 * MiB, "state": "inactive"},
            ],
        }
    ]
    data = pickle.dumps(legacy, protocol=2)
    a = analyze_snapshot(loads(data))
    assert (a.requested, a.rounding_waste, a.cached_free) == (2 * MiB + 5, MiB - 5, MiB)
    # trace entries without time_us, and protocol 5
    snap = {
        "segments": [seg([blk(MiB)])],
        "device_traces": [
            [{"action": "alloc", "addr": 1, "size": MiB}, {"action": "free_completed", "addr": 1, "size": MiB}]
        ],
    }
    a = analyze_snapshot(loads(pickle.dumps(snap, protocol=5)))
    assert a.alloc_count == 1 and a.leaked_bytes == 0 and a.trace_span_us is None and a.timeline["t_us"] == []


def _trace(*entries):
    return [
        [
            {
                "action": a,
                "addr": addr,
                "size": size,
                "stream": 0,
                "time_us": t,
                "frames": [{"name": site, "filename": "m.py", "line": 1}],
            }
            for (a, addr, size, t, site) in entries
        ]
    ]


def test_fragmentation_oom_and_real_oom():
    pieces = [blk(4 * MiB, "inactive"), blk(MiB), blk(4 * MiB, "inactive"), blk(MiB), blk(4 * MiB, "inactive")]
    snap = normalize(
        {
            "segments": [seg(pieces)],
            "device_traces": _trace(("oom", 0, 10 * MiB, 5, "x"), ("oom", 0, 20 * MiB, 6, "y")),
            "allocator_settings": {"expandable_segments": False},
        }
    )
    a = analyze_snapshot(snap)
    frag, real = a.ooms
    assert (
        frag.fragmentation_oom
        and (frag.inactive_bytes, frag.largest_inactive) == (12 * MiB, 4 * MiB)
        and frag.state_at == "oom"
    )
    assert not real.fragmentation_oom  # 20 MiB > 12 MiB free in total: a real OOM
    assert (
        a.advice and "expandable_segments:True" in a.advice[0]["setting"] and "10.0 MiB requested" in a.advice[0]["why"]
    )


def test_leaks_churn_short_lived_and_timeline():
    snap = normalize(
        {
            "segments": [seg([blk(2 * MiB), blk(6 * MiB, "inactive")], total=8 * MiB)],
            "device_traces": _trace(
                ("segment_alloc", 0x1000, 8 * MiB, 0, "s"),
                ("alloc", 1, MiB, 10, "temp"),
                ("free_requested", 1, MiB, 11, "temp"),  # freed before the next allocation: short-lived
                ("free_completed", 1, MiB, 12, "temp"),
                ("alloc", 2, 2 * MiB, 20, "kept"),  # never freed: still allocated at the end
                ("alloc", 3, MiB, 30, "temp"),
                ("free_completed", 3, MiB, 40, "temp"),  # old format: no free_requested
            ),
        }
    )
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


@pytest.mark.slow
def test_hostile_pickles_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    cases = {f"reduce-p{p}": _reduce_pickle(marker, p) for p in (2, 3, 4, 5)}  # GLOBAL / STACK_GLOBAL + REDUCE
    cases["inst"] = b"\x80\x02(S'touch " + str(marker).encode() + b"'\nios\nsystem\n."  # INST opcode
    cases["obj"] = b"\x80\x02cos\nsystem\n(S'touch " + str(marker).encode() + b"'\no."  # GLOBAL then OBJ
    cases["persid"] = b"\x80\x02P1\n."
    cases["ext"] = b"\x80\x02\x82\x01."  # EXT1: the copyreg extension registry
    cases["newline"] = b"\x80\x04\x8c\x07os\nx\ny\x94\x8c\x06system\x94\x93."  # STACK_GLOBAL, a name with newlines
    for name, data in cases.items():
        p = tmp_path / f"{name}.pickle"
        p.write_bytes(data)
        r = run_kvprof("analyze", str(p))
        assert r.returncode == 2, (name, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and str(p) in r.stderr, (name, r.stderr)
        assert not marker.exists(), name
    assert "refused" in run_kvprof("analyze", str(tmp_path / "reduce-p4.pickle")).stderr


@pytest.mark.slow
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
    for text in (
        "PyTorch CUDA allocator",
        "13.2 GiB",
        "external fragmentation 97.4%",
        "Still allocated at the end of the trace",
        "expandable_segments",
    ):
        assert text in r.stdout, text
    r = run_kvprof(
        "compare", os.path.join(SNAPS, "docubox.pickle"), os.path.join(SNAPS, "sketchkv2.pickle"), "--json", "-"
    )
    rows = {x["name"]: x for x in json.loads(r.stdout)["rows"]}
    assert r.returncode == 1 and rows["torch.reserved_bytes"]["verdict"] == "fail"
    assert "torch" not in sys.modules  # analysis never imported torch in this process either


def _seg(blocks, total=2 << 20):
    return {
        "device": 0,
        "address": 1 << 40,
        "total_size": total,
        "stream": 0,
        "segment_type": "large",
        "blocks": blocks,
    }


DEEP_KEY = b")" + b"\x85" * 200_000 + b"K\x01s."  # a tuple nested 200,000 deep as a dict key, then STOP


def _one_line_refusal(r, *texts):
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-500:])
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    for text in texts:
        assert text in r.stderr, (text, r.stderr)


def test_structure_bombs_are_refused_in_one_line(tmp_path):
    """Plain data can still hurt: a tuple key nested 200,000 deep overflows the C stack while
    the unpickler hashes it (a segfault no exception catches: the isolated reader dies, the
    CLI says so); one big list referenced many times through the memo stands for billions
    of blocks; a number of thousands of digits is not a size.  Each is refused in one line."""
    blk = {"size": 1 << 20, "state": "inactive", "requested_size": 0}
    shared = [blk] * 100_000
    bomb = pickle.dumps({"segments": [_seg(shared)] * 1000}, protocol=4)
    assert len(bomb) < 2_000_000
    cases = {
        "deep.pickle": (b"\x80\x02}" + DEEP_KEY, "crashed the isolated reader (SIGSEGV)"),
        "bomb.pickle": (
            bomb,
            "segments, blocks and trace entries (counting shared references), more than a snapshot of this size holds",
        ),
        "huge.pickle": (pickle.dumps({"segments": [_seg([], total=10**5000)]}, protocol=2), "a number of 16610 bits"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        _one_line_refusal(
            run_kvprof("analyze", str(path), timeout=60), message, "refused" if name != "huge.pickle" else "plausible"
        )


@pytest.mark.slow
def test_noop_build_before_a_deep_key_is_refused_by_every_command(tmp_path):
    """Red team: a BUILD opcode that changes nothing (state None) ahead of a 200,000-deep tuple
    key stopped the old opcode scan and segfaulted analyze, compare and report."""
    path = tmp_path / "build-deep.pickle"
    path.write_bytes(b"\x80\x02}Nb" + DEEP_KEY)
    good = os.path.join(SNAPS, "docubox.pickle")
    for args in (
        ["analyze", str(path)],
        ["compare", str(path), good],
        ["compare", good, str(path)],
        ["report", str(path), "-o", str(tmp_path / "r.html")],
        ["export", str(path), "--format", "perfetto", "-o", str(tmp_path / "t.json")],
    ):
        _one_line_refusal(run_kvprof(*args, timeout=60), str(path), "SIGSEGV", "nothing in it was run")
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "t.json").exists()


def _bundle_with_snapshot(tmp_path, data: bytes):
    """fixtures/demo.kvprof with a torch snapshot recorded by its process (as --probe torch writes it)."""
    import shutil

    out = tmp_path / "b.kvprof"
    shutil.copytree(os.path.join(ROOT, "fixtures", "demo.kvprof"), out)
    (proc,) = (out / "procs").iterdir()
    (proc / "torch").mkdir()
    (proc / "torch" / "exit.pickle").write_bytes(data)
    with open(proc / "meta.jsonl", "a") as fh:
        fh.write(
            json.dumps({"type": "torch_snapshot", "t": 1, "reason": "exit", "mark": None, "file": "torch/exit.pickle"})
            + "\n"
        )
    return out


@pytest.mark.slow
def test_a_hostile_snapshot_inside_a_bundle_is_a_note(tmp_path):
    """A bundle's snapshots go through the same loader: the deep key is one note in the torch
    section, and the rest of the bundle is analyzed (exit 0), compared and reported."""
    out = _bundle_with_snapshot(tmp_path, b"\x80\x02}Nb" + DEEP_KEY)
    r = run_kvprof("analyze", str(out), "--json", "-", timeout=120)
    assert r.returncode == 0, r.stderr[-1000:]
    doc = json.loads(r.stdout)
    (note,) = [n for n in doc["sections"]["torch"]["notes"] if "exit.pickle" in n]
    assert "SIGSEGV" in note and "unreadable" in note
    assert doc["metrics"]["blocks.peak_blocks"]["value"] > 0
    r = run_kvprof("compare", str(out), os.path.join(ROOT, "fixtures", "demo.kvprof"), "--json", "-", timeout=120)
    assert r.returncode in (0, 1) and json.loads(r.stdout)["rows"], r.stderr[-1000:]
    assert run_kvprof("report", str(out), "-o", str(tmp_path / "r.html"), timeout=300).returncode == 0


def test_a_snapshot_inside_a_bundle_is_analyzed(tmp_path):
    out = _bundle_with_snapshot(tmp_path, open(os.path.join(SNAPS, "assignment2-systems.pickle"), "rb").read())
    r = run_kvprof("analyze", str(out), "--json", "-", timeout=120)
    assert r.returncode == 0, r.stderr[-1000:]
    assert json.loads(r.stdout)["metrics"]["torch.reserved_bytes"]["value"] == 14180941824


def test_huge_int_settings_key_is_dropped(tmp_path):
    """Red team: an int of 10**5000 as an allocator_settings key gave a traceback (str() of it
    exceeds Python's digit limit); keys beyond 64 bits are dropped, the analysis goes on."""
    path = tmp_path / "key.pickle"
    path.write_bytes(
        pickle.dumps(
            {
                "segments": [_seg([{"size": 2 << 20, "state": "inactive"}])],
                "allocator_settings": {10**5000: 1, 7: "seven", "expandable_segments": True},
            },
            protocol=4,
        )
    )
    r = run_kvprof("analyze", str(path), "--json", "-")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sections"]["torch"]["allocator_settings"] == {
        "7": "seven",
        "expandable_segments": True,
    }


def test_shared_frame_lists_are_read_once(tmp_path):
    """Red team: one 100,000-frame list shared (pickle memo) by 10,000 blocks, or by 10,000
    allocations of the trace, ran the old loader to MemoryError.  Block frames are never read
    and an allocation's call site takes its first 4 frames: a correct analysis, at once."""
    sites = [{"filename": f"/src/m{k}.py", "line": k, "name": f"f{k % 3}"} for k in range(7)]
    frames = [sites[i % 7] for i in range(100_000)]
    blocks = [
        {"size": 1 << 20, "state": "active_allocated", "requested_size": 1 << 20, "frames": frames}
        for _ in range(10_000)
    ]
    trace = [
        {"action": "alloc", "addr": i << 20, "size": 1 << 20, "stream": 0, "time_us": i, "frames": frames}
        for i in range(10_000)
    ]
    path = tmp_path / "frames.pickle"
    path.write_bytes(
        pickle.dumps({"segments": [_seg(blocks, total=10_000 << 20)], "device_traces": [trace]}, protocol=4)
    )
    assert path.stat().st_size < 2_000_000
    r = run_kvprof("analyze", str(path), "--json", "-", timeout=60)
    assert r.returncode == 0, r.stderr[-500:]
    doc = json.loads(r.stdout)
    assert doc["metrics"]["torch.allocated_bytes"]["value"] == 10_000 << 20
    assert doc["metrics"]["torch.leaked_bytes"]["value"] == 10_000 << 20
    (row,) = doc["sections"]["torch"]["leaks_by_stack"]
    assert row["stack"] == "f0 (m0.py:0) < f1 (m1.py:1) < f2 (m2.py:2) < f0 (m3.py:3)" and row["count"] == 10_000


def test_shared_segment_pool_id_is_refused(tmp_path):
    """Red team: one 100,000-number segment_pool_id list shared by 10,000 segments (MemoryError
    before): a pool id is a pair of numbers; anything longer is refused in one line."""
    pool = list(range(100_000))
    segs = [dict(_seg([{"size": 2 << 20, "state": "inactive"}]), segment_pool_id=pool) for _ in range(10_000)]
    path = tmp_path / "pool.pickle"
    path.write_bytes(pickle.dumps({"segments": segs}, protocol=4))
    _one_line_refusal(
        run_kvprof("analyze", str(path), timeout=60),
        "segment 0 is malformed (segment_pool_id is not a pair of numbers)",
    )


@pytest.mark.parametrize(
    "case, message",
    [
        ("negative-total", "a negative size (-4,096) in a segment's total_size"),
        ("negative-block", "a negative size (-8,192) in a block's size"),
        ("negative-request", "a negative size (-1) in a block's requested_size"),
        ("negative-trace", "a negative size (-5) in a trace entry's size"),
        ("block-over-segment", "the blocks of segment 1 add up to 8,192 bytes, more than its total_size of 4,096"),
    ],
)
def test_impossible_sizes_are_refused(tmp_path, case, message):
    """Red team: negative sizes and blocks larger than their segment gave torch.reserved_bytes
    -4096 with exit 0.  PyTorch's sizes are unsigned and a segment's blocks tile it, so such a
    file is damaged or forged: no figure from it can be right (clamping would pick one of two
    contradicting numbers and hide that), and a CI gate must not pass on it.  Refused."""
    ok = _seg([{"size": 4096, "state": "inactive"}], total=4096)
    snap = {
        "segments": [ok, _seg([{"size": 4096, "state": "active_allocated", "requested_size": 4000}], total=4096)],
        "device_traces": [[]],
    }
    if case == "negative-total":
        snap["segments"][1]["total_size"] = -4096
        snap["segments"][1]["blocks"] = []
    elif case == "negative-block":
        snap["segments"][1]["blocks"][0]["size"] = -8192
    elif case == "negative-request":
        snap["segments"][1]["blocks"][0]["requested_size"] = -1
    elif case == "negative-trace":
        snap["device_traces"] = [[{"action": "alloc", "addr": 1, "size": -5, "stream": 0, "time_us": 1, "frames": []}]]
    else:
        snap["segments"][1]["blocks"][0]["size"] = 8192
    path = tmp_path / f"{case}.pickle"
    path.write_bytes(pickle.dumps(snap, protocol=4))
    _one_line_refusal(run_kvprof("analyze", str(path)), message, "not a plausible memory snapshot")


def test_a_huge_memo_index_is_refused_within_the_memory_limit(tmp_path):
    """LONG_BINPUT 2**31: the unpickler grows its memo table to twice that index (32 GB);
    the reader's address-space limit turns it into one line."""
    path = tmp_path / "memo.pickle"
    path.write_bytes(b"\x80\x04N" + b"r" + (0x7FFFFFFF).to_bytes(4, "little") + b"0}.")
    _one_line_refusal(run_kvprof("analyze", str(path), timeout=60), "needs more memory than the reader allows")


@pytest.mark.slow
def test_a_slow_pickle_is_stopped_at_the_cpu_limit(monkeypatch):
    """Integers that all hash alike make each dict insertion walk every earlier key: building
    a dict of them is quadratic.  The reader's CPU limit (1 s here) stops it."""
    from kvprof.trace import torch_snapshot as T

    monkeypatch.setattr(T, "CHILD_CPU_BASE_S", 1)
    m = (1 << 61) - 1  # hash(k * m) == 0 for every k
    keys = b"".join(
        b"\x8a" + bytes([len(e)]) + e + b"N" for e in (pickle.encode_long(k * m) for k in range(1, 200_000))
    )
    data = b"\x80\x02}(" + keys + b"u."
    import time

    t0 = time.monotonic()
    with pytest.raises(BundleError, match="took longer than the reader allows"):
        loads(data, "slow.pickle")
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_odd_settings_and_frames_are_kept_as_plain_data(tmp_path):
    """allocator_settings and frames pass through to JSON and reports: a settings dict that
    contains itself, bytes keys, or a frame whose name is not a string must not break them."""
    settings = {"expandable_segments": False, b"raw": 1, "nested": {"a": [1, 2, {"b": 3}]}}
    settings["self"] = settings
    blk = {
        "size": 1 << 20,
        "state": "active_allocated",
        "requested_size": 1 << 20,
        "frames": [{"filename": "x.py", "line": 3, "name": ("not", "a", "str")}],
    }
    path = tmp_path / "odd.pickle"
    path.write_bytes(
        pickle.dumps(
            {"segments": [_seg([blk, {"size": 1 << 20, "state": "inactive"}])], "allocator_settings": settings},
            protocol=4,
        )
    )
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
        return {
            "device": dev,
            "address": addr,
            "total_size": sum(b["size"] for b in blocks),
            "stream": 0,
            "segment_type": kind,
            "segment_pool_id": pool,
            "blocks": blocks,
        }

    free = lambda n: {"size": n, "state": "inactive"}  # noqa: E731
    used = lambda n: {"size": n, "state": "active_allocated", "requested_size": n}  # noqa: E731
    oom = {"action": "oom", "addr": 0, "size": 3 * MiB, "stream": 0, "time_us": 100, "device_free": 0, "frames": []}
    small = [seg(1 << 30, "small", [used(MiB // 2), free(3 * MiB // 4), used(MiB // 4), free(3 * MiB // 4)])]
    large = [seg(1 << 31, "large", [used(4 * MiB), free(5 * MiB // 2)])]
    a = analyze_snapshot(normalize({"segments": small + large, "device_traces": [[oom]]}))
    (o,) = a.ooms
    assert not o.fragmentation_oom and o.inactive_bytes == 5 * MiB // 2
    # the same free bytes in pieces of the large pool: a fragmentation OOM
    a = analyze_snapshot(
        normalize(
            {"segments": [seg(1 << 31, "large", [free(2 * MiB), used(MiB), free(2 * MiB)])], "device_traces": [[oom]]}
        )
    )
    assert a.ooms[0].fragmentation_oom
    # a private pool's free blocks do not serve the default pool's request
    priv = [seg(1 << 32, "large", [free(4 * MiB), used(MiB), free(4 * MiB)], pool=(1, 0))]
    a = analyze_snapshot(normalize({"segments": priv + large, "device_traces": [[oom]]}))
    assert not a.ooms[0].fragmentation_oom and a.ooms[0].inactive_bytes == 5 * MiB // 2
    # device 1 allocating after device 0's OOM leaves device 0 as it was at the OOM
    other = {"action": "alloc", "addr": 1 << 33, "size": MiB, "stream": 0, "time_us": 150, "frames": []}
    a = analyze_snapshot(
        normalize({"segments": large + [seg(1 << 33, "large", [used(MiB)], dev=1)], "device_traces": [[oom], [other]]})
    )
    assert a.ooms[0].state_at == "oom"


def test_timeline_merges_devices_in_time_and_counts_requested_bytes():
    MiB = 1 << 20
    A = 1 << 28

    def seg(dev):
        return {
            "device": dev,
            "address": A,
            "total_size": 20 * MiB,
            "stream": 0,
            "segment_type": "large",
            "blocks": [{"address": A, "size": 20 * MiB, "requested_size": 20 * MiB - 3, "state": "active_allocated"}],
        }

    def ev(action, t, size=20 * MiB):
        return {"action": action, "addr": A, "size": size, "stream": 0, "time_us": t, "frames": []}

    snap = {
        "segments": [seg(0), seg(1)],
        "device_traces": [
            [ev("segment_alloc", 10), ev("alloc", 20, 20 * MiB - 3)],
            [ev("segment_alloc", 5), ev("alloc", 15, 20 * MiB - 3)],
        ],
    }
    tl = analyze_snapshot(normalize(snap)).timeline
    assert tl["t_us"] == [5, 10, 15, 20]
    assert tl["reserved"] == [20 * MiB, 40 * MiB, 40 * MiB, 40 * MiB]
    assert tl["requested"] == [0, 0, 20 * MiB - 3, 40 * MiB - 6]  # from zero: the trace's sizes are the requested ones


def test_segment_map_of_blocks_without_addresses():
    """The oldest format has no block addresses: blocks are laid out from the segment's start."""
    from kvprof.analysis.timeseries import segment_layout

    snap = normalize(
        [
            {
                "address": 1 << 30,
                "total_size": 3 << 20,
                "stream": 0,
                "segment_type": "small",
                "blocks": [{"size": 1 << 20, "state": "active_allocated"}, {"size": 2 << 20, "state": "inactive"}],
            }
        ]
    )
    (seg,) = segment_layout(snap)
    assert (
        seg["blocks"] == [[0, 1 << 20, "active_allocated"], [1 << 20, 2 << 20, "inactive"]] and seg["pool"] == "small"
    )


@pytest.mark.slow
def test_files_mistaken_for_snapshots_are_named(tmp_path):
    zipped, empty = tmp_path / "model.pt", tmp_path / "empty.pickle"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    empty.write_bytes(b"")
    for cmd in (["analyze"], ["compare", os.path.join(ROOT, "fixtures", "demo.kvprof")]):
        r = run_kvprof(*cmd, str(zipped))
        assert r.returncode == 2 and "a zip archive, as torch.save writes" in r.stderr, r.stderr
        r = run_kvprof(*cmd, str(empty))
        assert r.returncode == 2 and "(an empty file)" in r.stderr, r.stderr


def test_without_fork_the_same_snapshot_is_read_in_process(monkeypatch):
    """Where os.fork does not exist (Windows) the pickle is read in kvprof's own process (no
    isolation: README), with the same result and the same one-line refusals."""
    data = open(os.path.join(SNAPS, "assignment2-systems.pickle"), "rb").read()
    forked = analyze_snapshot(loads(data))
    monkeypatch.delattr(os, "fork")
    assert analyze_snapshot(loads(data)) == forked
    with pytest.raises(BundleError, match="refused to load this pickle: it asks to import os.system"):
        loads(b"\x80\x02cos\nsystem\n.", "evil")
    with pytest.raises(BundleError, match="a negative size"):
        loads(pickle.dumps({"segments": [_seg([], total=-1)]}, protocol=4))
