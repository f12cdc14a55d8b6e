"""Ray on a real local cluster of three nodes (ray.cluster_utils.Cluster: three raylets on
this machine), started outside any recording as a real cluster is: a recorded driver
connects to it, and kvprof's probes start in every worker of its job on every node through
the job's runtime_env.  `make test-ray` (about a minute and a half); not in `make test`.

tests/workloads/ray_fleet.py: one engine actor pinned to each node and a victim that
ray.kill ends; each runs a kvprof.blocks.Pool engine, leaks 8 KiB a step and churns the
collector, and reports what it did; the driver passes a runtime_env of its own."""

import json
import os
import re
import subprocess
import sys
import threading

import pytest

from kvprof.trace.reader import Bundle
from tests.conftest import ROOT, WORKLOADS, run_kvprof

pytestmark = pytest.mark.ray
pytest.importorskip("ray")

FLEET = os.path.join(WORKLOADS, "ray_fleet.py")


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("KVPROF_", "RAY_"))}


@pytest.fixture(scope="module")
def cluster():
    proc = subprocess.Popen(
        [sys.executable, os.path.join(WORKLOADS, "ray_cluster.py"), "3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_clean_env(),
        cwd=ROOT,
    )
    timer = threading.Timer(180, proc.kill)  # a cluster that never comes up fails the test, not the suite
    timer.start()
    line = proc.stdout.readline()
    timer.cancel()
    if not line:
        proc.kill()
        pytest.fail("the local Ray cluster did not start")
    info = json.loads(line)
    yield info
    proc.stdin.close()
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()


def _own_dir(tmp) -> str:
    own = tmp / "own"
    own.mkdir(exist_ok=True)
    (own / "fleet_own_mod.py").write_text('VALUE = "own"\n')
    return str(own)


@pytest.fixture(scope="module")
def fleet(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    out, report = tmp / "fleet.kvprof", tmp / "report.json"
    r = run_kvprof(
        "record",
        "-o",
        str(out),
        "-p",
        "blocks,gc,tracemalloc",
        "--tracemalloc-interval",
        "0",
        "--tracemalloc-depth",
        "4",
        "--",
        sys.executable,
        FLEET,
        cluster["address"],
        str(report),
        _own_dir(tmp),
        timeout=600,
        env=_clean_env(),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return {"bundle": Bundle(str(out)), "path": out, "report": json.load(open(report)), "tmp": tmp, "stderr": r.stderr}


def _proc(b, pid):
    (p,) = [p for p in b.processes if p.pid == pid]
    return p


def test_every_worker_is_recorded_on_its_node(fleet, cluster):
    b, rep = fleet["bundle"], fleet["report"]
    actors = rep["engines"] + [rep["victim"]]
    assert {a["node_id"] for a in rep["engines"]} == set(cluster["nodes"]), "one engine on each node"
    for a in actors:
        p = _proc(b, a["pid"])
        assert p.info["ray"]["node_id"] == a["node_id"] and p.info["ray"]["role"] == "worker"
        assert p.info["host"]["hostname"] == os.uname().nodename and p.info["clock"]["wall_minus_mono_ns"]["start"]
    listed = {p["pid"]: p for p in b.manifest["processes"]}
    assert all(listed[a["pid"]]["ray"]["node_id"] == a["node_id"] for a in actors), (
        "the manifest names each process's node"
    )
    driver = _proc(b, rep["driver_pid"])
    assert (
        driver.info["role"] == "main"
        and driver.info["ray"]["role"] == "driver"
        and driver.info["ray"]["node_id"] == rep["driver_node"]
    )
    # Ray's own processes are not recorded (the cluster's daemons were started outside anyway)
    for p in b.processes:
        argv0 = str(p.info["argv"][0]) if p.info["argv"] else ""
        assert p is driver or argv0.endswith("workers/default_worker.py"), argv0


def test_counts_equal_what_each_actor_reports(fleet):
    b, rep = fleet["bundle"], fleet["report"]
    for a in rep["engines"] + [rep["victim"]]:
        p = _proc(b, a["pid"])
        c = p.counts()
        assert c["blocks"] == a["calls"], a["name"]
        assert c["marks"] == a["marks"], a["name"]
        m = p.marks()
        names = [p.string(s) for s in m["name"]]
        t0, t1 = m["t"][names.index("run_start")], m["t"][names.index("run_end")]
        gc_t = p.gc_events()["t"]
        assert ((gc_t >= t0) & (gc_t <= t1)).sum() == a["collections"] == a["gc_stats_delta"], a["name"]


def test_a_worker_killed_by_ray_keeps_its_events(fleet):
    b, victim = fleet["bundle"], fleet["report"]["victim"]
    p = _proc(b, victim["pid"])
    assert p.info["end_ns"] is None, "ray.kill left it no time to close"
    assert any(n.startswith("stage-") for n in os.listdir(p.dir)), "its events are in its staging segments"
    assert p.counts()["blocks"] == victim["calls"]


def test_the_programs_own_runtime_env_is_kept(fleet):
    for a in fleet["report"]["engines"]:
        assert a["own_var"] == "kept" and a["own_module"] == "own" and a["recording"]
        entries = a["pythonpath"].split(os.pathsep)
        assert entries[0].endswith(os.path.join("kvprof", "_hook")) and entries[1] == str(fleet["tmp"] / "own")


def test_analysis_per_engine_per_node_and_fleet(fleet, tmp_path):
    rep = fleet["report"]
    js = tmp_path / "a.json"
    r = run_kvprof("analyze", str(fleet["path"]), "--json", str(js), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Fleet" in r.stdout
    res = json.load(open(js))
    mt = {k: v["value"] for k, v in res["metrics"].items()}
    fleet_sec = res["sections"]["fleet"]
    actors = rep["engines"] + [rep["victim"]]
    engines = {e["label"].split("@")[0]: e for e in fleet_sec["engines"]}
    for a in actors:
        e = engines[a["name"]]
        assert (e["peak_blocks"], e["query_tokens"], e["hit_tokens"], e["preemptions"]) == (
            a["peak_blocks"],
            a["query_tokens"],
            a["hit_tokens"],
            a["preemptions"],
        ), a["name"]
    assert mt["fleet.nodes"] == 3 and mt["fleet.engines"] == 4
    assert mt["fleet.peak_blocks.sum"] == sum(a["peak_blocks"] for a in actors)
    assert mt["fleet.preemptions"] == sum(a["preemptions"] for a in actors)
    assert mt["fleet.prefix_cache.hit_rate"] == pytest.approx(
        sum(a["hit_tokens"] for a in actors) / sum(a["query_tokens"] for a in actors)
    )
    assert mt["fleet.peak_blocks.simultaneous"] <= mt["fleet.peak_blocks.sum"]
    by_node = {n["ray_node_id"]: n for n in fleet_sec["nodes"]}
    for node in rep["nodes"]:
        mine = [a for a in actors if a["node_id"] == node]
        assert by_node[node]["peak_blocks_sum"] == sum(a["peak_blocks"] for a in mine)
        assert by_node[node]["engines"] == len(mine)
    # the tracemalloc leak: in every engine, its line is the top suspect of its process
    leak_line = next(i for i, line in enumerate(open(FLEET), 1) if "bytearray(8192)" in line)
    suspects = res["sections"]["heap"]["leak_suspects"]
    for a in rep["engines"]:
        mine = [s for s in suspects if s["pid"] == a["pid"]]
        assert mine and re.search(rf"ray_fleet\.py:{leak_line}\b", mine[0]["site"]), (a["name"], mine[:1])
        assert 8192 <= mine[0]["growth_bytes_per_step"] < 8192 * 1.1


def test_ray_output_parts_combine_into_the_same_figures(fleet, cluster, tmp_path):
    """--ray-output DIR: the workers write there (the shared directory of a real cluster);
    combine gives back one bundle with the same processes and figures."""
    out, parts, report = tmp_path / "driver.kvprof", tmp_path / "shared" / "ray", tmp_path / "report.json"
    r = run_kvprof(
        "record",
        "-o",
        str(out),
        "--ray-output",
        str(parts),
        "-p",
        "blocks,gc",
        "--",
        sys.executable,
        FLEET,
        cluster["address"],
        str(report),
        _own_dir(tmp_path),
        timeout=600,
        env=_clean_env(),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"kvprof combine OUT.kvprof {out} {parts}" in r.stderr
    rep = json.load(open(report))
    actors = rep["engines"] + [rep["victim"]]
    assert [p.pid for p in Bundle(str(out)).processes] == [rep["driver_pid"]]
    part = Bundle(str(parts))
    assert part.manifest["status"] == "part" and {p.pid for p in part.processes} == {a["pid"] for a in actors}
    combined = tmp_path / "all.kvprof"
    r = run_kvprof("combine", str(combined), str(out), str(parts))
    assert r.returncode == 0, r.stderr
    js = tmp_path / "a.json"
    assert run_kvprof("analyze", str(combined), "--json", str(js), timeout=300).returncode == 0
    res = json.load(open(js))
    engines = {e["label"].split("@")[0]: e for e in res["sections"]["fleet"]["engines"]}
    for a in actors:
        assert (engines[a["name"]]["peak_blocks"], engines[a["name"]]["preemptions"]) == (
            a["peak_blocks"],
            a["preemptions"],
        )
    assert res["metrics"]["fleet.nodes"]["value"] == 3
