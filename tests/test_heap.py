"""--probe tracemalloc and --probe memray: planted leaks and churn found at the right line,
totals equal memray's own, children attributed, bare captures and bad input handled."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import WORKLOADS, analyze_json, metric_values, run_kvprof

pytestmark = pytest.mark.slow  # records the heap workloads under tracemalloc and memray (make test-quick leaves it out)

FAULTS = os.path.join(WORKLOADS, "heap_faults.py")


def _record(tmp_path, mode, probes, *extra, steps=40):
    out, truth = tmp_path / f"{mode}.kvprof", tmp_path / f"{mode}.json"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--probe",
        probes,
        *extra,
        "--",
        sys.executable,
        FAULTS,
        mode,
        "--steps",
        str(steps),
        "--truth",
        str(truth),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    r = run_kvprof("analyze", str(out), "--json", str(tmp_path / f"{mode}.a.json"), "--width", "120")
    assert r.returncode == 0, r.stderr
    return out, json.loads(truth.read_text()), json.loads((tmp_path / f"{mode}.a.json").read_text()), r.stdout


def test_growing_cache_is_the_top_leak_suspect_at_its_line(tmp_path):
    _, truth, a, text = _record(tmp_path, "leak", "tracemalloc")
    sec = a["sections"]["heap"]
    top = sec["leak_suspects"][0]
    assert top["stack"][0] == {"file": truth["file"], "line": truth["leak_line"], "function": "leak_step"}
    assert top["pid"] == truth["pid"] and top["source"] == "tracemalloc"
    # bytearray(8192) is 8192 + its header; the list's growth lands on the same line
    assert 8192 <= top["growth_bytes_per_step"] <= 8192 + 200
    assert top["consecutive_growth"] >= sec["k"] and top["r2"] > 0.99
    assert top["window"]["marker"] == "step" and top["window"]["snapshots"] >= 30
    assert top["live_bytes"] >= 30 * 8192
    proc = sec["processes"][0]
    assert proc["leak_suspects"][0]["site"] == top["site"]  # per process, too
    m = metric_values(a)
    assert m["heap.leak_suspects"] >= 1 and m["heap.leak_suspect_bytes_per_step"] >= 8192
    assert m["heap.peak_bytes"] >= 40 * 8192
    assert "possible leak" in text and f"heap_faults.py:{truth['leak_line']} in leak_step" in text
    assert any(f["source"] == "tracemalloc" and "leak_step" in f["title"] for f in a["findings"])


def test_clean_loop_has_no_suspects(tmp_path):
    _, _, a, text = _record(tmp_path, "clean", "tracemalloc")
    sec = a["sections"]["heap"]
    assert sec["processes"][0]["tracemalloc"]["steady_snapshots"] >= 30
    assert sec["leak_suspects"] == [] and metric_values(a)["heap.leak_suspects"] == 0
    assert "No leak suspects" in text


def test_churn_loop_tops_the_churn_list_and_counts_as_temporary(tmp_path):
    _, truth, a, text = _record(tmp_path, "churn", "memray")
    mr = a["sections"]["heap"]["processes"][0]["memray"]
    top = mr["churn"][0]
    assert top["stack"][0] == {"file": truth["file"], "line": truth["churn_line"], "function": "churn_step"}
    assert top["allocations"] == truth["churn_allocations"] == top["frees"]
    assert top["allocated_bytes"] >= truth["churn_allocations"] * 65536
    assert top["temporary"] >= 0.95 * truth["churn_allocations"]
    assert metric_values(a)["heap.temporary_allocations"] >= top["temporary"]
    assert "busiest allocation site" in text


def test_large_captures_take_churn_from_memrays_statistics(tmp_path):
    out, truth, _, _ = _record(tmp_path, "churn", "memray", steps=10)
    r = run_kvprof("analyze", str(out), "--json", "-", env={"KVPROF_MEMRAY_EXACT_RECORDS": "100"})
    assert r.returncode == 0, r.stderr
    mr = json.loads(r.stdout)["sections"]["heap"]["processes"][0]["memray"]
    assert "memray's own statistics" in mr["churn_note"]
    top = mr["churn"][0]
    assert top["stack"][0]["line"] == truth["churn_line"] and top["allocations"] == truth["churn_allocations"]
    assert top["frees"] is None and mr["frees"] is None


def test_totals_equal_memrays_own_on_the_same_capture(tmp_path):
    memray = pytest.importorskip("memray")
    out, truth, a, _ = _record(tmp_path, "leak", "memray")
    proc = a["sections"]["heap"]["processes"][0]
    capture = os.path.join(str(out), "procs", os.listdir(os.path.join(str(out), "procs"))[0], "memray.bin")
    assert proc["memray"]["file"] == capture
    # memray's own command line...
    st = tmp_path / "stats.json"
    subprocess.run(
        [sys.executable, "-m", "memray", "stats", "--json", "-f", "-o", str(st), capture],
        check=True,
        capture_output=True,
    )
    stats = json.loads(st.read_text())
    assert proc["memray"]["total_allocations"] == stats["total_num_allocations"] > 0
    assert proc["memray"]["total_allocated_bytes"] == stats["total_bytes_allocated"]
    # ...and its reader API
    reader = memray.FileReader(capture)
    assert proc["memray"]["peak_bytes"] == reader.metadata.peak_memory == stats["metadata"]["peak_memory"]
    assert (
        proc["memray"]["leaked_bytes"]
        == sum(r.size for r in reader.get_leaked_allocation_records(merge_threads=True))
        > 40 * 8192
    )
    temp = sum(r.n_allocations for r in reader.get_temporary_allocation_records(merge_threads=True, threshold=1))
    assert proc["memray"]["temporary_allocations"] == temp
    m = metric_values(a)
    assert (
        m["heap.allocations"] == stats["total_num_allocations"] and m["heap.peak_bytes"] == reader.metadata.peak_memory
    )
    assert m["heap.leaked_bytes_at_exit"] == proc["memray"]["leaked_bytes"]
    # the planted leak is the largest group left at exit with a Python stack (a pymalloc arena
    # mapped while the interpreter compiled the script has none), with its whole stack
    top = next(g for g in proc["memray"]["leaked_stacks"] if g["stack"])
    assert top["stack"][0]["line"] == truth["leak_line"] and top["stack"][0]["function"] == "leak_step"
    assert [f["function"] for f in top["stack"][:3]] == ["leak_step", "main", "<module>"]


def test_leaking_pool_workers_are_the_suspects(tmp_path):
    _, truth, a, _ = _record(tmp_path, "pool-leak", "tracemalloc", steps=60)
    sec = a["sections"]["heap"]
    children = {p["pid"] for p in sec["processes"] if p["role"] == "child"}
    assert set(truth["worker_pids"]) <= children
    sus = sec["leak_suspects"]
    assert sus, "no suspects in the workers"
    assert {s["pid"] for s in sus if s["stack"][0]["line"] == truth["leak_line"]} == set(truth["worker_pids"])
    assert all(s["role"] == "child" for s in sus[:2]) and all(s["window"]["marker"] == "task" for s in sus[:2])
    main = next(p for p in sec["processes"] if p["pid"] == truth["pid"])
    assert not any(s["stack"][0]["line"] == truth["leak_line"] for s in main["leak_suspects"])


def test_both_probes_together_and_the_manifest_cost(tmp_path):
    out, truth, a, _ = _record(
        tmp_path, "leak", "tracemalloc,memray", "--tracemalloc-depth", "4", "--tracemalloc-interval", "0"
    )
    proc = a["sections"]["heap"]["processes"][0]
    assert proc["tracemalloc"] and proc["memray"] and proc["tracemalloc"]["depth"] == 4
    assert a["sections"]["heap"]["leak_suspects"][0]["stack"][0]["line"] == truth["leak_line"]
    # memray does not see tracemalloc's (or kvprof's) own work in its lists
    assert not any("/kvprof/probes/" in f["file"] for c in proc["memray"]["churn"] for f in c["stack"])
    man = json.loads((out / "manifest.json").read_text())
    cost = man["probe_cost"]
    assert cost["tracemalloc"]["bytes_written"] > 0 and cost["tracemalloc"]["snapshot_seconds"] > 0
    assert cost["memray"]["bytes_written"] > 0
    assert man["probe_options"]["tracemalloc"] == {"depth": 4, "interval": 0.0, "every": 1}


FORKY = (
    "import multiprocessing as mp, kvprof\n"
    "keep = []\n"
    "def work(i):\n"
    "    keep.append(bytearray(100_000))\n"
    "    kvprof.mark('task', i)\n"
    "    return i\n"
    "if __name__ == '__main__':\n"
    "    with mp.get_context('fork').Pool(2) as p:\n"
    "        p.map(work, range(8), chunksize=1)\n"
    "        p.close(); p.join()\n"
)


@pytest.mark.parametrize("probe", ["memray", "tracemalloc"])
def test_forked_children_are_recorded_on_their_own(tmp_path, probe):
    script = tmp_path / "forky.py"
    script.write_text(FORKY)
    out = tmp_path / "fork.kvprof"
    r = run_kvprof("record", "-q", "-o", str(out), "--probe", probe, "--", sys.executable, str(script), timeout=300)
    assert r.returncode == 0, r.stderr
    r = run_kvprof("analyze", str(out), "--json", "-", timeout=300)
    assert r.returncode == 0, r.stderr
    a = json.loads(r.stdout)
    procs = a["sections"]["heap"]["processes"]
    kids = [p for p in procs if p["role"] == "child"]
    assert len(kids) == 2 and len(procs) == 3
    for k in kids:
        if probe == "memray":  # memray's follow_fork file, beside the parent's
            assert k["memray"]["file"].endswith(f"memray.bin.{k['pid']}") and k["memray"]["total_allocations"] > 0
        else:
            assert k["tracemalloc"]["snapshots"] >= 2
    if probe == "memray":
        main = next(p for p in procs if p["role"] == "main")
        assert main["memray"] and main["memray"]["total_allocations"] > 0


def test_bare_memray_capture_from_memray_run(tmp_path):
    pytest.importorskip("memray")
    cap = tmp_path / "run.bin"
    subprocess.run(
        [sys.executable, "-m", "memray", "run", "-q", "-o", str(cap), FAULTS, "churn", "--steps", "5"],
        check=True,
        capture_output=True,
    )
    r = run_kvprof("analyze", str(cap), "--json", str(tmp_path / "a.json"))
    assert r.returncode == 0, r.stderr
    a = json.loads((tmp_path / "a.json").read_text())
    st = tmp_path / "st.json"
    subprocess.run(
        [sys.executable, "-m", "memray", "stats", "--json", "-f", "-o", str(st), str(cap)],
        check=True,
        capture_output=True,
    )
    assert metric_values(a)["heap.allocations"] == json.loads(st.read_text())["total_num_allocations"]
    assert a["sections"]["heap"]["processes"][0]["memray"]["churn"][0]["stack"][0]["function"] == "churn_step"
    assert "memray capture" in r.stdout
    # compare takes captures like bundles: the same capture twice changes nothing
    r = run_kvprof("compare", str(cap), str(cap))
    assert r.returncode == 0, r.stderr


def test_cut_and_foreign_captures(tmp_path):
    pytest.importorskip("memray")
    cap = tmp_path / "run.bin"
    subprocess.run(
        [sys.executable, "-m", "memray", "run", "-q", "--no-compress", "-o", str(cap), FAULTS, "clean", "--steps", "2"],
        check=True,
        capture_output=True,
    )
    data = cap.read_bytes()
    # a capture cut short (its process killed): what it holds is analysed, the cut is said once.
    # memray's reader notices a cut inside a record (one at a record's end reads as a shorter
    # capture): the first of these cuts that lands inside one
    cut = tmp_path / "cut.bin"
    probe = "import memray, sys\nfor _ in memray.FileReader(sys.argv[1]).get_allocation_records(): pass\n"
    for frac in (0.5, 0.45, 0.55, 0.4, 0.6, 0.35, 0.3):
        cut.write_bytes(data[: int(len(data) * frac)])
        if "ERROR" in subprocess.run([sys.executable, "-c", probe, str(cut)], capture_output=True, text=True).stderr:
            break
    else:
        pytest.fail("no cut inside a record")
    r = run_kvprof("analyze", str(cut), "--json", str(tmp_path / "cut.json"))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    a = json.loads((tmp_path / "cut.json").read_text())
    assert 0 < metric_values(a)["heap.allocations"] < analyze_json(str(cap))["metrics"]["heap.allocations"]["value"]
    assert any("memray capture incomplete" in f["title"] for f in a["findings"])
    # not a capture at all: one line, non-zero
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"memray" + b"\xff" * 64)
    r = run_kvprof("analyze", str(bad))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(bad) in r.stderr, r.stderr


def test_hostile_process_record_cannot_point_out_of_the_bundle(tmp_path):
    """A process.json whose memray file points out of the bundle: the capture there, a real one
    that analyze would read if it followed the path, is not read (nor is /etc/passwd)."""
    out, _, before, _ = _record(tmp_path, "clean", "memray", steps=3)
    pdir = out / "procs" / os.listdir(out / "procs")[0]
    (proc,) = before["sections"]["heap"]["processes"]  # untouched: the capture inside the bundle is read
    assert proc["memray"]["file"] == str(pdir / "memray.bin") and proc["memray"]["total_allocations"] > 0
    outside = tmp_path / "outside.bin"
    os.replace(pdir / "memray.bin", outside)
    info = json.loads((pdir / "process.json").read_text())
    for hostile in (os.path.relpath(outside, pdir), str(outside), "../../../../../../etc/passwd"):
        info["probes"]["memray"]["file"] = hostile
        (pdir / "process.json").write_text(json.dumps(info))
        r = run_kvprof("analyze", str(out), "--json", "-")
        assert r.returncode == 0, r.stderr
        a = json.loads(r.stdout)
        assert "heap" not in a["sections"], (hostile, a["sections"]["heap"])
        assert str(outside) not in r.stdout and "/etc/passwd" not in r.stdout, hostile


def test_bad_options_are_one_line(tmp_path):
    for opt in (["--tracemalloc-depth", "0"], ["--tracemalloc-interval", "-1"], ["--tracemalloc-every", "0"]):
        r = run_kvprof(
            "record", "-o", str(tmp_path / "x.kvprof"), "-p", "tracemalloc", *opt, "--", sys.executable, "-c", "pass"
        )
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_tracemalloc_peak_leaves_out_kvprofs_own_snapshot_work(tmp_path):
    """200,000 strings held steady (about 14 MB): the peak is the program's, not the
    program's plus what each snapshot allocates while it aggregates the traces."""
    script = tmp_path / "steady.py"
    script.write_text(
        "import kvprof\nkeep = [str(i) * 3 for i in range(200_000)]\nfor i in range(5):\n    kvprof.mark('step', i)\n"
    )
    out = tmp_path / "s.kvprof"
    assert (
        run_kvprof(
            "record",
            "-q",
            "-o",
            str(out),
            "--probe",
            "tracemalloc",
            "--tracemalloc-interval",
            "0",
            "--",
            sys.executable,
            str(script),
        ).returncode
        == 0
    )
    heap = analyze_json(out)["sections"]["heap"]
    (tm,) = [p["tracemalloc"] for p in heap["processes"] if p.get("tracemalloc")]
    live = max(v for _, v in tm["series"])
    assert live <= tm["peak_bytes"] <= 1.05 * live, (tm["peak_bytes"], live)


def test_marker_values_beyond_int64_keep_the_heap_stream(tmp_path):
    script = tmp_path / "big.py"
    script.write_text(
        "import kvprof\nkeep = []\nfor i in range(6):\n    keep.append(bytearray(10_000))\n    kvprof.mark('step', 2**70 + i)\n"
    )
    out = tmp_path / "b.kvprof"
    assert (
        run_kvprof(
            "record", "-q", "-o", str(out), "--probe", "tracemalloc,gc", "--", sys.executable, str(script)
        ).returncode
        == 0
    )
    doc = analyze_json(out)
    (tm,) = [p["tracemalloc"] for p in doc["sections"]["heap"]["processes"] if p.get("tracemalloc")]
    assert tm["snapshots"] >= 7 and doc["sections"]["markers"]["step"]["count"] == 6


def test_gc_advice_sees_a_freeze_made_by_the_program(tmp_path):
    script = tmp_path / "frozen.py"
    script.write_text(
        "import gc, time\nkeep = [[i] for i in range(300_000)]\ngc.freeze()\nt = time.time()\n"
        "while time.time() - t < 1.0:\n    gc.collect()\n"
    )
    out = tmp_path / "f.kvprof"
    assert (
        run_kvprof("record", "-q", "-o", str(out), "--probe", "gc", "--", sys.executable, str(script)).returncode == 0
    )
    gcs = analyze_json(out)["sections"]["gc"]
    (p,) = gcs["processes"]
    assert p["frozen"] >= 300_000
    assert not any("gc.freeze()" in a["advice"] for a in gcs["advice"]), gcs["advice"]


def test_a_grandchilds_memray_capture_is_its_own(tmp_path):
    pytest.importorskip("memray")
    script = tmp_path / "gfork.py"
    script.write_text(
        "import os\nkeep = []\npid = os.fork()\nif pid == 0:\n    gp = os.fork()\n    if gp == 0:\n"
        "        keep.extend(bytearray(30000) for _ in range(20))\n        os._exit(0)\n    os.waitpid(gp, 0)\n    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    out = tmp_path / "g.kvprof"
    assert (
        run_kvprof("record", "-q", "-o", str(out), "--probe", "memray", "--", sys.executable, str(script)).returncode
        == 0
    )
    heap = analyze_json(out)["sections"]["heap"]
    procs = heap["processes"]
    assert len(procs) == 3, heap["notes"]
    grand = max(procs, key=lambda p: p["pid"])
    assert grand["memray"] and grand["memray"]["total_allocated_bytes"] >= 20 * 30000, grand
    # no capture written into by a descendant (memray's reader errors, or the parent's capture unreadable)
    assert heap["notes"] == [] and all(p["memray"]["reader_errors"] == 0 for p in procs), heap


def test_memrays_fork_hook_runs_before_kvprofs(tmp_path):
    """In a forked child, memray must move the inherited tracker onto the child's own file
    before kvprof's fork hook starts the child's writer thread: until then the tracker writes
    into the parent's capture, which memray maps shared (1 run in 5 of the test above lost
    the parent's capture).  Python runs fork hooks in the order they were registered."""
    pytest.importorskip("memray")
    script = tmp_path / "order.py"
    script.write_text(
        "import sys, json\nfrom kvprof.probes import heap\nprint(json.dumps(heap._memray.get('imported_first')))\n"
    )
    out = tmp_path / "o.kvprof"
    r = run_kvprof("record", "-q", "-o", str(out), "--probe", "memray", "--", sys.executable, str(script))
    assert r.returncode == 0 and r.stdout.strip() == "true", (r.stdout, r.stderr)
    (proc,) = json.loads((out / "manifest.json").read_text())["processes"]
    assert "fork_order" not in proc["probes"]["memray"], proc


LONG_FORKS = (
    "import os, time\nkeep = []\nkids = []\n"
    "def churn(s):\n    t = time.time()\n    while time.time() - t < s:\n        keep.append(bytearray(20000)); keep[:] = keep[-50:]\n"
    "for i in range(3):\n    pid = os.fork()\n    if pid == 0:\n        churn(0.5)\n        os._exit(0)\n    kids.append(pid)\n"
    "churn(0.5)\nfor p in kids:\n    os.waitpid(p, 0)\n"
)


def test_children_that_keep_allocating_leave_the_parents_capture_whole(tmp_path):
    """The case README's old "known limit" described: forked children that run and allocate
    for a while.  Every capture, the parent's included, reads without an error (before the
    fork hooks were ordered, 2 of 12 runs lost the parent's)."""
    pytest.importorskip("memray")
    script = tmp_path / "long.py"
    script.write_text(LONG_FORKS)
    out = tmp_path / "long.kvprof"
    assert (
        run_kvprof("record", "-q", "-o", str(out), "--probe", "memray", "--", sys.executable, str(script)).returncode
        == 0
    )
    heap = analyze_json(out)["sections"]["heap"]
    assert len(heap["processes"]) == 4 and heap["notes"] == [], heap["notes"]
    for p in heap["processes"]:
        assert p["memray"]["reader_errors"] == 0 and p["memray"]["total_allocated_bytes"] > 10 * 20000, p


def test_an_aggregated_memray_capture_is_named(tmp_path):
    pytest.importorskip("memray")
    script = tmp_path / "w.py"
    script.write_text("keep = [bytearray(1000) for _ in range(100)]\n")
    cap = tmp_path / "agg.bin"
    subprocess.run(
        [sys.executable, "-m", "memray", "run", "-q", "--aggregate", "-o", str(cap), str(script)],
        check=True,
        capture_output=True,
    )
    r = run_kvprof("analyze", str(cap))
    assert r.returncode == 2 and "an aggregated memray capture (memray run --aggregate)" in r.stderr, r.stderr


needs_cc = pytest.mark.skipif(
    not __import__("shutil").which(os.environ.get("CC", "cc")), reason="no C compiler for the native library"
)


@needs_cc
def test_native_leak_grows_across_markers_in_memrays_capture(tmp_path):
    """A C library that mallocs 8 KiB a step and never frees it: from memray's capture alone
    (live bytes by stack replayed up to each marker), the top leak suspect, at its native frame."""
    _, truth, a, text = _record(tmp_path, "native-leak", "memray", "--memray-native")
    sec = a["sections"]["heap"]
    mr = sec["processes"][0]["memray"]
    assert mr["growth"] == {"markers": 40, "marker": "step", "steady_snapshots": 32} and mr["growth_note"] is None
    top = sec["leak_suspects"][0]
    assert top["source"] == "memray" and top["pid"] == truth["pid"]
    assert top["stack"][0]["function"] == "kvprof_native_leak" and top["stack"][0]["file"].endswith("kvprof_native.c")
    assert top["growth_bytes_per_step"] == 8192 and top["r2"] > 0.99 and top["consecutive_growth"] >= sec["k"]
    assert top["live_bytes"] == 40 * 8192 and top["live_blocks"] == 40 and top["window"]["marker"] == "step"
    assert any(
        f["function"] == "leak_step" or f["function"] == "main" for f in top["stack"]
    )  # the Python frames behind it
    assert len(sec["leak_suspects"]) == 1  # the malloc-and-free of the same library is not one
    m = metric_values(a)
    assert m["heap.leak_suspects"] == 1 and m["heap.leak_suspect_bytes_per_step"] == 8192
    assert "possible leak" in text and "kvprof_native_leak" in text
    assert any(f["source"] == "memray" and "kvprof_native_leak" in f["title"] for f in a["findings"])


@needs_cc
def test_clean_native_loop_has_no_memray_suspects(tmp_path):
    _, _, a, _ = _record(tmp_path, "native-clean", "memray", "--memray-native")
    sec = a["sections"]["heap"]
    assert sec["processes"][0]["memray"]["growth"]["steady_snapshots"] == 32
    assert sec["leak_suspects"] == []
    m = metric_values(a)
    assert m["heap.leak_suspects"] == 0 and m["heap.leak_suspect_bytes_per_step"] == 0


def test_python_leak_grows_in_memrays_capture_at_its_line(tmp_path):
    """Without native frames memray's Python stacks place the growing cache at its line (a
    bytearray(8192) is one malloc of 8,193 bytes), as tracemalloc does."""
    _, truth, a, _ = _record(tmp_path, "leak", "memray")
    top = a["sections"]["heap"]["leak_suspects"][0]
    assert (
        top["source"] == "memray"
        and top["stack"][0]["line"] == truth["leak_line"]
        and top["stack"][0]["function"] == "leak_step"
    )
    assert top["growth_bytes_per_step"] == 8193 and top["r2"] > 0.99


def test_memray_growth_needs_markers(tmp_path):
    """A capture without kvprof markers (a bare file, or a program that never marks) has no
    growth analysis and says so; its leak-suspect metrics stay unknown, not 0."""
    out, truth = tmp_path / "nomark.kvprof", tmp_path / "t.json"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--probe",
        "memray",
        "--",
        sys.executable,
        "-c",
        "x = [bytearray(9000) for _ in range(50)]",
    )
    assert r.returncode == 0, r.stderr
    r = run_kvprof("analyze", str(out), "--json", str(truth))
    assert r.returncode == 0, r.stderr
    a = json.loads(truth.read_text())
    mr = a["sections"]["heap"]["processes"][0]["memray"]
    assert mr["growth"] is None and "no kvprof.mark" in mr["growth_note"]
    assert metric_values(a)["heap.leak_suspects"] is None
