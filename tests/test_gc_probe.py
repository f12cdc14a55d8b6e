"""--probe gc: every collection of every recorded process, checked against gc.get_stats()."""

import json
import os
import sys

import pytest

from tests.conftest import WORKLOADS, analyze_json, run_kvprof

pytestmark = pytest.mark.slow  # records gc workloads, spawned pools among them (make test-quick leaves it out)


def test_collections_equal_gc_get_stats_over_the_same_span(tmp_path):
    out, truth = tmp_path / "gc.kvprof", tmp_path / "truth.json"
    r = run_kvprof(
        "record",
        "-o",
        str(out),
        "--probe",
        "gc",
        "--",
        sys.executable,
        os.path.join(WORKLOADS, "gc_cycles.py"),
        str(truth),
        "150",
    )
    assert r.returncode == 0, r.stderr
    assert "GC pauses" in r.stderr
    delta = json.loads(truth.read_text())
    r = run_kvprof(
        "analyze", str(out), "--window", "gc-begin:gc-end", "--json", str(tmp_path / "a.json"), "--width", "100"
    )
    assert r.returncode == 0, r.stderr
    a = json.loads((tmp_path / "a.json").read_text())
    gens = a["sections"]["gc"]["by_generation"]
    assert [g["collections"] for g in gens] == [d["collections"] for d in delta]
    assert [g["collected"] for g in gens] == [d["collected"] for d in delta]
    assert [g["uncollectable"] for g in gens] == [d["uncollectable"] for d in delta] == [0, 0, 0]
    m = {k: v["value"] for k, v in a["metrics"].items()}
    assert (
        m["gc.collections"] == sum(d["collections"] for d in delta)
        and m["gc.collections_gen2"] == delta[2]["collections"] >= 3
    )
    assert 0 < m["gc.pause_seconds_max"] <= m["gc.pause_seconds_total"] and 0 < m["gc.time_share"] < 1
    # the longest pauses say which marker they followed; the report shows the section
    assert all(p["after_marker"] for p in a["sections"]["gc"]["longest"])
    assert "Garbage collector" in r.stdout and "Longest pauses" in r.stdout


def test_without_the_probe_there_is_no_gc_section(tmp_path):
    out = tmp_path / "plain.kvprof"
    r = run_kvprof(
        "record",
        "-q",
        "-o",
        str(out),
        "--",
        sys.executable,
        os.path.join(WORKLOADS, "gc_cycles.py"),
        str(tmp_path / "t.json"),
        "5",
    )
    assert r.returncode == 0, r.stderr
    a = analyze_json(str(out))
    assert "gc" not in a["sections"] and not any(k.startswith("gc.") for k in a["metrics"])


def test_spawned_children_record_their_own_collections(tmp_path):
    script = tmp_path / "kids.py"
    script.write_text(
        "import gc, multiprocessing as mp\n"
        "def work(_):\n"
        "    for _ in range(3):\n"
        "        gc.collect()\n"
        "    return 0\n"
        "if __name__ == '__main__':\n"
        "    ctx = mp.get_context('spawn')\n"
        "    p = ctx.Pool(2)\n"
        "    p.map(work, range(4), chunksize=1)\n"
        "    p.close()\n"
        "    p.join()\n"
    )
    out = tmp_path / "kids.kvprof"
    r = run_kvprof("record", "-q", "-o", str(out), "--probe", "gc", "--", sys.executable, str(script))
    assert r.returncode == 0, r.stderr
    a = analyze_json(str(out))
    procs = a["sections"]["gc"]["processes"]
    children = [p for p in procs if p["role"] == "child"]
    assert len(children) >= 2  # both pool workers recorded (whichever ran the tasks)
    assert sum(p["by_generation"][2]["collections"] for p in children) >= 12, procs  # 4 tasks x 3 gc.collect()


def test_pool_workers_terminated_at_exit_keep_their_events(tmp_path):
    """`with Pool(...)` ends with terminate(): SIGTERM can land while a worker's exit hook is
    already closing the recording. The close must finish, and the worker still die of it."""
    script = tmp_path / "pool.py"
    script.write_text(
        "import gc, multiprocessing as mp\n"
        "def work(_):\n"
        "    for _ in range(3):\n"
        "        gc.collect()\n"
        "if __name__ == '__main__':\n"
        "    with mp.get_context('spawn').Pool(2) as p:\n"
        "        p.map(work, range(4), chunksize=1)\n"
    )
    for attempt in range(3):
        out = tmp_path / f"pool{attempt}.kvprof"
        r = run_kvprof("record", "-q", "-o", str(out), "--probe", "gc", "--", sys.executable, str(script))
        assert r.returncode == 0, r.stderr
        procs = json.loads((out / "manifest.json").read_text())["processes"]
        workers = [p for p in procs if "--multiprocessing-fork" in " ".join(p["argv"] or [])]
        assert workers and all(p["exited_cleanly"] for p in workers), workers
        a = analyze_json(str(out))
        pids = {p["pid"] for p in workers}
        gen2 = sum(p["by_generation"][2]["collections"] for p in a["sections"]["gc"]["processes"] if p["pid"] in pids)
        assert gen2 >= 12, a["sections"]["gc"]["processes"]
